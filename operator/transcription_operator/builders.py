"""Pure builders of every manifest the operator creates: Jobs, Secrets, Events, owner refs."""

from __future__ import annotations

import base64
import hashlib
from datetime import datetime
from typing import Any

from transcription import resources
from transcription.jobfiles import RunRequest
from transcription.resources import USER_ERROR_EXIT
from transcription.settings import OperatorSettings

CONTAINER = "transcriber"
COMPONENT = "transcription-operator"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
_MAX_NAME = 63
_RUN_AS = 10001


def owner_reference(owner: dict[str, Any]) -> dict[str, Any]:
    """A controller reference to ``owner`` so the child is collected with it."""
    return {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": owner["metadata"]["name"],
        "uid": owner["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def job_name(cr_name: str) -> str:
    """The child Job's name: fixed by the TranscriptionJob's, so a replay finds the same Job."""
    if len(cr_name) <= _MAX_NAME - 4:
        return cr_name
    digest = hashlib.sha256(cr_name.encode()).hexdigest()[:10]
    return f"{cr_name[: _MAX_NAME - 15]}-{digest}"


def transcriber_job(
    tj: dict[str, Any],
    request: RunRequest,
    spec: resources.TranscriptionJobSpec,
    settings: OperatorSettings,
) -> dict[str, Any]:
    """The batch/v1 Job that runs ``python -m transcriber`` for one TranscriptionJob. Its pod
    gets the run's request, the blob store and the engine's own Secret: no database."""
    cr_name = tj["metadata"]["name"]
    labels = {
        "app.kubernetes.io/name": "whisper-transcriber",
        "app.kubernetes.io/component": "transcriber",
        "app.kubernetes.io/managed-by": COMPONENT,
        resources.JOB_LABEL: cr_name,
    }
    job_labels = dict(labels)
    if settings.kueue_queue_name:
        job_labels[KUEUE_QUEUE_LABEL] = settings.kueue_queue_name
    env = [
        *({"name": name, "value": value} for name, value in request.env().items()),
        {"name": "WHISPER_BLOB_URL", "value": settings.resolved_blob_url()},
        {"name": "WHISPER_ENGINE", "value": spec.engine},
        {"name": "WHISPER_TERMINATION_MESSAGE_PATH", "value": "/dev/termination-log"},
        # The root filesystem is read-only; /tmp is the pod's own emptyDir.
        {"name": "HOME", "value": "/tmp"},  # noqa: S108
    ]
    if spec.model:
        env.append({"name": "WHISPER_MODEL", "value": spec.model})
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": settings.transcriber_image,
        "command": ["python", "-m", "transcriber"],
        "env": env,
        "resources": {
            "requests": {"cpu": settings.job_cpu_request, "memory": settings.job_memory_request},
            "limits": {"cpu": settings.job_cpu_limit, "memory": settings.job_memory_limit},
        },
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],  # noqa: S108
    }
    if settings.transcriber_env_secret:
        container["envFrom"] = [{"secretRef": {"name": settings.transcriber_env_secret}}]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(cr_name),
            "namespace": tj["metadata"]["namespace"],
            "labels": job_labels,
            "ownerReferences": [owner_reference(tj)],
        },
        "spec": {
            "backoffLimit": settings.job_backoff_limit,
            "activeDeadlineSeconds": settings.job_deadline_seconds,
            "ttlSecondsAfterFinished": settings.job_ttl_seconds,
            "completions": 1,
            "parallelism": 1,
            # Kueue admits a suspended Job by un-suspending it.
            "suspend": bool(settings.kueue_queue_name),
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": CONTAINER,
                            "operator": "In",
                            "values": [USER_ERROR_EXIT],
                        },
                    },
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                ]
            },
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "serviceAccountName": settings.transcriber_service_account,
                    "automountServiceAccountToken": False,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": _RUN_AS,
                        "runAsGroup": _RUN_AS,
                        "fsGroup": _RUN_AS,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [container],
                    "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "2Gi"}}],
                },
            },
        },
    }


def secret_name(cc_name: str) -> str:
    return f"{cc_name}-code"


def code_secret(cc: dict[str, Any], code: str, code_id: str) -> dict[str, Any]:
    """The Secret holding a minted code, owned by its CreditCode."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": secret_name(cc["metadata"]["name"]),
            "namespace": cc["metadata"]["namespace"],
            "labels": {"app.kubernetes.io/managed-by": COMPONENT},
            "annotations": {f"{resources.GROUP}/code-id": code_id},
            "ownerReferences": [owner_reference(cc)],
        },
        "data": {"code": base64.b64encode(code.encode()).decode()},
    }


def event(
    involved: dict[str, Any], *, reason: str, message: str, now: datetime, warning: bool = False
) -> dict[str, Any]:
    """A core/v1 Event on ``involved``, as ``kubectl describe`` shows them."""
    meta = involved["metadata"]
    stamp = now.isoformat().replace("+00:00", "Z")
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": involved["apiVersion"],
            "kind": involved["kind"],
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta["uid"],
        },
        "type": "Warning" if warning else "Normal",
        "reason": reason,
        "message": message[:1024],
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT,
        "reportingInstance": COMPONENT,
        "action": reason,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }
