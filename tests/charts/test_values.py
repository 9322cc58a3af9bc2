"""Every value of values.yaml reaches the object it configures.

Each leaf is set to a distinctive value and found where it must land: in an object the chart
renders, or in the transcriber Job the rendered operator would build from its own environment.
A switch makes its object appear and disappear. A leaf without a proof fails the test, so a new
value needs one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml

from tests.charts.conftest import CHART, Render
from tests.charts.test_chart import transcriber_job_of
from transcription_operator.builders import KUEUE_QUEUE_LABEL

VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
APP_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
#: The bucket, the one value without a default; the CRDs, only slow to parse, are left out but
#: where a proof needs them.
BASE = {"config.blobUrl": "gs://whisper-test/default", "crds.enabled": False}
#: The name ``transcriber_job_of`` gives the Job it builds.
TRANSCRIBER_JOB = "tr-0123456789abcdef"
PROXY_ON = {"cloudSqlProxy.enabled": True, "cloudSqlProxy.instanceConnectionName": "p:r:i"}
ROUTE_ON = {"gateway.httpRoute.enabled": True, "gateway.httpRoute.parentRefs": [{"name": "gw"}]}
INGRESS_ON = {"gateway.ingress.enabled": True}
MONITOR_ON = {"metrics.serviceMonitor.enabled": True}
PODMON_ON = {"metrics.podMonitoring.enabled": True}
RULE_ON = {"metrics.prometheusRule.enabled": True}
DASHBOARD_ON = {"metrics.dashboard.enabled": True}
CRD = "creditcodes.transcription.whisper.dev"
Objects = list[dict[str, Any]]
Find = Callable[[dict[str, Any]], Any]
SAME = object()


@dataclass(frozen=True)
class At:
    """Where a value lands: ``find`` on the one ``kind`` whose name ends in ``suffix`` gives
    ``expect`` (by default the value itself)."""

    kind: str
    suffix: str
    find: Find
    expect: Any = SAME


@dataclass(frozen=True)
class Proof:
    """A distinctive value, where it lands, and the values its objects need to render at all."""

    value: Any
    places: tuple[At, ...]
    context: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Switch:
    """An enabled flag: its object is rendered when it is on and not when it is off."""

    kind: str
    suffix: str
    context: dict[str, Any] = field(default_factory=dict)


def dig(*keys: str | int) -> Find:
    def find(obj: dict[str, Any]) -> Any:
        node: Any = obj
        for key in keys:
            node = node[key]
        return node

    return find


def pod(*keys: str | int) -> Find:
    return dig("spec", "template", "spec", *keys)


def main(*keys: str | int) -> Find:
    return pod("containers", 0, *keys)


def proxy(*keys: str | int) -> Find:
    return pod("initContainers", 0, *keys)


def env(name: str, *keys: str) -> Find:
    def find(obj: dict[str, Any]) -> Any:
        (var,) = (e for e in main("env")(obj) if e["name"] == name)
        return dig(*keys)(var.get("valueFrom")) if keys else var["value"]

    return find


def has(item: str, within: Find) -> Find:
    return lambda obj: item in within(obj)


def volume(name: str, *keys: str) -> Find:
    def find(obj: dict[str, Any]) -> Any:
        (found,) = (v for v in pod("volumes")(obj) if v["name"] == name)
        return dig(*keys)(found)

    return find


def annotation(key: str) -> Find:
    return lambda obj: (obj["metadata"].get("annotations") or {}).get(key)


def alert(name: str, text: str) -> Find:
    """Whether the expression of the alert ``name`` contains ``text``."""

    def find(obj: dict[str, Any]) -> Any:
        (rule,) = (r for g in obj["spec"]["groups"] for r in g["rules"] if r.get("alert") == name)
        return text in rule["expr"]

    return find


def gateway(find: Find, expect: Any = SAME) -> At:
    return At("Deployment", "-gateway", find, expect)


def operator(find: Find, expect: Any = SAME) -> At:
    return At("Deployment", "-operator", find, expect)


def migrate(find: Find, expect: Any = SAME) -> At:
    return At("Job", "-migrate", find, expect)


def transcriber(find: Find, expect: Any = SAME) -> At:
    return At("Job", TRANSCRIBER_JOB, find, expect)


def account(component: str, find: Find, expect: Any = SAME) -> At:
    return At("ServiceAccount", f"-{component}", find, expect)


def everywhere(find: Find, expect: Any = SAME) -> tuple[At, ...]:
    """The same place in each pod the chart itself renders."""
    return gateway(find, expect), operator(find, expect), migrate(find, expect)


def resources(
    component: str,
    *places: Callable[[Find], At],
    container: Callable[..., Find] = main,
    context: dict[str, Any] | None = None,
) -> dict[str, Proof]:
    """Each request and limit of ``<component>.resources``, in the ``container`` of the objects
    ``places`` name."""
    node = VALUES[component]["resources"]
    return {
        f"{component}.resources.{group}.{name}": Proof(
            f"{index + 7}{'m' if name == 'cpu' else 'Mi'}",
            tuple(place(container("resources", group, name)) for place in places),
            context or {},
        )
        for index, (group, name) in enumerate((g, n) for g in node for n in node[g])
    }


def scheduling(component: str, place: Callable[[Find], At]) -> dict[str, Proof]:
    """``<component>.nodeSelector``, ``.tolerations`` and ``.affinity``, in its pod."""
    term = {"weight": 1, "podAffinityTerm": {"topologyKey": f"proof/{component}"}}
    toleration = {"key": f"proof/{component}", "operator": "Exists", "effect": "NoSchedule"}
    return {
        f"{component}.nodeSelector": Proof({"pool": component}, (place(pod("nodeSelector")),)),
        f"{component}.tolerations": Proof([toleration], (place(pod("tolerations")),)),
        f"{component}.affinity": Proof(
            {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [term]}},
            (place(pod("affinity")),),
        ),
    }


def service_account(component: str, workload: At) -> dict[str, Proof]:
    """``<component>.serviceAccount``: the account's name (its pods and its binding use it), its
    Google service account and its annotations."""
    name = f"{component}-proof"
    named = [At("ServiceAccount", name, dig("metadata", "name")), workload]
    if component != "transcriber":
        named.append(At("RoleBinding", f"-{component}", dig("subjects", 0, "name")))
    gsa = annotation("iam.gke.io/gcp-service-account")
    # The migration hook acts as the gateway's Google account: it reaches the same database.
    google = (
        account(component, gsa),
        *((account("migrate", gsa),) if component == "gateway" else ()),
    )
    return {
        f"{component}.serviceAccount.name": Proof(name, tuple(named)),
        f"{component}.serviceAccount.gcpServiceAccount": Proof(
            f"{name}@p.iam.gserviceaccount.com", google
        ),
        f"{component}.serviceAccount.annotations": Proof(
            {"proof/annotation": component},
            (account(component, annotation("proof/annotation"), component),),
        ),
    }


PROOFS: dict[str, Proof | Switch] = {
    "nameOverride": Proof(
        "speech", (gateway(dig("metadata", "labels", "app.kubernetes.io/name")),)
    ),
    "fullnameOverride": Proof("acme", (gateway(dig("metadata", "name"), "acme-gateway"),)),
    "crds.enabled": Switch("CustomResourceDefinition", CRD),
    "crds.keep": Proof(
        False,
        (At("CustomResourceDefinition", CRD, annotation("helm.sh/resource-policy"), None),),
        {"crds.enabled": True},
    ),
    "image.gateway.repository": Proof(
        "reg.test/gw", everywhere(main("image"), f"reg.test/gw:{APP_VERSION}")
    ),
    "image.gateway.tag": Proof("9.9.9", everywhere(main("image"), "whisper-gateway:9.9.9")),
    "image.gateway.pullPolicy": Proof("Always", everywhere(main("imagePullPolicy"))),
    "image.transcriber.repository": Proof(
        "reg.test/tr", (transcriber(main("image"), f"reg.test/tr:{APP_VERSION}"),)
    ),
    "image.transcriber.tag": Proof(
        "9.9.9", (transcriber(main("image"), "whisper-transcriber:9.9.9"),)
    ),
    # The operator's Jobs list none: they pull through their account.
    "imagePullSecrets": Proof(
        [{"name": "regcred"}],
        (
            *everywhere(pod("imagePullSecrets")),
            *(account(c, dig("imagePullSecrets")) for c in ("gateway", "operator", "transcriber")),
        ),
    ),
    "config.engine": Proof("local", (gateway(env("WHISPER_ENGINE")),)),
    "config.model": Proof("proof-model", (gateway(env("WHISPER_MODEL")),)),
    "config.blobUrl": Proof(
        "gs://proof/p",
        (
            gateway(env("WHISPER_BLOB_URL")),
            operator(env("WHISPER_BLOB_URL")),
            transcriber(env("WHISPER_BLOB_URL")),
        ),
    ),
    "config.maxAudioSeconds": Proof(1234, (gateway(env("WHISPER_MAX_AUDIO_SECONDS"), "1234"),)),
    "config.maxUploadBytes": Proof(4321, (gateway(env("WHISPER_MAX_UPLOAD_BYTES"), "4321"),)),
    "config.logLevel": Proof("debug", (gateway(main("args"), ["serve", "--log-level", "debug"]),)),
    "database.existingSecret": Proof("db", everywhere(env("DATABASE_URL", "secretKeyRef", "name"))),
    "database.key": Proof("URL", everywhere(env("DATABASE_URL", "secretKeyRef", "key"))),
    **{
        f"codeSecret.{key}": Proof(value, (gateway(find), operator(find)))
        for key, ref, value in (("existingSecret", "name", "codes"), ("key", "key", "KEY"))
        for find in [env("WHISPER_CODE_SECRET", "secretKeyRef", ref)]
    },
    "adminToken.existingSecret": Proof(
        "admin", (gateway(env("WHISPER_ADMIN_TOKEN", "secretKeyRef", "name")),)
    ),
    "adminToken.key": Proof(
        "TOKEN",
        (gateway(env("WHISPER_ADMIN_TOKEN", "secretKeyRef", "key")),),
        {"adminToken.existingSecret": "admin"},
    ),
    "cloudSqlProxy.enabled": Proof(
        True,
        everywhere(proxy("name"), "cloud-sql-proxy"),
        {"cloudSqlProxy.instanceConnectionName": "p:r:i"},
    ),
    "cloudSqlProxy.instanceConnectionName": Proof(
        "proof:region:db", everywhere(proxy("args", -1)), PROXY_ON
    ),
    "cloudSqlProxy.port": Proof(
        15432, everywhere(has("--port=15432", proxy("args")), True), PROXY_ON
    ),
    "cloudSqlProxy.privateIp": Proof(
        False, everywhere(has("--private-ip", proxy("args")), False), PROXY_ON
    ),
    "cloudSqlProxy.autoIamAuthn": Proof(
        True, everywhere(has("--auto-iam-authn", proxy("args")), True), PROXY_ON
    ),
    "cloudSqlProxy.image": Proof("reg.test/proxy:1", everywhere(proxy("image")), PROXY_ON),
    **resources("cloudSqlProxy", gateway, operator, migrate, container=proxy, context=PROXY_ON),
    "gateway.replicaCount": Proof(3, (gateway(dig("spec", "replicas")),)),
    "gateway.containerPort": Proof(
        8081,
        (
            gateway(main("ports", 0, "containerPort")),
            gateway(env("WHISPER_PORT"), "8081"),
            At("NetworkPolicy", "-gateway", dig("spec", "ingress", 0, "ports", 0, "port")),
        ),
    ),
    "gateway.metricsPort": Proof(
        9465,
        (
            gateway(main("ports", 1, "containerPort")),
            gateway(env("WHISPER_METRICS_PORT"), "9465"),
            At("Service", "-gateway-metrics", dig("spec", "ports", 0, "port")),
            At("NetworkPolicy", "-gateway", dig("spec", "ingress", 1, "ports", 0, "port")),
        ),
    ),
    "gateway.service.type": Proof(
        "LoadBalancer", (At("Service", "-gateway", dig("spec", "type")),)
    ),
    "gateway.service.port": Proof(
        8088,
        (
            At("Service", "-gateway", dig("spec", "ports", 0, "port")),
            At("HTTPRoute", "-gateway", dig("spec", "rules", 0, "backendRefs", 0, "port")),
        ),
        ROUTE_ON,
    ),
    "gateway.service.annotations": Proof(
        {"proof/annotation": "service"},
        (At("Service", "-gateway", annotation("proof/annotation"), "service"),),
    ),
    **service_account("gateway", gateway(pod("serviceAccountName"))),
    **resources("gateway", gateway),
    "gateway.uploadVolumeSize": Proof("5Gi", (gateway(volume("data", "emptyDir", "sizeLimit")),)),
    **{
        f"gateway.limits.{key}": Proof(value, (gateway(env(f"WHISPER_{name}"), str(value)),))
        for key, name, value in (
            ("maxBodyBytes", "MAX_BODY_BYTES", 4097),
            ("headerTimeout", "HEADER_TIMEOUT", 2.5),
            ("bodyTimeout", "BODY_TIMEOUT", 31.5),
            ("minUploadRate", "MIN_UPLOAD_RATE", 4095),
            ("maxUploads", "MAX_UPLOADS", 13),
            ("maxUploadsPerCode", "MAX_UPLOADS_PER_CODE", 3),
            ("maxConnections", "MAX_CONNECTIONS", 1001),
            ("keepAliveTimeout", "KEEP_ALIVE_TIMEOUT", 621),
            ("authFailures", "AUTH_FAILURE_LIMIT", 21),
            ("authFailureWindowSeconds", "AUTH_FAILURE_WINDOW_SECONDS", 61),
            ("authFailureDelay", "AUTH_FAILURE_DELAY", 0.25),
        )
    },
    "gateway.trustedProxies": Proof(
        ["35.191.0.0/16", "203.0.113.9"],
        (gateway(env("WHISPER_TRUSTED_PROXIES"), "35.191.0.0/16,203.0.113.9"),),
    ),
    "gateway.ingress.enabled": Switch("Ingress", "-gateway"),
    "gateway.ingress.className": Proof(
        "gce", (At("Ingress", "-gateway", dig("spec", "ingressClassName")),), INGRESS_ON
    ),
    "gateway.ingress.annotations": Proof(
        {"proof/annotation": "ingress"},
        (At("Ingress", "-gateway", annotation("proof/annotation"), "ingress"),),
        INGRESS_ON,
    ),
    "gateway.ingress.host": Proof(
        "proof.example.com",
        (At("Ingress", "-gateway", dig("spec", "rules", 0, "host")),),
        INGRESS_ON,
    ),
    "gateway.ingress.tls": Proof(
        [{"secretName": "tls", "hosts": ["proof.example.com"]}],
        (At("Ingress", "-gateway", dig("spec", "tls")),),
        INGRESS_ON,
    ),
    "gateway.httpRoute.enabled": Switch(
        "HTTPRoute", "-gateway", {"gateway.httpRoute.parentRefs": [{"name": "gw"}]}
    ),
    "gateway.httpRoute.parentRefs": Proof(
        [{"name": "external", "namespace": "infra"}],
        (At("HTTPRoute", "-gateway", dig("spec", "parentRefs")),),
        ROUTE_ON,
    ),
    "gateway.httpRoute.hostnames": Proof(
        ["proof.example.com"], (At("HTTPRoute", "-gateway", dig("spec", "hostnames")),), ROUTE_ON
    ),
    "gateway.backendPolicy.enabled": Switch("GCPBackendPolicy", "-gateway"),
    "gateway.backendPolicy.timeoutSec": Proof(
        1801,
        (At("GCPBackendPolicy", "-gateway", dig("spec", "default", "timeoutSec")),),
        {"gateway.backendPolicy.enabled": True},
    ),
    "gateway.autoscaling.enabled": Switch("HorizontalPodAutoscaler", "-gateway"),
    **{
        f"gateway.autoscaling.{key}": Proof(
            value,
            (At("HorizontalPodAutoscaler", "-gateway", find),),
            {"gateway.autoscaling.enabled": True},
        )
        for key, value, find in (
            ("minReplicas", 3, dig("spec", "minReplicas")),
            ("maxReplicas", 11, dig("spec", "maxReplicas")),
            (
                "targetCPUUtilizationPercentage",
                71,
                dig("spec", "metrics", 0, "resource", "target", "averageUtilization"),
            ),
        )
    },
    "gateway.podDisruptionBudget.enabled": Switch("PodDisruptionBudget", "-gateway"),
    "gateway.podDisruptionBudget.minAvailable": Proof(
        2, (At("PodDisruptionBudget", "-gateway", dig("spec", "minAvailable")),)
    ),
    **scheduling("gateway", gateway),
    **service_account("operator", operator(pod("serviceAccountName"))),
    "operator.maxRunningJobs": Proof(7, (operator(env("WHISPER_MAX_RUNNING_JOBS"), "7"),)),
    "operator.kueueQueueName": Proof(
        "queue",
        (
            transcriber(dig("metadata", "labels", KUEUE_QUEUE_LABEL)),
            transcriber(dig("spec", "suspend"), True),
        ),
    ),
    "operator.reconcileInterval": Proof(17, (operator(env("WHISPER_RECONCILE_INTERVAL"), "17"),)),
    "operator.maxAttempts": Proof(4, (operator(env("WHISPER_MAX_ATTEMPTS"), "4"),)),
    "operator.livenessPort": Proof(
        8089,
        (
            operator(main("ports", 0, "containerPort")),
            operator(has("--liveness=http://0.0.0.0:8089/healthz", main("args")), True),
        ),
    ),
    "operator.metricsPort": Proof(
        9466,
        (
            operator(main("ports", 1, "containerPort")),
            operator(env("WHISPER_METRICS_PORT"), "9466"),
            At("Service", "-operator-metrics", dig("spec", "ports", 0, "port")),
            At("NetworkPolicy", "-operator", dig("spec", "ingress", 0, "ports", 0, "port")),
        ),
    ),
    **resources("operator", operator),
    **scheduling("operator", operator),
    **service_account("transcriber", transcriber(pod("serviceAccountName"))),
    "transcriber.envSecret": Proof(
        "engine", (transcriber(main("envFrom"), [{"secretRef": {"name": "engine"}}]),)
    ),
    "transcriber.backoffLimit": Proof(5, (transcriber(dig("spec", "backoffLimit")),)),
    "transcriber.deadlineSeconds": Proof(
        7201, (transcriber(dig("spec", "activeDeadlineSeconds")),)
    ),
    "transcriber.ttlSecondsAfterFinished": Proof(
        61, (transcriber(dig("spec", "ttlSecondsAfterFinished")),)
    ),
    **resources("transcriber", transcriber),
    "migrations.enabled": Switch("Job", "-migrate"),
    "migrations.activeDeadlineSeconds": Proof(
        601, (migrate(dig("spec", "activeDeadlineSeconds")),)
    ),
    **resources("migrations", migrate),
    "metrics.serviceMonitor.enabled": Switch("ServiceMonitor", "whisper"),
    "metrics.serviceMonitor.interval": Proof(
        "15s",
        (At("ServiceMonitor", "whisper", dig("spec", "endpoints", 0, "interval")),),
        MONITOR_ON,
    ),
    "metrics.serviceMonitor.labels": Proof(
        {"release": "kps"},
        (At("ServiceMonitor", "whisper", dig("metadata", "labels", "release"), "kps"),),
        MONITOR_ON,
    ),
    "metrics.podMonitoring.enabled": Switch("PodMonitoring", "whisper"),
    "metrics.podMonitoring.interval": Proof(
        "15s", (At("PodMonitoring", "whisper", dig("spec", "endpoints", 0, "interval")),), PODMON_ON
    ),
    **{
        f"metrics.alerts.{key}": Proof(
            value,
            tuple(At("PrometheusRule", "whisper", alert(name, text), True) for name in alerts),
            RULE_ON,
        )
        for key, value, text, alerts in (
            ("queueWaitSeconds", 901, "901", ("WhisperJobsStuckQueued", "WhisperQueueWaitHigh")),
            ("settlementLagSeconds", 121, "> 121", ("WhisperSettlementLagHigh",)),
            ("failureRatio", 0.15, "> 0.15", ("WhisperJobFailureRatioHigh",)),
            ("serverErrorRatio", 0.07, "> 0.07", ("WhisperGatewayErrorRatioHigh",)),
            ("reconcileStaleSeconds", 301, "> 301", ("WhisperOperatorNotReconciling",)),
        )
    },
    "metrics.prometheusRule.enabled": Switch("PrometheusRule", "whisper"),
    "metrics.prometheusRule.labels": Proof(
        {"release": "kps"},
        (At("PrometheusRule", "whisper", dig("metadata", "labels", "release"), "kps"),),
        RULE_ON,
    ),
    "metrics.gmpRules.enabled": Switch("Rules", "whisper"),
    "metrics.dashboard.enabled": Switch("ConfigMap", "-dashboard"),
    "metrics.dashboard.namespace": Proof(
        "grafana", (At("ConfigMap", "-dashboard", dig("metadata", "namespace")),), DASHBOARD_ON
    ),
    "metrics.dashboard.annotations": Proof(
        {"grafana_folder": "Whisper"},
        (At("ConfigMap", "-dashboard", annotation("grafana_folder"), "Whisper"),),
        DASHBOARD_ON,
    ),
    "networkPolicy.enabled": Switch("NetworkPolicy", "-gateway"),
    "networkPolicy.gatewayFrom": Proof(
        [{"namespaceSelector": {"matchLabels": {"proof": "yes"}}}],
        (At("NetworkPolicy", "-gateway", dig("spec", "ingress", 0, "from")),),
    ),
    "networkPolicy.metricsFrom": Proof(
        [{"namespaceSelector": {"matchLabels": {"proof": "metrics"}}}],
        (
            At("NetworkPolicy", "-gateway", dig("spec", "ingress", 1, "from")),
            At("NetworkPolicy", "-operator", dig("spec", "ingress", 0, "from")),
        ),
    ),
    **{
        f"podSecurityContext.{key}": Proof(
            value, everywhere(pod("securityContext", *key.split(".")))
        )
        for key, value in (
            ("runAsNonRoot", False),
            ("runAsUser", 10002),
            ("runAsGroup", 10003),
            ("fsGroup", 10004),
            ("seccompProfile.type", "Unconfined"),
        )
    },
    **{
        f"securityContext.{key}": Proof(value, everywhere(main("securityContext", *key.split("."))))
        for key, value in (
            ("allowPrivilegeEscalation", True),
            ("readOnlyRootFilesystem", False),
            ("runAsNonRoot", False),
            ("capabilities.drop", ["NET_RAW"]),
        )
    },
}


def leaves(node: Any, path: tuple[str, ...] = ()) -> Iterator[str]:
    """Dotted paths of the values a user sets: maps are descended, anything else is a leaf."""
    if isinstance(node, dict) and node:
        for key, child in node.items():
            yield from leaves(child, (*path, key))
    else:
        yield ".".join(path)


LEAVES = sorted(leaves(VALUES))


@pytest.fixture(scope="module")
def objects(render: Render) -> Callable[[dict[str, Any]], Objects]:
    """The chart's objects for these values, and the transcriber Job its operator would build."""
    cache: dict[str, Objects] = {}

    def build(values: dict[str, Any]) -> Objects:
        key = json.dumps(values, sort_keys=True)
        if key not in cache:
            flags = [f for k, v in {**BASE, **values}.items()
                     for f in ("--set-json", f"{k}={json.dumps(v)}")]  # fmt: skip
            rendered = render(*flags)
            cache[key] = [*rendered, transcriber_job_of(rendered)]
        return cache[key]

    return build


def the(objects: Objects, kind: str, suffix: str) -> dict[str, Any] | None:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].endswith(suffix)]
    assert len(found) <= 1, f"{len(found)} {kind} objects end in {suffix}"
    return found[0] if found else None


def landed(objects: Objects, at: At) -> Any:
    """What ``at`` finds, or a sentence saying why nothing is there."""
    obj = the(objects, at.kind, at.suffix)
    if obj is None:
        return f"no {at.kind} *{at.suffix}"
    try:
        return at.find(obj)
    except (KeyError, IndexError, TypeError, ValueError):
        return f"nothing there in {at.kind}/{obj['metadata']['name']}"


def default(path: str) -> Any:
    node: Any = VALUES
    for key in path.split("."):
        node = node[key]
    return node


def test_every_value_has_a_proof() -> None:
    assert sorted(PROOFS) == LEAVES, (
        f"values without a proof: {sorted(set(LEAVES) - set(PROOFS))}; "
        f"proofs of no value: {sorted(set(PROOFS) - set(LEAVES))}"
    )


@pytest.mark.parametrize("path", LEAVES)
def test_each_value_lands_in_the_object_it_configures(
    objects: Callable[[dict[str, Any]], Objects], path: str
) -> None:
    proof = PROOFS[path]
    if isinstance(proof, Switch):
        on, off = (objects({**proof.context, path: flag}) for flag in (True, False))
        assert the(on, proof.kind, proof.suffix) is not None, f"{path}=true renders no {proof.kind}"
        assert the(off, proof.kind, proof.suffix) is None, f"{path}=false still renders one"
        return
    assert proof.value != default(path), f"{path}: a proof needs a value other than the default"
    before, after = objects(proof.context), objects({**proof.context, path: proof.value})
    for at in proof.places:
        expect = proof.value if at.expect is SAME else at.expect
        where = f"{path} in {at.kind} *{at.suffix}"
        assert landed(after, at) == expect, where
        assert landed(before, at) != expect, f"{where}: there without the value too"
