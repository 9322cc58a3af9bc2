"""A job's files: one key layout, the records a run leaves, and who deletes what when.

Every final transition removes the job's work prefix (audio, checkpoints, progress, result
record); a succeeded job keeps its transcripts until the user deletes it, any other loses them.
The lifecycle tests run on both databases and on both blob stores (a directory and the GCS
emulator)."""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from tests.transcription.test_ledger import counters, issue, new_job, submit_job
from tests.transcription.test_lifecycle import run_result
from transcription import jobfiles
from transcription.blobstore import BlobStore, LocalBlobStore, open_blob_store
from transcription.db.models import Job, utcnow
from transcription.db.session import Database
from transcription.jobfiles import JobFiles, RunError, RunRequest, RunResult
from transcription.lifecycle import Lifecycle, submit
from transcription.states import JobStatus, Mode
from transcription.transcript import FORMATS


@pytest.fixture(params=["local", "gcs"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    if request.param == "local":
        return LocalBlobStore(tmp_path / "blobs")
    return open_blob_store(request.getfixturevalue("gcs_bucket_url"))


def transcript_keys(job_id: str) -> list[str]:
    return sorted(jobfiles.transcript_key(job_id, fmt) for fmt in FORMATS)


def leave_run_files(blobs: BlobStore, job: Job) -> None:
    """Everything a run leaves for ``job``: its audio, a checkpoint, progress, the result record
    and the transcripts."""
    files = JobFiles(blobs)
    blobs.put_bytes(job.audio_key, b"ID3 audio")
    blobs.put_bytes(f"{jobfiles.checkpoint_prefix(job.id)}/00000.json", b"{}")
    files.write_progress(job.id, 0.5, job.audio_seconds / 2)
    files.write_result(run_result(job.id, job.audio_seconds))
    for key in transcript_keys(job.id):
        blobs.put_bytes(key, b"Hello and welcome to the show.")


# --- the layout and the records -------------------------------------------------------------


def test_everything_but_the_transcripts_lives_under_the_work_prefix() -> None:
    work = jobfiles.work_prefix("tr_1") + "/"
    assert work == "jobs/tr_1/work/"
    for key in (
        jobfiles.audio_key("tr_1"),
        jobfiles.checkpoint_prefix("tr_1") + "/00000.json",
        jobfiles.progress_key("tr_1"),
        jobfiles.result_key("tr_1"),
    ):
        assert key.startswith(work), key
    for fmt in FORMATS:
        key = jobfiles.transcript_key("tr_1", fmt)
        assert key == f"jobs/tr_1/transcript.{fmt}"
        assert not key.startswith(work)
    assert not jobfiles.audio_key("tr_1").startswith(jobfiles.work_prefix("tr_10"))


def test_a_run_request_travels_in_the_environment(db: Database) -> None:
    """The operator puts the request in the Job's environment; the pod reads it back whole."""
    code_id = issue(db, 100).record.id
    new = new_job(code_id, 12.5)
    with db.transaction() as session:
        job = submit(
            session,
            replace(
                new,
                language="de",
                prompt="Grüße, Ärzte",
                mode="accurate",
                temperature=0.2,
                word_timestamps=False,
            ),
        )
    request = RunRequest.of(job)
    assert request == RunRequest(
        job_id=job.id,
        audio_key=jobfiles.audio_key(job.id),
        audio_seconds=12.5,
        mode=Mode.ACCURATE,
        language="de",
        prompt="Grüße, Ärzte",
        temperature=0.2,
        word_timestamps=False,
    )
    env = request.env()
    assert env == {
        "WHISPER_JOB_ID": job.id,
        "WHISPER_JOB_AUDIO_KEY": jobfiles.audio_key(job.id),
        "WHISPER_JOB_AUDIO_SECONDS": "12.5",
        "WHISPER_JOB_MODE": "accurate",
        "WHISPER_JOB_LANGUAGE": "de",
        "WHISPER_JOB_PROMPT": "Grüße, Ärzte",
        "WHISPER_JOB_TEMPERATURE": "0.2",
        "WHISPER_JOB_WORD_TIMESTAMPS": "False",
    }
    assert RunRequest.from_env({**env, "UNRELATED": "x"}) == request


def test_unset_request_fields_stay_out_of_the_environment() -> None:
    request = RunRequest(job_id="tr_1", audio_key="jobs/tr_1/work/audio.mp3", audio_seconds=3)
    env = request.env()
    assert set(env) == {
        "WHISPER_JOB_ID",
        "WHISPER_JOB_AUDIO_KEY",
        "WHISPER_JOB_AUDIO_SECONDS",
        "WHISPER_JOB_MODE",
        "WHISPER_JOB_WORD_TIMESTAMPS",
    }
    assert RunRequest.from_env(env) == request
    # A transcriber image older than word_timestamps ignores the variable; a newer one reading
    # an older Job's environment times words.
    del env["WHISPER_JOB_WORD_TIMESTAMPS"]
    assert RunRequest.from_env(env).word_timestamps is True
    assert RunRequest.from_env(env).mode is Mode.FAST


def test_progress_and_result_records_round_trip(store: BlobStore) -> None:
    files = JobFiles(store)
    assert files.read_progress("tr_1") is None
    assert files.read_result("tr_1") is None

    files.write_progress("tr_1", 1.7, -3)
    progress = files.read_progress("tr_1")
    assert progress is not None and (progress.fraction, progress.seconds_done) == (1.0, 0.0)
    files.write_progress("tr_1", 0.25, 15.5)
    progress = files.read_progress("tr_1")
    assert progress is not None and (progress.fraction, progress.seconds_done) == (0.25, 15.5)
    assert utcnow() - progress.updated_at < timedelta(minutes=1)

    result = run_result("tr_1", 61.5)
    files.write_result(result)
    assert files.read_result("tr_1") == result
    rejected = RunResult(
        job_id="tr_1",
        outcome="rejected",
        error=RunError(code="audio_undecodable", message="No audio."),
    )
    files.write_result(rejected)
    assert files.read_result("tr_1") == rejected
    assert store.list("jobs/tr_1") == [jobfiles.progress_key("tr_1"), jobfiles.result_key("tr_1")]


@pytest.mark.parametrize(
    "data",
    [b'{"fraction": 0.5, "seconds_do', b"not json", b'{"version": 2, "job_id": "tr_1"}', b""],
)
def test_an_unreadable_record_reads_as_absent(
    tmp_path: Path, data: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """A record cut short by a crash (or from a newer writer) is not trusted: it reads as
    absent, so the writer writes it again."""
    blobs = LocalBlobStore(tmp_path)
    blobs.put_bytes(jobfiles.progress_key("tr_1"), data)
    blobs.put_bytes(jobfiles.result_key("tr_1"), data)
    files = JobFiles(blobs)
    with caplog.at_level(logging.WARNING):
        assert files.read_progress("tr_1") is None
        assert files.read_result("tr_1") is None
    assert "unreadable record" in caplog.text


def test_tidy_is_safe_to_repeat_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blobs = LocalBlobStore(tmp_path)
    files = JobFiles(blobs)
    blobs.put_bytes(jobfiles.audio_key("tr_1"), b"audio")
    blobs.put_bytes(jobfiles.transcript_key("tr_1", "txt"), b"text")
    blobs.put_bytes(jobfiles.audio_key("tr_2"), b"another job's audio")
    for _ in range(2):
        files.tidy("tr_1", transcripts=False)
    assert blobs.list("") == [jobfiles.transcript_key("tr_1", "txt"), jobfiles.audio_key("tr_2")]
    files.tidy("tr_1", transcripts=True)
    assert blobs.list("") == [jobfiles.audio_key("tr_2")]

    class Unreachable(LocalBlobStore):
        def delete_prefix(self, prefix: str) -> int:
            raise OSError("the bucket is unreachable")

    with caplog.at_level(logging.WARNING):
        JobFiles(Unreachable(tmp_path)).tidy("tr_2", transcripts=True)
    assert "could not remove the files of job tr_2" in caplog.text
    assert blobs.list("") == [jobfiles.audio_key("tr_2")]


# --- who deletes what -----------------------------------------------------------------------


def test_finishing_removes_the_work_files_and_keeps_the_transcripts(
    db: Database, store: BlobStore
) -> None:
    lifecycle = Lifecycle(db, store)
    job = submit_job(db, issue(db, 100).record.id, 30)
    lifecycle.start(job.id)
    leave_run_files(store, job)
    assert jobfiles.audio_key(job.id) in store.list(jobfiles.work_prefix(job.id))

    assert lifecycle.finish(job.id, run_result(job.id, 30)) is not None
    assert store.list(f"jobs/{job.id}") == transcript_keys(job.id)

    # Cancelling or failing a finished job does nothing, to money or to files.
    assert lifecycle.cancel(job.id) is None
    assert lifecycle.fail(job.id, code="x", message="late") is None
    lifecycle.discard_leftovers(job.id)
    assert store.list(f"jobs/{job.id}") == transcript_keys(job.id)

    lifecycle.mark_deleted(job.id)
    assert store.list(f"jobs/{job.id}") == []


@pytest.mark.parametrize("how", ["fail", "cancel queued", "cancel running", "worker lost"])
def test_a_job_that_did_not_succeed_leaves_no_files(
    db: Database, store: BlobStore, how: str
) -> None:
    lifecycle = Lifecycle(db, store)
    code_id = issue(db, 100).record.id
    job = submit_job(db, code_id, 30)
    if how != "cancel queued":
        lifecycle.start(job.id, lease_owner="worker-a", lease_seconds=30)
    leave_run_files(store, job)

    if how == "fail":
        assert lifecycle.fail(job.id, code="engine_error", message="It broke.") is not None
    elif how == "worker lost":
        assert lifecycle.expire_leases(1, now=utcnow() + timedelta(minutes=1)) == []
    else:
        assert lifecycle.cancel(job.id) is not None
    assert store.list(f"jobs/{job.id}") == []
    assert lifecycle.get(job.id).status in (JobStatus.FAILED, JobStatus.CANCELLED)
    counters(db, code_id)


def test_a_requeued_job_keeps_its_audio_and_checkpoints(db: Database, store: BlobStore) -> None:
    """A lost worker's job runs again: what it needs, and what it already did, stays."""
    lifecycle = Lifecycle(db, store)
    job = submit_job(db, issue(db, 100).record.id, 30)
    lifecycle.start(job.id, lease_owner="worker-a", lease_seconds=30)
    leave_run_files(store, job)
    before = store.list(f"jobs/{job.id}")
    assert lifecycle.expire_leases(3, now=utcnow() + timedelta(minutes=1)) == [job.id]
    assert store.list(f"jobs/{job.id}") == before


def test_late_files_of_a_job_that_did_not_succeed_are_discarded(
    db: Database, store: BlobStore
) -> None:
    """A run that outlived its job's cancellation wrote transcripts nobody will get: the worker
    discards them. Leftovers of a job still running or succeeded are not touched."""
    lifecycle = Lifecycle(db, store)
    code_id = issue(db, 100, max_uses=3).record.id
    cancelled, running, succeeded = (submit_job(db, code_id, 30) for _ in range(3))
    for job in (cancelled, running, succeeded):
        lifecycle.start(job.id)
    lifecycle.cancel(cancelled.id)
    lifecycle.finish(succeeded.id, run_result(succeeded.id, 30))
    for job in (cancelled, running, succeeded):
        leave_run_files(store, job)
        lifecycle.discard_leftovers(job.id)

    assert store.list(f"jobs/{cancelled.id}") == []
    assert len(store.list(f"jobs/{running.id}")) == 4 + len(FORMATS)
    assert set(transcript_keys(succeeded.id)) <= set(store.list(f"jobs/{succeeded.id}"))


def test_audio_stored_under_the_old_layout_goes_too(db: Database, tmp_path: Path) -> None:
    """Jobs submitted before the work prefix existed kept their audio at jobs/<id>/audio.mp3."""
    blobs = LocalBlobStore(tmp_path / "blobs")
    lifecycle = Lifecycle(db, blobs)
    code_id = issue(db, 100, max_uses=2).record.id
    for end in ("finish", "fail"):
        new = new_job(code_id, 30)
        legacy = f"jobs/{new.job_id}/audio.mp3"
        with db.transaction() as session:
            job = submit(session, replace(new, audio_key=legacy))
        blobs.put_bytes(legacy, b"ID3 audio")
        if end == "finish":
            lifecycle.finish(job.id, run_result(job.id, 30))
        else:
            lifecycle.fail(job.id, code="engine_error", message="It broke.")
        assert not blobs.exists(legacy)
