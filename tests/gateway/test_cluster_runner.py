"""The cluster shape's gateway (``WHISPER_RUNNER=kubernetes``) as a real ``whisperctl serve``:
its Kubernetes calls run off the event loop with a timeout, so an API server that never answers
or refuses connections costs one quick, refunded 503, and nothing else waits for it."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.fixtures.server import Server, free_port
from tests.operator.emulator import running_emulator
from transcription import resources

TIMEOUT = 1.5
HEALTHZ_WITHIN = 0.1
CREDITS_WITHIN = 0.5


@contextmanager
def silent_api_server() -> Iterator[str]:
    """An address that accepts connections and never says a word, like a hung API server."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for sock in [*held, listener]:
            sock.close()


@contextmanager
def dropping_api_server() -> Iterator[str]:
    """An address whose connections never complete, like a firewalled or vanished API server:
    a listener with a backlog of one that one connection already fills."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    filler = socket.create_connection(listener.getsockname())
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        filler.close()
        listener.close()


@contextmanager
def refusing_api_server() -> Iterator[str]:
    """An address where nothing listens: every connection is refused."""
    yield f"http://127.0.0.1:{free_port()}"


def kubeconfig(path: Path, url: str) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": url}}],
                "users": [{"name": "u", "user": {"token": "gateway"}}],
                "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "c",
            }
        )
    )
    return path


def cluster_env(tmp_path: Path, api_url: str) -> dict[str, str]:
    """What the chart gives the gateway, with a SQLite file and a blob folder standing in for
    PostgreSQL and the bucket (one gateway process here shares them with nobody)."""
    return {
        "WHISPER_RUNNER": "kubernetes",
        "WHISPER_KUBERNETES_NAMESPACE": "default",
        "WHISPER_KUBERNETES_TIMEOUT": str(TIMEOUT),
        "KUBECONFIG": str(kubeconfig(tmp_path / "kubeconfig", api_url)),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'cluster.db'}",
        "WHISPER_BLOB_URL": (tmp_path / "blobs").as_uri(),
        "WHISPER_CODE_SECRET": "cluster-runner-test-secret",
    }


def upload(server: Server, code: str, audio: Path, key: str) -> httpx.Response:
    return httpx.post(
        server.base_url + "/v1/transcriptions",
        headers={"Authorization": f"Bearer {code}", "Idempotency-Key": key},
        files={"file": ("talk.mp3", audio.read_bytes(), "audio/mpeg")},
        timeout=60,
    )


def timed_get(client: httpx.Client, url: str, **kwargs: Any) -> float:
    started = time.monotonic()
    response = client.get(url, **kwargs)
    assert response.status_code == 200, response.text
    return time.monotonic() - started


@pytest.mark.parametrize(
    "api_server", [silent_api_server, dropping_api_server, refusing_api_server]
)
def test_an_unusable_api_server_costs_a_quick_refunded_503_and_stalls_nothing(
    api_server: Any, start_server: Any, tmp_path: Path, mp3_5s: Path
) -> None:
    with api_server() as url:
        server: Server = start_server(env=cluster_env(tmp_path, url))
        code = server.create_code(seconds=600)
        owner = {"Authorization": f"Bearer {code}"}
        healthz, credits = [], []
        with ThreadPoolExecutor(1) as pool, httpx.Client(base_url=server.base_url) as client:
            started = time.monotonic()
            pending = pool.submit(upload, server, code, mp3_5s, "retry-me")
            # Other requests while the upload waits on the API server: none waits with it.
            while not pending.done():
                healthz.append(timed_get(client, "/healthz"))
                credits.append(timed_get(client, "/v1/credits", headers=owner))
                time.sleep(0.02)
            response = pending.result()
            elapsed = time.monotonic() - started

            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "cluster_unavailable"
            assert response.headers["Retry-After"] == "30"
            assert elapsed < TIMEOUT + 3.0
            assert max(healthz) < HEALTHZ_WITHIN, healthz
            assert max(credits) < CREDITS_WITHIN, credits

            # Refunded in full, the use given back; the job is there, cancelled.
            balance = client.get("/v1/credits", headers=owner).json()
            assert (balance["remaining_seconds"], balance["uses"]) == (600, 0)
            (job,) = client.get("/v1/transcriptions", headers=owner).json()["data"]
            assert (job["status"], job["charged_seconds"]) == ("cancelled", 0)

            # The same Idempotency-Key tries again rather than replaying the cancelled job.
            again = upload(server, code, mp3_5s, "retry-me")
            assert again.status_code == 503, again.text
            assert "Idempotent-Replayed" not in again.headers
    print(f"503 after {elapsed:.2f} s; /healthz at most {max(healthz) * 1000:.1f} ms")


def test_a_working_api_server_gets_the_transcription_job(
    start_server: Any, tmp_path: Path, mp3_5s: Path
) -> None:
    """The same gateway against the emulated cluster: 202, and the TranscriptionJob exists."""
    with running_emulator() as emulator:
        server: Server = start_server(env=cluster_env(tmp_path, emulator.url))
        code = server.create_code(seconds=600)
        response = upload(server, code, mp3_5s, "first")
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        key = (resources.GROUP, resources.VERSION, resources.TJ_PLURAL)
        tj = emulator.store.get(key, "default", resources.resource_name(job_id))
        assert tj["spec"]["jobId"] == job_id
        assert response.json()["status"] == "queued"
