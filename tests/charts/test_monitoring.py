"""Metrics in the chart: ports apart from the public path, scrape objects that find them, and
alerts and a dashboard that name only metrics and labels the code exposes."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.charts.conftest import CHART, NAMESPACE, REQUIRED, Render
from tests.charts.monitoring import exposed, problems, validate
from tests.charts.test_chart import EVERYTHING, by_kind, container, env_of, named, settings_of
from tests.charts.test_guide import guide_blocks
from transcription.settings import CoreSettings, GatewaySettings, OperatorSettings

DASHBOARD = json.loads((CHART / "dashboards" / "whisper.json").read_text())
#: The alerts issue 15 asks for, by what they watch.
ALERTS = {
    "WhisperJobsStuckQueued",  # jobs stuck queued
    "WhisperSettlementLagHigh",  # settlement lag
    "WhisperJobFailureRatioHigh",  # failure ratio
    "WhisperGatewayErrorRatioHigh",  # 5xx ratio
    "WhisperOperatorNotReconciling",  # operator not reconciling
}
COMPONENTS: dict[str, type[CoreSettings]] = {
    "gateway": GatewaySettings,
    "operator": OperatorSettings,
}


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a Kubernetes label selector (matchLabels, matchExpressions with In) matches."""
    if not selector["matchLabels"].items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In", expression
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def family(sample: str) -> str:
    return re.sub(r"_(total|bucket|sum|count)$", "", sample)


def test_the_alerts_name_only_metrics_and_labels_the_code_exposes(render: Render) -> None:
    objects = render(*EVERYTHING)
    (prometheus,) = by_kind(objects, "PrometheusRule")
    (managed,) = by_kind(objects, "Rules")
    assert prometheus["spec"] == managed["spec"]
    rules = [r for group in prometheus["spec"]["groups"] for r in group["rules"]]
    alerts = {r["alert"]: r for r in rules}
    assert len(alerts) == len(rules), "alert names repeat"
    assert alerts.keys() >= ALERTS
    for name, rule in alerts.items():
        assert problems(rule["expr"]) == [], name
        # Scoped to the release's namespace, so two releases in one Prometheus stay apart.
        selectors = re.findall(r"(whisper_\w+)(\{[^}]*\})?", rule["expr"])
        assert all(f'namespace="{NAMESPACE}"' in matchers for _, matchers in selectors), name
    for obj in (prometheus, managed):
        validate(obj)


def test_a_misnamed_metric_or_label_is_caught() -> None:
    assert problems('sum(rate(whisper_jobs_finished_total{namespace="x"}[5m]))') == []
    assert problems("sum(rate(whisper_job_finished_total[5m]))") == [
        "no metric 'whisper_job_finished_total'"
    ]
    assert problems('max(whisper_jobs{state="queued"})') == ["whisper_jobs has no label 'state'"]
    assert problems("max by (stat) (whisper_jobs)") == ["no metric has a label 'stat'"]
    assert problems("histogram_quantile(0.9, whisper_operator_settlement_lag_seconds_bucket") == [
        "unbalanced brackets in 'histogram_quantile(0.9, "
        "whisper_operator_settlement_lag_seconds_bucket'"
    ]


def test_the_dashboard_ships_as_is_and_shows_every_metric(render: Render) -> None:
    (config_map,) = by_kind(render(*EVERYTHING), "ConfigMap")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["whisper.json"]) == DASHBOARD
    panels = DASHBOARD["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    shown: set[str] = set()
    for panel in panels:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            assert problems(target["expr"]) == [], panel["title"]
            assert 'namespace="$namespace"' in target["expr"], panel["title"]
            shown |= {family(n) for n in re.findall(r"whisper_\w+", target["expr"])}
    (source,) = re.findall(
        r"label_values\((\w+), namespace\)", variables["namespace"]["definition"]
    )
    assert source in exposed()
    assert shown | {source} == {family(n) for n in exposed()}


def test_metrics_never_reach_the_public_path(render: Render) -> None:
    objects = render(*EVERYTHING, "--set", "gateway.service.type=LoadBalancer")
    public = named(objects, "Service", "whisper-gateway")
    assert [p["name"] for p in public["spec"]["ports"]] == ["http"]
    assert [p["targetPort"] for p in public["spec"]["ports"]] == ["http"]
    for component in COMPONENTS:
        service = named(objects, "Service", f"whisper-{component}-metrics")
        assert service["spec"]["type"] == "ClusterIP", component
        assert [(p["name"], p["targetPort"]) for p in service["spec"]["ports"]] == [
            ("metrics", "metrics")
        ]
    # Whatever is exposed outside the cluster leads to the public Service's http port.
    (ingress,) = by_kind(objects, "Ingress")
    backends = [p["backend"]["service"] for r in ingress["spec"]["rules"]
                for p in r["http"]["paths"]]  # fmt: skip
    assert backends == [{"name": "whisper-gateway", "port": {"name": "http"}}]
    (route,) = by_kind(objects, "HTTPRoute")
    assert [(b["name"], b["port"]) for b in route["spec"]["rules"][0]["backendRefs"]] == [
        ("whisper-gateway", public["spec"]["ports"][0]["port"])
    ]
    (policy,) = by_kind(objects, "GCPBackendPolicy")
    assert policy["spec"]["targetRef"]["name"] == "whisper-gateway"
    loaded = [s for s in by_kind(objects, "Service") if s["spec"]["type"] != "ClusterIP"]
    assert [s["metadata"]["name"] for s in loaded] == ["whisper-gateway"]


@pytest.mark.parametrize("shape", ["default", "everything"])
def test_each_component_serves_metrics_on_its_own_port(render: Render, shape: str) -> None:
    objects = render(*(REQUIRED if shape == "default" else EVERYTHING))
    for component, cls in COMPONENTS.items():
        main = container(objects, "Deployment", f"whisper-{component}")
        ports = {p["name"]: p["containerPort"] for p in main["ports"]}
        assert len(set(ports.values())) == len(ports), component
        settings = settings_of(cls, env_of(main))
        assert (settings.metrics_port, settings.metrics_host) == (ports["metrics"], "0.0.0.0")
        if shape == "everything":
            # The Cloud SQL proxy sidecar shares the pod's ports: its health port and its own.
            assert ports["metrics"] not in (9090, 5432), component


def test_the_scrapers_find_exactly_the_metrics_ports(render: Render) -> None:
    objects = render(*EVERYTHING)
    (monitor,) = by_kind(objects, "ServiceMonitor")
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    found = [s for s in by_kind(objects, "Service")
             if selects(monitor["spec"]["selector"], s["metadata"]["labels"])]  # fmt: skip
    assert sorted(s["metadata"]["name"] for s in found) == [
        "whisper-gateway-metrics",
        "whisper-operator-metrics",
    ]
    assert all(endpoint["port"] in [p["name"] for p in s["spec"]["ports"]] for s in found)

    (pod_monitoring,) = by_kind(objects, "PodMonitoring")
    (endpoint,) = pod_monitoring["spec"]["endpoints"]
    workloads = [o for o in objects if o["kind"] in ("Deployment", "Job")]
    scraped = [w for w in workloads if selects(pod_monitoring["spec"]["selector"],
                                               w["spec"]["template"]["metadata"]["labels"])]  # fmt: skip
    assert sorted(w["metadata"]["name"] for w in scraped) == ["whisper-gateway", "whisper-operator"]
    for workload in scraped:
        (main,) = workload["spec"]["template"]["spec"]["containers"]
        assert endpoint["port"] in [p["name"] for p in main["ports"]]


def test_without_a_port_a_component_serves_no_metrics(render: Render) -> None:
    objects = render(*REQUIRED, "--set", "gateway.metricsPort=0")
    gateway = container(objects, "Deployment", "whisper-gateway")
    assert "WHISPER_METRICS_PORT" not in env_of(gateway)
    assert [p["name"] for p in gateway["ports"]] == ["http"]
    services = {s["metadata"]["name"] for s in by_kind(objects, "Service")}
    assert services == {"whisper-gateway", "whisper-operator-metrics"}
    objects = render(*REQUIRED, "--set", "operator.metricsPort=0",
                     "--set", "metrics.podMonitoring.enabled=true")  # fmt: skip
    (pod_monitoring,) = by_kind(objects, "PodMonitoring")
    assert pod_monitoring["spec"]["selector"]["matchExpressions"][0]["values"] == ["gateway"]


def test_the_gke_values_scrape_with_managed_prometheus(render: Render) -> None:
    objects = render("-f", str(CHART / "ci" / "gke-values.yaml"))
    assert by_kind(objects, "PodMonitoring")
    assert not by_kind(objects, "ServiceMonitor")


def test_the_guide_queries_name_only_exposed_metrics() -> None:
    queries = [q for block in guide_blocks("promql") for q in block.splitlines() if q.strip()]
    assert queries
    for query in queries:
        assert problems(query) == [], query
