"""A release installed as docs/deploy-gke.md says, run on an emulated cluster with RBAC enforced.

``helm template`` with the guide's values (``ci/gke-values.yaml``) is applied to kmock's
emulator: its Roles and RoleBindings are enforced for each ServiceAccount, and the Secrets the
chart references are created as the guide creates them. The migration hook, the operator and the
gateway run from their rendered pod specs (the image's entrypoint and the container's command and
args, the container's env with values from the Secrets), and every Job the operator creates runs
from its own pod template.

What the emulation substitutes, and nothing else:

- processes on this machine for containers: this virtualenv's ``whisperctl`` and ``python`` for
  the images' entrypoints, a temporary directory for each emptyDir volume and for the
  termination-message file;
- a kubeconfig holding the pod's ServiceAccount token for the in-cluster mounted token (none when
  the pod or its account turns automounting off);
- gcp-storage-emulator for GCS (``STORAGE_EMULATOR_HOST``) instead of Workload Identity;
- the test's PostgreSQL for Cloud SQL, so the Auth Proxy sidecar is not run;
- faster-whisper-server (serving ``whisper-1``) for the OpenAI API, named by ``OPENAI_BASE_URL``
  in the transcriber's Secret as the guide says for any OpenAI-compatible server;
- one gateway replica, reached on its container port (no Service, HTTPRoute or NetworkPolicy);
- the test plays the Job controller and the kubelet: it runs each Job's pod once and writes the
  Pod and the Job's status; the emulator serves the CRDs' kinds from its own table.
"""

from __future__ import annotations

import base64
import json
import math
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubernetes import client, config
from prometheus_client.parser import text_string_to_metric_families

from tests.charts.conftest import CHART, NAMESPACE, ROOT, Render
from tests.fixtures.openai_server import WhisperServer
from tests.fixtures.server import clean_env, free_port
from tests.operator.conftest import Cluster, Kubelet, wait_for
from tests.operator.emulator import RunningEmulator, running_emulator
from tests.speech import SCRIPT, SPEECH
from tests.wer import wer
from transcription import resources

#: What each key the chart reads from a Secret holds here, as the guide's ``kubectl create
#: secret`` commands fill them.
CODE_SECRET = "release-test-code-secret"
ADMIN_TOKEN = "release-test-admin-token"
#: A generous bound on "within seconds": the stall this guards against took 48 s.
MINT_DEADLINE = 15.0
SETTLE_DEADLINE = 20.0
RBAC_KINDS = ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")


def image_entrypoint(dockerfile: Path) -> tuple[list[str], list[str]]:
    """The ENTRYPOINT and CMD of a Dockerfile's final stage (exec form)."""
    entrypoint: list[str] = []
    cmd: list[str] = []
    for line in dockerfile.read_text().splitlines():
        if line.startswith("FROM "):
            entrypoint, cmd = [], []
        elif line.startswith("ENTRYPOINT "):
            entrypoint = json.loads(line.removeprefix("ENTRYPOINT "))
        elif line.startswith("CMD "):
            cmd = json.loads(line.removeprefix("CMD "))
    return entrypoint, cmd


#: The images' executables, as this virtualenv has them.
EXECUTABLES = {"whisperctl": str(Path(sys.executable).with_name("whisperctl")),
               "python": sys.executable}  # fmt: skip


@dataclass
class Kubernetes:
    """The emulated cluster as the chart's pods and an admin with kubectl see it."""

    emulator: RunningEmulator
    workdir: Path
    storage_emulator: str
    admin: client.ApiClient = field(init=False)
    #: The entrypoint and command of each image the release names, from its Dockerfile.
    images: dict[str, tuple[list[str], list[str]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.admin = config.new_client_from_config(
            str(self.emulator.kubeconfig(self.workdir / "admin-kubeconfig", token="admin"))
        )

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.admin)

    @property
    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.admin)

    def secret_data(self, name: str) -> dict[str, str]:
        data = self.core.read_namespaced_secret(name, NAMESPACE).data or {}
        return {k: base64.b64decode(v).decode() for k, v in data.items()}

    def secret_value(self, name: str, key: str) -> str:
        return self.secret_data(name)[key]

    def token_for(self, pod: dict[str, Any], accounts: dict[str, dict[str, Any]]) -> str | None:
        """A kubeconfig for the pod's ServiceAccount, or None when no token is mounted."""
        name = pod.get("serviceAccountName", "default")
        account = accounts.get(name, {})
        mounted = pod.get("automountServiceAccountToken")
        if mounted is None:
            mounted = account.get("automountServiceAccountToken", True)
        if not mounted:
            return None
        token = f"token-of-{name}"
        handler = self.emulator.handler
        assert handler is not None
        handler.rbac.accounts[token] = (NAMESPACE, name)
        path = self.workdir / f"kubeconfig-{name}"
        return str(self.emulator.kubeconfig(path, token=token))

    def pod_process(
        self, name: str, pod: dict[str, Any], accounts: dict[str, dict[str, Any]]
    ) -> tuple[list[str], dict[str, str], Path]:
        """Argv, environment and working directory of the pod's (only) app container."""
        (container,) = pod["containers"]
        root = self.workdir / name
        entrypoint, cmd = self.images[container["image"]]
        argv = container.get("command") or entrypoint
        argv = [*argv, *(container.get("args") or ([] if container.get("command") else cmd))]
        argv = [EXECUTABLES.get(argv[0], argv[0]), *argv[1:]]

        mounts: dict[str, Path] = {}
        for mount in container.get("volumeMounts") or []:
            mounts[mount["mountPath"]] = root / "volumes" / mount["name"]
        mounts[container.get("terminationMessagePath", "/dev/termination-log")] = (
            root / "termination-log"
        )
        for path in mounts.values():
            (path.parent if path.name == "termination-log" else path).mkdir(
                parents=True, exist_ok=True
            )

        declared: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            declared.update(self.secret_data(source["secretRef"]["name"]))
        for var in container.get("env") or []:
            if "value" in var:
                declared[var["name"]] = var["value"]
            else:
                ref = var["valueFrom"]["secretKeyRef"]
                declared[var["name"]] = self.secret_value(ref["name"], ref["key"])
        for key, value in declared.items():
            for mount_path, host in sorted(mounts.items(), key=lambda m: -len(m[0])):
                if value == mount_path or value.startswith(mount_path + "/"):
                    declared[key] = str(host) + value.removeprefix(mount_path)
                    break
        kubeconfig = self.token_for(pod, accounts)
        env = clean_env(
            {
                "STORAGE_EMULATOR_HOST": self.storage_emulator,
                "KUBECONFIG": kubeconfig or str(root / "no-service-account-token"),
                **declared,
            }
        )
        return argv, env, root


@dataclass
class Process:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


def deployment_pod(objects: list[dict[str, Any]], component: str) -> dict[str, Any]:
    found = [
        o["spec"]["template"]["spec"]
        for o in objects
        if o["kind"] in ("Deployment", "Job")
        and o["metadata"]["labels"].get("app.kubernetes.io/component") == component
    ]
    assert len(found) == 1, f"{component}: {len(found)} workloads"
    pod: dict[str, Any] = found[0]
    return pod


def secret_key_refs(obj: Any) -> Iterator[dict[str, str]]:
    """Every ``secretKeyRef`` anywhere in ``obj``."""
    if isinstance(obj, dict):
        if "secretKeyRef" in obj:
            yield obj["secretKeyRef"]
        for value in obj.values():
            yield from secret_key_refs(value)
    elif isinstance(obj, list):
        for item in obj:
            yield from secret_key_refs(item)


def scraped(port: int, name: str) -> float:
    """The sum of the samples called ``name`` on the metrics port ``port``."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    )


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def kube(tmp_path: Path, gcs_emulator: str) -> Iterator[Kubernetes]:
    with running_emulator() as emulator:
        yield Kubernetes(emulator, tmp_path, gcs_emulator)


@pytest.mark.slow
def test_a_release_installed_as_the_guide_says_transcribes_and_mints_codes(
    render: Render,
    kube: Kubernetes,
    pg_url: str,
    gcs_bucket_url: str,
    whisper_server: WhisperServer,
    mp3_5s: Path,
    tmp_path: Path,
) -> None:
    gateway_port, liveness_port = free_port(), free_port()
    gateway_metrics, operator_metrics = free_port(), free_port()
    objects = render(
        "-f", str(CHART / "ci" / "gke-values.yaml"),
        "--set", f"config.blobUrl={gcs_bucket_url}",
        "--set", f"gateway.containerPort={gateway_port}",
        "--set", f"operator.livenessPort={liveness_port}",
        "--set", f"gateway.metricsPort={gateway_metrics}",
        "--set", f"operator.metricsPort={operator_metrics}",
    )  # fmt: skip
    handler = kube.emulator.handler
    assert handler is not None
    handler.rbac.objects = [o for o in objects if o["kind"] in RBAC_KINDS]
    accounts = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ServiceAccount"}

    # The Secrets, keyed as the chart reads them (the guide's step 7).
    known = {"DATABASE_URL": pg_url, "WHISPER_CODE_SECRET": CODE_SECRET,
             "WHISPER_ADMIN_TOKEN": ADMIN_TOKEN}  # fmt: skip
    secrets: dict[str, dict[str, str]] = {}
    for ref in secret_key_refs(objects):
        secrets.setdefault(ref["name"], {})[ref["key"]] = known[ref["key"]]
    operator_pod = deployment_pod(objects, "operator")
    operator_env = {e["name"]: e.get("value") for e in operator_pod["containers"][0]["env"]}
    kube.images = {
        operator_pod["containers"][0]["image"]: image_entrypoint(ROOT / "Dockerfile.gateway"),
        str(operator_env["WHISPER_TRANSCRIBER_IMAGE"]): image_entrypoint(
            ROOT / "Dockerfile.transcriber"
        ),
    }
    engine_secret = operator_env["WHISPER_TRANSCRIBER_ENV_SECRET"]
    assert engine_secret, "the guide's values give the transcriber an engine Secret"
    secrets[engine_secret] = {"OPENAI_API_KEY": "sk-release-test",
                              "OPENAI_BASE_URL": whisper_server.base_url}  # fmt: skip
    for name, data in secrets.items():
        kube.core.create_namespaced_secret(
            NAMESPACE,
            {
                "metadata": {"name": name},
                "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
            },
        )

    started: list[Process] = []

    def start(component: str) -> Process:
        argv, env, root = kube.pod_process(component, deployment_pod(objects, component), accounts)
        log = tmp_path / f"{component}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(argv, env=env, cwd=root, stdout=out, stderr=out)
        process = Process(component, proc, log)
        started.append(process)
        return process

    try:
        # helm install: the pre-install hook first, then the workloads.
        argv, env, root = kube.pod_process("migrate", deployment_pod(objects, "migrate"), accounts)
        migrated = subprocess.run(argv, env=env, cwd=root, capture_output=True, text=True)
        assert migrated.returncode == 0, migrated.stderr
        operator = start("operator")
        gateway = start("gateway")
        liveness = f"http://127.0.0.1:{liveness_port}/healthz"
        base = f"http://127.0.0.1:{gateway_port}"
        for process, url in ((operator, liveness), (gateway, base + "/readyz")):
            wait_for(lambda p=process, u=url: answers(u) or p.proc.poll() is not None,
                     timeout=60, what=f"the {process.name} starting", log=process.log)  # fmt: skip
            assert process.proc.poll() is None, process.tail()

        # kubectl apply -f a CreditCode: the operator mints its Secret within seconds.
        code_cr = {"apiVersion": resources.API_VERSION, "kind": "CreditCode",
                   "metadata": {"name": "first"}, "spec": {"seconds": 3600, "maxUses": 2}}  # fmt: skip
        applied = time.monotonic()
        kube.custom.create_namespaced_custom_object(
            resources.GROUP, resources.VERSION, NAMESPACE, resources.CC_PLURAL, code_cr
        )

        def minted() -> str | None:
            status = (
                kube.custom.get_namespaced_custom_object(
                    resources.GROUP, resources.VERSION, NAMESPACE, resources.CC_PLURAL, "first"
                ).get("status")
                or {}
            )
            name = status.get("secretName")
            return kube.secret_value(name, "code") if name else None

        code: str = wait_for(minted, timeout=60, what="the code's Secret", log=operator.log)
        assert time.monotonic() - applied < MINT_DEADLINE
        headers = {"Authorization": f"Bearer {code}"}
        kubelet = Kubelet(Cluster(kube.emulator, kube.workdir / "admin-kubeconfig"), tmp_path,
                          namespace=NAMESPACE)  # fmt: skip

        def run_pod_of(job: dict[str, Any]) -> None:
            name = job["metadata"]["name"]
            kubelet.start(job)
            argv, env, root = kube.pod_process(name, job["spec"]["template"]["spec"], accounts)
            done = subprocess.run(argv, env=env, cwd=root, capture_output=True, text=True)
            message = (root / "termination-log").read_text()
            assert done.returncode == 0, f"{shlex.join(argv)}:\n{done.stderr[-3000:]}"
            kubelet.finish(job, done.returncode, message, final=True)

        def job_of(name: str) -> dict[str, Any] | None:
            jobs = client.BatchV1Api(kube.admin).list_namespaced_job(NAMESPACE).items
            found = [j for j in jobs if j.metadata.name == name]
            return kube.admin.sanitize_for_serialization(found[0]) if found else None  # type: ignore[no-any-return]

        def tj_phase(name: str) -> str | None:
            tj = kube.custom.get_namespaced_custom_object(
                resources.GROUP, resources.VERSION, NAMESPACE, resources.TJ_PLURAL, name
            )
            phase: str | None = (tj.get("status") or {}).get("phase")
            return phase

        # One upload through the gateway, transcribed by the Job the operator creates.
        with SPEECH.open("rb") as audio:
            created = httpx.post(base + "/v1/transcriptions", headers=headers, timeout=120,
                                 files={"file": ("speech.mp3", audio, "audio/mpeg")})  # fmt: skip
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]
        name = resources.resource_name(job_id)
        job = wait_for(lambda: job_of(name), timeout=60, what="the Job", log=operator.log)
        run_pod_of(job)
        wait_for(lambda: tj_phase(name) == "Succeeded", timeout=60, what="Succeeded",
                 log=operator.log)  # fmt: skip
        body = httpx.get(f"{base}/v1/transcriptions/{job_id}", headers=headers).json()
        assert body["status"] == "succeeded", body
        assert body["charged_seconds"] == math.ceil(body["audio_seconds"] - 1e-6)
        assert wer(SCRIPT, body["text"]) <= 0.15, body["text"]

        # A Job that finishes while the operator is down settles soon after it is back.
        with mp3_5s.open("rb") as audio:
            created = httpx.post(base + "/v1/transcriptions", headers=headers, timeout=120,
                                 files={"file": ("tone.mp3", audio, "audio/mpeg")})  # fmt: skip
        assert created.status_code == 202, created.text
        second_id = created.json()["id"]
        second = resources.resource_name(second_id)
        job = wait_for(lambda: job_of(second), timeout=60, what="the second Job", log=operator.log)
        operator.kill()
        run_pod_of(job)
        operator = start("operator")
        restarted = time.monotonic()
        wait_for(lambda: tj_phase(second) == "Succeeded", timeout=60, what="settling",
                 log=operator.log)  # fmt: skip
        assert time.monotonic() - restarted < SETTLE_DEADLINE

        balance = httpx.get(base + "/v1/credits", headers=headers).json()
        settled = httpx.get(f"{base}/v1/transcriptions/{second_id}", headers=headers).json()
        assert settled["charged_seconds"] == math.ceil(settled["audio_seconds"] - 1e-6)
        spent = body["charged_seconds"] + settled["charged_seconds"]
        assert (balance["spent_seconds"], balance["reserved_seconds"]) == (spent, 0), balance
        # Each serves its metrics on the port the chart gave it: the gateway took both jobs,
        # the restarted operator settled the second.
        assert scraped(gateway_metrics, "whisper_jobs_created_total") == 2
        assert scraped(operator_metrics, "whisper_operator_settlement_lag_seconds_count") == 1
        assert handler.rbac.denied == [], handler.rbac.denied
        for process in started:
            assert "forbidden" not in process.tail().lower(), process.tail()
    finally:
        for process in reversed(started):
            process.stop()
