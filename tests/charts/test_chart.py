"""The Helm chart: lint, render, validate against Kubernetes 1.35, and agree with crds/ and RBAC."""

from __future__ import annotations

import re
import textwrap
from typing import Any, TypeVar

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import AliasChoices
from pydantic_settings import BaseSettings

from tests.charts import monitoring
from tests.charts.conftest import CHART, NAMESPACE, REQUIRED, ROOT, Helm, Render
from transcription import resources
from transcription.jobfiles import RunRequest
from transcription.settings import CoreSettings, GatewaySettings, OperatorSettings
from transcription_operator import builders

S = TypeVar("S", bound=BaseSettings)

K8S_VERSION = "1.35.0"
GSA = "whisper@my-project.iam.gserviceaccount.com"
TRANSCRIBER_GSA = "whisper-transcriber@my-project.iam.gserviceaccount.com"
GKE_VALUES = CHART / "ci" / "gke-values.yaml"
SHAPES = {"default": REQUIRED, "gke": ("-f", str(GKE_VALUES))}
GATEWAY, OPERATOR = "Deployment/whisper-gateway", "Deployment/whisper-operator"
MIGRATE, TRANSCRIBER = "Job/whisper-migrate", "the operator's transcriber Job"
#: Every optional part switched on, so each template renders in at least one test.
EVERYTHING = (
    *REQUIRED,
    "--set", "gateway.ingress.enabled=true",
    "--set", "gateway.ingress.host=whisper.example.com",
    "--set", "gateway.httpRoute.enabled=true",
    "--set", "gateway.httpRoute.parentRefs[0].name=external",
    "--set", "gateway.autoscaling.enabled=true",
    "--set", "gateway.backendPolicy.enabled=true",
    "--set", "adminToken.existingSecret=whisper-admin",
    "--set", "cloudSqlProxy.enabled=true",
    "--set", "cloudSqlProxy.instanceConnectionName=p:r:i",
    "--set", "operator.kueueQueueName=transcription",
    "--set", "imagePullSecrets[0].name=regcred",
    "--set", "metrics.serviceMonitor.enabled=true",
    "--set", "metrics.podMonitoring.enabled=true",
    "--set", "metrics.prometheusRule.enabled=true",
    "--set", "metrics.gmpRules.enabled=true",
    "--set", "metrics.dashboard.enabled=true",
)  # fmt: skip


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def named(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(o for o in by_kind(objects, kind) if o["metadata"]["name"] == name)


def container(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """The main container of a Deployment or Job."""
    first: dict[str, Any] = named(objects, kind, name)["spec"]["template"]["spec"]["containers"][0]
    return first


def pod_specs(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        f"{o['kind']}/{o['metadata']['name']}": o["spec"]["template"]["spec"]
        for o in objects
        if o["kind"] in ("Deployment", "Job")
    }


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def settings_of(cls: type[S], env: dict[str, Any]) -> S:
    """``cls`` as the container would build it, each variable read from a Secret standing in as
    ``secret:<name>/<key>``."""
    values = {
        name.removeprefix("WHISPER_").lower(): (
            value if isinstance(value, str)
            else "secret:{name}/{key}".format(**value["secretKeyRef"])
        )
        for name, value in env.items()
    }  # fmt: skip
    return cls.model_validate({k: v for k, v in values.items() if k in cls.model_fields})


def crd_schema(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    crd = next(c for c in by_kind(objects, "CustomResourceDefinition")
               if c["spec"]["names"]["kind"] == kind)  # fmt: skip
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def rules(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def granted(objects: list[dict[str, Any]], service_account: str) -> set[tuple[str, str, str]]:
    """Everything the bindings of the release give ``service_account``."""
    roles = {(o["kind"], o["metadata"]["name"]): o for o in objects
             if o["kind"] in ("Role", "ClusterRole")}  # fmt: skip
    allowed: set[tuple[str, str, str]] = set()
    for binding in objects:
        if binding["kind"] in ("RoleBinding", "ClusterRoleBinding") and any(
            s["name"] == service_account for s in binding["subjects"]
        ):
            allowed |= rules(roles[(binding["roleRef"]["kind"], binding["roleRef"]["name"])])
    return allowed


def deploy_rbac(component: str) -> set[tuple[str, str, str]]:
    docs = yaml.safe_load_all((ROOT / "deploy/rbac" / f"{component}.yaml").read_text())
    allowed: set[tuple[str, str, str]] = set()
    for doc in docs:
        if doc["kind"] in ("Role", "ClusterRole"):
            allowed |= rules(doc)
    return allowed


def test_the_chart_lints_strictly_clean(helm: Helm) -> None:
    for flags in SHAPES.values():
        done = helm("lint", "--strict", str(CHART), *flags)
        assert "0 chart(s) failed" in done.stdout
        assert "[WARNING]" not in done.stdout and "[ERROR]" not in done.stdout, done.stdout


@pytest.mark.parametrize("shape", [*SHAPES, "everything"])
def test_every_rendered_object_is_valid_for_kubernetes_1_35(render: Render, shape: str) -> None:
    objects = render(*SHAPES.get(shape, EVERYTHING))
    assert {"Deployment", "Service", "CustomResourceDefinition", "Job"} <= {
        o["kind"] for o in objects
    }
    for obj in objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["apiVersion"].startswith("gateway.networking.k8s.io/"):
            # Gateway API types are CRDs, absent from the Kubernetes schemas: check the route
            # points at the gateway Service instead.
            backend = obj["spec"]["rules"][0]["backendRefs"][0]
            service = named(objects, "Service", backend["name"])
            assert backend["port"] == service["spec"]["ports"][0]["port"], where
            assert obj["spec"]["parentRefs"], where
            continue
        if obj["apiVersion"] == "networking.gke.io/v1":
            # GKE's own CRD, equally absent: check the policy targets the gateway Service in
            # its namespace, within the CRD's bounds of timeoutSec.
            assert obj["kind"] == "GCPBackendPolicy", where
            target = obj["spec"]["targetRef"]
            assert (target["group"], target["kind"]) == ("", "Service"), where
            service = named(objects, "Service", target["name"])
            assert service["metadata"]["namespace"] == obj["metadata"]["namespace"], where
            assert 1 <= obj["spec"]["default"]["timeoutSec"] <= 2**31 - 1, where
            continue
        if obj["apiVersion"] in monitoring.API_VERSIONS:
            # The Prometheus operator's and GKE Managed Prometheus's CRDs, equally absent:
            # checked against the parts of their schemas the chart uses.
            monitoring.validate(obj)
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{where}: {exc.message} at {list(exc.path)}") from exc


def test_the_chart_crds_are_the_repository_crds(render: Render) -> None:
    rendered = {
        c["metadata"]["name"]: c for c in by_kind(render(*REQUIRED), "CustomResourceDefinition")
    }
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        source = yaml.safe_load(path.read_text())
        copy = CHART / "files" / "crds" / path.name
        assert copy.read_text() == path.read_text(), (
            "regenerate with: python -m transcription_operator.crds charts/whisper/files/crds"
        )
        crd = rendered.pop(source["metadata"]["name"])
        assert crd["metadata"].pop("annotations") == {"helm.sh/resource-policy": "keep"}
        assert crd["metadata"].pop("labels")["app.kubernetes.io/managed-by"] == "Helm"
        assert crd == source
    assert not rendered, f"CRDs in the chart but not in crds/: {sorted(rendered)}"


def test_crds_can_be_left_out_or_left_to_uninstall(render: Render) -> None:
    assert not by_kind(render(*REQUIRED, "--set", "crds.enabled=false"), "CustomResourceDefinition")
    loose = by_kind(render(*REQUIRED, "--set", "crds.keep=false"), "CustomResourceDefinition")
    assert loose and all("annotations" not in c["metadata"] for c in loose)


@pytest.mark.parametrize(
    ("flag", "named_in_error"),
    [
        ("gateway.replicas=3", "'replicas'"),
        ("cloudSqlProxy.instanceConnectioName=p:r:i", "'instanceConnectioName'"),
        ("config.engin=local", "'engin'"),
        ("transcriber.resources.request.cpu=2", "'request'"),
        ("config.engine=whisper.cpp", "/config/engine"),
        # Renamed or removed values fail instead of being ignored.
        ("operator.admissionInterval=5", "'admissionInterval'"),
        ("openai.baseUrl=http://whisper:8000/v1", "'openai'"),
        ("operator.reconcileInterval=0", "/operator/reconcileInterval"),
        ("operator.reconcileInterval=fast", "/operator/reconcileInterval"),
        ("operator.maxAttempts=0", "/operator/maxAttempts"),
        ("transcriber.envSecret=Engine_Keys", "/transcriber/envSecret"),
        ("gateway.backendPolicy.timeoutSec=0", "/gateway/backendPolicy/timeoutSec"),
        ("metrics.serviceMonitor.intervall=1m", "'intervall'"),
        ("gateway.metricsPort=80", "/gateway/metricsPort"),
        ("metrics.podMonitoring.interval=30", "/metrics/podMonitoring/interval"),
        ("metrics.alerts.failureRatio=2", "/metrics/alerts/failureRatio"),
    ],
)
def test_a_values_typo_fails_naming_it(helm: Helm, flag: str, named_in_error: str) -> None:
    done = helm("template", "whisper", str(CHART), *REQUIRED, "--set", flag, check=False)
    assert done.returncode != 0
    assert named_in_error in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ((), "config.blobUrl is required"),
        ((*REQUIRED, "--set", "cloudSqlProxy.enabled=true"),
         "cloudSqlProxy.instanceConnectionName is required"),
        ((*REQUIRED, "--set", "gateway.httpRoute.enabled=true"),
         "gateway.httpRoute.parentRefs needs at least one Gateway"),
        ((*REQUIRED, "--set", "database.existingSecret="), "/database/existingSecret"),
        # The database's (or the code key's) Secret as the transcriber's environment.
        ((*REQUIRED, "--set", "transcriber.envSecret=whisper-database"),
         "transcriber.envSecret \"whisper-database\" is the Secret of the database"),
        ((*REQUIRED, "--set", "transcriber.envSecret=whisper-code-secret"),
         "engine credentials only"),
        ((*REQUIRED, "--set", "adminToken.existingSecret=whisper-admin",
          "--set", "transcriber.envSecret=whisper-admin"), "engine credentials only"),
        ((*REQUIRED, "--set", "codeSecret.existingSecret=keys",
          "--set", "transcriber.envSecret=keys"), "engine credentials only"),
        # A metrics port its pod already listens on.
        ((*REQUIRED, "--set", "gateway.metricsPort=8080"),
         "gateway.metricsPort 8080 is also gateway.containerPort"),
        ((*REQUIRED, "--set", "operator.metricsPort=8080"),
         "operator.metricsPort 8080 is also operator.livenessPort"),
        ((*REQUIRED, "--set", "cloudSqlProxy.enabled=true",
          "--set", "cloudSqlProxy.instanceConnectionName=p:r:i",
          "--set", "operator.metricsPort=9090"), "is also the Cloud SQL proxy's health port"),
        ((*REQUIRED, "--set", "cloudSqlProxy.enabled=true",
          "--set", "cloudSqlProxy.instanceConnectionName=p:r:i",
          "--set", "gateway.metricsPort=5432"), "is also cloudSqlProxy.port"),
        ((*REQUIRED, "--set", "gateway.metricsPort=0", "--set", "operator.metricsPort=0",
          "--set", "metrics.podMonitoring.enabled=true"), "set gateway.metricsPort or"),
    ],
)  # fmt: skip
def test_a_missing_required_value_fails_saying_what_to_set(
    helm: Helm, flags: tuple[str, ...], message: str
) -> None:
    done = helm("template", "whisper", str(CHART), *flags, check=False)
    assert done.returncode != 0
    assert message in done.stderr, done.stderr


def uncommented_values(lines: list[str]) -> list[str]:
    """Leaf keys of values.yaml with no comment above them or above a key they are nested in."""
    missing: list[str] = []
    stack: list[tuple[int, bool]] = []
    for number, line in enumerate(lines):
        key = re.match(r"^(\s*)([A-Za-z][\w.]*):(.*)$", line)
        if key is None:
            continue
        indent = len(key.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        commented = lines[number - 1].strip().startswith("#")
        following = next((n for n in lines[number + 1 :] if n.strip()), "")
        leaf = key.group(3).strip() != "" or len(following) - len(following.lstrip()) <= indent
        if leaf and not commented and not any(c for _, c in stack):
            missing.append(line.strip())
        stack.append((indent, commented))
    return missing


def test_every_value_is_commented_and_in_the_schema() -> None:
    lines = (CHART / "values.yaml").read_text().splitlines()
    assert uncommented_values(lines) == []
    schema = yaml.safe_load((CHART / "values.schema.json").read_text())

    def closed(node: dict[str, Any], path: str) -> None:
        if node.get("properties"):
            assert node.get("additionalProperties") is False, f"{path} accepts unknown keys"
            for key, child in node["properties"].items():
                closed(child, f"{path}.{key}")

    closed(schema, "values")


def test_rbac_is_the_least_privilege_of_deploy_rbac(render: Render) -> None:
    objects = render(*SHAPES["gke"])
    accounts = {o["metadata"]["name"]: o for o in by_kind(objects, "ServiceAccount")}
    for component in ("gateway", "operator", "transcriber"):
        assert granted(objects, f"whisper-{component}") == deploy_rbac(component), component
    transcriber = accounts["whisper-transcriber"]
    assert transcriber["automountServiceAccountToken"] is False
    operator = named(objects, "Deployment", "whisper-operator")["spec"]["template"]["spec"]
    env = env_of(operator["containers"][0])
    assert env["WHISPER_TRANSCRIBER_SERVICE_ACCOUNT"] == "whisper-transcriber"
    # The transcriber's Google service account is its own: the bucket only, no Cloud SQL.
    expected = {"whisper-gateway": GSA, "whisper-operator": GSA, "whisper-migrate": GSA,
                "whisper-transcriber": TRANSCRIBER_GSA}  # fmt: skip
    for name, gsa in expected.items():
        annotations = accounts[name]["metadata"]["annotations"]
        assert annotations["iam.gke.io/gcp-service-account"] == gsa, name


@pytest.mark.parametrize("shape", [*SHAPES, "everything"])
def test_every_pod_runs_locked_down(render: Render, shape: str) -> None:
    specs = pod_specs(render(*SHAPES.get(shape, EVERYTHING)))
    expected = {"Deployment/whisper-gateway", "Deployment/whisper-operator", "Job/whisper-migrate"}
    assert expected <= set(specs)
    for where, spec in specs.items():
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, where
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, where
        volumes = {v["name"]: v for v in spec["volumes"]}
        for each in [*spec.get("initContainers", []), *spec["containers"]]:
            what = f"{where} {each['name']}"
            sc = each["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, what
            assert sc["allowPrivilegeEscalation"] is False, what
            assert sc["capabilities"]["drop"] == ["ALL"], what
            assert each["resources"]["requests"], what
            if each["name"] != "cloud-sql-proxy":
                # Where the app writes (its home, its data directory) is the pod's own emptyDir.
                env = env_of(each)
                mounts = {m["mountPath"]: m["name"] for m in each["volumeMounts"]}
                for path in {env["HOME"], env.get("WHISPER_DATA_DIR", env["HOME"])}:
                    assert "emptyDir" in volumes[mounts[path]], f"{what} has no writable {path}"


def test_the_gke_shape_wires_database_bucket_secrets_and_the_proxy(render: Render) -> None:
    objects = render(*SHAPES["gke"])
    for where, spec in pod_specs(objects).items():
        (proxy,) = spec["initContainers"]
        # A native sidecar: it outlives the app container and lets the migration Job complete.
        assert proxy["restartPolicy"] == "Always", where
        assert proxy["args"][-1] == "my-project:europe-west1:whisper", where
        env = env_of(spec["containers"][0])
        assert env["DATABASE_URL"] == {
            "secretKeyRef": {"name": "whisper-database", "key": "DATABASE_URL"}
        }, where
        if where != "Job/whisper-migrate":
            assert env["WHISPER_CODE_SECRET"] == {
                "secretKeyRef": {"name": "whisper-code-secret", "key": "WHISPER_CODE_SECRET"}
            }, where
            assert env["WHISPER_BLOB_URL"] == "gs://my-project-whisper/prod", where
    gateway = named(objects, "Deployment", "whisper-gateway")["spec"]["template"]["spec"]
    env = env_of(gateway["containers"][0])
    assert env["WHISPER_RUNNER"] == "kubernetes"
    assert env["WHISPER_ADMIN_TOKEN"] == {
        "secretKeyRef": {"name": "whisper-admin", "key": "WHISPER_ADMIN_TOKEN"}
    }
    assert env["WHISPER_MIGRATE_ON_START"] == "false", "the hook migrates; replicas must not race"
    # Long uploads and the synchronous call outlast the load balancer's default 30 s.
    (policy,) = by_kind(objects, "GCPBackendPolicy")
    assert policy["spec"]["targetRef"]["name"] == "whisper-gateway"
    assert (
        policy["spec"]["default"]["timeoutSec"]
        >= GatewaySettings.model_fields["sync_wait_seconds"].default
    )
    operator = env_of(container(objects, "Deployment", "whisper-operator"))
    assert operator["WHISPER_TRANSCRIBER_IMAGE"] == (
        "europe-west1-docker.pkg.dev/my-project/whisper/transcriber:0.1.0"
    )
    assert operator["WHISPER_MAX_RUNNING_JOBS"] == "8"
    assert operator["WHISPER_TRANSCRIBER_ENV_SECRET"] == "whisper-transcriber"


def transcriber_job_of(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """The Job the rendered operator would create: its settings read from the Deployment's env
    exactly as the operator reads them, fed to the operator's own builder."""
    (operator,) = (d for d in by_kind(objects, "Deployment")
                   if d["metadata"]["labels"]["app.kubernetes.io/component"] == "operator")  # fmt: skip
    settings = settings_of(
        OperatorSettings, env_of(operator["spec"]["template"]["spec"]["containers"][0])
    )
    tj = {"apiVersion": resources.API_VERSION, "kind": "TranscriptionJob",
          "metadata": {"name": "tr-0123456789abcdef", "namespace": NAMESPACE, "uid": "u"}}  # fmt: skip
    spec = resources.TranscriptionJobSpec(job_id="tr_0123456789abcdef", engine="openai")
    request = RunRequest(job_id="tr_0123456789abcdef", audio_key="jobs/tr_0123456789abcdef/work/audio.mp3",
                         audio_seconds=312.4)  # fmt: skip
    return builders.transcriber_job(tj, request, spec, settings)


def secrets_named(obj: Any) -> set[str]:
    """Every Secret a manifest refers to, wherever it does (envFrom, secretKeyRef, volumes)."""
    found: set[str] = set()
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key in ("secretRef", "secretKeyRef") and isinstance(value, dict):
                found.add(value["name"])
            elif key == "secret" and isinstance(value, dict):
                found.add(value["secretName"])
            found |= secrets_named(value)
    elif isinstance(obj, list):
        for each in obj:
            found |= secrets_named(each)
    return found


@pytest.mark.parametrize("shape", [*SHAPES, "everything"])
def test_the_transcriber_pods_get_no_database(render: Render, shape: str) -> None:
    flags = SHAPES.get(shape, EVERYTHING)
    objects = render(*flags)
    operator = env_of(container(objects, "Deployment", "whisper-operator"))
    job = transcriber_job_of(objects)
    (pod,) = job["spec"]["template"]["spec"]["containers"]
    env = env_of(pod)
    assert not {"DATABASE_URL", "WHISPER_DATABASE_URL", "WHISPER_CODE_SECRET"} & env.keys()
    assert not any("DATABASE" in name or "postgres" in str(v) for name, v in env.items())
    # The bucket and the job come from the operator itself, not from a Secret.
    assert env["WHISPER_BLOB_URL"] == operator["WHISPER_BLOB_URL"]
    assert RunRequest.from_env({k: v for k, v in env.items() if isinstance(v, str)}).job_id == (
        "tr_0123456789abcdef"
    )
    # The only Secret a transcriber pod may see is the engine's, and only when one is set.
    if shape == "gke":
        assert operator["WHISPER_TRANSCRIBER_ENV_SECRET"] == "whisper-transcriber"
        assert secrets_named(job) == {"whisper-transcriber"}
        assert pod["envFrom"] == [{"secretRef": {"name": "whisper-transcriber"}}]
    else:
        assert "WHISPER_TRANSCRIBER_ENV_SECRET" not in operator
        assert secrets_named(job) == set() and "envFrom" not in pod
    # Whatever Secrets the gateway and the operator read (the database's among them), the
    # transcriber gets none of them.
    deployments = [named(objects, "Deployment", f"whisper-{c}") for c in ("gateway", "operator")]
    assert not secrets_named(job) & secrets_named(deployments)
    # Nor can the pod fetch one: its account has no token and no Kubernetes rights.
    assert job["spec"]["template"]["spec"]["serviceAccountName"] == "whisper-transcriber"
    assert job["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    assert granted(objects, "whisper-transcriber") == set()


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ("default", {"whisper-database": {GATEWAY, OPERATOR, MIGRATE},
                     "whisper-code-secret": {GATEWAY, OPERATOR}}),
        ("gke", {"whisper-database": {GATEWAY, OPERATOR, MIGRATE},
                 "whisper-code-secret": {GATEWAY, OPERATOR},
                 "whisper-admin": {GATEWAY},
                 "whisper-transcriber": {TRANSCRIBER}}),
    ],
)  # fmt: skip
def test_each_secret_reaches_exactly_the_pods_that_need_it(
    render: Render, shape: str, expected: dict[str, set[str]]
) -> None:
    """The database URL: gateway, operator, migration; the code key: where codes are redeemed
    and minted; the admin token: the gateway; the engine's Secret: the transcriber only."""
    objects = render(*SHAPES[shape])
    pods = {**pod_specs(objects), TRANSCRIBER: transcriber_job_of(objects)}
    reached: dict[str, set[str]] = {}
    for where, pod in pods.items():
        for secret in secrets_named(pod):
            reached.setdefault(secret, set()).add(where)
    assert reached == expected
    # The operator only names the engine's Secret in the Jobs it creates; it never reads it.
    operator = env_of(container(objects, "Deployment", "whisper-operator"))
    assert operator.get("WHISPER_TRANSCRIBER_ENV_SECRET") == (
        "whisper-transcriber" if "whisper-transcriber" in expected else None
    )


def test_an_engine_secret_reaches_the_transcriber_and_nothing_else(render: Render) -> None:
    objects = render(*REQUIRED, "--set", "transcriber.envSecret=whisper-openai")
    operator = env_of(container(objects, "Deployment", "whisper-operator"))
    assert operator["WHISPER_TRANSCRIBER_ENV_SECRET"] == "whisper-openai"
    job = transcriber_job_of(objects)
    assert secrets_named(job) == {"whisper-openai"}
    for name in ("whisper-gateway", "whisper-operator"):
        assert "whisper-openai" not in secrets_named(named(objects, "Deployment", name)), name
    for empty in ("transcriber.envSecret=", "transcriber.envSecret=null"):
        objects = render(*REQUIRED, "--set", empty)
        assert "WHISPER_TRANSCRIBER_ENV_SECRET" not in env_of(
            container(objects, "Deployment", "whisper-operator")
        ), empty
        assert secrets_named(transcriber_job_of(objects)) == set(), empty


def test_the_operator_reconciles_and_retries_as_the_values_say(render: Render) -> None:
    defaults = env_of(container(render(*REQUIRED), "Deployment", "whisper-operator"))
    fields = OperatorSettings.model_fields
    assert defaults["WHISPER_RECONCILE_INTERVAL"] == f"{fields['reconcile_interval'].default:g}"
    assert defaults["WHISPER_MAX_ATTEMPTS"] == str(fields["max_attempts"].default)
    assert "WHISPER_ADMISSION_INTERVAL" not in defaults
    objects = render(*REQUIRED, "--set", "operator.reconcileInterval=30",
                     "--set", "operator.maxAttempts=5")  # fmt: skip
    env = env_of(container(objects, "Deployment", "whisper-operator"))
    assert (env["WHISPER_RECONCILE_INTERVAL"], env["WHISPER_MAX_ATTEMPTS"]) == ("30", "5")


def setting_names(cls: type[BaseSettings]) -> set[str]:
    names = set()
    for name, info in cls.model_fields.items():
        names.add(f"WHISPER_{name.upper()}")
        if isinstance(info.validation_alias, AliasChoices):
            names.update(str(c) for c in info.validation_alias.choices)
    return names


@pytest.mark.parametrize("shape", [*SHAPES, "everything"])
def test_every_variable_the_chart_sets_is_one_the_code_reads(render: Render, shape: str) -> None:
    objects = render(*SHAPES.get(shape, EVERYTHING))
    # `whisperctl db upgrade` reads the core settings only.
    reads: dict[str, type[BaseSettings]] = {
        "whisper-gateway": GatewaySettings,
        "whisper-operator": OperatorSettings,
        "whisper-migrate": CoreSettings,
    }
    for name, cls in reads.items():
        kind = "Job" if name == "whisper-migrate" else "Deployment"
        env = env_of(container(objects, kind, name))
        assert set(env) - {"HOME"} <= setting_names(cls), name
        settings_of(cls, env)


def test_the_service_maps_port_80_to_an_unprivileged_container_port(render: Render) -> None:
    objects = render(*REQUIRED)
    (port,) = named(objects, "Service", "whisper-gateway")["spec"]["ports"]
    gateway = container(objects, "Deployment", "whisper-gateway")
    (target,) = [p for p in gateway["ports"] if p["name"] == port["targetPort"]]
    assert port["port"] == 80 and target["containerPort"] >= 1024
    assert env_of(gateway)["WHISPER_PORT"] == str(target["containerPort"])
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}


def test_the_operator_is_a_single_recreated_replica_with_kopf_liveness(render: Render) -> None:
    deployment = named(render(*REQUIRED), "Deployment", "whisper-operator")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    (operator,) = deployment["spec"]["template"]["spec"]["containers"]
    liveness = next(a for a in operator["args"] if a.startswith("--liveness="))
    probe = operator["livenessProbe"]["httpGet"]
    port = next(p["containerPort"] for p in operator["ports"] if p["name"] == probe["port"])
    assert liveness == f"--liveness=http://0.0.0.0:{port}{probe['path']}"
    assert f"--namespace={NAMESPACE}" in operator["args"]
    assert "readinessProbe" not in operator


def test_optional_parts_render_when_switched_on(render: Render) -> None:
    objects = render(*EVERYTHING)
    kinds = {o["kind"] for o in objects}
    assert {"Ingress", "HTTPRoute", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "GCPBackendPolicy", "ServiceMonitor", "PodMonitoring", "PrometheusRule", "Rules",
            "ConfigMap"} <= kinds  # fmt: skip
    assert "replicas" not in named(objects, "Deployment", "whisper-gateway")["spec"]
    operator = named(objects, "Deployment", "whisper-operator")["spec"]["template"]["spec"]
    assert env_of(operator["containers"][0])["WHISPER_KUEUE_QUEUE_NAME"] == "transcription"
    plain = {o["kind"] for o in render(*REQUIRED)}
    assert not {"Ingress", "HTTPRoute", "HorizontalPodAutoscaler", "GCPBackendPolicy",
                "ServiceMonitor", "PodMonitoring", "PrometheusRule", "Rules", "ConfigMap"} & plain  # fmt: skip


def test_migrations_run_in_a_hook_before_install_and_upgrade(render: Render) -> None:
    job = named(render(*REQUIRED), "Job", "whisper-migrate")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["db", "upgrade"]
    off = render(*REQUIRED, "--set", "migrations.enabled=false")
    assert not by_kind(off, "Job")
    gateway = named(off, "Deployment", "whisper-gateway")["spec"]["template"]["spec"]
    assert env_of(gateway["containers"][0])["WHISPER_MIGRATE_ON_START"] == "true"


def test_network_policies_admit_the_gateway_port_and_metrics_from_monitoring_only(
    render: Render,
) -> None:
    objects = render(*REQUIRED)
    policies = {p["metadata"]["name"]: p["spec"] for p in by_kind(objects, "NetworkPolicy")}
    scrapers = yaml.safe_load((CHART / "values.yaml").read_text())["networkPolicy"]["metricsFrom"]
    assert {s["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
            for s in scrapers} == {"gmp-system", "monitoring"}  # fmt: skip
    metrics = {"ports": [{"port": 9464, "protocol": "TCP"}], "from": scrapers}
    assert policies["whisper-gateway"]["ingress"] == [
        {"ports": [{"port": 8080, "protocol": "TCP"}]},
        metrics,
    ]
    assert policies["whisper-operator"]["ingress"] == [metrics]
    assert "ingress" not in policies["whisper-transcriber"]
    for policy in policies.values():
        assert policy["policyTypes"] == ["Ingress"]
    # No scraper named: the metrics ports are closed, not open to everyone.
    closed = render(*REQUIRED, "--set", "networkPolicy.metricsFrom=null")
    policies = {p["metadata"]["name"]: p["spec"] for p in by_kind(closed, "NetworkPolicy")}
    assert policies["whisper-gateway"]["ingress"] == [
        {"ports": [{"port": 8080, "protocol": "TCP"}]}
    ]
    assert "ingress" not in policies["whisper-operator"]
    # The transcriber policy must select the pods the operator's Jobs make.
    job = transcriber_job_of(objects)
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    selector = policies["whisper-transcriber"]["podSelector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()


def test_notes_tell_how_to_mint_a_code_and_submit_a_file(helm: Helm, render: Render) -> None:
    notes = helm("install", "whisper", str(CHART), "--dry-run=client", "--namespace", NAMESPACE,
                 *REQUIRED).stdout.split("NOTES:", 1)[1]  # fmt: skip
    assert "port-forward service/whisper-gateway 8080:80" in notes
    assert "get secret first-code" in notes and "/v1/transcriptions" in notes
    assert "get transcriptionjobs" in notes
    manifest = re.search(r"^cat <<'YAML'.*?\n(.*?)\nYAML\n", notes, re.S | re.M)
    assert manifest is not None
    credit_code = yaml.safe_load(textwrap.dedent(manifest.group(1)))
    # The CreditCode NOTES shows must be one the chart's own CRD accepts.
    schema = crd_schema(render(*REQUIRED), "CreditCode")
    jsonschema.Draft4Validator(schema).validate(credit_code)
