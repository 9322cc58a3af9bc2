"""CreditCodes applied with kubectl, and the operator's RBAC against the calls it really makes."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import yaml

from tests.fixtures.gateway import MakeClient, auth
from tests.operator.conftest import (
    CODE_SECRET,
    NAMESPACE,
    OPERATOR_TOKEN,
    Cluster,
    Kubelet,
    StartOperator,
    wait_for,
)
from tests.operator.test_operator import phase, submit_direct
from transcription import ledger, resources
from transcription.db.session import Database

ROOT = Path(__file__).parent.parent.parent


def code_status(cluster: Cluster, name: str) -> dict[str, Any]:
    body = cluster.custom.get_namespaced_custom_object(
        resources.GROUP, resources.VERSION, NAMESPACE, "creditcodes", name
    )
    status: dict[str, Any] = body.get("status") or {}
    return status


def secret_code(cluster: Cluster, name: str) -> str:
    secret = cluster.core.read_namespaced_secret(name, NAMESPACE)
    return base64.b64decode(secret.data["code"]).decode()


def test_a_credit_code_applied_as_yaml_works_at_the_gateway_until_deleted(
    cluster: Cluster,
    start_operator: StartOperator,
    make_client: MakeClient,
    pg_url: str,
    op_db: Database,
) -> None:
    operator = start_operator()
    gateway = make_client(db_url=pg_url, code_secret=CODE_SECRET)
    example = yaml.safe_load((ROOT / "crds/examples/creditcode.yaml").read_text())
    cluster.create("creditcodes", example)
    name = example["metadata"]["name"]

    status = wait_for(lambda: code_status(cluster, name).get("state"), what="minting",
                      log=operator.log) and code_status(cluster, name)  # fmt: skip
    assert status["remainingSeconds"] == example["spec"]["seconds"]
    code = secret_code(cluster, status["secretName"])
    assert code.startswith("wt_") and code not in str(status)
    balance = gateway.get("/v1/credits", headers=auth(code))
    assert balance.status_code == 200 and balance.json()["budget_seconds"] == 3600

    cluster.custom.patch_namespaced_custom_object(
        resources.GROUP, resources.VERSION, NAMESPACE, "creditcodes", name,
        {"spec": {"seconds": 5400}}, _content_type="application/merge-patch+json",
    )  # fmt: skip
    wait_for(lambda: code_status(cluster, name).get("budgetSeconds") == 5400, what="top-up",
             log=operator.log)  # fmt: skip
    assert gateway.get("/v1/credits", headers=auth(code)).json()["budget_seconds"] == 5400

    # Revoked by an admin while its CreditCode lives on: a later top-up is reported in the
    # status, not retried for ever.
    with op_db.transaction() as session:
        ledger.revoke(session, status["codeId"])
    cluster.custom.patch_namespaced_custom_object(
        resources.GROUP, resources.VERSION, NAMESPACE, "creditcodes", name,
        {"spec": {"seconds": 7200}}, _content_type="application/merge-patch+json",
    )  # fmt: skip
    wait_for(lambda: "revoked, for good" in code_status(cluster, name).get("message", ""),
             what="the refused top-up reported", log=operator.log)  # fmt: skip
    assert code_status(cluster, name)["budgetSeconds"] == 5400

    cluster.delete("creditcodes", name)
    wait_for(lambda: gateway.get("/v1/credits", headers=auth(code)).json().get("state")
             == "revoked", what="revocation", log=operator.log)  # fmt: skip
    refused = gateway.post(
        "/v1/transcriptions",
        files={"file": ("a.mp3", (ROOT / "tests/data/speech.mp3").read_bytes(), "audio/mpeg")},
        headers=auth(code),
    )
    assert refused.status_code == 402
    assert refused.json()["error"]["code"] == "code_revoked"


def rbac_rules(path: Path) -> set[tuple[str, str, str]]:
    allowed: set[tuple[str, str, str]] = set()
    for doc in yaml.safe_load_all(path.read_text()):
        if doc["kind"] in ("ClusterRole", "Role"):
            for rule in doc["rules"]:
                for group in rule["apiGroups"]:
                    for resource in rule["resources"]:
                        allowed.update((group, resource, verb) for verb in rule["verbs"])
    return allowed


def test_the_operator_rbac_allows_exactly_what_the_operator_calls(
    cluster: Cluster, start_operator: StartOperator, kubelet: Kubelet, op_db: Database
) -> None:
    operator = start_operator()
    finished, _ = submit_direct(op_db, cluster)
    deleted, _ = submit_direct(op_db, cluster)
    # A job whose gateway died before creating its TranscriptionJob: the operator creates it.
    orphan, _ = submit_direct(op_db, cluster, create_tj=False)
    for job_id in (finished, deleted, orphan):
        wait_for(lambda j=job_id: cluster.job(resources.resource_name(j)), what="the Job",
                 log=operator.log)  # fmt: skip
    job = cluster.job(resources.resource_name(finished))
    assert job is not None
    kubelet.finish(job, 0, "{}", final=True)
    wait_for(lambda: phase(cluster, resources.resource_name(finished)) == "Failed",
             what="the Job's end", log=operator.log)  # fmt: skip
    cluster.delete("transcriptionjobs", resources.resource_name(deleted))
    wait_for(lambda: cluster.job(resources.resource_name(deleted)) is None, what="Job deletion",
             log=operator.log)  # fmt: skip
    # A CreditCode whose Secret survived a crash: the replayed mint reads the Secret back.
    cc = {"apiVersion": resources.API_VERSION, "kind": "CreditCode",
          "metadata": {"name": "replayed"}, "spec": {"seconds": 60}}  # fmt: skip
    cluster.core.create_namespaced_secret(NAMESPACE, {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "replayed-code"},
        "data": {"code": base64.b64encode(b"wt_left-by-an-earlier-run-0123456789").decode()}})  # fmt: skip
    cluster.create("creditcodes", cc)
    wait_for(lambda: code_status(cluster, "replayed").get("hint") == "6789", what="minting",
             log=operator.log)  # fmt: skip
    cluster.delete("creditcodes", "replayed")
    wait_for(lambda: not cluster.custom.list_namespaced_custom_object(
        resources.GROUP, resources.VERSION, NAMESPACE, "creditcodes")["items"],
        what="revocation", log=operator.log)  # fmt: skip

    called = cluster.emulator.handler.calls[OPERATOR_TOKEN]  # type: ignore[union-attr]
    assert called == rbac_rules(ROOT / "deploy/rbac/operator.yaml")
