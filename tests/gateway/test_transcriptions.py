"""The user journey over HTTP: submit, follow, download, list, cancel, delete, retry safely."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from gateway.runners import LocalJobRunner
from tests.fixtures.audio import make_mp3
from tests.fixtures.gateway import (
    BlockingEngine,
    FailingEngine,
    FixedEngine,
    MakeClient,
    audit,
    auth,
    credits,
    decoded_seconds,
    eventually,
    get_job,
    issue_code,
    services,
    stop,
    submit,
    wait_for_job,
)
from tests.wer import normalise, wer
from transcriber.engines.local import LocalEngine
from transcription.db.models import Job
from transcription.errors import TranscriptionFailed
from transcription.transcript import FORMATS

DATA = Path(__file__).parents[1] / "data"
SPEECH = DATA / "speech.mp3"
REFERENCE = (DATA / "speech.txt").read_text()
MAX_WER = 0.15

Cue = tuple[float, float, str]
TIMING = re.compile(r"^(\d\d):(\d\d):(\d\d)[,.](\d{3}) --> (\d\d):(\d\d):(\d\d)[,.](\d{3})$")


def _seconds(parts: tuple[str, ...]) -> float:
    hours, minutes, seconds, millis = (int(p) for p in parts)
    return hours * 3600 + minutes * 60 + seconds + millis / 1000


def parse_cues(body: str, fmt: str) -> list[Cue]:
    """The (start, end, text) cues of an SRT or WebVTT document, failing on any malformed block."""
    blocks = body.strip().split("\n\n")
    if fmt == "vtt":
        assert blocks[0] == "WEBVTT", body
        blocks = blocks[1:]
    cues = []
    for number, block in enumerate(blocks, start=1):
        lines = block.split("\n")
        if fmt == "srt":
            assert lines[0] == str(number), block
            lines = lines[1:]
        timing = TIMING.match(lines[0])
        assert timing is not None, block
        groups = timing.groups()
        cues.append((_seconds(groups[:4]), _seconds(groups[4:]), " ".join(lines[1:])))
    return cues


def json_cues(body: str) -> list[Cue]:
    return [(s["start"], s["end"], s["text"]) for s in json.loads(body)["segments"]]


def assert_timeline(cues: list[Cue], duration: float) -> None:
    starts = [start for start, _, _ in cues]
    assert starts == sorted(set(starts)), cues
    assert all(0 <= start < end <= duration + 0.5 for start, end, _ in cues), cues


def download(client: Any, code: str, job_id: str, fmt: str) -> Any:
    return client.get(f"/v1/transcriptions/{job_id}/transcript.{fmt}", headers=auth(code))


@pytest.fixture(params=["sqlite+directory", "postgresql+gcs"])
def backend(request: pytest.FixtureRequest) -> dict[str, str]:
    """The embedded shape, and the cluster's stores (PostgreSQL and the GCS emulator)."""
    if request.param == "sqlite+directory":
        return {}
    return {
        "db_url": request.getfixturevalue("pg_url"),
        "blob_url": request.getfixturevalue("gcs_bucket_url"),
    }


@pytest.mark.slow
def test_speech_is_transcribed_accurately_and_charged_its_length(
    backend: dict[str, str], make_client: MakeClient, local_engine: LocalEngine
) -> None:
    client = make_client(engine=local_engine, **backend)
    issued = issue_code(client)

    response = submit(client, issued.code, SPEECH, filename="speech.mp3")
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/transcriptions/{job['id']}"
    assert job["status"] in ("queued", "running")
    assert (job["engine"], job["model"], job["mode"]) == ("local", "tiny.en", "fast")
    seconds = decoded_seconds(SPEECH)
    assert job["audio_seconds"] == pytest.approx(seconds, abs=0.01)
    assert job["reserved_seconds"] == math.ceil(seconds)

    done = wait_for_job(client, issued.code, job["id"])
    assert done["status"] == "succeeded", done
    assert done["progress"] == 1
    assert done["error"] is None
    assert wer(REFERENCE, done["text"]) <= MAX_WER, done["text"]
    assert done["charged_seconds"] == math.ceil(seconds)

    txt = download(client, issued.code, job["id"], "txt")
    assert txt.status_code == 200
    assert txt.headers["content-type"].startswith("text/plain")
    assert 'filename="speech.txt"' in txt.headers["content-disposition"]
    assert wer(REFERENCE, txt.text) <= MAX_WER, txt.text
    renderings = {
        "srt": parse_cues(download(client, issued.code, job["id"], "srt").text, "srt"),
        "vtt": parse_cues(download(client, issued.code, job["id"], "vtt").text, "vtt"),
        "json": json_cues(download(client, issued.code, job["id"], "json").text),
    }
    for fmt, cues in renderings.items():
        assert normalise(" ".join(text for _, _, text in cues)) == normalise(txt.text), fmt
        assert_timeline(cues, seconds)
        assert len(cues) == done["transcript"]["segment_count"], fmt
    assert renderings["srt"] == renderings["vtt"]
    json_times = [t for start, end, _ in renderings["json"] for t in (start, end)]
    srt_times = [t for start, end, _ in renderings["srt"] for t in (start, end)]
    assert json_times == pytest.approx(srt_times, abs=0.001)

    balance = credits(client, issued.code)
    assert balance["spent_seconds"] == math.ceil(seconds)
    assert balance["reserved_seconds"] == 0
    assert balance["remaining_seconds"] == 3600 - math.ceil(seconds)
    assert (balance["uses"], balance["state"]) == (1, "exhausted")
    # Only the transcripts are kept: the uploaded audio goes once the job is done.
    assert services(client).blobs.list(f"jobs/{job['id']}") == sorted(
        f"jobs/{job['id']}/transcript.{fmt}" for fmt in FORMATS
    )
    assert client.get("/readyz").status_code == 200
    assert local_engine.loads == 1


def test_transcript_is_not_ready_while_the_job_is_queued_or_running(
    make_client: MakeClient, mp3_5s: Path
) -> None:
    engine = BlockingEngine()
    client = make_client(engine=engine)
    issued = issue_code(client, max_uses=2)
    running = submit(client, issued.code, mp3_5s).json()
    engine.wait_started()
    queued = submit(client, issued.code, mp3_5s).json()

    def halfway() -> dict[str, Any] | None:
        job = get_job(client, issued.code, running["id"])
        return job if job["progress"] > 0 else None

    job = eventually(halfway, what="progress being reported")
    assert job["status"] == "running"
    assert job["progress"] == pytest.approx(0.5, abs=0.01)
    assert get_job(client, issued.code, queued["id"])["status"] == "queued"
    for job_id, status in ((running["id"], "running"), (queued["id"], "queued")):
        for fmt in FORMATS:
            response = download(client, issued.code, job_id, fmt)
            assert response.status_code == 409, response.text
            assert response.json()["error"]["code"] == "transcript_not_ready"
            assert status in response.json()["error"]["message"]

    engine.release()
    for job_id in (running["id"], queued["id"]):
        assert wait_for_job(client, issued.code, job_id)["status"] == "succeeded"
        response = download(client, issued.code, job_id, "txt")
        assert response.status_code == 200
        assert response.text.strip() == " ".join(FixedEngine.words)


def test_list_is_newest_first_paginated_and_filtered_by_status(
    make_client: MakeClient, mp3_5s: Path
) -> None:
    engine = BlockingEngine()
    client = make_client(engine=engine)
    issued = issue_code(client, max_uses=3)
    ids = [submit(client, issued.code, mp3_5s).json()["id"] for _ in range(3)]
    engine.wait_started()

    def listed(**params: Any) -> dict[str, Any]:
        response = client.get("/v1/transcriptions", params=params, headers=auth(issued.code))
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    first = listed(limit=2)
    assert [j["id"] for j in first["data"]] == [ids[2], ids[1]]
    assert (first["object"], first["has_more"]) == ("list", True)
    rest = listed(limit=2, after=ids[1])
    assert [j["id"] for j in rest["data"]] == [ids[0]]
    assert rest["has_more"] is False
    assert [j["id"] for j in listed(status="queued")["data"]] == [ids[2], ids[1]]
    assert [j["id"] for j in listed(status="running")["data"]] == [ids[0]]
    assert listed(status="succeeded")["data"] == []
    bad_cursor = client.get(
        "/v1/transcriptions", params={"after": "tr_nope"}, headers=auth(issued.code)
    )
    assert bad_cursor.status_code == 400
    assert bad_cursor.json()["error"]["param"] == "after"

    engine.release()
    for job_id in ids:
        wait_for_job(client, issued.code, job_id)
    assert [j["id"] for j in listed(status="succeeded")["data"]] == ids[::-1]


def test_a_job_is_invisible_to_every_other_code(make_client: MakeClient, mp3_5s: Path) -> None:
    client = make_client()
    owner, other = issue_code(client), issue_code(client)
    job_id = submit(client, owner.code, mp3_5s).json()["id"]
    wait_for_job(client, owner.code, job_id)

    for method, path in (
        ("GET", f"/v1/transcriptions/{job_id}"),
        ("GET", f"/v1/transcriptions/{job_id}/transcript.txt"),
        ("DELETE", f"/v1/transcriptions/{job_id}"),
    ):
        response = client.request(method, path, headers=auth(other.code))
        assert response.status_code == 404, (method, path, response.text)
        assert response.json()["error"]["code"] == "not_found"
    assert client.get("/v1/transcriptions", headers=auth(other.code)).json()["data"] == []
    assert get_job(client, owner.code, job_id)["deleted"] is False
    assert download(client, owner.code, job_id, "txt").status_code == 200


def test_another_codes_job_as_a_cursor_answers_as_an_unknown_id(
    make_client: MakeClient, mp3_5s: Path
) -> None:
    """``?after=`` tells nothing about someone else's job: its ID answers exactly as an ID that
    never existed does, while the code's own ID pages on."""
    client = make_client()
    owner, other = issue_code(client), issue_code(client)
    mine = submit(client, owner.code, mp3_5s).json()["id"]
    theirs = submit(client, other.code, mp3_5s).json()["id"]
    unknown = "tr_" + "0" * 16

    def page(after: str) -> Any:
        return client.get("/v1/transcriptions", params={"after": after}, headers=auth(owner.code))

    foreign, missing = page(theirs), page(unknown)
    assert (foreign.status_code, missing.status_code) == (400, 400)
    assert foreign.json() == json.loads(missing.text.replace(unknown, theirs))
    assert foreign.json()["error"]["param"] == "after"
    own = page(mine)
    assert (own.status_code, own.json()["data"]) == (200, [])


def test_cancelling_refunds_a_queued_job_and_charges_a_running_one_what_it_transcribed(
    db_url: str, make_client: MakeClient, mp3_5s: Path
) -> None:
    engine = BlockingEngine()  # holds the running job at half its audio
    client = make_client(engine=engine, db_url=db_url)
    issued = issue_code(client, seconds=60, max_uses=3)
    running = submit(client, issued.code, mp3_5s).json()
    engine.wait_started()
    queued = submit(client, issued.code, mp3_5s).json()
    assert (
        credits(client, issued.code)["reserved_seconds"],
        credits(client, issued.code)["uses"],
    ) == (12, 2)
    halfway = eventually(
        lambda: (job := get_job(client, issued.code, running["id"]))["progress"] > 0 and job,
        what="progress being reported",
    )
    transcribed = halfway["progress"] * halfway["audio_seconds"]

    # The queued one first, or the freed worker could start it.
    response = client.delete(f"/v1/transcriptions/{queued['id']}", headers=auth(issued.code))
    assert response.status_code == 200, response.text
    assert (response.json()["status"], response.json()["charged_seconds"]) == ("cancelled", 0)
    response = client.delete(f"/v1/transcriptions/{running['id']}", headers=auth(issued.code))
    assert response.status_code == 200, response.text
    cancelled = response.json()
    assert cancelled["status"] == "cancelled"
    assert cancelled["charged_seconds"] == math.ceil(transcribed - 1e-3) == 3
    assert (cancelled["text"], cancelled["transcript"]) == (None, None)
    # The queued job's use came back; the running one's stays spent.
    balance = credits(client, issued.code)
    assert (balance["reserved_seconds"], balance["spent_seconds"], balance["uses"]) == (0, 3, 1)
    assert (balance["remaining_seconds"], balance["state"]) == (57, "active")

    # The running worker stops at its next progress write; the queued job never starts.
    eventually(lambda: services(client).blobs.list("jobs") == [], what="the audio being deleted")
    engine.release()
    again = submit(client, issued.code, mp3_5s)
    assert again.status_code == 202, again.text
    assert wait_for_job(client, issued.code, again.json()["id"])["status"] == "succeeded"
    assert len(engine.calls) == 2
    for job in (running, queued):
        assert get_job(client, issued.code, job["id"])["status"] == "cancelled"
        response = download(client, issued.code, job["id"], "txt")
        assert response.status_code == 409
        assert "cancelled" in response.json()["error"]["message"]
    jobs = audit(services(client).db)
    assert [jobs[j["id"]].charged_seconds for j in (queued, running)] == [0, 3]
    assert credits(client, issued.code)["uses"] == 2


def test_deleting_a_finished_job_removes_its_transcripts_but_not_its_charge(
    make_client: MakeClient, mp3_5s: Path
) -> None:
    client = make_client()
    issued = issue_code(client)
    job_id = submit(client, issued.code, mp3_5s).json()["id"]
    wait_for_job(client, issued.code, job_id)
    assert download(client, issued.code, job_id, "txt").status_code == 200
    assert len(services(client).blobs.list(f"jobs/{job_id}")) == len(FORMATS)

    response = client.delete(f"/v1/transcriptions/{job_id}", headers=auth(issued.code))
    assert response.status_code == 200, response.text
    assert (response.json()["status"], response.json()["deleted"]) == ("succeeded", True)
    assert client.get(f"/v1/transcriptions/{job_id}", headers=auth(issued.code)).status_code == 404
    for fmt in FORMATS:
        assert download(client, issued.code, job_id, fmt).status_code == 404
    assert client.get("/v1/transcriptions", headers=auth(issued.code)).json()["data"] == []
    assert services(client).blobs.list(f"jobs/{job_id}") == []
    assert credits(client, issued.code)["spent_seconds"] == 6
    again = client.delete(f"/v1/transcriptions/{job_id}", headers=auth(issued.code))
    assert again.status_code == 404


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (
            TranscriptionFailed("The engine could not make sense of the audio."),
            "transcription_failed",
            "The engine could not make sense of the audio.",
        ),
        (RuntimeError("segfault-ish"), "internal_error", "refunded"),
    ],
)
def test_a_failed_transcription_is_refunded_in_full_and_gives_the_use_back(
    db_url: str,
    make_client: MakeClient,
    mp3_5s: Path,
    error: Exception,
    code: str,
    message: str,
) -> None:
    client = make_client(engine=FailingEngine(error), db_url=db_url)
    issued = issue_code(client, seconds=60)
    job_id = submit(client, issued.code, mp3_5s).json()["id"]

    job = wait_for_job(client, issued.code, job_id)
    assert job["status"] == "failed"
    assert job["error"]["code"] == code
    assert message in job["error"]["message"]
    assert job["charged_seconds"] == 0
    balance = credits(client, issued.code)
    assert (balance["reserved_seconds"], balance["spent_seconds"], balance["uses"]) == (0, 0, 0)
    assert (balance["remaining_seconds"], balance["state"]) == (60, "active")
    response = download(client, issued.code, job_id, "txt")
    assert response.status_code == 409
    assert "failed" in response.json()["error"]["message"]
    assert services(client).blobs.list("jobs") == []
    # The single use was given back, so the code pays for another try.
    assert submit(client, issued.code, mp3_5s).status_code == 202


def test_an_idempotency_key_replays_the_same_job_and_charges_once(
    db_url: str, make_client: MakeClient, mp3_5s: Path, tmp_path: Path
) -> None:
    client = make_client(db_url=db_url)
    issued = issue_code(client, max_uses=2)
    key = {"Idempotency-Key": "upload-2024-06-01"}

    first = submit(client, issued.code, mp3_5s, headers=key)
    assert first.status_code == 202, first.text
    replay = submit(client, issued.code, mp3_5s, headers=key)
    assert replay.status_code == 202, replay.text
    assert replay.json()["id"] == first.json()["id"]
    assert replay.headers["idempotent-replayed"] == "true"
    wait_for_job(client, issued.code, first.json()["id"])
    later = submit(client, issued.code, mp3_5s, headers=key)
    assert (later.json()["id"], later.json()["status"]) == (first.json()["id"], "succeeded")
    balance = credits(client, issued.code)
    assert (balance["uses"], balance["spent_seconds"], balance["reserved_seconds"]) == (1, 6, 0)

    other_file = tmp_path / "other.mp3"
    make_mp3(other_file, 3)
    for audio, data in ((other_file, {}), (mp3_5s, {"mode": "accurate"})):
        reused = submit(client, issued.code, audio, data=data, headers=key)
        assert reused.status_code == 422, reused.text
        assert reused.json()["error"]["code"] == "idempotency_key_reused"
    listed = client.get("/v1/transcriptions", headers=auth(issued.code)).json()["data"]
    assert [j["id"] for j in listed] == [first.json()["id"]]
    assert credits(client, issued.code)["uses"] == 1

    # Keys belong to a code: the same key from another code is a new request.
    stranger = issue_code(client)
    theirs = submit(client, stranger.code, mp3_5s, headers=key)
    assert theirs.status_code == 202, theirs.text
    assert theirs.json()["id"] != first.json()["id"]


def test_mode_language_and_prompt_reach_the_engine_and_are_shown_on_the_job(
    make_client: MakeClient, mp3_5s: Path
) -> None:
    engine = FixedEngine()
    client = make_client(engine=engine)
    issued = issue_code(client, max_uses=2)
    options = {"mode": "accurate", "language": "en", "prompt": "Trains, rain and coffee."}

    accurate = submit(client, issued.code, mp3_5s, data=options).json()
    assert (accurate["mode"], accurate["language"], accurate["prompt"]) == (
        "accurate",
        "en",
        "Trains, rain and coffee.",
    )
    default = submit(client, issued.code, mp3_5s).json()
    assert (default["mode"], default["language"], default["prompt"]) == ("fast", None, None)
    assert wait_for_job(client, issued.code, accurate["id"])["mode"] == "accurate"
    assert wait_for_job(client, issued.code, default["id"])["mode"] == "fast"
    calls = [(c["mode"], c["language"], c["prompt"]) for c in engine.calls]
    assert calls == [("accurate", "en", "Trains, rain and coffee."), ("fast", None, None)]


def test_word_timing_can_be_declined_per_job(make_client: MakeClient, mp3_5s: Path) -> None:
    engine = FixedEngine()
    client = make_client(engine=engine)
    issued = issue_code(client, max_uses=2)
    refused = submit(client, issued.code, mp3_5s, data={"word_timestamps": "sometimes"})
    assert (refused.status_code, refused.json()["error"]["param"]) == (400, "word_timestamps")
    declined = submit(client, issued.code, mp3_5s, data={"word_timestamps": "false"}).json()
    default = submit(client, issued.code, mp3_5s).json()
    assert (declined["word_timestamps"], default["word_timestamps"]) == (False, True)
    wait_for_job(client, issued.code, declined["id"])
    wait_for_job(client, issued.code, default["id"])
    assert [c["word_timestamps"] for c in engine.calls] == [False, True]


@pytest.fixture(params=["sqlite-exclusive", "postgresql-leases"])
def restart(request: pytest.FixtureRequest) -> dict[str, Any]:
    """How a restarted app finds the jobs its predecessor left running: alone on its SQLite
    data directory (``whisperctl serve`` holds its lock) it takes them back at once, however
    long their leases; sharing PostgreSQL it waits for their leases to expire."""
    if request.param == "sqlite-exclusive":
        return {"exclusive": True, "lease_seconds": 3600}
    return {"db_url": request.getfixturevalue("pg_url"), "lease_seconds": 1}


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_jobs_left_by_a_stopped_app_are_finished_by_the_next_and_charged_once(
    restart: dict[str, Any], make_client: MakeClient, mp3_5s: Path
) -> None:
    blocking = BlockingEngine()
    first_app = make_client(engine=blocking, **restart)
    issued = issue_code(first_app, max_uses=2)
    running = submit(first_app, issued.code, mp3_5s).json()
    blocking.wait_started()
    queued = submit(first_app, issued.code, mp3_5s).json()
    # The app stops taking jobs, then its worker dies mid-job without recording anything, as
    # in a crash: the job stays running, its lease no longer renewed, the other one queued.
    runner = services(first_app).runner
    assert isinstance(runner, LocalJobRunner)
    runner.stop(timeout=0.1)
    blocking.abandon()
    stop(first_app)
    with services(first_app).db.read() as session:
        left = {job.id: job for job in session.scalars(select(Job))}
    assert (left[running["id"]].status, left[queued["id"]].status) == ("running", "queued")
    assert left[running["id"]].lease_owner is not None

    engine = FixedEngine()
    second_app = make_client(engine=engine, **restart)
    for job in (running, queued):
        done = wait_for_job(second_app, issued.code, job["id"])
        assert (done["status"], done["charged_seconds"]) == ("succeeded", 6)
    assert len(engine.calls) == 2
    balance = credits(second_app, issued.code)
    assert (balance["spent_seconds"], balance["reserved_seconds"], balance["uses"]) == (12, 0, 2)
    jobs = audit(services(second_app).db)
    assert (jobs[running["id"]].attempts, jobs[queued["id"]].attempts) == (2, 1)
