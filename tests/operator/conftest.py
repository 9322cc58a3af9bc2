"""The cluster without a cluster: kmock's emulator, the real operator in a subprocess, a kubelet.

Nothing on the emulator runs Jobs, so ``Kubelet`` plays the Job controller and the kubelet: it
runs the transcriber the Job describes (with the Job's environment and its Secret) or pretends a
pod ended a certain way, creates the Pod with its termination message, and sets the Job's status.
"""

from __future__ import annotations

import base64
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from tests.fixtures.server import WHISPERCTL
from tests.operator.emulator import RunningEmulator, running_emulator
from transcriber.engines.base import Engine
from transcription import resources
from transcription.db.migrate import upgrade
from transcription.db.session import Database
from transcription.jobfiles import RunRequest

NAMESPACE = "default"
CODE_SECRET = "operator-test-code-secret"
OPERATOR_TOKEN = "operator"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Cluster:
    """The emulator as a user's kubectl sees it: the official client, one namespace."""

    def __init__(self, emulator: RunningEmulator, kubeconfig: Path) -> None:
        self.emulator = emulator
        self.kubeconfig = kubeconfig
        api = config.new_client_from_config(str(kubeconfig))
        self.api = api
        self.custom = client.CustomObjectsApi(api)
        self.batch = client.BatchV1Api(api)
        self.core = client.CoreV1Api(api)

    def tj(self, name: str) -> dict[str, Any]:
        found: dict[str, Any] = self.custom.get_namespaced_custom_object(
            resources.GROUP, resources.VERSION, NAMESPACE, "transcriptionjobs", name
        )
        return found

    def tjs(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.custom.list_namespaced_custom_object(
            resources.GROUP, resources.VERSION, NAMESPACE, "transcriptionjobs"
        )["items"]
        return found

    def create(self, plural: str, body: dict[str, Any]) -> dict[str, Any]:
        created: dict[str, Any] = self.custom.create_namespaced_custom_object(
            resources.GROUP, resources.VERSION, NAMESPACE, plural, body
        )
        return created

    def delete(self, plural: str, name: str) -> None:
        self.custom.delete_namespaced_custom_object(
            resources.GROUP, resources.VERSION, NAMESPACE, plural, name
        )

    def jobs(self) -> list[dict[str, Any]]:
        items = self.batch.list_namespaced_job(NAMESPACE, label_selector=resources.JOB_LABEL).items
        found: list[dict[str, Any]] = self.api.sanitize_for_serialization(items)
        return found

    def job(self, name: str) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = self.api.sanitize_for_serialization(
                self.batch.read_namespaced_job(name, NAMESPACE)
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return found

    def events(self, name: str) -> list[dict[str, Any]]:
        items = self.core.list_namespaced_event(NAMESPACE).items
        return [
            e for e in self.api.sanitize_for_serialization(items)
            if e["involvedObject"]["name"] == name
        ]  # fmt: skip


class Operator:
    """``kopf run -m transcription_operator`` in a subprocess, or with ``whisperctl`` the
    ``whisperctl operator`` the chart's Deployment runs."""

    def __init__(self, env: dict[str, str], log: Path, *, whisperctl: bool = False) -> None:
        self.env = env
        self.log = log
        self.whisperctl = whisperctl
        self.proc: subprocess.Popen[bytes] | None = None
        self.liveness = ""

    def start(self) -> None:
        port = _free_port()
        self.liveness = f"http://127.0.0.1:{port}/healthz"
        command = [WHISPERCTL, "operator", f"--liveness={self.liveness}"] if self.whisperctl else [
            sys.executable, "-m", "kopf", "run", "--standalone", "--all-namespaces",
            f"--liveness={self.liveness}", "-m", "transcription_operator",
        ]  # fmt: skip
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(command, env=self.env, stdout=out, stderr=out)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the operator exited:\n{self.log.read_text()[-5000:]}")
            if self.alive():
                return
            time.sleep(0.1)
        raise RuntimeError(f"the operator did not come up:\n{self.log.read_text()[-5000:]}")

    def alive(self) -> bool:
        try:
            with urllib.request.urlopen(self.liveness, timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def kill(self) -> None:
        """Die as a pod does when its node goes away: no cleanup."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


@contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


class Kubelet:
    """Plays the Job controller and the kubelet for the Jobs the operator creates."""

    def __init__(self, cluster: Cluster, workdir: Path, namespace: str = NAMESPACE) -> None:
        self.cluster = cluster
        self.workdir = workdir
        self.namespace = namespace

    def env(self, job: dict[str, Any]) -> dict[str, str]:
        """The transcriber container's environment: its env plus its Secret's keys, if any."""
        container = job["spec"]["template"]["spec"]["containers"][0]
        env: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            secret = self.cluster.core.read_namespaced_secret(
                source["secretRef"]["name"], self.namespace
            )
            env.update({k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()})
        env.update({e["name"]: e["value"] for e in container.get("env") or []})
        env.pop("HOME", None)
        # The pod has no database: make sure nothing inherited from the test run gives it one.
        env["DATABASE_URL"] = env["WHISPER_DATABASE_URL"] = "postgresql://nowhere.invalid/none"
        env["WHISPER_TERMINATION_MESSAGE_PATH"] = str(
            self.workdir / f"{job['metadata']['name']}-{secrets.token_hex(3)}.log"
        )
        return env

    def start(self, job: dict[str, Any]) -> None:
        """The pod is scheduled: the Job counts it active."""
        self.cluster.batch.patch_namespaced_job_status(
            job["metadata"]["name"], self.namespace, {"status": {"active": 1, "startTime": _now()}}
        )

    def run(
        self, job: dict[str, Any], *, engine: Engine | None = None, subprocess_run: bool = False
    ) -> tuple[int, str]:
        """Run the real transcriber for the Job; returns its exit code and termination message."""
        env = self.env(job)
        path = Path(env["WHISPER_TERMINATION_MESSAGE_PATH"])
        if subprocess_run:
            code = subprocess.run(
                [sys.executable, "-m", "transcriber"], env={**os.environ, **env}, check=False
            ).returncode
        else:
            from transcriber.job import JobSettings, run_job

            with _environ(env):
                request = RunRequest.from_env(os.environ)
                code = run_job(JobSettings(), request, engine=engine)
        return code, path.read_text()

    def finish(self, job: dict[str, Any], exit_code: int, message: str, *, final: bool) -> None:
        """A pod of the Job terminated; ``final`` says whether the Job controller gives up."""
        name = job["metadata"]["name"]
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"{name}-{secrets.token_hex(3)}",
                "namespace": self.namespace,
                "labels": {**job["spec"]["template"]["metadata"]["labels"], "job-name": name},
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": name,
                                     "uid": job["metadata"]["uid"], "controller": True}],
            },
            "spec": job["spec"]["template"]["spec"],
            "status": {
                "phase": "Succeeded" if exit_code == 0 else "Failed",
                "containerStatuses": [{
                    "name": "transcriber", "image": "x", "imageID": "", "ready": False,
                    "restartCount": 0, "started": False,
                    "state": {"terminated": {"exitCode": exit_code, "message": message,
                                             "finishedAt": _now(), "reason": "Completed"
                                             if exit_code == 0 else "Error"}},
                }],
            },
        }  # fmt: skip
        self.cluster.core.create_namespaced_pod(self.namespace, pod)
        status: dict[str, Any]
        if exit_code == 0:
            status = {"active": 0, "succeeded": 1, "completionTime": _now(),
                      "conditions": [_condition("SuccessCriteriaMet", "CompletionsReached"),
                                     _condition("Complete", "CompletionsReached")]}  # fmt: skip
        elif final:
            reason = "PodFailurePolicy" if exit_code == 3 else "BackoffLimitExceeded"
            text = (
                "Container transcriber for pod exited with code 3 matching FailJob rule"
                if exit_code == 3
                else "Job has reached the specified backoff limit"
            )
            status = {"active": 0, "failed": (job.get("status") or {}).get("failed", 0) + 1,
                      "conditions": [_condition("FailureTarget", reason, text),
                                     _condition("Failed", reason, text)]}  # fmt: skip
        else:
            status = {"active": 1, "failed": (job.get("status") or {}).get("failed", 0) + 1}
        self.cluster.batch.patch_namespaced_job_status(name, self.namespace, {"status": status})


def _now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _condition(type_: str, reason: str, message: str = "") -> dict[str, str]:
    return {"type": type_, "status": "True", "reason": reason, "message": message,
            "lastTransitionTime": _now(), "lastProbeTime": _now()}  # fmt: skip


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    """A fresh emulated cluster; KUBECONFIG points at it for this process and its children."""
    with running_emulator() as emulator:
        kubeconfig = emulator.kubeconfig(tmp_path / "kubeconfig")
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        yield Cluster(emulator, kubeconfig)


@pytest.fixture
def op_db(pg_url: str) -> Iterator[Database]:
    database = Database(pg_url)
    upgrade(database.engine)
    yield database
    database.dispose()


StartOperator = Callable[..., Operator]


@pytest.fixture
def blob_url(tmp_path: Path) -> str:
    """The blob store the operator and the transcriber share unless a test picks another."""
    return (tmp_path / "blobs").absolute().as_uri()


@pytest.fixture
def start_operator(
    cluster: Cluster, pg_url: str, op_db: Database, tmp_path: Path, blob_url: str
) -> Iterator[StartOperator]:
    """Start the operator against the cluster and the test database; stopped after the test."""
    started: list[Operator] = []

    def start(*, blob: str | None = None, whisperctl: bool = False, **settings: Any) -> Operator:
        env = {
            **os.environ,
            # Its own token, so the emulator can tell the operator's calls from the test's.
            "KUBECONFIG": str(
                cluster.emulator.kubeconfig(tmp_path / "operator-kubeconfig", token=OPERATOR_TOKEN)
            ),
            "DATABASE_URL": pg_url,
            "WHISPER_BLOB_URL": blob or blob_url,
            "WHISPER_CODE_SECRET": CODE_SECRET,
            "WHISPER_DATA_DIR": str(tmp_path / "operator-data"),
            "WHISPER_RECONCILE_INTERVAL": "2",
            **{f"WHISPER_{k.upper()}": str(v) for k, v in settings.items()},
        }
        operator = Operator(env, tmp_path / "operator.log", whisperctl=whisperctl)
        operator.start()
        started.append(operator)
        return operator

    yield start
    for operator in started:
        operator.stop()


@pytest.fixture
def kubelet(cluster: Cluster, tmp_path: Path) -> Kubelet:
    return Kubelet(cluster, tmp_path)


def wait_for(
    check: Callable[[], Any], *, timeout: float = 30.0, what: str = "it", log: Path | None = None
) -> Any:
    """Poll ``check`` until it returns something truthy; fail with the operator's log tail."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            tail = log.read_text()[-4000:] if log is not None and log.exists() else ""
            pytest.fail(f"{what} did not happen within {timeout} s\n{tail}")
        time.sleep(0.05)
