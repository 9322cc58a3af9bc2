"""The transcriber as a Kubernetes Job: one job ID from the environment, a JSON termination message.

Exit codes are the contract with the Job's pod failure policy: 0 when the transcript is recorded
(or there is nothing left to do), ``USER_ERROR_EXIT`` when the audio itself is at fault (the Job
fails at once, no retry), anything else for faults a retry may cure.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from pydantic import Field

from transcriber.engines import Engine, build_engine
from transcriber.pipeline import Pipeline
from transcription.blobstore import open_blob_store
from transcription.db.session import Database
from transcription.errors import DomainError, EngineUnavailable
from transcription.lifecycle import Lifecycle
from transcription.settings import WorkerSettings

log = logging.getLogger(__name__)

USER_ERROR_EXIT = 3
#: The kubelet keeps at most 4 KB of a termination message.
MAX_MESSAGE_BYTES = 4096


class JobSettings(WorkerSettings):
    """What the Job's pod is told through its environment."""

    job_id: str = Field(description="ID of the transcription to run (WHISPER_JOB_ID).")
    termination_message_path: Path = Field(
        Path("/dev/termination-log"), description="Where the JSON outcome is written."
    )


def termination_message(outcome: dict[str, Any]) -> str:
    """The outcome as JSON that fits the kubelet's limit, shortening the message if needed."""
    text = json.dumps(outcome, separators=(",", ":"))
    error = outcome.get("error")
    if len(text.encode()) > MAX_MESSAGE_BYTES and isinstance(error, dict):
        spare = MAX_MESSAGE_BYTES - len(text.encode()) + len(error.get("message", "").encode())
        error = {**error, "message": error.get("message", "").encode()[: max(spare - 8, 0)]}
        error["message"] = error["message"].decode(errors="ignore") + "…"
        text = json.dumps({**outcome, "error": error}, separators=(",", ":"))
    return text


def run_job(settings: JobSettings, engine: Engine | None = None) -> int:
    """Transcribe the job and record its transcript; returns the process exit code."""
    db = Database(settings.resolved_database_url())
    lc = Lifecycle(db)
    pipeline = Pipeline(
        lc,
        open_blob_store(settings.resolved_blob_url()),
        engine or build_engine(settings),
        progress_interval=settings.progress_interval,
    )
    outcome: dict[str, Any] = {"jobId": settings.job_id}
    code = 0
    try:
        transcript = pipeline.record(settings.job_id)
        if transcript is None:
            outcome["outcome"] = "skipped"
        else:
            outcome.update(
                outcome="transcribed",
                transcriptId=transcript.id,
                durationSeconds=round(transcript.duration_seconds, 3),
            )
    except EngineUnavailable as exc:
        # Not the audio's fault: let the Job's backoffLimit retry; checkpoints make it resume.
        outcome.update(outcome="retrying", error={"code": exc.code, "message": exc.message})
        code = 1
    except DomainError as exc:
        outcome.update(outcome="rejected", error={"code": exc.code, "message": exc.message})
        code = USER_ERROR_EXIT
    except Exception as exc:
        log.exception("transcription of %s failed", settings.job_id)
        outcome.update(
            outcome="crashed",
            error={"code": "internal_error", "message": f"{type(exc).__name__}: {exc}"},
        )
        code = 1
    finally:
        db.dispose()
    _write(settings.termination_message_path, termination_message(outcome))
    return code


def _write(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError:
        # Outside a pod the path may not exist; the outcome still goes to the log.
        log.warning("could not write the termination message to %s", path)
    log.info("outcome: %s", text)


def main() -> int:
    logging.basicConfig(level=os.environ.get("WHISPER_LOG_LEVEL", "INFO"))
    return run_job(JobSettings())
