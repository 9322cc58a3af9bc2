"""The pipeline: a job's audio from the blob store through an engine to transcripts and a
``RunResult``. It touches no database, finishes nothing and deletes nothing, so running it twice
is harmless; the lifecycle finishes the job from its result.

The engines here are scripted (what they say and when is the point of each test); the real
engines have their own tests, and ``test_job.py`` runs the real local engine end to end."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import pytest

from tests.transcription.test_ledger import counters, issue, submit_job
from transcriber.engines.base import Checkpoints, ProgressCallback
from transcriber.engines.local import LocalEngine
from transcriber.pipeline import RUNNING_PROGRESS_CAP, AudioMissing, JobCancelled, Pipeline
from transcription import jobfiles
from transcription.blobstore import BlobStore, LocalBlobStore, open_blob_store
from transcription.db.session import Database
from transcription.errors import EngineUnavailable, TranscriptionFailed, UsesExhausted
from transcription.jobfiles import JobFiles, RunRequest
from transcription.lifecycle import Lifecycle
from transcription.states import CreditState, JobStatus, Mode
from transcription.transcript import FORMATS, Segment, TranscriptResult, render

SPEECH = Path(__file__).parents[1] / "data" / "speech.mp3"

Sink = Callable[[float, float], bool]


class ScriptedEngine:
    """Reports progress at ``steps`` (seconds of audio), calling ``during(seconds)`` at each
    one, then returns a two-segment transcript lasting ``duration`` seconds."""

    name = "local"
    model = "scripted-tiny.en"

    def __init__(
        self,
        duration: float,
        steps: tuple[float, ...] = (),
        during: Callable[[float], None] | None = None,
        error: Exception | None = None,
    ) -> None:
        self.duration = duration
        self.steps = steps
        self.during = during
        self.error = error
        self.calls: list[dict[str, object]] = []

    def transcribe(
        self,
        audio: Path,
        *,
        language: str | None = None,
        prompt: str | None = None,
        mode: Mode = Mode.FAST,
        on_progress: ProgressCallback | None = None,
        checkpoints: Checkpoints | None = None,
        temperature: float | None = None,
        word_timestamps: bool = True,
    ) -> TranscriptResult:
        self.calls.append(
            {"audio": audio.read_bytes(), "language": language, "prompt": prompt, "mode": mode}
        )
        for seconds in self.steps:
            if self.during is not None:
                self.during(seconds)
            if on_progress is not None:
                on_progress(seconds)
        if self.error is not None:
            raise self.error
        half = self.duration / 2
        return TranscriptResult(
            segments=[
                Segment(id=0, start=0.0, end=half, text="Hello and welcome"),
                Segment(id=1, start=half, end=self.duration, text="to the show."),
            ],
            language=language or "en",
            duration=self.duration,
            model=self.model,
            mode=mode,
        )


class ResumableScriptedEngine(ScriptedEngine):
    """Saves one checkpoint per run, as the OpenAI engine does per chunk."""

    resumable: Literal[True] = True

    def transcribe(
        self,
        audio: Path,
        *,
        language: str | None = None,
        prompt: str | None = None,
        mode: Mode = Mode.FAST,
        on_progress: ProgressCallback | None = None,
        checkpoints: Checkpoints | None = None,
        temperature: float | None = None,
        word_timestamps: bool = True,
    ) -> TranscriptResult:
        assert checkpoints is not None
        previous = checkpoints.load("00000.json")
        checkpoints.save("00000.json", b'{"runs": %d}' % (1 if previous is None else 2))
        return super().transcribe(
            audio, language=language, prompt=prompt, mode=mode, on_progress=on_progress
        )


@pytest.fixture(params=["local", "gcs"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    if request.param == "local":
        return LocalBlobStore(tmp_path / "blobs")
    return open_blob_store(request.getfixturevalue("gcs_bucket_url"))


@pytest.fixture
def blobs(tmp_path: Path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "blobs")


def request_for(job_id: str = "tr_pipeline", seconds: float = 40.0, **fields: object) -> RunRequest:
    return RunRequest.model_validate(
        {
            "job_id": job_id,
            "audio_key": jobfiles.audio_key(job_id),
            "audio_seconds": seconds,
            **fields,
        }
    )


def upload(blobs: BlobStore, request: RunRequest, data: bytes = b"ID3 not really audio") -> None:
    blobs.put_bytes(request.audio_key, data)


class Reports:
    """A progress sink that records every report and answers ``answer``."""

    def __init__(self, answer: bool = True) -> None:
        self.calls: list[tuple[float, float]] = []
        self.answer = answer

    def __call__(self, fraction: float, seconds_done: float) -> bool:
        self.calls.append((fraction, seconds_done))
        return self.answer


def transcript_keys(job_id: str) -> list[str]:
    return sorted(jobfiles.transcript_key(job_id, fmt) for fmt in FORMATS)


# --- one run --------------------------------------------------------------------------------


def test_a_run_stores_every_rendering_and_says_what_it_did(store: BlobStore) -> None:
    request = request_for(language="en", prompt="A talk show.", mode=Mode.ACCURATE)
    upload(store, request)
    engine = ScriptedEngine(39.5, steps=(10.0, 20.0, 40.0, 40.0))
    reports = Reports()

    result = Pipeline(store, engine, progress_interval=0).run(request, reports)

    assert result.outcome == "transcribed" and result.error is None
    assert (result.job_id, result.text, result.language) == (
        request.job_id,
        "Hello and welcome to the show.",
        "en",
    )
    assert (result.duration_seconds, result.segment_count) == (39.5, 2)
    assert (result.model, result.engine) == ("scripted-tiny.en", "local")
    assert engine.calls == [
        {
            "audio": b"ID3 not really audio",
            "language": "en",
            "prompt": "A talk show.",
            "mode": Mode.ACCURATE,
        }
    ]
    # Progress: fractions of the request's audio, held below 1 until the job is finished.
    cap = RUNNING_PROGRESS_CAP
    assert reports.calls == [(0.25, 10.0), (0.5, 20.0), (cap, 40.0), (cap, 40.0)]
    # Every rendering is stored where the result says; nothing else is written or removed.
    assert sorted(result.uris) == sorted(fmt.value for fmt in FORMATS)
    expected = ScriptedEngine(39.5).transcribe(SPEECH, language="en", mode=Mode.ACCURATE)
    for fmt in FORMATS:
        key = jobfiles.transcript_key(request.job_id, fmt)
        assert result.uris[fmt] == store.uri(key)
        assert store.get_bytes(key).decode() == render(expected, fmt)
    assert store.list(f"jobs/{request.job_id}") == sorted(
        [request.audio_key, *transcript_keys(request.job_id)]
    )


def test_progress_reports_are_throttled_but_the_first_goes_out(blobs: LocalBlobStore) -> None:
    request = request_for()
    upload(blobs, request)
    reports = Reports()
    Pipeline(blobs, ScriptedEngine(40, steps=(1.0, 2.0, 3.0)), progress_interval=3600).run(
        request, reports
    )
    assert reports.calls == [(1 / 40, 1.0)]


def test_a_sink_saying_stop_cancels_the_run_before_anything_is_stored(
    blobs: LocalBlobStore,
) -> None:
    request = request_for()
    upload(blobs, request)
    reports = Reports(answer=False)
    with pytest.raises(JobCancelled):
        Pipeline(blobs, ScriptedEngine(40, steps=(10.0, 20.0)), progress_interval=0).run(
            request, reports
        )
    assert reports.calls == [(0.25, 10.0)]
    assert blobs.list(f"jobs/{request.job_id}") == [request.audio_key]


def test_missing_audio_is_reported_as_such(store: BlobStore) -> None:
    engine = ScriptedEngine(40)
    with pytest.raises(AudioMissing):
        Pipeline(store, engine).run(request_for(), Reports())
    assert engine.calls == []
    assert store.list("jobs") == []


@pytest.mark.parametrize(
    "content",
    [b"", b"ID3\x03\x00", random.Random(7).randbytes(20_000)],
    ids=["empty", "id3", "noise"],
)
def test_audio_the_engine_cannot_decode_gives_a_rejected_result(
    blobs: LocalBlobStore, content: bytes
) -> None:
    """The real local engine fails on audio it cannot decode (before loading any model): the
    run is ``rejected`` with the engine's reason, and stores nothing."""
    request = request_for()
    upload(blobs, request, content)
    result = Pipeline(blobs, LocalEngine()).run(request, Reports())
    assert result.outcome == "rejected"
    assert result.error is not None and result.error.code == "audio_undecodable"
    assert "could not be decoded" in result.error.message
    assert (result.text, result.uris, result.engine) == ("", {}, "local")
    assert blobs.list(f"jobs/{request.job_id}") == [request.audio_key]


@pytest.mark.parametrize(
    "error",
    [EngineUnavailable("rate limited"), TranscriptionFailed("model broke"), RuntimeError("a bug")],
)
def test_faults_a_retry_may_cure_propagate(blobs: LocalBlobStore, error: Exception) -> None:
    request = request_for()
    upload(blobs, request)
    with pytest.raises(type(error)):
        Pipeline(blobs, ScriptedEngine(40, error=error)).run(request, Reports())
    assert blobs.list(f"jobs/{request.job_id}") == [request.audio_key]


def test_a_resumable_engine_checkpoints_under_the_work_prefix(store: BlobStore) -> None:
    """Checkpoints live with the audio, so the job's final tidy removes them with it."""
    request = request_for()
    upload(store, request)
    pipeline = Pipeline(store, ResumableScriptedEngine(40))
    for _ in range(2):  # a second run finds the first run's checkpoint
        pipeline.run(request, Reports())
    key = f"{jobfiles.checkpoint_prefix(request.job_id)}/00000.json"
    assert key.startswith(jobfiles.work_prefix(request.job_id) + "/")
    assert store.get_bytes(key) == b'{"runs": 2}'
    JobFiles(store).tidy(request.job_id, transcripts=False)
    assert store.list(f"jobs/{request.job_id}") == transcript_keys(request.job_id)


# --- runs and the lifecycle -----------------------------------------------------------------


@pytest.fixture
def lifecycle(db: Database, blobs: LocalBlobStore) -> Lifecycle:
    return Lifecycle(db, blobs)


def submitted(db: Database, blobs: BlobStore, seconds: float, *, uses: int = 1) -> RunRequest:
    """A job submitted on a fresh code, with its audio uploaded; its run request."""
    job = submit_job(db, issue(db, 10_000, max_uses=uses).record.id, seconds)
    request = RunRequest.of(job)
    upload(blobs, request)
    return request


def snapshot(blobs: BlobStore, job_id: str) -> dict[str, bytes]:
    return {key: blobs.get_bytes(key) for key in blobs.list(f"jobs/{job_id}")}


def test_a_run_after_the_job_finished_leaves_the_winners_files_alone(
    db: Database, blobs: LocalBlobStore, lifecycle: Lifecycle
) -> None:
    """A second run (a restarted worker, a pod started twice) after the job finished finds no
    audio and stops: the winner's transcripts stay as they were."""
    request = submitted(db, blobs, 40)
    winner = Pipeline(blobs, ScriptedEngine(40)).run(request, Reports())
    assert lifecycle.finish(request.job_id, winner) is not None
    kept = snapshot(blobs, request.job_id)
    assert sorted(kept) == transcript_keys(request.job_id)

    loser = ScriptedEngine(40)
    loser.duration = 12.0  # it would say something else, if it got to say anything
    with pytest.raises(AudioMissing):
        Pipeline(blobs, loser).run(request, Reports())
    lifecycle.discard_leftovers(request.job_id)
    assert snapshot(blobs, request.job_id) == kept
    stored = lifecycle.transcript(request.job_id)
    assert stored is not None and stored.duration_seconds == 40


def test_a_run_overtaken_by_the_winner_never_overwrites_its_transcripts(
    db: Database, blobs: LocalBlobStore, lifecycle: Lifecycle
) -> None:
    """Two runs at once: the winner finishes the job while the loser is still transcribing.
    The loser notices the audio has gone before storing anything, and stores nothing."""
    request = submitted(db, blobs, 40)
    kept: dict[str, bytes] = {}

    def winner_finishes(seconds: float) -> None:
        if kept:
            return
        result = Pipeline(blobs, ScriptedEngine(40)).run(request, Reports())
        assert lifecycle.finish(request.job_id, result) is not None
        kept.update(snapshot(blobs, request.job_id))

    loser = ScriptedEngine(12.0, steps=(5.0,), during=winner_finishes)
    with pytest.raises(AudioMissing):
        Pipeline(blobs, loser, progress_interval=0).run(request, Reports())
    assert len(loser.calls) == 1
    assert snapshot(blobs, request.job_id) == kept
    assert sorted(kept) == transcript_keys(request.job_id)


def test_cancel_at_99_percent_through_a_running_pipeline_is_charged(
    db: Database, blobs: LocalBlobStore, lifecycle: Lifecycle
) -> None:
    """The reproduction from issue 11 in the embedded shape: a worker runs an hour of audio,
    reporting progress to the database; the user cancels at 99 %. The worker is told to stop,
    at least 99 % of the hour is charged, no text appears, and the single-use code is spent."""
    request = submitted(db, blobs, 3600)
    job = lifecycle.start(request.job_id, lease_owner="worker-a", lease_seconds=30)
    assert job is not None
    code_id = job.code_id

    def user_cancels(seconds: float) -> None:
        if seconds == 3599.0:  # the worker has just reported 99 %
            assert lifecycle.get(request.job_id).progress == RUNNING_PROGRESS_CAP
            assert lifecycle.cancel(request.job_id) is not None

    engine = ScriptedEngine(3600, steps=(1800.0, 3564.0, 3599.0, 3600.0), during=user_cancels)

    def sink(fraction: float, _seconds: float) -> bool:
        return lifecycle.progress(request.job_id, fraction)

    with pytest.raises(JobCancelled):
        Pipeline(blobs, engine, progress_interval=0).run(request, sink)
    lifecycle.discard_leftovers(request.job_id)

    cancelled = lifecycle.get(request.job_id)
    assert (cancelled.status, cancelled.credit_state) == (JobStatus.CANCELLED, CreditState.SETTLED)
    assert cancelled.charged_seconds is not None and cancelled.charged_seconds >= 0.99 * 3600
    assert lifecycle.transcript(request.job_id) is None
    assert blobs.list(f"jobs/{request.job_id}") == []
    with pytest.raises(UsesExhausted):
        submit_job(db, code_id, 60)
    assert counters(db, code_id)["spent"] == cancelled.charged_seconds


def test_cancel_at_99_percent_of_a_cluster_run_is_charged_from_its_record(
    db: Database, blobs: LocalBlobStore, lifecycle: Lifecycle
) -> None:
    """The same in the cluster shape: the transcriber pod writes progress only to the blob
    store, and the database still says 0 % when the user cancels."""
    request = submitted(db, blobs, 3600)
    assert lifecycle.start(request.job_id) is not None
    files = JobFiles(blobs)
    answers: Iterator[bool] = iter([True, True, False])

    def pod_progress(fraction: float, seconds_done: float) -> bool:
        files.write_progress(request.job_id, fraction, seconds_done)
        return next(answers)

    def user_cancels(seconds: float) -> None:
        if seconds == 3600.0:
            assert lifecycle.get(request.job_id).progress == 0.0
            cancelled = lifecycle.cancel(request.job_id)
            assert cancelled is not None and cancelled.charged_seconds is not None
            assert cancelled.charged_seconds >= 0.99 * 3600

    engine = ScriptedEngine(3600, steps=(1800.0, 3564.0, 3600.0), during=user_cancels)
    with pytest.raises(JobCancelled):
        Pipeline(blobs, engine, progress_interval=0).run(request, pod_progress)
    cancelled = lifecycle.get(request.job_id)
    assert cancelled.charged_seconds is not None and cancelled.charged_seconds >= 0.99 * 3600
    assert counters(db, cancelled.code_id) == {
        "budget": 10_000,
        "reserved": 0,
        "spent": cancelled.charged_seconds,
        "uses": 1,
    }
