"""Fault injection in the cluster shape, one test per step of a job's life, through the real
parts: PostgreSQL, the emulated cluster, the real operator process and the real transcriber entry
point (with a fast fake engine).

Each test breaks one step and then checks, within a deadline, that the job ended succeeded and
charged once, or failed or cancelled with the right money moved once; that the code's ledger sums
to its counters; that no job is left unfinished; and that the TranscriptionJob's final phase and
charged seconds match the database.
"""

from __future__ import annotations

import itertools
import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from tests.fixtures.audio import make_mp3
from tests.fixtures.gateway import FixedEngine, MakeClient, auth, get_job
from tests.operator.conftest import (
    CODE_SECRET,
    NAMESPACE,
    Cluster,
    Kubelet,
    Operator,
    StartOperator,
    wait_for,
)
from transcriber.engines.base import ProgressCallback
from transcription import jobfiles, ledger, lifecycle, resources
from transcription.blobstore import BlobStore, open_blob_store
from transcription.db.models import CreditCode, Job, LedgerEntry, Transcript
from transcription.db.session import Database
from transcription.lifecycle import Lifecycle, NewJob
from transcription.resources import Phase
from transcription.states import RESOLUTIONS, UNFINISHED, EntryKind, JobStatus
from transcription.transcript import FORMATS

#: How long any one outcome may take; the operator reconciles every 2 s in these tests.
DEADLINE = 30.0
SECONDS = 7.5

PHASES = {
    JobStatus.SUCCEEDED: Phase.SUCCEEDED,
    JobStatus.FAILED: Phase.FAILED,
    JobStatus.CANCELLED: Phase.CANCELLED,
}


@dataclass(frozen=True)
class Submitted:
    job_id: str
    code_id: str
    code: str
    audio_seconds: float
    reserved_seconds: int

    @property
    def name(self) -> str:
        return resources.resource_name(self.job_id)


def submit(
    db: Database, cluster: Cluster, blob_url: str, workdir: Path, *, create_tj: bool = True
) -> Submitted:
    """What the gateway does for one upload of real audio: the audio stored, a job row with its
    credit held on a fresh single-use code, and (unless the gateway "died" first) its
    TranscriptionJob."""
    job_id = lifecycle.new_job_id()
    path = workdir / f"{job_id}.mp3"
    seconds = make_mp3(path, SECONDS)
    key = jobfiles.audio_key(job_id)
    open_blob_store(blob_url).put_file(key, path, content_type="audio/mpeg")
    with db.transaction() as session:
        issued = ledger.issue_code(session, CODE_SECRET.encode(), seconds=3600)
        job = lifecycle.submit(
            session,
            NewJob(job_id=job_id, code_id=issued.record.id, audio_key=key,
                   audio_bytes=path.stat().st_size, audio_seconds=seconds, filename="talk.mp3",
                   language=None, prompt=None, mode="fast", engine="local", model=None),
        )  # fmt: skip
        submitted = Submitted(job_id, issued.record.id, issued.code, seconds, job.reserved_seconds)
        created = job.created_at
    if create_tj:
        cluster.create(
            resources.TJ_PLURAL,
            resources.transcription_job(
                job_id=job_id,
                namespace=NAMESPACE,
                spec=resources.TranscriptionJobSpec(job_id=job_id),
                submitted_at=created,
            ),
        )
    return submitted


def find_tj(cluster: Cluster, name: str) -> dict[str, Any] | None:
    return next((t for t in cluster.tjs() if t["metadata"]["name"] == name), None)


def status(cluster: Cluster, name: str) -> dict[str, Any]:
    tj = find_tj(cluster, name)
    return (tj.get("status") or {}) if tj is not None else {}


def reach(cluster: Cluster, name: str, phase: Phase, operator: Operator) -> dict[str, Any]:
    """Wait until the TranscriptionJob's status shows ``phase``; return that status."""
    found: dict[str, Any] = wait_for(
        lambda: (s := status(cluster, name)).get("phase") == phase and s,
        timeout=DEADLINE,
        what=f"{name} {phase}",
        log=operator.log,
    )
    return found


def admitted(cluster: Cluster, name: str, operator: Operator, *, not_uid: set[str]) -> Any:
    """Wait for a Job (other than those in ``not_uid``) that the TranscriptionJob reports."""

    def check() -> dict[str, Any] | None:
        job = cluster.job(name)
        if job is None or job["metadata"]["uid"] in not_uid:
            return None
        return job if status(cluster, name).get("jobName") == name else None

    return wait_for(check, timeout=DEADLINE, what=f"a new Job for {name}", log=operator.log)


def db_job(db: Database, job_id: str) -> Job:
    with db.read() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def transcribe(kubelet: Kubelet, job: dict[str, Any]) -> str:
    """The pod starts, runs the real transcriber entry point to the end and the Job completes."""
    kubelet.start(job)
    exit_code, message = kubelet.run(job, engine=FixedEngine())
    assert exit_code == 0, message
    kubelet.finish(job, exit_code, message, final=True)
    return message


def assert_books(
    db: Database,
    cluster: Cluster,
    sub: Submitted,
    *,
    state: JobStatus,
    charged: int,
    uses: int,
    resolution: EntryKind,
    cr: bool = True,
) -> Job:
    """The end every test must reach: the job final with its money moved once, the ledger equal
    to the counters, nothing unfinished, and the TranscriptionJob (unless it was deleted) telling
    the same story as the database."""
    with db.read() as session:
        job = session.get(Job, sub.job_id)
        assert job is not None
        code = session.get(CreditCode, sub.code_id)
        assert code is not None
        totals = ledger.ledger_totals(session, sub.code_id)
        resolutions = list(
            session.scalars(
                select(LedgerEntry.kind).where(
                    LedgerEntry.job_id == sub.job_id, LedgerEntry.kind.in_(sorted(RESOLUTIONS))
                )
            )
        )
        unfinished = session.scalar(
            select(func.count()).select_from(Job).where(Job.status.in_(sorted(UNFINISHED)))
        )
        transcript = session.scalar(select(Transcript).where(Transcript.job_id == sub.job_id))
    assert (job.status, job.charged_seconds) == (state, charged), job.error_message
    assert resolutions == [resolution]
    assert (code.reserved_seconds, code.spent_seconds, code.uses) == (0, charged, uses)
    assert totals == {
        "budget": code.budget_seconds,
        "reserved": code.reserved_seconds,
        "spent": code.spent_seconds,
        "uses": code.uses,
    }
    assert unfinished == 0
    assert (transcript is not None) == (state == JobStatus.SUCCEEDED)
    if cr:
        final = status(cluster, sub.name)
        assert final.get("phase") == PHASES[state]
        assert final.get("chargedSeconds") == job.charged_seconds
    return job


def whole(seconds: float) -> int:
    return math.ceil(seconds - 1e-6)


# --- 1. the gateway dies after its commit, before the TranscriptionJob ------------------------


def test_a_job_whose_gateway_died_before_the_transcription_job_gets_one_and_succeeds(
    cluster: Cluster,
    start_operator: StartOperator,
    kubelet: Kubelet,
    op_db: Database,
    blob_url: str,
    tmp_path: Path,
) -> None:
    operator = start_operator()
    sub = submit(op_db, cluster, blob_url, tmp_path, create_tj=False)

    # Found by the timer pass, not by any event: nothing in the cluster names the job yet.
    tj = wait_for(lambda: find_tj(cluster, sub.name), timeout=DEADLINE,
                  what="the missing TranscriptionJob", log=operator.log)  # fmt: skip
    assert tj["spec"]["jobId"] == sub.job_id
    assert tj["metadata"]["annotations"][resources.SUBMITTED_AT]
    job = admitted(cluster, sub.name, operator, not_uid=set())
    transcribe(kubelet, job)

    reach(cluster, sub.name, Phase.SUCCEEDED, operator)
    assert_books(op_db, cluster, sub, state=JobStatus.SUCCEEDED,
                 charged=whole(sub.audio_seconds), uses=1, resolution=EntryKind.SETTLE)  # fmt: skip
    assert db_job(op_db, sub.job_id).attempts == 1
    assert len(cluster.tjs()) == 1


def test_a_job_the_gateway_refunded_runs_nowhere_though_its_transcription_job_appears(
    cluster: Cluster,
    start_operator: StartOperator,
    op_db: Database,
    blob_url: str,
    tmp_path: Path,
) -> None:
    """The gateway's create timed out, so it cancelled the job (a full refund) and answered 503,
    but the create reached the API server after all: the operator reports it Cancelled and
    never starts a Job for it, while it goes on admitting others."""
    refunded = submit(op_db, cluster, blob_url, tmp_path, create_tj=False)
    assert Lifecycle(op_db, open_blob_store(blob_url)).cancel(refunded.job_id) is not None
    operator = start_operator()
    cluster.create(
        resources.TJ_PLURAL,
        resources.transcription_job(
            job_id=refunded.job_id,
            namespace=NAMESPACE,
            spec=resources.TranscriptionJobSpec(job_id=refunded.job_id),
            submitted_at=db_job(op_db, refunded.job_id).created_at,
        ),
    )
    reach(cluster, refunded.name, Phase.CANCELLED, operator)
    assert_books(op_db, cluster, refunded, state=JobStatus.CANCELLED, charged=0, uses=0,
                 resolution=EntryKind.RELEASE)  # fmt: skip

    # Admission has run since (another job got its Job), and still none for the refunded one.
    other = submit(op_db, cluster, blob_url, tmp_path)
    admitted(cluster, other.name, operator, not_uid=set())
    assert cluster.job(refunded.name) is None
    assert status(cluster, refunded.name)["phase"] == Phase.CANCELLED


# --- 2. the operator dies after settling, before the status says so ---------------------------


def test_an_operator_killed_after_settling_publishes_the_settled_outcome_on_restart(
    cluster: Cluster,
    start_operator: StartOperator,
    kubelet: Kubelet,
    op_db: Database,
    blob_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    operator = start_operator()
    sub = submit(op_db, cluster, blob_url, tmp_path)
    job = admitted(cluster, sub.name, operator, not_uid=set())
    kubelet.start(job)
    reach(cluster, sub.name, Phase.RUNNING, operator)
    operator.kill()
    exit_code, message = kubelet.run(job, engine=FixedEngine())
    assert exit_code == 0, message
    kubelet.finish(job, exit_code, message, final=True)

    # What the operator did just before it died: settle from the result record as its
    # reconciler does, and die right after the commit: no tidying, no status.
    lc = Lifecycle(op_db, open_blob_store(blob_url))
    result = lc.files.read_result(sub.job_id)
    assert result is not None and result.outcome == "transcribed"
    monkeypatch.setattr(lc.files, "tidy", lambda *_, **__: None)
    assert lc.finish(sub.job_id, result) is not None
    monkeypatch.undo()
    assert status(cluster, sub.name)["phase"] == Phase.RUNNING

    operator = start_operator()
    final = reach(cluster, sub.name, Phase.SUCCEEDED, operator)
    settled = assert_books(op_db, cluster, sub, state=JobStatus.SUCCEEDED,
                           charged=whole(sub.audio_seconds), uses=1,
                           resolution=EntryKind.SETTLE)  # fmt: skip
    transcript = lc.transcript(sub.job_id)
    assert transcript is not None
    assert final["transcriptId"] == transcript.id
    assert final["transcriptUris"] == transcript.uris
    assert final["progress"] == 1 and final["completedAt"]
    assert settled.attempts == 1
    # The restart also finishes what the crash cut short: the audio and the records go.
    wait_for(lambda: not lc.files.blobs.list(jobfiles.work_prefix(sub.job_id)),
             timeout=DEADLINE, what="the working files to go", log=operator.log)  # fmt: skip
    assert transcripts(lc.files.blobs, sub.job_id)


# --- 3. the database refuses the settlement -----------------------------------------------------

REFUSE_SETTLEMENT = (
    "CREATE SEQUENCE settle_refusals",
    """CREATE FUNCTION refuse_settlement() RETURNS trigger LANGUAGE plpgsql AS $fault$
    BEGIN
        IF NEW.status = 'succeeded' AND OLD.status <> 'succeeded' THEN
            PERFORM nextval('settle_refusals');  -- counts though the transaction rolls back
            RAISE EXCEPTION USING MESSAGE = 'injected fault: no settling ' || NEW.id;
        END IF;
        RETURN NEW;
    END
    $fault$""",
    """CREATE TRIGGER refuse_settlement BEFORE UPDATE ON jobs
    FOR EACH ROW EXECUTE FUNCTION refuse_settlement()""",
)


def refusals(db: Database) -> int:
    with db.engine.connect() as conn:
        last, called = conn.exec_driver_sql(
            "SELECT last_value, is_called FROM settle_refusals"
        ).one()
    return int(last) if called else 0


def test_a_database_error_while_settling_is_retried_with_backoff_and_settles_once(
    cluster: Cluster,
    start_operator: StartOperator,
    kubelet: Kubelet,
    op_db: Database,
    blob_url: str,
    tmp_path: Path,
) -> None:
    # In this test's own schema (the URL's search_path): the operator's connections see it too.
    with op_db.engine.begin() as conn:
        for statement in REFUSE_SETTLEMENT:
            conn.exec_driver_sql(statement)
    operator = start_operator(reconcile_interval=0.5)
    sub = submit(op_db, cluster, blob_url, tmp_path)
    job = admitted(cluster, sub.name, operator, not_uid=set())
    transcribe(kubelet, job)

    seen: list[float] = []

    def refused(times: int) -> bool:
        count = refusals(op_db)
        seen.extend(time.monotonic() for _ in range(count - len(seen)))
        return count >= times

    wait_for(lambda: refused(4), timeout=DEADLINE, what="4 refused settlements", log=operator.log)
    gaps = [later - earlier for earlier, later in itertools.pairwise(seen)]
    assert gaps[-1] > gaps[0] + 0.5, f"no backoff between retries: {gaps}"
    held = db_job(op_db, sub.job_id)
    assert (held.status, held.credit_state, held.charged_seconds) == ("running", "held", None)
    assert status(cluster, sub.name)["phase"] == Phase.RUNNING
    assert "injected fault" in operator.log.read_text()

    with op_db.engine.begin() as conn:
        conn.exec_driver_sql("DROP TRIGGER refuse_settlement ON jobs")
    reach(cluster, sub.name, Phase.SUCCEEDED, operator)
    assert_books(op_db, cluster, sub, state=JobStatus.SUCCEEDED,
                 charged=whole(sub.audio_seconds), uses=1, resolution=EntryKind.SETTLE)  # fmt: skip


# --- 4. the Job is deleted ---------------------------------------------------------------------


def delete_job(cluster: Cluster, job: dict[str, Any]) -> None:
    cluster.batch.delete_namespaced_job(
        job["metadata"]["name"], NAMESPACE, propagation_policy="Background"
    )


def test_a_job_deleted_before_it_finished_runs_again_and_succeeds(
    cluster: Cluster,
    start_operator: StartOperator,
    kubelet: Kubelet,
    op_db: Database,
    blob_url: str,
    tmp_path: Path,
) -> None:
    operator = start_operator()
    sub = submit(op_db, cluster, blob_url, tmp_path)
    first = admitted(cluster, sub.name, operator, not_uid=set())
    kubelet.start(first)
    reach(cluster, sub.name, Phase.RUNNING, operator)
    delete_job(cluster, first)

    second = admitted(cluster, sub.name, operator, not_uid={first["metadata"]["uid"]})
    assert db_job(op_db, sub.job_id).attempts == 2
    transcribe(kubelet, second)
    reach(cluster, sub.name, Phase.SUCCEEDED, operator)
    job = assert_books(op_db, cluster, sub, state=JobStatus.SUCCEEDED,
                       charged=whole(sub.audio_seconds), uses=1,
                       resolution=EntryKind.SETTLE)  # fmt: skip
    assert job.attempts == 2
    assert "JobLost" in [e["reason"] for e in cluster.events(sub.name)]


def test_a_finished_job_deleted_while_the_operator_was_down_is_settled_from_its_result(
    cluster: Cluster,
    start_operator: StartOperator,
    kubelet: Kubelet,
    op_db: Database,
    blob_url: str,
    tmp_path: Path,
) -> None:
    operator = start_operator()
    sub = submit(op_db, cluster, blob_url, tmp_path)
    job = admitted(cluster, sub.name, operator, not_uid=set())
    kubelet.start(job)
    reach(cluster, sub.name, Phase.RUNNING, operator)
    operator.kill()
    transcribe(kubelet, job)
    delete_job(cluster, job)  # its TTL passed while nobody watched
    assert cluster.job(sub.name) is None

    operator = start_operator()
    reach(cluster, sub.name, Phase.SUCCEEDED, operator)
    settled = assert_books(op_db, cluster, sub, state=JobStatus.SUCCEEDED,
                           charged=whole(sub.audio_seconds), uses=1,
                           resolution=EntryKind.SETTLE)  # fmt: skip
    assert settled.attempts == 1
    assert cluster.jobs() == []  # finished from the record, not run again


def test_a_job_that_keeps_vanishing_fails_job_lost_and_is_refunded(
    cluster: Cluster, start_operator: StartOperator, op_db: Database, blob_url: str, tmp_path: Path
) -> None:
    operator = start_operator(max_attempts=2)
    sub = submit(op_db, cluster, blob_url, tmp_path)
    gone: set[str] = set()
    for attempt in (1, 2):
        job = admitted(cluster, sub.name, operator, not_uid=gone)
        assert db_job(op_db, sub.job_id).attempts == attempt
        gone.add(job["metadata"]["uid"])
        delete_job(cluster, job)

    final = reach(cluster, sub.name, Phase.FAILED, operator)
    failed = assert_books(op_db, cluster, sub, state=JobStatus.FAILED, charged=0, uses=0,
                          resolution=EntryKind.RELEASE)  # fmt: skip
    assert (failed.error_code, failed.attempts) == ("job_lost", 2)
    assert "refunded" in final["message"]
    assert cluster.jobs() == []
    assert not open_blob_store(blob_url).exists(jobfiles.audio_key(sub.job_id))


# --- pods that run in the background ------------------------------------------------------


class PodKilled(BaseException):
    """The pod's container is killed: nothing more runs in it, nothing is written."""


class StallingEngine(FixedEngine):
    """Reports half the audio done, again and again, until its pod is killed."""

    def __init__(self) -> None:
        super().__init__()
        self.killed = threading.Event()

    def _wait(self, duration: float, on_progress: ProgressCallback | None) -> None:
        while not self.killed.wait(0.05):
            if on_progress is not None:
                on_progress(duration / 2)
        raise PodKilled


Outcome = tuple[int, str | None] | None


@contextmanager
def running_pod(
    kubelet: Kubelet, job: dict[str, Any], engine: FixedEngine
) -> Iterator[Callable[..., Outcome]]:
    """The transcriber runs in a thread (a pod) while the block runs; the returned ``end`` kills
    a ``StallingEngine``'s pod (unless ``kill=False``), waits for the pod and returns its exit
    code and outcome (None if it was killed). The pod's environment is the process's while it
    runs (``Kubelet.run``), so the block must not start an operator nor change the environment,
    and runs the kubelet makes in it must end before the pod does."""
    errors: list[BaseException] = []
    outcome: list[tuple[int, str | None]] = []

    def run() -> None:
        try:
            exit_code, message = kubelet.run(job, engine=engine)
            outcome.append((exit_code, json.loads(message).get("outcome")))
        except PodKilled:
            pass
        except BaseException as exc:  # surfaced in the test's thread
            errors.append(exc)

    thread = threading.Thread(target=run, name="transcriber-pod", daemon=True)
    thread.start()

    def end(*, kill: bool = True) -> Outcome:
        if kill and isinstance(engine, StallingEngine):
            engine.killed.set()
        thread.join(DEADLINE)
        assert not thread.is_alive()
        if errors:
            raise errors[0]
        return outcome[0] if outcome else None

    try:
        yield end
    finally:
        if isinstance(engine, StallingEngine):
            engine.killed.set()
        late = getattr(engine, "go", None)
        if late is not None:
            late.set()
        thread.join(DEADLINE)


# --- 5. the pod runs twice --------------------------------------------------------------------


class OtherEngine(FixedEngine):
    """Says something else: a second run that stored its transcripts would change them."""

    words = ("a different transcript", "that must never win")


class LateEngine(OtherEngine):
    """A pod the cluster gave up on that still runs: it has its audio and holds until told."""

    def __init__(self) -> None:
        super().__init__()
        self.holding = threading.Event()
        self.go = threading.Event()

    def _wait(self, duration: float, on_progress: ProgressCallback | None) -> None:
        self.holding.set()
        assert self.go.wait(DEADLINE)


def transcripts(blobs: BlobStore, job_id: str) -> dict[str, bytes]:
    return {fmt.value: blobs.get_bytes(jobfiles.transcript_key(job_id, fmt)) for fmt in FORMATS}


def test_a_pod_run_twice_charges_once_and_never_touches_the_first_run_s_transcripts(
    cluster: Cluster,
    start_operator: StartOperator,
    kubelet: Kubelet,
    op_db: Database,
    pg_url: str,
    blob_url: str,
    tmp_path: Path,
    make_client: MakeClient,
) -> None:
    operator = start_operator()
    sub = submit(op_db, cluster, blob_url, tmp_path)
    job = admitted(cluster, sub.name, operator, not_uid=set())
    blobs = open_blob_store(blob_url)
    kubelet.start(job)
    late = LateEngine()
    with running_pod(kubelet, job, late) as loser:
        assert late.holding.wait(DEADLINE)
        exit_code, message = kubelet.run(job, engine=FixedEngine())
        assert exit_code == 0, message
        written = transcripts(blobs, sub.job_id)

        # Another pod of the same Job, before the Job is reported finished.
        again = OtherEngine()
        exit_code, second = kubelet.run(job, engine=again)
        assert (exit_code, json.loads(second)["outcome"]) == (0, "skipped")
        assert transcripts(blobs, sub.job_id) == written

        kubelet.finish(job, 0, message, final=True)
        reach(cluster, sub.name, Phase.SUCCEEDED, operator)
        # The pod the cluster gave up on ends only now, after the job succeeded.
        late.go.set()
        outcome = loser()
    assert outcome == (0, "skipped")

    # And one more after the job succeeded and its working files were tidied away.
    exit_code, third = kubelet.run(job, engine=again)
    assert (exit_code, json.loads(third)["outcome"]) == (0, "skipped")
    assert again.calls == []
    assert transcripts(blobs, sub.job_id) == written
    assert not blobs.list(jobfiles.work_prefix(sub.job_id))

    assert_books(op_db, cluster, sub, state=JobStatus.SUCCEEDED,
                 charged=whole(sub.audio_seconds), uses=1, resolution=EntryKind.SETTLE)  # fmt: skip
    gateway = make_client(db_url=pg_url, blob_url=blob_url, runner="kubernetes",
                          kubernetes_namespace=NAMESPACE, code_secret=CODE_SECRET)  # fmt: skip
    body = get_job(gateway, sub.code, sub.job_id)
    assert body["status"] == "succeeded"
    assert body["text"] == " ".join(FixedEngine.words)
    for fmt, content in written.items():
        download = gateway.get(
            f"/v1/transcriptions/{sub.job_id}/transcript.{fmt}", headers=auth(sub.code)
        )
        assert (download.status_code, download.content) == (200, content)


# --- 6. cancelled while running -----------------------------------------------------------------


def test_cancelling_a_running_job_charges_the_progress_keeps_the_use_and_stops_the_job(
    cluster: Cluster,
    start_operator: StartOperator,
    kubelet: Kubelet,
    op_db: Database,
    blob_url: str,
    tmp_path: Path,
) -> None:
    operator = start_operator()
    sub = submit(op_db, cluster, blob_url, tmp_path)
    job = admitted(cluster, sub.name, operator, not_uid=set())
    kubelet.start(job)
    files = jobfiles.JobFiles(open_blob_store(blob_url))
    with running_pod(kubelet, job, StallingEngine()) as end:
        # The pod's progress record reaches the database and what kubectl shows.
        wait_for(lambda: status(cluster, sub.name).get("progress", 0) >= 0.4, timeout=DEADLINE,
                 what="progress in the status", log=operator.log)  # fmt: skip
        progress = files.read_progress(sub.job_id)
        assert progress is not None
        cluster.delete(resources.TJ_PLURAL, sub.name)
        wait_for(lambda: find_tj(cluster, sub.name) is None and cluster.job(sub.name) is None,
                 timeout=DEADLINE, what="the cancel to go through", log=operator.log)  # fmt: skip
        # Had the Job's deletion not killed the pod, it would notice its job is over and stop.
        assert end(kill=False) == (0, "skipped")

    done = whole(progress.fraction * sub.audio_seconds)
    cancelled = assert_books(op_db, cluster, sub, state=JobStatus.CANCELLED,
                             charged=whole(max(progress.seconds_done,
                                               progress.fraction * sub.audio_seconds)),
                             uses=1, resolution=EntryKind.SETTLE, cr=False)  # fmt: skip
    assert cancelled.charged_seconds is not None
    assert done <= cancelled.charged_seconds < sub.reserved_seconds
    assert not files.has_audio(sub.job_id)
    assert cluster.jobs() == []


def test_an_operator_killed_between_a_cancel_and_its_tidying_tidies_on_restart(
    cluster: Cluster,
    start_operator: StartOperator,
    kubelet: Kubelet,
    op_db: Database,
    blob_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    operator = start_operator()
    sub = submit(op_db, cluster, blob_url, tmp_path)
    job = admitted(cluster, sub.name, operator, not_uid=set())
    kubelet.start(job)
    lc = Lifecycle(op_db, open_blob_store(blob_url))
    with running_pod(kubelet, job, StallingEngine()) as end:
        wait_for(lambda: status(cluster, sub.name).get("progress", 0) >= 0.4, timeout=DEADLINE,
                 what="progress in the status", log=operator.log)  # fmt: skip
        operator.kill()
        # The TranscriptionJob is deleted; the finalizer's cancel commits, and the operator dies
        # before it removes the files or the Job, and before the finalizer lets go.
        cluster.delete(resources.TJ_PLURAL, sub.name)
        monkeypatch.setattr(lc.files, "tidy", lambda *_, **__: None)
        cancelled = lc.cancel(sub.job_id)
        monkeypatch.undo()
        assert cancelled is not None and cancelled.charged_seconds
        assert end() is None  # the pod's node went down too

    assert lc.files.has_audio(sub.job_id)
    assert find_tj(cluster, sub.name) is not None
    operator = start_operator()
    wait_for(lambda: find_tj(cluster, sub.name) is None and cluster.job(sub.name) is None,
             timeout=DEADLINE, what="the cancel to go through", log=operator.log)  # fmt: skip
    assert not lc.files.blobs.list(jobfiles.job_prefix(sub.job_id))
    assert_books(op_db, cluster, sub, state=JobStatus.CANCELLED,
                 charged=cancelled.charged_seconds, uses=1, resolution=EntryKind.SETTLE,
                 cr=False)  # fmt: skip
    assert cluster.jobs() == []
