"""The real operator against the emulated cluster: what a user sees with kubectl and the API."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from tests.fixtures.audio import make_mp3
from tests.fixtures.gateway import (
    MakeClient,
    auth,
    credits,
    issue_code,
    submit,
    wait_for_job,
)
from tests.operator.conftest import (
    CODE_SECRET,
    Cluster,
    Kubelet,
    StartOperator,
    wait_for,
)
from transcription import jobfiles, ledger, lifecycle, resources
from transcription.blobstore import open_blob_store
from transcription.db.models import LedgerEntry
from transcription.db.session import Database
from transcription.lifecycle import NewJob
from transcription_operator.crds import transcription_job_crd

DATA = Path(__file__).parent.parent / "data"


def phase(cluster: Cluster, name: str) -> str | None:
    return (cluster.tj(name).get("status") or {}).get("phase")


def printer_columns(tj: dict[str, Any]) -> dict[str, Any]:
    """What ``kubectl get tj`` prints, by following the CRD's column JSONPaths."""
    columns = transcription_job_crd()["spec"]["versions"][0]["additionalPrinterColumns"]
    values: dict[str, Any] = {}
    for column in columns:
        node: Any = tj
        for part in column["jsonPath"].strip(".").split("."):
            node = node.get(part) if isinstance(node, dict) else None
        values[column["name"]] = node
    return values


def submit_direct(db: Database, cluster: Cluster, *, seconds: float = 5.0,
                  audio: tuple[str, Path] | None = None,
                  create_tj: bool = True) -> tuple[str, str]:  # fmt: skip
    """What the gateway does for one upload: the audio stored (when given as blob URL and
    file), a job row with its credit held, and (unless the gateway "died" first) its
    TranscriptionJob. Returns job and code IDs."""
    job_id = lifecycle.new_job_id()
    key = jobfiles.audio_key(job_id)
    if audio is not None:
        open_blob_store(audio[0]).put_file(key, audio[1], content_type="audio/mpeg")
    with db.transaction() as session:
        code = ledger.issue_code(session, CODE_SECRET.encode(), seconds=3600)
        job = lifecycle.submit(
            session,
            NewJob(job_id=job_id, code_id=code.record.id, audio_key=key, audio_bytes=1,
                   audio_seconds=seconds, filename="a.mp3", language=None, prompt=None,
                   mode="fast", engine="local", model=None),
        )  # fmt: skip
        job_id, code_id, created = job.id, code.record.id, job.created_at
    if not create_tj:
        return job_id, code_id
    spec = resources.TranscriptionJobSpec(job_id=job_id)
    cluster.create(
        "transcriptionjobs",
        resources.transcription_job(
            job_id=job_id, namespace="default", spec=spec, submitted_at=created
        ),
    )
    return job_id, code_id


def ledger_rows(db: Database, job_id: str, kind: str) -> int:
    with db.transaction() as session:
        return int(
            session.scalar(
                select(func.count()).where(LedgerEntry.job_id == job_id, LedgerEntry.kind == kind)
            )
            or 0
        )


@pytest.mark.slow
def test_upload_through_the_gateway_ends_succeeded_with_transcript_and_one_charge(
    cluster: Cluster,
    start_operator: StartOperator,
    kubelet: Kubelet,
    make_client: MakeClient,
    pg_url: str,
    gcs_bucket_url: str,
) -> None:
    operator = start_operator(blob=gcs_bucket_url)
    gateway = make_client(
        db_url=pg_url,
        blob_url=gcs_bucket_url,
        runner="kubernetes",
        kubernetes_namespace="default",
        code_secret=CODE_SECRET,
    )
    code = issue_code(gateway)
    response = submit(gateway, code.code, DATA / "speech.mp3")
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    name = resources.resource_name(job_id)

    job = wait_for(lambda: cluster.job(name), what="the Job", log=operator.log)
    assert job["metadata"]["ownerReferences"][0]["name"] == name
    kubelet.start(job)
    wait_for(lambda: phase(cluster, name) == "Running", what="Running", log=operator.log)
    exit_code, message = kubelet.run(job, subprocess_run=True)
    assert exit_code == 0, message
    kubelet.finish(job, exit_code, message, final=True)

    wait_for(lambda: phase(cluster, name) == "Succeeded", what="Succeeded", log=operator.log)
    tj = cluster.tj(name)
    columns = printer_columns(tj)
    assert all(v is not None for v in columns.values()), columns
    status = tj["status"]
    assert status["progress"] == 1
    assert status["transcriptUris"]["txt"].startswith("gs://")
    assert status["completedAt"]

    body = wait_for_job(gateway, code.code, job_id)
    assert body["status"] == "succeeded"
    assert "quick brown fox" in body["text"].lower() or len(body["text"]) > 20
    assert (
        status["chargedSeconds"]
        == body["charged_seconds"]
        == math.ceil(body["audio_seconds"] - 1e-6)
    )
    transcript = gateway.get(f"/v1/transcriptions/{job_id}/transcript.txt", headers=auth(code.code))
    assert transcript.status_code == 200
    balance = credits(gateway, code.code)
    assert balance["spent_seconds"] == status["chargedSeconds"]
    assert balance["reserved_seconds"] == 0
    reasons = [e["reason"] for e in cluster.events(name)]
    assert reasons[:1] == ["Queued"] and "Admitted" in reasons and "Transcribed" in reasons


def test_killing_the_operator_between_job_and_settlement_charges_once(
    cluster: Cluster,
    start_operator: StartOperator,
    kubelet: Kubelet,
    op_db: Database,
    blob_url: str,
    tmp_path: Path,
) -> None:
    operator = start_operator()
    seconds = make_mp3(tmp_path / "talk.mp3", 7.5)
    job_id, code_id = submit_direct(
        op_db, cluster, seconds=seconds, audio=(blob_url, tmp_path / "talk.mp3")
    )
    name = resources.resource_name(job_id)
    job = wait_for(lambda: cluster.job(name), what="the Job", log=operator.log)
    operator.kill()

    exit_code, message = kubelet.run(job, engine=_engine())
    kubelet.finish(job, exit_code, message, final=True)
    start_operator()
    wait_for(lambda: phase(cluster, name) == "Succeeded", what="Succeeded", log=operator.log)

    charged = math.ceil(seconds - 1e-6)
    assert len(cluster.jobs()) == 1
    assert ledger_rows(op_db, job_id, "settle") == 1
    with op_db.transaction() as session:
        code = ledger.get_code(session, code_id)
        assert (code.spent_seconds, code.reserved_seconds) == (charged, 0)
    assert cluster.tj(name)["status"]["chargedSeconds"] == charged


def test_deleting_an_unfinished_job_refunds_it_and_stops_its_job(
    cluster: Cluster, start_operator: StartOperator, op_db: Database
) -> None:
    operator = start_operator()
    job_id, code_id = submit_direct(op_db, cluster)
    name = resources.resource_name(job_id)
    wait_for(lambda: cluster.job(name), what="the Job", log=operator.log)

    cluster.delete("transcriptionjobs", name)
    wait_for(lambda: not [t for t in cluster.tjs() if t["metadata"]["name"] == name],
             what="the finalizer to let go", log=operator.log)  # fmt: skip
    assert cluster.job(name) is None
    with op_db.transaction() as session:
        code = ledger.get_code(session, code_id)
        assert (code.reserved_seconds, code.spent_seconds, code.uses) == (0, 0, 0)
    assert ledger_rows(op_db, job_id, "release") == 1


def test_a_job_that_exhausts_its_retries_fails_with_credit_released_and_a_reason(
    cluster: Cluster, start_operator: StartOperator, kubelet: Kubelet, op_db: Database
) -> None:
    operator = start_operator()
    job_id, code_id = submit_direct(op_db, cluster)
    name = resources.resource_name(job_id)
    job = wait_for(lambda: cluster.job(name), what="the Job", log=operator.log)
    crash = '{"jobId":"x","outcome":"crashed","error":{"code":"internal_error","message":"OOM"}}'
    kubelet.start(job)
    kubelet.finish(job, 1, crash, final=False)
    kubelet.finish(job, 1, crash, final=True)

    wait_for(lambda: phase(cluster, name) == "Failed", what="Failed", log=operator.log)
    status = cluster.tj(name)["status"]
    assert "BackoffLimitExceeded" in status["message"] and "refunded" in status["message"]
    assert status["chargedSeconds"] == 0
    with op_db.transaction() as session:
        code = ledger.get_code(session, code_id)
        assert (code.reserved_seconds, code.spent_seconds, code.uses) == (0, 0, 0)
    warnings = [e for e in cluster.events(name) if e["type"] == "Warning"]
    assert warnings and "BackoffLimitExceeded" in warnings[0]["message"]


def test_bad_audio_fails_at_once_with_the_transcriber_s_reason(
    cluster: Cluster, start_operator: StartOperator, kubelet: Kubelet, op_db: Database
) -> None:
    operator = start_operator()
    job_id, _ = submit_direct(op_db, cluster)
    name = resources.resource_name(job_id)
    job = wait_for(lambda: cluster.job(name), what="the Job", log=operator.log)
    rejected = (
        '{"jobId":"x","outcome":"rejected","error":{"code":"audio_undecodable",'
        '"message":"The audio could not be decoded."}}'
    )
    kubelet.finish(job, 3, rejected, final=True)
    wait_for(lambda: phase(cluster, name) == "Failed", what="Failed", log=operator.log)
    assert cluster.tj(name)["status"]["message"] == "The audio could not be decoded."


def test_a_spec_that_cannot_work_fails_permanently_with_a_message(
    cluster: Cluster, start_operator: StartOperator
) -> None:
    operator = start_operator()
    spec = {"jobId": "tr_00000000000000ff"}
    body = {"apiVersion": resources.API_VERSION, "kind": "TranscriptionJob",
            "metadata": {"name": "tr-00000000000000ff"}, "spec": spec}  # fmt: skip
    cluster.create("transcriptionjobs", body)
    wait_for(lambda: phase(cluster, "tr-00000000000000ff") == "Failed", what="Failed",
             log=operator.log)  # fmt: skip
    assert "created by the gateway" in cluster.tj("tr-00000000000000ff")["status"]["message"]


def _engine() -> Any:
    from tests.fixtures.gateway import FixedEngine

    return FixedEngine()


@pytest.mark.slow
def test_200_jobs_at_once_never_exceed_the_cap_and_are_admitted_in_order(
    cluster: Cluster, start_operator: StartOperator, kubelet: Kubelet, op_db: Database
) -> None:
    cap = 20
    operator = start_operator(max_running_jobs=cap)
    names = [resources.resource_name(submit_direct(op_db, cluster)[0]) for _ in range(200)]
    admitted: list[str] = []
    while len(admitted) < len(names):
        # The free slots fill up to the cap (never past it) before the kubelet ends any Job.
        want = min(cap, len(names) - len(admitted))
        jobs = wait_for(
            lambda want=want: (  # type: ignore[misc]
                fresh := [j for j in cluster.jobs() if j["metadata"]["name"] not in admitted]
            ) and len(fresh) >= want and fresh,
            timeout=60, what=f"{want} admissions after {len(admitted)}", log=operator.log,
        )  # fmt: skip
        assert len(jobs) == want
        for job in sorted(jobs, key=lambda j: names.index(j["metadata"]["name"])):
            admitted.append(job["metadata"]["name"])
            kubelet.finish(job, 0, "{}", final=True)
        running = [j for j in cluster.jobs() if not (j.get("status") or {}).get("conditions")]
        assert len(running) <= cap
    assert admitted == names
