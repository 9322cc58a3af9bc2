"""kopf's own lines about a TranscriptionJob or its Job (a handler's outcome, a retry) carry the
job's ID, as every line the operator logs while working on a job does."""

from __future__ import annotations

import logging

from transcription.resources import job_id_of

#: The logger kopf writes its per-object lines to, each with the object's reference.
KOPF_OBJECTS = "kopf.objects"
#: A job's TranscriptionJob and its child Job (builders.job_name) are both named after the job.
KINDS = frozenset({"TranscriptionJob", "Job"})


class JobOfObject(logging.Filter):
    """Sets ``job_id`` on a kopf record about a job's object from the object's name."""

    def filter(self, record: logging.LogRecord) -> bool:
        reference = getattr(record, "k8s_ref", None)
        if (
            isinstance(reference, dict)
            and reference.get("kind") in KINDS
            and getattr(record, "job_id", None) is None
        ):
            job_id = job_id_of(str(reference.get("name") or ""))
            if job_id is not None:
                record.job_id = job_id
        return True


def install() -> None:
    """Filter kopf's per-object logger (once, however often the operator starts)."""
    logger = logging.getLogger(KOPF_OBJECTS)
    if not any(isinstance(f, JobOfObject) for f in logger.filters):
        logger.addFilter(JobOfObject())
