"""The transcriber's Kubernetes Job entrypoint: the request from the environment, the outcome in
the blob store (transcripts, progress, the result record) and in the termination message, and
no database anywhere. Exit codes are the contract with the Job's pod failure policy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.transcriber.test_pipeline import ScriptedEngine
from tests.wer import wer
from transcriber.job import MAX_MESSAGE_BYTES, JobSettings, main, run_job, termination_message
from transcription import jobfiles
from transcription.blobstore import LocalBlobStore
from transcription.errors import EngineUnavailable
from transcription.jobfiles import JobFiles, RunRequest
from transcription.resources import USER_ERROR_EXIT
from transcription.transcript import FORMATS

DATA = Path(__file__).parents[1] / "data"
SPEECH = DATA / "speech.mp3"
REFERENCE = (DATA / "speech.txt").read_text()
MAX_WER = 0.15
JOB_ID = "tr_0123456789abcdef"


@pytest.fixture(autouse=True)
def no_database(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pod is given no database: nothing that names one is in its environment."""
    for name in list(os.environ):
        if name.startswith("WHISPER_") or name == "DATABASE_URL":
            monkeypatch.delenv(name)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def blobs(data_dir: Path) -> LocalBlobStore:
    return LocalBlobStore(data_dir / "blobs")


@pytest.fixture
def settings(data_dir: Path, blobs: LocalBlobStore, tmp_path: Path) -> JobSettings:
    return JobSettings(
        data_dir=data_dir,
        blob_url=blobs.root.as_uri(),
        termination_message_path=tmp_path / "termination-log",
        progress_interval=0,
    )


def request_for(seconds: float = 38.3, **fields: Any) -> RunRequest:
    return RunRequest(
        job_id=JOB_ID, audio_key=jobfiles.audio_key(JOB_ID), audio_seconds=seconds, **fields
    )


def outcome(settings: JobSettings) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(settings.termination_message_path.read_text())
    return message


def files_of(blobs: LocalBlobStore) -> dict[str, tuple[bytes, int]]:
    """Every blob of the job with its content and modification time."""
    return {
        key: (blobs.get_bytes(key), blobs.local_path(key).stat().st_mtime_ns)
        for key in blobs.list(f"jobs/{JOB_ID}")
    }


def assert_no_database(data_dir: Path) -> None:
    assert sorted(p.name for p in data_dir.iterdir()) == ["blobs"]


@pytest.mark.slow
def test_the_entrypoint_transcribes_with_no_database(
    data_dir: Path, blobs: LocalBlobStore, tmp_path: Path
) -> None:
    """``python -m transcriber`` as the Job's container runs it: the request in WHISPER_JOB_*,
    the bucket and nothing else. It writes the transcripts, progress and the result record,
    says what happened in the termination message, and exits 0."""
    request = request_for(language="en")
    blobs.put_file(request.audio_key, SPEECH)
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("WHISPER_", "DATABASE_", "PG"))
    }
    env.update(request.env())
    env.update(
        WHISPER_BLOB_URL=blobs.root.as_uri(),
        WHISPER_DATA_DIR=str(data_dir),
        WHISPER_TERMINATION_MESSAGE_PATH=str(tmp_path / "termination-log"),
        HF_HUB_OFFLINE="1",
    )
    done = subprocess.run(
        [sys.executable, "-m", "transcriber"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr

    result = JobFiles(blobs).read_result(JOB_ID)
    assert result is not None and result.outcome == "transcribed", done.stderr
    assert wer(REFERENCE, result.text) <= MAX_WER, result.text
    assert (result.language, result.model, result.engine) == ("en", "tiny.en", "local")
    assert result.duration_seconds == pytest.approx(38.3, abs=0.5)
    assert result.segment_count >= 2
    for fmt in FORMATS:
        key = jobfiles.transcript_key(JOB_ID, fmt)
        assert result.uris[fmt] == blobs.uri(key)
        assert blobs.exists(key)
    assert blobs.get_bytes(jobfiles.transcript_key(JOB_ID, "txt")).decode().strip()
    progress = JobFiles(blobs).read_progress(JOB_ID)
    assert progress is not None and 0 < progress.fraction < 1
    message = json.loads((tmp_path / "termination-log").read_text())
    assert message == {
        "jobId": JOB_ID,
        "outcome": "transcribed",
        "durationSeconds": round(result.duration_seconds, 3),
    }
    # Its stderr is no terminal, so it logs JSON lines, each naming the job.
    logged = [json.loads(line) for line in done.stderr.splitlines()]
    assert logged, done.stderr
    assert all(line["job_id"] == JOB_ID for line in logged), done.stderr
    assert_no_database(data_dir)
    assert not (tmp_path / "whisper-data").exists()


def test_undecodable_audio_exits_as_a_user_error_with_a_rejected_record(
    settings: JobSettings, blobs: LocalBlobStore, data_dir: Path
) -> None:
    """The real local engine cannot decode the upload: exit 3, so the pod failure policy fails
    the Job at once, and a ``rejected`` record the operator fails (and refunds) the job from."""
    request = request_for()
    blobs.put_bytes(request.audio_key, b"ID3\x03\x00" + bytes(4000))
    assert run_job(settings, request) == USER_ERROR_EXIT == 3

    result = JobFiles(blobs).read_result(JOB_ID)
    assert result is not None and result.outcome == "rejected"
    assert result.error is not None and "could not be decoded" in result.error.message
    assert outcome(settings) == {
        "jobId": JOB_ID,
        "outcome": "rejected",
        "error": result.error.model_dump(),
    }
    assert blobs.list(f"jobs/{JOB_ID}") == [request.audio_key, jobfiles.result_key(JOB_ID)]
    assert_no_database(data_dir)


def test_main_reads_the_request_and_settings_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, settings: JobSettings, blobs: LocalBlobStore
) -> None:
    request = request_for(mode="accurate", prompt="Names: Ada.")
    blobs.put_bytes(request.audio_key, b"not audio at all")
    for name, value in request.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("WHISPER_BLOB_URL", str(settings.blob_url))
    monkeypatch.setenv("WHISPER_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("WHISPER_TERMINATION_MESSAGE_PATH", str(settings.termination_message_path))
    assert main() == USER_ERROR_EXIT
    assert outcome(settings)["outcome"] == "rejected"


def test_a_second_run_after_a_result_exists_is_skipped_and_touches_nothing(
    settings: JobSettings, blobs: LocalBlobStore
) -> None:
    """Kubernetes may start a Job's pod twice: the second finds the first's record and leaves
    every file exactly as it was, without running the engine."""
    request = request_for()
    blobs.put_file(request.audio_key, SPEECH)
    assert run_job(settings, request, ScriptedEngine(38.3, steps=(19.0,))) == 0
    before = files_of(blobs)
    assert sorted(before) == sorted(
        [
            request.audio_key,
            jobfiles.progress_key(JOB_ID),
            jobfiles.result_key(JOB_ID),
            *(jobfiles.transcript_key(JOB_ID, fmt) for fmt in FORMATS),
        ]
    )

    again = ScriptedEngine(12.0, steps=(6.0,))
    assert run_job(settings, request, again) == 0
    assert again.calls == []
    assert outcome(settings) == {"jobId": JOB_ID, "outcome": "skipped"}
    assert files_of(blobs) == before


def test_a_run_for_a_job_already_tidied_is_skipped(
    settings: JobSettings, blobs: LocalBlobStore
) -> None:
    """The job finished (and its work files went) before this pod started: nothing to do."""
    engine = ScriptedEngine(38.3)
    assert run_job(settings, request_for(), engine) == 0
    assert outcome(settings) == {"jobId": JOB_ID, "outcome": "skipped"}
    assert engine.calls == []
    assert blobs.list("") == []


def test_a_run_whose_job_finishes_meanwhile_stops_and_writes_nothing(
    settings: JobSettings, blobs: LocalBlobStore
) -> None:
    """The job was cancelled (or another pod won) while this one transcribed: its audio went
    with the work prefix, so the pod stops at its next progress report and writes nothing."""
    request = request_for()
    blobs.put_file(request.audio_key, SPEECH)

    def job_ends(seconds: float) -> None:
        if seconds > 10:
            JobFiles(blobs).tidy(JOB_ID, transcripts=True)

    engine = ScriptedEngine(38.3, steps=(5.0, 20.0, 30.0), during=job_ends)
    assert run_job(settings, request, engine) == 0
    assert outcome(settings) == {"jobId": JOB_ID, "outcome": "skipped"}
    assert blobs.list("") == []


@pytest.mark.parametrize(
    "error, expected",
    [
        (
            EngineUnavailable("The OpenAI API answered 429 three times."),
            {
                "outcome": "retrying",
                "error": {
                    "code": "engine_unavailable",
                    "message": "The OpenAI API answered 429 three times.",
                },
            },
        ),
        (
            RuntimeError("out of memory"),
            {
                "outcome": "crashed",
                "error": {"code": "internal_error", "message": "RuntimeError: out of memory"},
            },
        ),
    ],
)
def test_a_fault_a_retry_may_cure_exits_1_and_leaves_no_result(
    settings: JobSettings, blobs: LocalBlobStore, error: Exception, expected: dict[str, Any]
) -> None:
    """No result record, so the operator lets the Job's next pod try again."""
    request = request_for()
    blobs.put_file(request.audio_key, SPEECH)
    assert run_job(settings, request, ScriptedEngine(38.3, error=error)) == 1
    assert outcome(settings) == {"jobId": JOB_ID, **expected}
    assert JobFiles(blobs).read_result(JOB_ID) is None
    assert blobs.exists(request.audio_key)


@pytest.mark.parametrize("char", ["x", "é", "\n", "語"])
def test_the_termination_message_fits_the_kubelets_limit(char: str) -> None:
    """A long error message is cut to the longest start that fits in 4 KB of JSON, whatever
    its characters cost once encoded."""
    short = {"jobId": JOB_ID, "outcome": "rejected", "error": {"code": "x", "message": "short"}}
    assert json.loads(termination_message(short)) == short
    long = {**short, "error": {"code": "x", "message": char * 10_000}}
    text = termination_message(long)
    assert MAX_MESSAGE_BYTES - 12 < len(text.encode()) <= MAX_MESSAGE_BYTES
    message = json.loads(text)
    assert (message["jobId"], message["error"]["code"]) == (JOB_ID, "x")
    assert message["error"]["message"] == char * (len(message["error"]["message"]) - 1) + "…"


def test_an_unwritable_termination_path_does_not_change_the_exit_code(
    settings: JobSettings, blobs: LocalBlobStore, tmp_path: Path
) -> None:
    """Outside a pod /dev/termination-log may not exist; the outcome still goes to the log."""
    settings.termination_message_path = tmp_path / "missing" / "termination-log"
    assert run_job(settings, request_for(), ScriptedEngine(38.3)) == 0
