"""Waiting without polling, against real ``whisperctl serve`` processes: ``?wait=N`` answers when
the job finishes or after N seconds, the events stream shows progress and the end, fifty waiters
hold no threads, and a job another process finishes is noticed."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures.server import Server, running_server, stalled_server
from tests.speech import repeated_speech
from transcription.blobstore import open_blob_store
from transcription.lifecycle import Lifecycle
from transcription.settings import GatewaySettings

#: Slack for a busy machine (two cores shared with other tests) on top of the re-read interval.
SLACK = 3.0


def auth(code: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {code}"}


def upload(server: Server, code: str, audio: Path) -> dict[str, Any]:
    response = httpx.post(
        server.base_url + "/v1/transcriptions",
        headers=auth(code),
        files={"file": (audio.name, audio.read_bytes(), "audio/mpeg")},
        timeout=60,
    )
    assert response.status_code == 202, response.text
    job: dict[str, Any] = response.json()
    return job


def events(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """The events of a stream as ``{"id", "event", "data"}`` (data parsed), as they arrive."""
    fields: dict[str, str] = {}
    for line in response.iter_lines():
        if line:
            name, _, value = line.partition(": ")
            fields[name] = value
        elif "data" in fields:
            yield {
                "id": int(fields["id"]),
                "event": fields["event"],
                "data": json.loads(fields["data"]),
            }
            fields = {}
        else:
            fields = {}


@pytest.fixture(scope="module")
def stalled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with stalled_server(tmp_path_factory.mktemp("waiting") / "data") as server:
        yield server


@pytest.fixture(scope="module")
def code(stalled: Server, mp3_5s: Path) -> str:
    """A code whose first job holds the only worker, so every later one stays queued."""
    code = stalled.create_code(seconds=3600, max_uses=100)
    first = upload(stalled, code, mp3_5s)["id"]
    url = f"{stalled.base_url}/v1/transcriptions/{first}/events"
    with httpx.stream("GET", url, headers=auth(code), timeout=30) as response:
        assert next(e for e in events(response) if e["event"] != "queued")["event"] == "running"
    return code


@pytest.fixture
def queued(stalled: Server, code: str, mp3_5s: Path) -> str:
    job = upload(stalled, code, mp3_5s)
    assert job["status"] == "queued", job
    return str(job["id"])


def test_wait_answers_after_n_seconds_with_the_unfinished_job(
    stalled: Server, code: str, queued: str
) -> None:
    url = f"{stalled.base_url}/v1/transcriptions/{queued}"
    started = time.monotonic()
    waited = httpx.get(url, params={"wait": 2}, headers=auth(code), timeout=30)
    took = time.monotonic() - started
    assert waited.status_code == 200, waited.text
    assert 2 <= took < 2 + SLACK, took
    assert waited.json() == httpx.get(url, headers=auth(code)).json()
    assert waited.json()["status"] == "queued"


@pytest.mark.parametrize("wait", ["0", "-1", "60.5", "61", "soon"])
def test_a_wait_out_of_range_is_refused_naming_wait(
    stalled: Server, code: str, queued: str, wait: str
) -> None:
    response = httpx.get(
        f"{stalled.base_url}/v1/transcriptions/{queued}", params={"wait": wait}, headers=auth(code)
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"], error["type"]) == (
        "wait",
        "invalid_request",
        "invalid_request_error",
    )
    assert error["message"].startswith("wait: ")


def test_another_codes_job_answers_like_an_unknown_id(
    stalled: Server, code: str, queued: str
) -> None:
    other = stalled.create_code()
    unknown = "tr_0000000000000000"
    for tail, params in (("", {"wait": "5"}), ("/events", {})):
        answers = [
            httpx.get(
                f"{stalled.base_url}/v1/transcriptions/{job_id}{tail}",
                params=params,
                headers=auth(other),
                timeout=10,
            )
            for job_id in (queued, unknown)
        ]
        assert [a.status_code for a in answers] == [404, 404], answers[0].text
        assert answers[0].text.replace(queued, unknown) == answers[1].text
    anonymous = httpx.get(f"{stalled.base_url}/v1/transcriptions/{queued}/events", timeout=10)
    assert anonymous.status_code == 401


def test_fifty_waiters_hold_no_threads(stalled: Server, code: str, queued: str) -> None:
    """Fifty ``?wait=`` requests and fifty event streams wait at once (more than the 40 worker
    threads the server has), and other requests are still answered at once."""
    url = f"{stalled.base_url}/v1/transcriptions/{queued}"
    wait_seconds = 12.0

    async def scenario() -> tuple[list[float], list[httpx.Response]]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(headers=auth(code), timeout=60, limits=limits) as client:
            waits = [
                asyncio.create_task(client.get(url, params={"wait": wait_seconds}))
                for _ in range(50)
            ]
            streams = [client.stream("GET", url + "/events") for _ in range(50)]
            opened = await asyncio.gather(*(s.__aenter__() for s in streams))
            for response in opened:
                assert response.status_code == 200
                first = await anext(response.aiter_lines())
                assert first.startswith("retry:")
            answered = []
            for path in ("/v1/credits", f"/v1/transcriptions/{queued}", "/healthz") * 3:
                started = time.monotonic()
                response = await client.get(stalled.base_url + path)
                answered.append(time.monotonic() - started)
                assert response.status_code == 200, response.text
            assert not any(w.done() for w in waits), "a waiter answered before its time"
            for stream in streams:
                await stream.__aexit__(None, None, None)
            return answered, await asyncio.gather(*waits)

    started = time.monotonic()
    answered, waited = asyncio.run(scenario())
    assert max(answered) < 1.0, answered
    assert all(r.status_code == 200 and r.json()["status"] == "queued" for r in waited)
    assert wait_seconds <= time.monotonic() - started < wait_seconds + 2 * SLACK


def test_a_job_finished_by_another_process_is_noticed(
    stalled: Server, code: str, queued: str
) -> None:
    """The test process cancels the job through its own Lifecycle on the server's database: no
    notification reaches the server, which sees it at its next re-read."""
    url = f"{stalled.base_url}/v1/transcriptions/{queued}"
    waited: list[tuple[float, httpx.Response]] = []

    def wait() -> None:
        response = httpx.get(url, params={"wait": 60}, headers=auth(code), timeout=90)
        waited.append((time.monotonic(), response))

    waiter = threading.Thread(target=wait)
    with httpx.stream("GET", url + "/events", headers=auth(code), timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        stream = events(response)
        first = next(stream)
        assert (first["id"], first["event"], first["data"]["status"]) == (1, "queued", "queued")
        waiter.start()
        settings = GatewaySettings(data_dir=stalled.data_dir)
        with stalled.database() as db:
            cancelled = Lifecycle(db, open_blob_store(settings.resolved_blob_url())).cancel(queued)
        assert cancelled is not None
        at = time.monotonic()
        last = next(stream)
        seen_after = time.monotonic() - at
        assert (last["id"], last["event"]) == (2, "cancelled")
        assert last["data"] == httpx.get(url, headers=auth(code)).json()
        assert list(stream) == [], "the stream went on after the final state"
    waiter.join(60)
    assert seen_after < SLACK, seen_after
    ((returned, answer),) = waited
    assert answer.status_code == 200 and answer.json()["status"] == "cancelled"
    assert returned - at < SLACK


@pytest.fixture(scope="module")
def transcribing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server that transcribes with the bundled tiny.en, writing progress at every step, in
    one-minute batches so a job's progress moves mid-job."""
    env = {"WHISPER_BATCH_SIZE": "2", "WHISPER_PROGRESS_INTERVAL": "0"}
    with running_server(tmp_path_factory.mktemp("transcribing") / "data", env=env) as server:
        yield server


@pytest.mark.slow
def test_the_stream_shows_progress_then_the_result_and_wait_returns_as_it_ends(
    transcribing: Server, tmp_path: Path
) -> None:
    audio = tmp_path / "two-minutes.mp3"
    repeated_speech(audio, 3)
    code = transcribing.create_code()
    job = upload(transcribing, code, audio)
    url = f"{transcribing.base_url}/v1/transcriptions/{job['id']}"
    waited: list[tuple[float, float, httpx.Response]] = []

    def wait() -> None:
        started = time.monotonic()
        response = httpx.get(url, params={"wait": 60}, headers=auth(code), timeout=90)
        waited.append((started, time.monotonic(), response))

    waiter = threading.Thread(target=wait)
    waiter.start()
    received = []
    with httpx.stream("GET", url + "/events", headers=auth(code), timeout=120) as response:
        for event in events(response):
            received.append((time.monotonic(), event))
    waiter.join(90)
    ended_at, final = received[-1]

    names = [e["event"] for _, e in received]
    assert [e["id"] for _, e in received] == list(range(1, len(received) + 1))
    assert names[0] in ("queued", "running") and names[-1] == "succeeded", names
    assert set(names[1:-1]) <= {"running", "progress"}, names
    progress = [e["data"]["progress"] for _, e in received if e["data"]["status"] == "running"]
    assert progress == sorted(progress), progress
    assert any(0 < p < 1 for p in progress), f"no progress mid-job: {names}, {progress}"
    assert final["data"] == httpx.get(url, headers=auth(code)).json()
    assert final["data"]["text"], final

    ((started, returned, answer),) = waited
    assert answer.status_code == 200 and answer.json() == final["data"]
    assert returned - started < 55, "?wait= did not return when the job finished"
    assert abs(returned - ended_at) < SLACK, (returned, ended_at)
