"""Pure builders and generated CRDs: golden files, and offline validation against Kubernetes 1.35."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from transcription import resources
from transcription.jobfiles import RunRequest
from transcription.settings import OperatorSettings
from transcription_operator import builders, crds
from transcription_operator.status import Phase, job_state, termination

ROOT = Path(__file__).parent.parent.parent
GOLDEN = Path(__file__).parent / "golden"
K8S_VERSION = "1.35.0"
TJ = {
    "apiVersion": resources.API_VERSION,
    "kind": "TranscriptionJob",
    "metadata": {"name": "tr-0123456789abcdef", "namespace": "whisper", "uid": "uid-1"},
}
CC = {
    "apiVersion": resources.API_VERSION,
    "kind": "CreditCode",
    "metadata": {"name": "alice", "namespace": "whisper", "uid": "uid-2"},
}
NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


def settings(**overrides: Any) -> OperatorSettings:
    """Operator settings as a cluster gives them (the operator refuses to start without these)."""
    required = {"database_url": "postgresql://db/whisper", "code_secret": "k"}
    return OperatorSettings(_env_file=None, **{**required, **overrides})  # type: ignore[call-arg]


def built() -> dict[str, dict[str, Any]]:
    spec = resources.TranscriptionJobSpec(job_id="tr_0123456789abcdef", model="tiny.en")
    request = RunRequest(
        job_id="tr_0123456789abcdef",
        audio_key="jobs/tr_0123456789abcdef/work/audio.mp3",
        audio_seconds=61.2,
        language="en",
        prompt="Names: Ada, Grace.",
    )
    bucket = "gs://whisper-transcripts/prod"
    return {
        "job.yaml": builders.transcriber_job(TJ, request, spec, settings(blob_url=bucket)),
        "job-kueue.yaml": builders.transcriber_job(
            TJ,
            request,
            spec,
            settings(
                blob_url=bucket, kueue_queue_name="gpu", transcriber_env_secret="whisper-openai"
            ),
        ),
        "secret.yaml": builders.code_secret(CC, "wt_example", "cc_1"),
        "event.yaml": builders.event(TJ | {"metadata": {**TJ["metadata"]}}, reason="Admitted",
                                     message="Created Job tr-0123456789abcdef.", now=NOW),
    }  # fmt: skip


@pytest.mark.parametrize("name", sorted(built()))
def test_builders_match_their_golden_files(name: str) -> None:
    manifest = built()[name]
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    assert manifest == yaml.safe_load(path.read_text()), f"rerun with UPDATE_GOLDEN=1 ({path})"


@pytest.mark.parametrize("name", sorted(built()))
def test_built_manifests_are_valid_kubernetes_objects(name: str) -> None:
    kubernetes_validate.validate(built()[name], K8S_VERSION, strict=True)


@pytest.mark.parametrize("file_name", sorted(crds.CRDS))
def test_crd_files_are_generated_from_the_models(file_name: str) -> None:
    assert (ROOT / "crds" / file_name).read_text() == crds.render(crds.CRDS[file_name]()), (
        "regenerate with: python -m transcription_operator.crds crds"
    )


@pytest.mark.parametrize("file_name", sorted(crds.CRDS))
def test_crds_are_valid_and_described_everywhere(file_name: str) -> None:
    crd = crds.CRDS[file_name]()
    kubernetes_validate.validate(crd, K8S_VERSION, strict=True)

    def walk(node: dict[str, Any], path: str) -> None:
        assert node.get("description") or path.count(".") <= 1, f"{path} has no description"
        for key, child in (node.get("properties") or {}).items():
            walk(child, f"{path}.{key}")
        if isinstance(node.get("items"), dict) and "properties" in node["items"]:
            walk(node["items"], f"{path}[]")

    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for part in ("spec", "status"):
        walk(schema["properties"][part], part)


@pytest.mark.parametrize("example", sorted((ROOT / "crds/examples").glob("*.yaml")))
def test_examples_validate_against_their_crd(example: Path) -> None:
    body = yaml.safe_load(example.read_text())
    crd = next(c() for c in crds.CRDS.values() if c()["spec"]["names"]["kind"] == body["kind"])
    # OpenAPI v3.0 schemas are JSON Schema draft 4 (exclusiveMinimum is a flag there).
    jsonschema.Draft4Validator(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]).validate(
        body
    )
    model = {"TranscriptionJob": resources.TranscriptionJobSpec,
             "CreditCode": resources.CreditCodeSpec}[body["kind"]]  # fmt: skip
    model.model_validate(body["spec"])


def test_rbac_manifests_are_valid() -> None:
    for path in (ROOT / "deploy/rbac").glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize(
    ("status", "phase"),
    [
        ({}, Phase.PENDING),
        ({"active": 1}, Phase.RUNNING),
        ({"conditions": [{"type": "Complete", "status": "True"}]}, Phase.SUCCEEDED),
        ({"conditions": [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}]},
         Phase.FAILED),
        ({"active": 1, "conditions": [{"type": "Failed", "status": "False"}]}, Phase.RUNNING),
    ],
)  # fmt: skip
def test_job_status_maps_to_a_phase(status: dict[str, Any], phase: Phase) -> None:
    assert job_state({"status": status}).phase == phase


def test_a_suspended_job_waits_queued_for_kueue() -> None:
    assert job_state({"spec": {"suspend": True}, "status": {}}).phase == Phase.QUEUED


def test_the_latest_termination_message_wins_and_a_crash_log_is_kept() -> None:
    def pod(at: str, message: str) -> dict[str, Any]:
        state = {"terminated": {"finishedAt": at, "message": message}}
        return {"status": {"containerStatuses": [{"name": "transcriber", "state": state}]}}

    ok = '{"outcome":"transcribed","transcriptId":"ts_1"}'
    assert termination([pod("2025-01-01T00:00:02Z", ok), pod("2025-01-01T00:00:01Z", "x")]) == (
        termination([pod("2025-01-01T00:00:02Z", ok)])
    )
    crashed = termination([pod("2025-01-01T00:00:01Z", "Traceback ... MemoryError")])
    assert crashed is not None and crashed.outcome == "crashed"
    assert crashed.error_message == "Traceback ... MemoryError"
