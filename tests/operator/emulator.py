"""kmock's Kubernetes scaffold with a small object store, served on 127.0.0.1 from a thread.

kmock 0.8's ``KubernetesEmulator`` stamps no resourceVersion/uid/creationTimestamp/generation,
answers a failed JSON-patch ``test`` with 500, ignores label selectors, has no status
subresource, no PUT, no owner-reference GC, and rescans its whole request history on every
request. This keeps kmock's HTTP layer, URL parsing, discovery and error rendering, and serves
CRUD, patches, watches and the rest of what the operator relies on from the store below.
"""

from __future__ import annotations

import asyncio
import copy
import json
import secrets
import threading
import uuid
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import kmock
import yaml
from kmock._internal import rendering

from transcription import resources

Key = tuple[str, str, str]  # group, version, plural


@dataclass(frozen=True)
class Kind:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    status: bool = False
    short: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


KINDS = [
    Kind(resources.GROUP, resources.VERSION, "transcriptionjobs", "TranscriptionJob",
         status=True, short=("tj",)),
    Kind(resources.GROUP, resources.VERSION, "creditcodes", "CreditCode", status=True,
         short=("cc",)),
    Kind("batch", "v1", "jobs", "Job", status=True),
    Kind("", "v1", "pods", "Pod", status=True),
    Kind("", "v1", "secrets", "Secret"),
    Kind("", "v1", "events", "Event"),
    Kind("events.k8s.io", "v1", "events", "Event"),
    # Discoverable for kopf's backbone; clusterwide kopf never lists namespaces (kmock's path
    # parser cannot route GET /api/v1/namespaces anyway).
    Kind("", "v1", "namespaces", "Namespace", namespaced=False, status=True),
    Kind("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition",
         namespaced=False, status=True),
]  # fmt: skip

_HISTORY = 20_000  # watch events kept for resuming; older resourceVersions get 410 Gone


class ApiError(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


def _now() -> str:
    # The API server stamps whole seconds, so many objects share one creationTimestamp.
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (also used for strategic merge: lists are replaced)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge(result.get(key), value)
    return result


def _selector_matches(selector: str, labels: dict[str, str]) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = (s.strip() for s in term.split("!=", 1))
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = (s.strip() for s in term.replace("==", "=").split("=", 1))
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


@dataclass
class Store:
    """Objects by kind, a global resourceVersion counter and a watch event history."""

    kinds: dict[Key, Kind]
    objects: dict[Key, dict[tuple[str, str], dict[str, Any]]] = field(default_factory=dict)
    revision: int = 0
    history: dict[Key, deque[tuple[int, dict[str, Any]]]] = field(default_factory=dict)
    watchers: dict[Key, set[asyncio.Queue[dict[str, Any]]]] = field(default_factory=dict)

    def bucket(self, key: Key) -> dict[tuple[str, str], dict[str, Any]]:
        return self.objects.setdefault(key, {})

    def _emit(self, key: Key, kind: str, obj: dict[str, Any]) -> None:
        event = {"type": kind, "object": copy.deepcopy(obj)}
        self.history.setdefault(key, deque(maxlen=_HISTORY)).append((self.revision, event))
        for queue in self.watchers.get(key, set()):
            queue.put_nowait(event)

    def _stamp(self, obj: dict[str, Any]) -> None:
        self.revision += 1
        obj["metadata"]["resourceVersion"] = str(self.revision)

    def create(self, key: Key, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        kind = self.kinds[key]
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise ApiError(422, "Invalid", "metadata.name or generateName is required")
            meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
        if kind.namespaced:
            meta["namespace"] = namespace
        name = meta["name"]
        if (namespace, name) in self.bucket(key):
            raise ApiError(409, "AlreadyExists", f'{key[2]} "{name}" already exists')
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
        obj.update(apiVersion=kind.api_version, kind=kind.kind)
        if kind.status and key != ("", "v1", "pods"):
            obj.pop("status", None)  # only the status subresource sets it (pods: the kubelet)
        self._stamp(obj)
        self.bucket(key)[namespace, name] = obj
        self._emit(key, "ADDED", obj)
        return obj

    def get(self, key: Key, namespace: str, name: str) -> dict[str, Any]:
        try:
            return self.bucket(key)[namespace, name]
        except KeyError:
            raise ApiError(404, "NotFound", f'{key[2]} "{name}" not found') from None

    def list(self, key: Key, namespace: str | None, selector: str | None) -> list[dict[str, Any]]:
        return [
            obj
            for (ns, _), obj in self.bucket(key).items()
            if (namespace is None or ns == namespace)
            and (not selector or _selector_matches(selector, obj["metadata"].get("labels", {})))
        ]

    def update(
        self, key: Key, namespace: str, name: str, new: dict[str, Any], *, status: bool
    ) -> dict[str, Any]:
        """Store ``new`` (the whole object after a patch or PUT) as the API server would."""
        kind = self.kinds[key]
        old = self.get(key, namespace, name)
        expected = new.get("metadata", {}).get("resourceVersion")
        if expected and expected != old["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", "the object has been modified; reload and retry")
        if kind.status:
            if status:  # the status subresource changes nothing but status
                new = {**copy.deepcopy(old), "status": new.get("status", {})}
            else:
                new = {**new, "status": copy.deepcopy(old.get("status"))}
                if new["status"] is None:
                    new.pop("status")
        new["metadata"] = {
            **new.get("metadata", {}),
            **{k: old["metadata"][k] for k in ("uid", "creationTimestamp", "name")},
        }
        if kind.namespaced:
            new["metadata"]["namespace"] = namespace
        if old["metadata"].get("deletionTimestamp"):
            new["metadata"]["deletionTimestamp"] = old["metadata"]["deletionTimestamp"]
            added = set(new["metadata"].get("finalizers", [])) - set(
                old["metadata"].get("finalizers", [])
            )
            if added:
                raise ApiError(422, "Invalid", "no new finalizers can be added when deleting")
        strip = ("metadata", "status")
        if {k: v for k, v in new.items() if k not in strip} != {
            k: v for k, v in old.items() if k not in strip
        }:
            new["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
        else:
            new["metadata"]["generation"] = old["metadata"].get("generation", 1)
        if new == {**old, "metadata": {**old["metadata"]}}:
            return old  # a no-op write does not bump the resourceVersion
        self._stamp(new)
        self.bucket(key)[namespace, name] = new
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            self._remove(key, namespace, name)
        else:
            self._emit(key, "MODIFIED", new)
        return new

    def delete(self, key: Key, namespace: str, name: str, *, orphan: bool) -> dict[str, Any]:
        obj = self.get(key, namespace, name)
        if obj["metadata"].get("finalizers"):
            if not obj["metadata"].get("deletionTimestamp"):
                obj = copy.deepcopy(obj)
                obj["metadata"]["deletionTimestamp"] = _now()
                self._stamp(obj)
                self.bucket(key)[namespace, name] = obj
                self._emit(key, "MODIFIED", obj)
            return obj
        return self._remove(key, namespace, name, orphan=orphan)

    def _remove(
        self, key: Key, namespace: str, name: str, *, orphan: bool = False
    ) -> dict[str, Any]:
        obj = self.bucket(key).pop((namespace, name))
        self._stamp(obj)
        self._emit(key, "DELETED", obj)
        if not orphan:
            self._collect(obj["metadata"]["uid"])
        return obj

    def _collect(self, owner_uid: str) -> None:
        """The garbage collector: delete what the removed object owned."""
        for key in list(self.objects):
            for (ns, name), obj in list(self.bucket(key).items()):
                owners = obj["metadata"].get("ownerReferences", [])
                if any(ref.get("uid") == owner_uid for ref in owners) and (ns, name) in self.bucket(
                    key
                ):
                    self.delete(key, ns, name, orphan=False)


@attrs.define(kw_only=True)
class ClusterEmulator(kmock.KubernetesScaffold):
    """Serves the store for known kinds and kmock's discovery and errors for everything else."""

    store: Store = attrs.field(
        factory=lambda: Store({(k.group, k.version, k.plural): k for k in KINDS})
    )
    requests_served: int = 0
    #: (group, resource[/subresource], verb) called, per bearer token: what RBAC must allow.
    calls: dict[str, set[tuple[str, str, str]]] = attrs.field(factory=dict)
    #: RBAC as the API server enforces it, for the tokens it knows; other tokens are admins.
    rbac: Rbac = attrs.field(factory=lambda: Rbac())

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for kind in KINDS:
            self.resources[kmock.resource(kind.group, kind.version, kind.plural)] = (
                kmock.ResourceInfo(
                    kind=kind.kind,
                    singular=kind.kind.lower(),
                    namespaced=kind.namespaced,
                    verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
                    shortnames=set(kind.short),
                    subresources={"status"} if kind.status else set(),
                )
            )

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        try:
            return await super().__call__(raw_request)
        finally:
            # kmock keeps every request and rescans them all on each new one; nothing here
            # asserts on request history, so dropping it keeps the emulator fast.
            self.requests_served += 1
            self._requests.clear()
            for payload in self._payloads:
                payload._requests.clear()

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        res = request.resource
        key = (res.group, res.version, res.plural) if res is not None else None
        raw = request._raw_request
        if key is None and raw is not None and raw.path.rstrip("/") == "/api/v1/namespaces":
            # kmock cannot route the namespace list, but RBAC must still answer for it.
            forbidden = self._authorize(request, "", "namespaces", None)
            if forbidden is not None:
                return forbidden
        if key is None or key not in self.store.kinds:
            return await super()._handle(request)
        forbidden = self._authorize(
            request,
            key[0],
            key[2] + (f"/{request.subresource}" if request.subresource else ""),
            request.namespace,
        )
        if forbidden is not None:
            return forbidden
        self._record(request, key)
        try:
            return await self._serve(request, key)
        except ApiError as exc:
            return _status(exc.status, exc.reason, exc.message)

    def _authorize(
        self, request: rendering.Request, group: str, resource: str, namespace: str | None
    ) -> aiohttp.web.Response | None:
        """The API server's 403 when the caller's RBAC does not allow this request, else None."""
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        verb = _verb(request)
        denial = self.rbac.denial(token, group, resource, verb, namespace)
        if denial is None:
            return None
        self.rbac.denied.append(denial)
        return _status(403, "Forbidden", denial)

    def _record(self, request: rendering.Request, key: Key) -> None:
        resource = key[2] + (f"/{request.subresource}" if request.subresource else "")
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        self.calls.setdefault(token, set()).add((key[0], resource, _verb(request)))

    async def _serve(self, request: rendering.Request, key: Key) -> aiohttp.web.StreamResponse:
        store, ns, name = self.store, request.namespace or "", request.name
        method = request.method.value.upper()
        params = request.params
        if params.get("watch") in ("true", "1"):
            return await self._watch(request, key)
        if method == "GET" and name is None:
            items = store.list(key, request.namespace, params.get("labelSelector"))
            kind = store.kinds[key]
            return aiohttp.web.json_response(
                {
                    "apiVersion": kind.api_version,
                    "kind": f"{kind.kind}List",
                    "metadata": {"resourceVersion": str(store.revision)},
                    "items": items,
                }
            )
        if method == "POST" and name is None:
            return aiohttp.web.json_response(store.create(key, ns, request.data), status=201)
        if name is None:
            raise ApiError(405, "MethodNotAllowed", f"{method} needs an object name")
        status = request.subresource == "status"
        if method == "GET":
            return aiohttp.web.json_response(store.get(key, ns, name))
        if method == "DELETE":
            body = request.data if isinstance(request.data, dict) else {}
            orphan = body.get("propagationPolicy") == "Orphan"
            return aiohttp.web.json_response(store.delete(key, ns, name, orphan=orphan))
        if method == "PUT":
            return aiohttp.web.json_response(
                store.update(key, ns, name, request.data, status=status)
            )
        if method == "PATCH":
            old = store.get(key, ns, name)
            content_type = request.headers.get("Content-Type", "").split(";")[0]
            if content_type == "application/json-patch+json":
                try:
                    new = jsonpatch.apply_patch(old, request.data)
                except jsonpatch.JsonPatchTestFailed as exc:
                    raise ApiError(422, "Invalid", f"the test operation failed: {exc}") from None
                except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                    raise ApiError(422, "Invalid", str(exc)) from None
            elif content_type == "application/merge-patch+json" or (
                # As the API server: strategic merge is for built-in kinds, not custom resources.
                content_type == "application/strategic-merge-patch+json" and key[0] in ("", "batch")
            ):
                new = _merge(old, request.data)
            else:
                raise ApiError(415, "UnsupportedMediaType", f"unsupported patch {content_type}")
            new.get("metadata", {}).pop("resourceVersion", None)
            if isinstance(request.data, dict):
                wanted = request.data.get("metadata", {}).get("resourceVersion")
                if wanted:
                    new["metadata"]["resourceVersion"] = wanted
            return aiohttp.web.json_response(store.update(key, ns, name, new, status=status))
        raise ApiError(405, "MethodNotAllowed", f"{method} is not served")

    async def _watch(self, request: rendering.Request, key: Key) -> aiohttp.web.StreamResponse:
        store = self.store
        params = request.params
        selector = params.get("labelSelector")
        since = params.get("resourceVersion")
        timeout = float(params.get("timeoutSeconds") or 0) or None

        def wanted(event: dict[str, Any]) -> bool:
            meta = event["object"]["metadata"]
            if request.namespace and meta.get("namespace") != request.namespace:
                return False
            if request.name and meta.get("name") != request.name:
                return False
            return not selector or _selector_matches(selector, meta.get("labels", {}))

        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        if since and since != "0":
            history = store.history.get(key, deque())
            oldest = history[0][0] if history else store.revision + 1
            if int(since) < oldest - 1 and history and int(since) < store.revision:
                gone = {"type": "ERROR", "object": {"kind": "Status", "code": 410,
                        "reason": "Expired", "message": "too old resource version"}}  # fmt: skip
                queue.put_nowait(gone)
            else:
                for revision, event in history:
                    if revision > int(since):
                        queue.put_nowait(event)
        else:
            for obj in store.list(key, request.namespace, selector):
                queue.put_nowait({"type": "ADDED", "object": copy.deepcopy(obj)})
        store.watchers.setdefault(key, set()).add(queue)
        raw = request._raw_request
        assert raw is not None
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(raw)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout else None
        try:
            while True:
                wait = None if deadline is None else deadline - loop.time()
                if wait is not None and wait <= 0:
                    break
                try:
                    event = await asyncio.wait_for(queue.get(), wait)
                except TimeoutError:
                    break
                if event["type"] == "ERROR" or wanted(event):
                    await response.write(json.dumps(event).encode() + b"\n")
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            store.watchers[key].discard(queue)
        return response


def _verb(request: rendering.Request) -> str:
    method = request.method.value.upper()
    if request.params.get("watch") in ("true", "1"):
        return "watch"
    if method == "GET":
        return "get" if request.name else "list"
    return {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}[method]


@dataclass
class Rbac:
    """Role-based access control from Role/ClusterRole and (Cluster)RoleBinding objects, for
    service accounts identified by bearer token; aggregation and resourceNames are not needed."""

    #: token -> (namespace, service account name)
    accounts: dict[str, tuple[str, str]] = field(default_factory=dict)
    objects: list[dict[str, Any]] = field(default_factory=list)
    #: The API server's message for every request refused, in order.
    denied: list[str] = field(default_factory=list)

    def denial(
        self, token: str, group: str, resource: str, verb: str, namespace: str | None
    ) -> str | None:
        account = self.accounts.get(token)
        if account is None or self._allows(account, group, resource, verb, namespace):
            return None
        user = f"system:serviceaccount:{account[0]}:{account[1]}"
        plural = resource.split("/")[0]
        what = f"{plural}.{group}" if group else plural
        scope = f' in the namespace "{namespace}"' if namespace else " at the cluster scope"
        in_group = f' in API group "{group}"'
        return (
            f'{what} is forbidden: User "{user}" cannot {verb} resource "{resource}"'
            f"{in_group}{scope}"
        )

    def _allows(
        self,
        account: tuple[str, str],
        group: str,
        resource: str,
        verb: str,
        namespace: str | None,
    ) -> bool:
        for binding in self.objects:
            kind = binding["kind"]
            if kind not in ("RoleBinding", "ClusterRoleBinding"):
                continue
            bound_in = binding["metadata"].get("namespace")
            if kind == "RoleBinding" and bound_in != namespace:
                continue
            if not any(
                s.get("kind") == "ServiceAccount" and (s.get("namespace"), s.get("name")) == account
                for s in binding.get("subjects") or []
            ):
                continue
            ref = binding["roleRef"]
            role = self._role(ref["kind"], ref["name"], bound_in if ref["kind"] == "Role" else None)
            if role is not None and any(
                _matches(rule, group, resource, verb) for rule in role.get("rules") or []
            ):
                return True
        return False

    def _role(self, kind: str, name: str, namespace: str | None) -> dict[str, Any] | None:
        for obj in self.objects:
            meta = obj["metadata"]
            if obj["kind"] == kind and meta["name"] == name and meta.get("namespace") == namespace:
                return obj
        return None


def _matches(rule: dict[str, Any], group: str, resource: str, verb: str) -> bool:
    def has(values: list[str], value: str) -> bool:
        return "*" in values or value in values

    return (
        has(rule.get("apiGroups") or [], group)
        and has(rule.get("resources") or [], resource)
        and has(rule.get("verbs") or [], verb)
    )


def _status(code: int, reason: str, message: str) -> aiohttp.web.Response:
    body = {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
            "code": code, "reason": reason, "message": message}  # fmt: skip
    return aiohttp.web.json_response(body, status=code)


class RunningEmulator:
    """An emulator served on 127.0.0.1 from its own thread and event loop."""

    def __init__(self) -> None:
        self.handler: ClusterEmulator | None = None
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="kmock-emulator", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with ClusterEmulator() as handler, kmock.Server(handler) as server:
            self.handler = handler
            self.url = f"http://127.0.0.1:{server.port}"
            self._ready.set()
            await self._stop.wait()

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the Kubernetes emulator did not start")

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    @property
    def store(self) -> Store:
        assert self.handler is not None
        return self.handler.store

    def kubeconfig(self, path: Path, token: str = "test") -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": token}}],
            "contexts": [
                {
                    "name": "emulator",
                    "context": {"cluster": "emulator", "user": "tester", "namespace": "default"},
                }
            ],
            "current-context": "emulator",
        }
        path.write_text(yaml.safe_dump(config))
        return path


@contextmanager
def running_emulator() -> Iterator[RunningEmulator]:
    emulator = RunningEmulator()
    emulator.start()
    try:
        yield emulator
    finally:
        emulator.stop()
