"""Uploading an hour of audio must not make the server hold it in memory."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.fixtures.audio import make_mp3
from tests.fixtures.server import Server
from transcription.settings import GatewaySettings

MAX_GROWTH_KIB = 30 * 1024


def status_kib(pid: int, field: str) -> int:
    """A ``/proc/<pid>/status`` memory figure (VmRSS, VmHWM, …) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == field:
            return int(value.split()[0])
    raise KeyError(field)


def reset_peak(pid: int) -> None:
    """Make VmHWM start again from the current RSS (Linux ≥ 4.0)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@pytest.mark.slow
def test_hour_long_upload_grows_server_memory_by_at_most_30_mib(
    start_server: Callable[..., Server], tmp_path: Path, mp3_5s: Path
) -> None:
    """A 60-minute, 128 kb/s stereo mp3 (~58 MB, more than the bound, so buffering it would
    show) is accepted with its real length while the server's peak RSS rises ≤ 30 MiB."""
    hour = tmp_path / "hour.mp3"
    make_mp3(hour, 3600, bitrate=128_000, sample_rate=44_100, channels=2)
    size = hour.stat().st_size
    assert MAX_GROWTH_KIB * 1024 < size < GatewaySettings.model_fields["max_upload_bytes"].default
    server = start_server()
    with httpx.Client(base_url=server.base_url, timeout=300) as client:
        # Warm-up: the model is loaded (/readyz) and one small job has gone all the way through.
        warm = {"Authorization": f"Bearer {server.create_code()}"}
        tone = {"file": (mp3_5s.name, mp3_5s.read_bytes(), "audio/mpeg")}
        first = client.post("/v1/transcriptions", headers=warm, files=tone)
        assert first.status_code == 202, first.text
        while first.json()["status"] not in ("succeeded", "failed"):
            time.sleep(0.1)
            first = client.get(f"/v1/transcriptions/{first.json()['id']}", headers=warm)
        assert first.json()["status"] == "succeeded", first.text

        auth = {"Authorization": f"Bearer {server.create_code(seconds=3700)}"}
        reset_peak(server.pid)
        baseline = status_kib(server.pid, "VmRSS")
        with hour.open("rb") as audio:
            response = client.post(
                "/v1/transcriptions",
                headers=auth,
                files={"file": ("hour.mp3", audio, "audio/mpeg")},
            )
        # The worker takes the job as soon as it is stored and decodes the whole hour into
        # memory (~100 MiB/s here); no setting keeps it from starting, so read the peak at once.
        peak = status_kib(server.pid, "VmHWM")
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["audio_seconds"] == pytest.approx(3600, abs=1)
    assert job["reserved_seconds"] == math.ceil(job["audio_seconds"])
    growth = peak - baseline
    assert growth <= MAX_GROWTH_KIB, f"{size / 1e6:.1f} MB upload: RSS {baseline} → {peak} KiB"
