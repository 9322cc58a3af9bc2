"""Job and credit metrics move only when their transaction commits, once per real change, on
SQLite and PostgreSQL; the database gauges count jobs and codes at scrape time."""

from __future__ import annotations

import ast
import json
from datetime import timedelta
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

from tests.transcription.test_ledger import issue, new_job, submit_job
from tests.transcription.test_lifecycle import run_result
from transcription import jobfiles, ledger, metrics
from transcription.blobstore import LocalBlobStore
from transcription.db.models import utcnow
from transcription.db.session import Database
from transcription.errors import KNOWN_CODES
from transcription.lifecycle import Lifecycle, submit
from transcription.states import CodeState

LEASE = 30.0
Samples = dict[str, float]

CREATED = "whisper_jobs_created_total{engine=local,mode=fast}"
RESERVED = "whisper_credit_reserved_seconds_total"
CHARGED = "whisper_credit_charged_seconds_total"
REFUNDED = "whisper_credit_refunded_seconds_total"
ATTEMPTS = "whisper_job_attempts_total"
RETRIES = "whisper_job_retries_total"
WAITED = "whisper_job_queue_wait_seconds_count{mode=fast}"
RAN = "whisper_job_run_seconds_count{engine=local,mode=fast}"
SPEED = "whisper_job_realtime_factor_count{engine=local,mode=fast}"


def finished(outcome: str, error: str = "none") -> str:
    return f"whisper_jobs_finished_total{{error={error},outcome={outcome}}}"


def snapshot(registry: CollectorRegistry = REGISTRY) -> Samples:
    """Counter totals and histogram counts of the whisper_ metrics, by name and labels."""
    samples: Samples = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name.startswith("whisper_") and sample.name.endswith(("_total", "_count")):
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def moved(before: Samples) -> Samples:
    """What moved since ``before``, and by how much."""
    after = snapshot()
    deltas = {key: value - before.get(key, 0.0) for key, value in after.items()}
    return {key: delta for key, delta in deltas.items() if delta}


@pytest.fixture
def lifecycle(db: Database, tmp_path: Path) -> Lifecycle:
    return Lifecycle(db, LocalBlobStore(tmp_path / "blobs"))


def test_a_rolled_back_submission_moves_nothing_and_a_committed_one_moves_once(
    db: Database,
) -> None:
    code_id = issue(db, 100, max_uses=2).record.id
    before = snapshot()
    with pytest.raises(RuntimeError), db.transaction() as session:
        submit(session, new_job(code_id, 10))
        raise RuntimeError("the upload could not be stored")
    assert moved(before) == {}

    submit_job(db, code_id, 9.5)
    assert moved(before) == {CREATED: 1, RESERVED: 10}


def test_a_success_counts_once_and_its_replays_count_nothing(
    db: Database, lifecycle: Lifecycle
) -> None:
    code_id = issue(db, 100).record.id
    job = submit_job(db, code_id, 42.3)
    before = snapshot()
    assert lifecycle.start(job.id, lease_owner="worker", lease_seconds=LEASE) is not None
    assert moved(before) == {ATTEMPTS: 1, WAITED: 1}

    assert lifecycle.finish(job.id, run_result(job.id, 42.3), lease_owner="worker") is not None
    success = {
        ATTEMPTS: 1,
        WAITED: 1,
        finished("succeeded"): 1,
        CHARGED: 43,
        RAN: 1,
        SPEED: 1,
    }
    assert moved(before) == success

    # Replays: the finish, a settlement and a release of the resolved reservation are no-ops.
    assert lifecycle.finish(job.id, run_result(job.id, 42.3)) is None
    with db.transaction() as session:
        assert ledger.settle(session, job.id, 43) is None
        assert ledger.release(session, job.id) is False
    assert lifecycle.cancel(job.id) is None
    assert moved(before) == success


def test_a_settlement_rolled_back_moves_nothing_until_it_commits(db: Database) -> None:
    code_id = issue(db, 100).record.id
    job = submit_job(db, code_id, 20)
    before = snapshot()
    with pytest.raises(RuntimeError), db.transaction() as session:
        assert ledger.settle(session, job.id, 12) == 12
        raise RuntimeError("the transcript could not be recorded")
    assert moved(before) == {}

    with db.transaction() as session:
        assert ledger.settle(session, job.id, 12) == 12
    assert moved(before) == {CHARGED: 12, REFUNDED: 8}


def test_failures_and_cancels_count_their_outcome_and_give_credit_back(
    db: Database, lifecycle: Lifecycle
) -> None:
    code_id = issue(db, 1000, max_uses=5).record.id
    failing, queued, running = (submit_job(db, code_id, 30) for _ in range(3))
    before = snapshot()

    lifecycle.start(failing.id, lease_owner="worker", lease_seconds=LEASE)
    lifecycle.fail(failing.id, code="engine_unavailable", message="The API kept failing.")
    lifecycle.cancel(queued.id)
    lifecycle.start(running.id, lease_owner="worker", lease_seconds=LEASE)
    lifecycle.progress(running.id, 0.5, lease_owner="worker")
    lifecycle.cancel(running.id)

    assert moved(before) == {
        ATTEMPTS: 2,
        WAITED: 2,
        finished("failed", "engine_unavailable"): 1,
        finished("cancelled"): 2,
        CHARGED: 15,
        REFUNDED: 30 + 30 + 15,
    }


def test_a_job_whose_worker_was_lost_counts_a_retry_and_waits_once(
    db: Database, lifecycle: Lifecycle
) -> None:
    code_id = issue(db, 100).record.id
    job = submit_job(db, code_id, 10)
    before = snapshot()
    lifecycle.start(job.id, lease_owner="lost", lease_seconds=LEASE)
    assert lifecycle.expire_leases(3, now=utcnow() + timedelta(seconds=2 * LEASE)) == [job.id]
    lifecycle.start(job.id, lease_owner="second", lease_seconds=LEASE)
    assert moved(before) == {ATTEMPTS: 2, RETRIES: 1, WAITED: 1}

    # The operator counts attempts as it creates Jobs, and starts jobs without a lease.
    assert lifecycle.begin_attempt(job.id) == 3
    assert moved(before) == {ATTEMPTS: 3, RETRIES: 2, WAITED: 1}


def test_the_database_gauges_count_unfinished_jobs_and_codes_by_state(
    db: Database, lifecycle: Lifecycle
) -> None:
    registry = CollectorRegistry()
    unregister = metrics.register_database_collector(db, registry)
    try:
        assert snapshot_gauges(registry) == {
            **{f"whisper_jobs{{status={s}}}": 0 for s in ("queued", "running")},
            **{f"whisper_codes{{state={s}}}": 0 for s in CodeState},
        }
        single = issue(db, 100).record.id  # its one use held by a queued job: exhausted
        roomy = issue(db, 100, max_uses=5).record.id
        submit_job(db, single, 10)
        for _ in range(2):
            lifecycle.start(submit_job(db, roomy, 10).id, lease_owner="w", lease_seconds=LEASE)
        issue(db, 100, expires_at=utcnow() - timedelta(seconds=1))
        with db.transaction() as session:
            ledger.revoke(session, issue(db, 100).record.id)
        assert snapshot_gauges(registry) == {
            "whisper_jobs{status=queued}": 1,
            "whisper_jobs{status=running}": 2,
            "whisper_codes{state=active}": 1,
            "whisper_codes{state=exhausted}": 1,
            "whisper_codes{state=expired}": 1,
            "whisper_codes{state=revoked}": 1,
        }
    finally:
        unregister()
    assert snapshot_gauges(registry) == {}


def snapshot_gauges(registry: CollectorRegistry) -> Samples:
    samples: Samples = {}
    for family in registry.collect():
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sample.labels.items())
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def test_one_database_collector_per_registry_and_a_dead_database_spoils_no_scrape(
    db: Database, tmp_path: Path
) -> None:
    """Apps started one after another in one process each register their database: the last
    one is reported, and an earlier app's shutdown does not remove it."""
    registry = CollectorRegistry()
    dead = Database(f"sqlite:///{tmp_path}/missing/whisper.db")
    unregister_first = metrics.register_database_collector(db, registry)
    unregister_dead = metrics.register_database_collector(dead, registry)
    unregister_first()
    assert b"whisper_jobs" not in generate_latest(registry)  # the dead one: nothing, no error
    unregister_dead()
    unregister_again = metrics.register_database_collector(db, registry)
    assert b'whisper_jobs{status="queued"} 0.0' in generate_latest(registry)
    unregister_again()
    dead.dispose()


def test_an_error_code_the_project_does_not_give_is_counted_as_other(
    db: Database, lifecycle: Lifecycle
) -> None:
    code_id = issue(db, 1000, max_uses=3).record.id
    known, unknown = (submit_job(db, code_id, 10) for _ in range(2))
    before = snapshot()
    # In the cluster a job's code may come from a transcriber pod's record.
    lifecycle.fail(known.id, code="engine_rate_limited", message="429 after every retry.")
    lifecycle.fail(unknown.id, code="pwned_0x41414141", message="Whatever the pod said.")
    assert moved(before) == {
        finished("failed", "engine_rate_limited"): 1,
        finished("failed", "other"): 1,
        REFUNDED: 20,
    }


def _code_literals(tree: ast.AST) -> set[str]:
    """String literals given as a code: ``code="…"`` arguments, ``code = "…"`` class
    attributes, ``"code": "…"`` dict entries and ``…_LOST = "…"`` constants."""
    found: set[str] = set()
    for node in ast.walk(tree):
        pairs: list[tuple[object, ast.expr | None]] = []
        if isinstance(node, ast.keyword):
            pairs.append((node.arg, node.value))
        elif isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name):
                pairs.append((target.id, node.value))
        elif isinstance(node, ast.Dict):
            pairs.extend(
                (key.value if isinstance(key, ast.Constant) else None, value)
                for key, value in zip(node.keys, node.values, strict=True)
            )
        for name, value in pairs:
            wanted = name == "code" or (isinstance(name, str) and name.endswith("_LOST"))
            if wanted and isinstance(value, ast.Constant) and isinstance(value.value, str):
                found.add(value.value)
    return found


def test_every_error_code_given_in_the_source_is_a_known_one() -> None:
    root = Path(__file__).resolve().parents[2]
    packages = ("transcription", "gateway", "transcriber", "operator", "whisperctl")
    given = {
        code
        for package in packages
        for path in (root / package).rglob("*.py")
        for code in _code_literals(ast.parse(path.read_text(), str(path)))
    }
    assert {"engine_timeout", "worker_lost", "job_lost", "invalid_spec"} <= given
    assert given - KNOWN_CODES == set()


OLD_RECORD = {
    "version": 1,
    "job_id": "tr_old",
    "outcome": "transcribed",
    "text": "Recorded before engine usage was.",
    "language": "en",
    "duration_seconds": 4.0,
    "segment_count": 1,
    "uris": {},
    "model": "whisper-1",
    "engine": "openai",
    "error": None,
}


@pytest.mark.parametrize(
    "usage",
    [
        {"openai_requests": {'200"} 1\nwhisper_fake': 1}},
        {"openai_requests": {"2000": 1}},
        {"openai_requests": {"200": -1}},
        {"openai_retries": jobfiles.MAX_ENGINE_COUNT + 1},
        {"openai_bytes_sent": jobfiles.MAX_ENGINE_BYTES + 1},
        {"model_loads": 10**9},
        {"model_load_seconds": float("inf")},
        "lots",
    ],
)
def test_engine_usage_out_of_bounds_is_dropped_and_the_record_kept(
    tmp_path: Path, usage: object
) -> None:
    files = jobfiles.JobFiles(LocalBlobStore(tmp_path))
    files.blobs.put_bytes(
        jobfiles.result_key("tr_old"), json.dumps({**OLD_RECORD, "engine_usage": usage}).encode()
    )
    result = files.read_result("tr_old")
    assert result is not None and result.text == OLD_RECORD["text"]
    assert result.engine_usage is None


def test_a_record_from_before_engine_usage_reads_and_a_new_one_round_trips(
    tmp_path: Path,
) -> None:
    files = jobfiles.JobFiles(LocalBlobStore(tmp_path))
    files.blobs.put_bytes(jobfiles.result_key("tr_old"), json.dumps(OLD_RECORD).encode())
    old = files.read_result("tr_old")
    assert old is not None and old.engine_usage is None and old.segment_count == 1

    usage = jobfiles.EngineUsage(
        openai_requests={"200": 3, "429": 2, "error": 1}, openai_retries=3, openai_bytes_sent=9000
    )
    files.write_result(old.model_copy(update={"job_id": "tr_new", "engine_usage": usage}))
    new = files.read_result("tr_new")
    assert new is not None and new.engine_usage == usage


def test_engine_usage_adds_up_to_its_caps() -> None:
    big = jobfiles.EngineUsage(
        openai_requests={"200": jobfiles.MAX_ENGINE_COUNT},
        openai_retries=jobfiles.MAX_ENGINE_COUNT,
        openai_bytes_sent=jobfiles.MAX_ENGINE_BYTES,
        model_loads=1,
        model_load_seconds=2.5,
    )
    more = jobfiles.EngineUsage(
        openai_requests={"200": 1, "503": 2}, openai_retries=1, openai_bytes_sent=1, model_loads=1
    )
    assert big.plus(more) == jobfiles.EngineUsage(
        openai_requests={"200": jobfiles.MAX_ENGINE_COUNT, "503": 2},
        openai_retries=jobfiles.MAX_ENGINE_COUNT,
        openai_bytes_sent=jobfiles.MAX_ENGINE_BYTES,
        model_loads=2,
        model_load_seconds=2.5,
    )


def test_a_meter_reports_what_the_engines_did_since_it_began_and_the_operator_adds_it() -> None:
    metrics.OPENAI_REQUESTS.labels("200").inc(7)  # before the meter: not its run's
    meter = metrics.EngineMeter()
    assert meter.usage() == jobfiles.EngineUsage()
    metrics.OPENAI_REQUESTS.labels("429").inc(2)
    metrics.OPENAI_REQUESTS.labels("200").inc()
    metrics.OPENAI_RETRIES.inc(2)
    metrics.OPENAI_BYTES_SENT.inc(3 * 1024)
    metrics.MODEL_LOAD.labels("local").observe(1.5)
    usage = meter.usage()
    assert usage == jobfiles.EngineUsage(
        openai_requests={"429": 2, "200": 1},
        openai_retries=2,
        openai_bytes_sent=3 * 1024,
        model_loads=1,
        model_load_seconds=1.5,
    )

    before = snapshot()
    load_sum = REGISTRY.get_sample_value("whisper_model_load_seconds_sum", {"engine": "local"})
    metrics.engine_used(usage)
    assert moved(before) == {
        "whisper_openai_requests_total{status=429}": 2,
        "whisper_openai_requests_total{status=200}": 1,
        "whisper_openai_retries_total": 2,
        "whisper_openai_bytes_sent_total": 3 * 1024,
        "whisper_model_load_seconds_count{engine=local}": 1,
    }
    after = REGISTRY.get_sample_value("whisper_model_load_seconds_sum", {"engine": "local"})
    assert after == pytest.approx((load_sum or 0) + 1.5)
