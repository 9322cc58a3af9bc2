"""The operator's /metrics, scraped from the real operator process on the emulated cluster."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from tests.fixtures.audio import make_mp3
from tests.fixtures.gateway import FixedEngine
from tests.fixtures.server import free_port
from tests.operator.conftest import Cluster, Kubelet, Operator, StartOperator, wait_for
from tests.operator.test_operator import phase, submit_direct
from transcription import metrics as domain_metrics
from transcription import resources
from transcription.blobstore import open_blob_store
from transcription.db.models import LedgerEntry
from transcription.db.session import Database
from transcription.errors import EngineUnavailable
from transcription.jobfiles import EngineUsage, JobFiles, RunError, RunResult, result_key
from transcription.states import EntryKind
from transcription.transcript import TranscriptResult

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Metrics:
    """The operator's metrics port, read with prometheus_client's own parser."""

    def __init__(self, operator: Operator, port: int) -> None:
        self.operator = operator
        self.url = f"http://127.0.0.1:{port}/metrics"

    def scrape(self) -> Samples:
        with urllib.request.urlopen(self.url, timeout=5) as response:
            text = response.read().decode()
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def value(self, name: str, **labels: str) -> float:
        """The sum of ``name``'s samples whose labels include ``labels`` (0 when there are none)."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.scrape().items() if n == name and wanted <= ls)

    def until(self, name: str, expected: float, **labels: str) -> None:
        wait_for(
            lambda: self.value(name, **labels) == expected,
            what=f"{name}{labels or ''} == {expected}",
            log=self.operator.log,
        )


def started(start_operator: StartOperator, **settings: object) -> Metrics:
    port = free_port()
    operator = start_operator(metrics_port=port, metrics_host="127.0.0.1", **settings)
    return Metrics(operator, port)


def ledger_totals(db: Database) -> tuple[int, int]:
    """Seconds charged and seconds given back, by the ledger's settle and release rows."""
    with db.transaction() as session:
        charged, unheld = session.execute(
            select(
                func.coalesce(func.sum(LedgerEntry.spent_delta), 0),
                func.coalesce(func.sum(-LedgerEntry.reserved_delta), 0),
            ).where(LedgerEntry.kind.in_([EntryKind.SETTLE, EntryKind.RELEASE]))
        ).one()
    return int(charged), int(unheld) - int(charged)


def test_passes_rise_and_the_admission_gauges_follow_the_cap(
    cluster: Cluster, start_operator: StartOperator, op_db: Database
) -> None:
    metrics = started(start_operator, max_running_jobs=1)
    assert metrics.value("whisper_operator_admission_cap") == 1
    wait_for(lambda: metrics.value("whisper_operator_reconcile_passes_total") >= 1,
             what="a first pass", log=metrics.operator.log)  # fmt: skip
    passes = metrics.value("whisper_operator_reconcile_passes_total")
    last = metrics.value("whisper_operator_last_reconcile_timestamp_seconds")
    assert time.time() - 30 < last <= time.time()
    # WHISPER_RECONCILE_INTERVAL is 2 s in these tests: passes go on with nothing to do.
    wait_for(lambda: metrics.value("whisper_operator_reconcile_passes_total") > passes,
             what="another pass", log=metrics.operator.log)  # fmt: skip
    assert metrics.value("whisper_operator_last_reconcile_timestamp_seconds") > last
    assert metrics.value("whisper_operator_reconcile_errors_total") == 0

    first, _ = submit_direct(op_db, cluster)
    submit_direct(op_db, cluster)
    wait_for(lambda: cluster.job(resources.resource_name(first)), what="the first Job",
             log=metrics.operator.log)  # fmt: skip
    # One Job holds the only slot; the other TranscriptionJob waits for it.
    metrics.until("whisper_operator_jobs_running", 1)
    metrics.until("whisper_operator_admission_queue", 1)
    assert metrics.value("whisper_jobs", status="queued") == 2
    # Each job holds its single-use code's one use.
    assert metrics.value("whisper_codes", state="exhausted") == 2


def test_settled_jobs_move_the_settlement_lag_and_the_job_and_credit_counters(
    cluster: Cluster,
    start_operator: StartOperator,
    kubelet: Kubelet,
    op_db: Database,
    blob_url: str,
    tmp_path: Path,
) -> None:
    metrics = started(start_operator)
    log = metrics.operator.log
    seconds = make_mp3(tmp_path / "talk.mp3", 7.5)
    succeeding, _ = submit_direct(
        op_db, cluster, seconds=seconds, audio=(blob_url, tmp_path / "talk.mp3")
    )
    name = resources.resource_name(succeeding)
    job = wait_for(lambda: cluster.job(name), what="the Job", log=log)
    kubelet.start(job)
    wait_for(lambda: phase(cluster, name) == "Running", what="Running", log=log)
    exit_code, message = kubelet.run(job, engine=FixedEngine())
    kubelet.finish(job, exit_code, message, final=True)
    wait_for(lambda: phase(cluster, name) == "Succeeded", what="Succeeded", log=log)

    assert metrics.value("whisper_operator_settlement_lag_seconds_count") == 1
    # The Job's end is stamped in whole seconds; settling follows within a pass or two.
    assert 0 <= metrics.value("whisper_operator_settlement_lag_seconds_sum") < 15
    assert metrics.value("whisper_jobs_finished_total", outcome="succeeded", error="none") == 1
    assert metrics.value("whisper_job_queue_wait_seconds_count") == 1
    assert metrics.value("whisper_job_attempts_total") == 1

    # Refused audio fails the next job, refunded in full.
    failing, _ = submit_direct(op_db, cluster)
    job = wait_for(lambda: cluster.job(resources.resource_name(failing)), what="the Job", log=log)
    rejected = ('{"jobId":"x","outcome":"rejected","error":{"code":"audio_undecodable",'
                '"message":"The audio could not be decoded."}}')  # fmt: skip
    kubelet.finish(job, 3, rejected, final=True)
    metrics.until("whisper_operator_settlement_lag_seconds_count", 2)
    metrics.until("whisper_jobs_finished_total", 1, outcome="failed", error="audio_undecodable")

    # A queued job deleted by its owner: cancelled and refunded, with no Job ever ending.
    cancelled, _ = submit_direct(op_db, cluster)
    cancelled_name = resources.resource_name(cancelled)
    wait_for(lambda: cluster.job(cancelled_name), what="the Job", log=log)
    cluster.delete("transcriptionjobs", cancelled_name)
    metrics.until("whisper_jobs_finished_total", 1, outcome="cancelled")
    assert metrics.value("whisper_operator_settlement_lag_seconds_count") == 2

    charged, refunded = ledger_totals(op_db)
    assert charged > 0 and refunded > 0
    metrics.until("whisper_credit_charged_seconds_total", charged)
    metrics.until("whisper_credit_refunded_seconds_total", refunded)
    metrics.until("whisper_jobs", 0, status="queued")
    metrics.until("whisper_jobs", 0, status="running")
    assert metrics.value("whisper_operator_reconcile_errors_total") == 0


#: A fault in this test's own schema (the URL's search_path), seen by the operator's
#: connections too: every update of a job row fails.
REFUSE_JOB_UPDATES = (
    """CREATE FUNCTION refuse_job_updates() RETURNS trigger LANGUAGE plpgsql AS $fault$
    BEGIN RAISE EXCEPTION 'injected fault'; END $fault$""",
    """CREATE TRIGGER refuse_job_updates BEFORE UPDATE ON jobs
    FOR EACH ROW EXECUTE FUNCTION refuse_job_updates()""",
)


def test_a_failing_step_counts_as_an_error_while_passes_go_on(
    cluster: Cluster, start_operator: StartOperator, kubelet: Kubelet, op_db: Database
) -> None:
    metrics = started(start_operator)
    job_id, _ = submit_direct(op_db, cluster)
    name = resources.resource_name(job_id)
    job = wait_for(lambda: cluster.job(name), what="the Job", log=metrics.operator.log)
    with op_db.engine.begin() as conn:
        for statement in REFUSE_JOB_UPDATES:
            conn.exec_driver_sql(statement)
    # The pod starts: marking the job running fails, pass after pass (with backoff).
    kubelet.start(job)
    wait_for(lambda: metrics.value("whisper_operator_reconcile_errors_total") >= 2,
             what="two failed steps", log=metrics.operator.log)  # fmt: skip
    # The passes themselves succeed: only the one job's step fails.
    last = metrics.value("whisper_operator_last_reconcile_timestamp_seconds")
    wait_for(lambda: metrics.value("whisper_operator_last_reconcile_timestamp_seconds") > last,
             what="a later pass", log=metrics.operator.log)  # fmt: skip

    with op_db.engine.begin() as conn:
        conn.exec_driver_sql("DROP TRIGGER refuse_job_updates ON jobs")
    wait_for(lambda: phase(cluster, name) == "Running", what="Running", log=metrics.operator.log)
    errors = metrics.value("whisper_operator_reconcile_errors_total")
    passes = metrics.value("whisper_operator_reconcile_passes_total")
    wait_for(lambda: metrics.value("whisper_operator_reconcile_passes_total") > passes + 1,
             what="two more passes", log=metrics.operator.log)  # fmt: skip
    assert metrics.value("whisper_operator_reconcile_errors_total") == errors


class MeteredEngine(FixedEngine):
    """Moves the engine metrics as the OpenAI engine's HTTP client would (two 429s retried,
    then a 200), then answers, or raises ``failure``."""

    def __init__(self, failure: Exception | None = None) -> None:
        super().__init__()
        self.failure = failure

    def transcribe(self, audio: Path, **options: Any) -> TranscriptResult:
        domain_metrics.OPENAI_REQUESTS.labels("429").inc(2)
        domain_metrics.OPENAI_REQUESTS.labels("200").inc()
        domain_metrics.OPENAI_RETRIES.inc(2)
        domain_metrics.OPENAI_BYTES_SENT.inc(1000)
        if self.failure is not None:
            raise self.failure
        return super().transcribe(audio, **options)


ENGINE_COUNTERS: tuple[tuple[str, dict[str, str]], ...] = (
    ("whisper_openai_requests_total", {"status": "429"}),
    ("whisper_openai_requests_total", {"status": "200"}),
    ("whisper_openai_requests_total", {"status": "400"}),
    ("whisper_openai_retries_total", {}),
    ("whisper_openai_bytes_sent_total", {}),
)


def engine_counters(metrics: Metrics) -> tuple[float, ...]:
    return tuple(metrics.value(name, **labels) for name, labels in ENGINE_COUNTERS)


def test_engine_counts_from_the_records_move_the_operators_engine_metrics_once(
    cluster: Cluster,
    start_operator: StartOperator,
    kubelet: Kubelet,
    op_db: Database,
    blob_url: str,
    tmp_path: Path,
) -> None:
    metrics = started(start_operator)
    log = metrics.operator.log
    files = JobFiles(open_blob_store(blob_url))
    seconds = make_mp3(tmp_path / "talk.mp3", 3.0)
    audio = (blob_url, tmp_path / "talk.mp3")
    rate_limited = EngineUnavailable("429 after every retry.", code="engine_rate_limited")

    # A first pod runs out of retries (its Job tries again), the second succeeds: the record
    # carries both pods' counts.
    retried, _ = submit_direct(op_db, cluster, seconds=seconds, audio=audio)
    name = resources.resource_name(retried)
    job = wait_for(lambda: cluster.job(name), what="the Job", log=log)
    kubelet.start(job)
    exit_code, message = kubelet.run(job, engine=MeteredEngine(rate_limited))
    assert exit_code == 1
    kubelet.finish(job, exit_code, message, final=False)
    exit_code, message = kubelet.run(job, engine=MeteredEngine())
    kubelet.finish(job, exit_code, message, final=True)
    wait_for(lambda: phase(cluster, name) == "Succeeded", what="Succeeded", log=log)
    wait_for(lambda: engine_counters(metrics) == (4, 2, 0, 4, 2000),
             what="the record's engine counts", log=log)  # fmt: skip

    # Every pod fails: no result record, the counts the pods left are added as the job fails.
    failed, _ = submit_direct(op_db, cluster, seconds=seconds, audio=audio)
    name = resources.resource_name(failed)
    job = wait_for(lambda: cluster.job(name), what="the Job", log=log)
    kubelet.start(job)
    exit_code, message = kubelet.run(job, engine=MeteredEngine(rate_limited))
    kubelet.finish(job, exit_code, message, final=True)
    wait_for(lambda: phase(cluster, name) == "Failed", what="Failed", log=log)
    metrics.until("whisper_jobs_finished_total", 1, outcome="failed", error="transcription_failed")
    assert engine_counters(metrics) == (6, 3, 0, 6, 3000)

    # A record whose error code the project does not give is counted as "other".
    strange, _ = submit_direct(op_db, cluster)
    name = resources.resource_name(strange)
    job = wait_for(lambda: cluster.job(name), what="the Job", log=log)
    files.write_result(
        RunResult(
            job_id=strange,
            outcome="rejected",
            error=RunError(code="pwned_0x41414141", message="Chosen by a hostile pod."),
            engine_usage=EngineUsage(openai_requests={"400": 1}, openai_bytes_sent=10),
        )
    )
    kubelet.finish(job, 3, f'{{"jobId":"{strange}","outcome":"rejected"}}', final=True)
    metrics.until("whisper_jobs_finished_total", 1, outcome="failed", error="other")
    assert metrics.value("whisper_jobs_finished_total", error="pwned_0x41414141") == 0

    # A record written before records carried engine counts still finishes its job.
    old, _ = submit_direct(op_db, cluster)
    name = resources.resource_name(old)
    job = wait_for(lambda: cluster.job(name), what="the Job", log=log)
    record = {"version": 1, "job_id": old, "outcome": "transcribed", "text": "Old.",
              "duration_seconds": 2.0, "segment_count": 1, "uris": {}, "engine": "openai"}  # fmt: skip
    files.blobs.put_bytes(result_key(old), json.dumps(record).encode())
    kubelet.finish(job, 0, f'{{"jobId":"{old}","outcome":"transcribed"}}', final=True)
    wait_for(lambda: phase(cluster, name) == "Succeeded", what="Succeeded", log=log)
    metrics.until("whisper_jobs_finished_total", 2, outcome="succeeded")

    # Passes go on over the settled Jobs and their records; nothing is counted again.
    passes = metrics.value("whisper_operator_reconcile_passes_total")
    wait_for(lambda: metrics.value("whisper_operator_reconcile_passes_total") >= passes + 2,
             what="two more passes", log=log)  # fmt: skip
    assert engine_counters(metrics) == (6, 3, 1, 6, 3010)
    assert metrics.value("whisper_operator_reconcile_errors_total") == 0
