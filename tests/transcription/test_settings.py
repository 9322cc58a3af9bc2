"""Settings: the cluster shape refuses the per-data-directory defaults that pods cannot share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from transcription.settings import CoreSettings, GatewaySettings, OperatorSettings

SHARED = {
    "database_url": "postgresql://whisper@db/whisper",
    "blob_url": "gs://whisper-test/prod",
    "code_secret": "a-long-random-key",
}
VARIABLES = {"database_url": "DATABASE_URL", "blob_url": "WHISPER_BLOB_URL",
             "code_secret": "WHISPER_CODE_SECRET"}  # fmt: skip


@pytest.fixture(autouse=True)
def _no_inherited_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DATABASE_URL", "WHISPER_DATABASE_URL", "WHISPER_BLOB_URL",
                 "WHISPER_CODE_SECRET", "WHISPER_RUNNER"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)


def operator(**values: Any) -> OperatorSettings:
    return OperatorSettings(**values)


def cluster_gateway(**values: Any) -> GatewaySettings:
    return GatewaySettings(runner="kubernetes", **values)


@pytest.mark.parametrize("build", [operator, cluster_gateway])
@pytest.mark.parametrize("unset", sorted(SHARED))
@pytest.mark.parametrize("empty", [False, True])
def test_the_cluster_shape_refuses_to_start_without_shared_state(
    build: Any, unset: str, empty: bool
) -> None:
    values = {k: v for k, v in SHARED.items() if k != unset} | ({unset: ""} if empty else {})
    with pytest.raises(ValidationError, match=VARIABLES[unset]) as raised:
        build(**values)
    assert "share no data directory" in str(raised.value)
    build(**SHARED)


def test_the_variables_the_chart_sets_satisfy_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", SHARED["database_url"])
    monkeypatch.setenv("WHISPER_BLOB_URL", SHARED["blob_url"])
    monkeypatch.setenv("WHISPER_CODE_SECRET", SHARED["code_secret"])
    monkeypatch.setenv("WHISPER_RUNNER", "kubernetes")
    assert GatewaySettings().code_key() == OperatorSettings().code_key() == b"a-long-random-key"


def test_the_embedded_shape_and_the_migration_keep_their_defaults(tmp_path: Path) -> None:
    gateway = GatewaySettings(data_dir=tmp_path)
    assert gateway.resolved_database_url().startswith("sqlite:///")
    assert len(gateway.code_key()) == 64, "generated once into the data directory"
    assert CoreSettings(data_dir=tmp_path).resolved_database_url() == (
        gateway.resolved_database_url()
    )
