"""An in-memory Kubernetes API: the few calls the operator's ``Context`` and the gateway's runner
make, with the semantics the reconciliation relies on.

TranscriptionJobs get a uid, a resourceVersion that every write bumps (a status patch naming an
older one answers 409), finalizers that turn a delete into a ``deletionTimestamp``, and a status
checked against the CRD's model (422 otherwise, as a structural schema would). Jobs and Pods are
plain dicts: the test's kubelet sets their status, and ``collect_garbage`` plays the garbage
collector (Jobs whose owner is gone, Pods whose Job is gone). Lists return deep copies, as JSON
over the wire would.

Every call the clients make goes through ``hook(verb, "before" | "after", name)``, where a test
can inject an API error, a crash of the caller, or another actor's step: the API calls are the
points where the operator's threads and the other processes interleave.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from transcription.resources import JOB_LABEL, TJ_PLURAL, TranscriptionJobStatus

Hook = Callable[[str, str, str], None]

#: The finalizer kopf puts on TranscriptionJobs (``settings.persistence.finalizer``).
FINALIZER = "transcription.whisper.dev/finalizer"


def clone(obj: Any) -> Any:
    """A deep copy, as a round trip through the API's JSON makes (and faster than deepcopy)."""
    return json.loads(json.dumps(obj))


def api_error(status: int, reason: str) -> ApiException:
    return ApiException(status=status, reason=reason)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge, ``null`` removes a key, the rest replaces."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


class FakeKube:
    """CoreV1Api, BatchV1Api and CustomObjectsApi in one object, for one namespace."""

    def __init__(self, namespace: str = "default", start: datetime | None = None) -> None:
        self.namespace = namespace
        self.tjs: dict[str, dict[str, Any]] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.pods: dict[str, dict[str, Any]] = {}
        self.events = 0
        self.hook: Hook | None = None
        self._version = 0
        self._serial = 0
        self._start = start or datetime(2030, 1, 1, tzinfo=UTC)
        self.seconds = 0.0
        # CoreV1Api.api_client.sanitize_for_serialization on what list_namespaced_pod returns.
        self.api_client = self

    # --- bookkeeping ---------------------------------------------------------------------

    def now(self) -> str:
        moment = self._start + timedelta(seconds=self.seconds)
        return moment.isoformat().replace("+00:00", "Z")

    def _bump(self, obj: dict[str, Any]) -> None:
        self._version += 1
        obj["metadata"]["resourceVersion"] = str(self._version)

    def _uid(self, kind: str) -> str:
        self._serial += 1
        return f"{kind}-{self._serial:06d}"

    def _call(self, verb: str, action: Callable[[], Any], name: str = "") -> Any:
        if self.hook is not None:
            self.hook(verb, "before", name)
        result = action()
        if self.hook is not None:
            self.hook(verb, "after", name)
        return result

    def _ns(self, namespace: str) -> None:
        if namespace != self.namespace:
            raise api_error(403, f"namespace {namespace} is not served")

    @staticmethod
    def sanitize_for_serialization(obj: Any) -> Any:
        return clone(obj)

    # --- CustomObjectsApi (TranscriptionJobs) ---------------------------------------------

    def list_namespaced_custom_object(
        self, group: str, version: str, namespace: str, plural: str, **_: Any
    ) -> dict[str, Any]:
        def act() -> dict[str, Any]:
            self._ns(namespace)
            assert plural == TJ_PLURAL
            return {"items": clone(list(self.tjs.values()))}

        result: dict[str, Any] = self._call("list_tjs", act)
        return result

    def create_namespaced_custom_object(
        self, group: str, version: str, namespace: str, plural: str, body: dict[str, Any], **_: Any
    ) -> dict[str, Any]:
        def act() -> dict[str, Any]:
            self._ns(namespace)
            assert plural == TJ_PLURAL
            name = body["metadata"]["name"]
            if name in self.tjs:
                raise api_error(409, "AlreadyExists")
            tj = clone(body)
            tj.pop("status", None)  # the status subresource ignores it on create
            tj["metadata"].update(
                uid=self._uid("tj"), generation=1, creationTimestamp=self.now(), finalizers=[]
            )
            self._bump(tj)
            self.tjs[name] = tj
            return clone(tj)

        result: dict[str, Any] = self._call("create_tj", act, body["metadata"]["name"])
        return result

    def patch_namespaced_custom_object_status(
        self,
        group: str,
        version: str,
        namespace: str,
        plural: str,
        name: str,
        body: dict[str, Any],
        **_: Any,
    ) -> dict[str, Any]:
        def act() -> dict[str, Any]:
            self._ns(namespace)
            assert plural == TJ_PLURAL
            tj = self.tjs.get(name)
            if tj is None:
                raise api_error(404, "NotFound")
            wanted = (body.get("metadata") or {}).get("resourceVersion")
            if wanted is not None and wanted != tj["metadata"]["resourceVersion"]:
                raise api_error(409, "Conflict")
            status = clone(merge_patch(tj.get("status") or {}, body.get("status") or {}))
            try:
                TranscriptionJobStatus.model_validate(status)
            except ValidationError as exc:
                raise api_error(422, f"Invalid status: {exc}") from None
            tj["status"] = status
            self._bump(tj)
            return clone(tj)

        result: dict[str, Any] = self._call(
            "patch_tj_status", act, f"{name} {(body.get('status') or {}).get('phase') or ''}"
        )
        return result

    def delete_namespaced_custom_object(
        self, group: str, version: str, namespace: str, plural: str, name: str, **_: Any
    ) -> dict[str, Any]:
        def act() -> dict[str, Any]:
            self._ns(namespace)
            assert plural == TJ_PLURAL
            return self.delete_tj(name)

        result: dict[str, Any] = self._call("delete_tj", act, name)
        return result

    def delete_tj(self, name: str) -> dict[str, Any]:
        tj = self.tjs.get(name)
        if tj is None:
            raise api_error(404, "NotFound")
        if tj["metadata"].get("finalizers"):
            if not tj["metadata"].get("deletionTimestamp"):
                tj["metadata"]["deletionTimestamp"] = self.now()
                self._bump(tj)
        else:
            del self.tjs[name]
        return {"kind": "Status", "status": "Success"}

    # --- what kopf does to a TranscriptionJob (no hook: it is not a handler's call) ---------

    def add_finalizer(self, name: str) -> None:
        tj = self.tjs[name]
        if FINALIZER not in tj["metadata"]["finalizers"]:
            tj["metadata"]["finalizers"].append(FINALIZER)
            self._bump(tj)

    def remove_finalizer(self, name: str) -> None:
        """The deletion handler succeeded: kopf lets the object go."""
        tj = self.tjs[name]
        tj["metadata"]["finalizers"] = [f for f in tj["metadata"]["finalizers"] if f != FINALIZER]
        self._bump(tj)
        if tj["metadata"].get("deletionTimestamp") and not tj["metadata"]["finalizers"]:
            del self.tjs[name]

    # --- BatchV1Api (Jobs) ----------------------------------------------------------------

    def list_namespaced_job(
        self, namespace: str, label_selector: str | None = None, **_: Any
    ) -> SimpleNamespace:
        def act() -> SimpleNamespace:
            self._ns(namespace)
            assert label_selector == JOB_LABEL
            items = [
                job
                for job in self.jobs.values()
                if JOB_LABEL in (job["metadata"].get("labels") or {})
            ]
            # _preload_content=False: the raw response, whose .data is the JSON body.
            return SimpleNamespace(data=json.dumps({"items": items}).encode())

        result: SimpleNamespace = self._call("list_jobs", act)
        return result

    def create_namespaced_job(self, namespace: str, body: dict[str, Any], **_: Any) -> Any:
        def act() -> dict[str, Any]:
            self._ns(namespace)
            name = body["metadata"]["name"]
            if name in self.jobs:
                raise api_error(409, "AlreadyExists")
            job = clone(body)
            job["metadata"].update(uid=self._uid("job"), creationTimestamp=self.now())
            job["status"] = {}
            self._bump(job)
            self.jobs[name] = job
            return clone(job)

        return self._call("create_job", act, body["metadata"]["name"])

    def delete_namespaced_job(self, name: str, namespace: str, **_: Any) -> Any:
        def act() -> dict[str, Any]:
            self._ns(namespace)
            if name not in self.jobs:
                raise api_error(404, "NotFound")
            self.remove_job(name)
            return {"kind": "Status", "status": "Success"}

        return self._call("delete_job", act, name)

    def remove_job(self, name: str) -> None:
        """The Job and (background propagation) its Pods go."""
        self.jobs.pop(name, None)
        for pod_name in [
            n for n, p in self.pods.items() if p["metadata"]["labels"]["job-name"] == name
        ]:
            del self.pods[pod_name]

    # --- CoreV1Api (Pods, Events) ---------------------------------------------------------

    def list_namespaced_pod(
        self, namespace: str, label_selector: str | None = None, **_: Any
    ) -> SimpleNamespace:
        def act() -> SimpleNamespace:
            self._ns(namespace)
            assert label_selector is not None
            key, _, value = label_selector.partition("=")
            items = [
                clone(pod)
                for pod in self.pods.values()
                if (pod["metadata"].get("labels") or {}).get(key) == value
            ]
            return SimpleNamespace(items=items)

        result: SimpleNamespace = self._call("list_pods", act)
        return result

    def create_namespaced_event(self, namespace: str, body: dict[str, Any], **_: Any) -> Any:
        def act() -> dict[str, Any]:
            self._ns(namespace)
            self.events += 1
            return body

        return self._call("create_event", act)

    # --- the Job controller and the kubelet (the test drives these) -----------------------

    def job_finished(self, name: str) -> bool:
        conditions = (self.jobs[name].get("status") or {}).get("conditions") or []
        return any(
            c["type"] in ("Complete", "Failed") and c["status"] == "True" for c in conditions
        )

    def set_job_status(self, name: str, **status: Any) -> None:
        job = self.jobs[name]
        job["status"] = {**(job.get("status") or {}), **status}
        self._bump(job)

    def start_pod(self, name: str) -> None:
        self.set_job_status(name, active=1, startTime=self.now())

    def end_pod(self, name: str, exit_code: int, message: str, *, final: bool) -> None:
        """A pod of the Job terminated with ``message``; ``final``: the Job controller gives up
        (or, for exit 0, the Job completes)."""
        job = self.jobs[name]
        labels = job["spec"]["template"]["metadata"]["labels"]
        pod_name = f"{name}-{self._uid('pod')}"
        self.pods[pod_name] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": pod_name,
                "namespace": self.namespace,
                "labels": {**labels, "job-name": name},
            },
            "status": {
                "phase": "Succeeded" if exit_code == 0 else "Failed",
                "containerStatuses": [
                    {
                        "name": "transcriber",
                        "state": {
                            "terminated": {
                                "exitCode": exit_code,
                                "message": message,
                                "finishedAt": self.now(),
                            }
                        },
                    }
                ],
            },
        }
        failed = (job.get("status") or {}).get("failed", 0)
        if exit_code == 0:
            self.set_job_status(
                name,
                active=0,
                succeeded=1,
                completionTime=self.now(),
                conditions=[
                    self._condition("SuccessCriteriaMet", "CompletionsReached"),
                    self._condition("Complete", "CompletionsReached"),
                ],
            )
        elif final:
            reason = "PodFailurePolicy" if exit_code == 3 else "BackoffLimitExceeded"
            text = f"Container transcriber exited with code {exit_code}"
            self.set_job_status(
                name,
                active=0,
                failed=failed + 1,
                conditions=[
                    self._condition("FailureTarget", reason, text),
                    self._condition("Failed", reason, text),
                ],
            )
        else:
            # The Job controller starts another pod.
            self.set_job_status(name, active=1, failed=failed + 1)

    def fail_job(self, name: str, reason: str, message: str) -> None:
        """The Job fails without a pod telling why (its deadline passed)."""
        self.set_job_status(
            name,
            active=0,
            conditions=[
                self._condition("FailureTarget", reason, message),
                self._condition("Failed", reason, message),
            ],
        )

    def _condition(self, type_: str, reason: str, message: str = "") -> dict[str, str]:
        return {
            "type": type_,
            "status": "True",
            "reason": reason,
            "message": message,
            "lastTransitionTime": self.now(),
        }

    def collect_garbage(self) -> list[str]:
        """Delete the Jobs whose owning TranscriptionJob is gone; their names."""
        owners = {tj["metadata"]["uid"] for tj in self.tjs.values()}
        orphans = [
            name
            for name, job in self.jobs.items()
            if not any(ref["uid"] in owners for ref in job["metadata"].get("ownerReferences", []))
        ]
        for name in orphans:
            self.remove_job(name)
        return orphans
