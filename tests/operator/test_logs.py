"""The operator's log: ``whisperctl operator`` writes JSON lines, kopf's included, and every
line about a job names it."""

from __future__ import annotations

import json
import logging
from typing import Any

from tests.operator.conftest import CODE_SECRET, Cluster, StartOperator, wait_for
from tests.operator.test_operator import submit_direct
from transcription import resources
from transcription.db.session import Database
from transcription_operator.joblog import JobOfObject


def test_whisperctl_operator_logs_json_lines_that_name_the_job(
    cluster: Cluster, start_operator: StartOperator, op_db: Database
) -> None:
    operator = start_operator(whisperctl=True, log_format="json")
    job_id, _ = submit_direct(op_db, cluster)
    name = resources.resource_name(job_id)
    # A job whose TranscriptionJob the gateway did not get to create: the reconciler's step.
    orphan_id, _ = submit_direct(op_db, cluster, create_tj=False)
    wait_for(lambda: cluster.job(name), what="the Job", log=operator.log)
    wait_for(lambda: cluster.job(resources.resource_name(orphan_id)), what="the orphan's Job",
             log=operator.log)  # fmt: skip
    cluster.delete("transcriptionjobs", name)
    wait_for(lambda: not [t for t in cluster.tjs() if t["metadata"]["name"] == name],
             what="the finalizer to let go", log=operator.log)  # fmt: skip
    operator.stop()

    text = operator.log.read_text()
    records: list[dict[str, Any]] = [json.loads(line) for line in text.splitlines()]
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    about_the_job = [
        r for r in records if job_id in r["message"] or r.get("object", {}).get("name") == name
    ]
    assert {"kopf.objects", "transcription.lifecycle"} <= {r["logger"] for r in about_the_job}
    assert all(r.get("job_id") == job_id for r in about_the_job), about_the_job
    created = [r for r in records if r["message"].startswith("created the missing")]
    assert [(r["logger"], r.get("job_id")) for r in created] == [
        ("transcription_operator.reconcile", orphan_id)
    ]
    assert CODE_SECRET not in text


def test_only_kopf_lines_about_a_job_s_objects_get_its_id() -> None:
    def filtered(kind: str, name: str) -> object:
        record = logging.LogRecord("kopf.objects", logging.INFO, __file__, 1, "x", None, None)
        record.k8s_ref = {"kind": kind, "name": name, "namespace": "default"}
        JobOfObject().filter(record)
        return getattr(record, "job_id", None)

    assert filtered("TranscriptionJob", "tr-0123456789abcdef") == "tr_0123456789abcdef"
    assert filtered("Job", "tr-0123456789abcdef") == "tr_0123456789abcdef"
    assert filtered("TranscriptionJob", "not-ours") is None
    assert filtered("CreditCode", "tr-0123456789abcdef") is None
