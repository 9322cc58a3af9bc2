"""deploy/rbac/ is the chart's own RBAC for release ``whisper`` in namespace ``whisper``."""

from __future__ import annotations

from typing import Any

import yaml

from deploy.rbac import generate
from tests.charts.conftest import REQUIRED, Helm, Render

RBAC_KINDS = {"ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}


def test_deploy_rbac_is_the_generators_output(helm: Helm) -> None:
    for component, text in generate.manifests(helm(*generate.TEMPLATE).stdout).items():
        path = generate.HERE / f"{component}.yaml"
        assert path.read_text() == text, f"{path}: regenerate with python -m deploy.rbac.generate"


def test_deploy_rbac_equals_the_chart_object_by_object(render: Render) -> None:
    # The whole release, so an account or role added in any template must be in deploy/rbac too;
    # only the migration hook's account is Helm's alone (kubectl users migrate themselves).
    chart: dict[tuple[str, str, str], dict[str, Any]] = {}
    for obj in render(*REQUIRED):
        component = obj["metadata"].get("labels", {}).get("app.kubernetes.io/component")
        if obj["kind"] in RBAC_KINDS and component != "migrate":
            assert component in generate.COMPONENTS, f"{obj['kind']}/{obj['metadata']['name']}"
            del obj["metadata"]["labels"]
            chart[(component, obj["kind"], obj["metadata"]["name"])] = obj
    files: dict[tuple[str, str, str], dict[str, Any]] = {}
    for component in generate.COMPONENTS:
        for doc in yaml.safe_load_all((generate.HERE / f"{component}.yaml").read_text()):
            files[(component, doc["kind"], doc["metadata"]["name"])] = doc
    assert sorted(files) == sorted(chart)
    for key, obj in chart.items():
        assert files[key] == obj, key
    assert {kind for _, kind, _ in chart} == {"ServiceAccount", "Role", "RoleBinding"}
    assert {o["metadata"]["namespace"] for o in chart.values()} == {"whisper"}
