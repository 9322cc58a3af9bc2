"""The transcriber as a Kubernetes Job: the run's request from the environment, its outcome in
the blob store (the result record) and in a JSON termination message.

The pod holds no database credentials: it reads its audio and writes transcripts, checkpoints,
progress, engine usage and the result record under its job's prefix, nothing else. The operator
finishes the job from the Job's outcome and the result record. Exit codes are the contract with
the Job's pod failure policy: 0 when the result is written (or there is nothing left to do),
``USER_ERROR_EXIT`` when the audio itself is at fault, anything else for faults a retry may cure.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from transcriber.engines import Engine, build_engine
from transcriber.pipeline import AudioMissing, JobCancelled, Pipeline
from transcription import metrics
from transcription.blobstore import open_blob_store
from transcription.errors import DomainError
from transcription.jobfiles import EngineUsage, JobFiles, RunRequest
from transcription.logs import configure_logging, job_context, secret_values
from transcription.resources import USER_ERROR_EXIT
from transcription.settings import WorkerSettings

log = logging.getLogger(__name__)

#: The kubelet keeps at most 4 KB of a termination message.
MAX_MESSAGE_BYTES = 4096


class JobSettings(WorkerSettings):
    """What the Job's pod is told through its environment besides its ``RunRequest``."""

    termination_message_path: Path = Field(
        Path("/dev/termination-log"), description="Where the JSON outcome is written."
    )


def termination_message(outcome: dict[str, Any]) -> str:
    """The outcome as JSON that fits the kubelet's limit, shortening the message if needed."""
    text = json.dumps(outcome, separators=(",", ":"))
    error = outcome.get("error")
    if len(text.encode()) <= MAX_MESSAGE_BYTES or not isinstance(error, dict):
        return text
    message = str(error.get("message", ""))

    def shortened(length: int) -> str:
        cut = {**error, "message": message[:length] + "…"}
        return json.dumps({**outcome, "error": cut}, separators=(",", ":"))

    # The longest start of the message that fits, measured as encoded JSON (where a character
    # may take up to six bytes, ``\uXXXX``).
    low, high = 0, len(message)
    while low < high:
        middle = (low + high + 1) // 2
        if len(shortened(middle).encode()) <= MAX_MESSAGE_BYTES:
            low = middle
        else:
            high = middle - 1
    return shortened(low)


def run_job(settings: JobSettings, request: RunRequest, engine: Engine | None = None) -> int:
    """Transcribe the request's audio and write the result record; returns the exit code."""
    blobs = open_blob_store(settings.resolved_blob_url())
    files = JobFiles(blobs)
    meter = metrics.EngineMeter()
    outcome: dict[str, Any] = {"jobId": request.job_id}
    code = 0
    try:
        if files.read_result(request.job_id) is not None:
            # An earlier pod of this Job already ran it to the end.
            outcome["outcome"] = "skipped"
        else:
            pipeline = Pipeline(
                blobs,
                engine or build_engine(settings),
                progress_interval=settings.progress_interval,
            )

            def progress(fraction: float, seconds_done: float) -> bool:
                if not files.has_audio(request.job_id, request.audio_key):
                    return False  # the job finished meanwhile: stop, and leave nothing behind
                files.write_progress(request.job_id, fraction, seconds_done)
                return True

            result = pipeline.run(request, progress)
            usage = _engine_usage(files, request.job_id, meter)
            files.write_result(result.model_copy(update={"engine_usage": usage}))
            outcome["outcome"] = result.outcome
            if result.error is not None:
                outcome["error"] = result.error.model_dump()
                code = USER_ERROR_EXIT
            else:
                outcome["durationSeconds"] = round(result.duration_seconds, 3)
    except (AudioMissing, JobCancelled):
        # The job was finished and tidied before or while this pod ran: nothing is left to do.
        outcome["outcome"] = "skipped"
    except DomainError as exc:
        # The engine's fault, not the audio's: let the Job's backoffLimit retry; checkpoints
        # make it resume.
        outcome.update(outcome="retrying", error={"code": exc.code, "message": exc.message})
        code = 1
        _keep_engine_usage(files, request.job_id, meter)
    except Exception as exc:
        log.exception("transcription of %s failed", request.job_id)
        outcome.update(
            outcome="crashed",
            error={"code": "internal_error", "message": f"{type(exc).__name__}: {exc}"},
        )
        code = 1
        _keep_engine_usage(files, request.job_id, meter)
    _write(settings.termination_message_path, termination_message(outcome))
    return code


def _engine_usage(files: JobFiles, job_id: str, meter: metrics.EngineMeter) -> EngineUsage:
    """What the engine did in this pod and in the job's earlier pods that left no result."""
    earlier = files.read_engine_usage(job_id) or EngineUsage()
    return earlier.plus(meter.usage())


def _keep_engine_usage(files: JobFiles, job_id: str, meter: metrics.EngineMeter) -> None:
    """Leave what the engine did for the job's next pod to carry on or, if none follows, for
    the operator: a run that fails writes no result record."""
    try:
        files.write_engine_usage(job_id, _engine_usage(files, job_id, meter))
    except Exception:
        # Only metrics are lost; the outcome must still be reported.
        log.warning("could not save the engine usage of %s", job_id, exc_info=True)


def _write(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError:
        # Outside a pod the path may not exist; the outcome still goes to the log.
        log.warning("could not write the termination message to %s", path)
    log.info("outcome: %s", text)


def main() -> int:
    settings = JobSettings()
    configure_logging(
        os.environ.get("WHISPER_LOG_LEVEL", "INFO"),
        settings.log_format,
        secrets=secret_values(settings),
    )
    try:
        request = RunRequest.from_env(os.environ)
    except ValidationError as exc:
        # The operator builds this environment; a gap is a fault to report, not to retry blindly.
        outcome = {
            "jobId": os.environ.get("WHISPER_JOB_ID"),
            "outcome": "crashed",
            "error": {"code": "invalid_job_environment", "message": f"WHISPER_JOB_*: {exc}"},
        }
        _write(settings.termination_message_path, termination_message(outcome))
        return 1
    with job_context(request.job_id):
        return run_job(settings, request)
