"""What the chart's monitoring objects are checked against: the metrics the code registers, and
the shape of the Prometheus operator's and GKE Managed Prometheus's custom resources.

Neither kind of custom resource is in kubernetes-validate's schemas, and PromQL has no parser on
PyPI, so the schemas below are the parts of those CRDs' own schemas that the chart uses (closed
with additionalProperties: false, so a misspelt field fails), and an expression is checked by
the names it uses: each metric must be one the code exposes, each label one that metric has.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any, cast

import jsonschema
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

import transcription.metrics
import transcription_operator.metrics
from transcription.metrics import DatabaseCollector

#: Labels the scraper adds to every series (Prometheus operator and GKE Managed Prometheus).
TARGET_LABELS = {"namespace", "job", "instance", "pod", "container", "service", "endpoint",
                 "cluster", "location", "project_id"}  # fmt: skip
#: PromQL functions, aggregations and keywords the chart's expressions may use.
PROMQL_WORDS = {"sum", "max", "min", "avg", "count", "rate", "increase", "histogram_quantile",
                "time", "absent", "and", "or", "unless", "by", "without", "on", "ignoring",
                "bool", "label_values"}  # fmt: skip

DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?"
    r"(([0-9]+)ms)?)$",
}
STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": STRINGS,
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["key", "operator"],
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}
METADATA = {
    "type": "object",
    "required": ["name", "namespace"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": STRINGS,
        "annotations": STRINGS,
    },
}
ENDPOINT = {
    "type": "object",
    "additionalProperties": False,
    "required": ["port"],
    "properties": {
        "port": {"type": ["string", "integer"]},
        "path": {"type": "string", "pattern": "^/"},
        "interval": DURATION,
    },
}
RULE_GROUPS = {
    "type": "object",
    "additionalProperties": False,
    "required": ["groups"],
    "properties": {
        "groups": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name", "rules"],
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "interval": DURATION,
                    "rules": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["alert", "expr", "for", "labels", "annotations"],
                            "properties": {
                                "alert": {"type": "string", "pattern": "^[A-Z][A-Za-z]+$"},
                                "expr": {"type": "string", "minLength": 1},
                                "for": DURATION,
                                "labels": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["severity"],
                                    "properties": {"severity": {"enum": ["warning", "critical"]}},
                                },
                                "annotations": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["summary", "description"],
                                    "properties": {
                                        "summary": {"type": "string", "minLength": 1},
                                        "description": {"type": "string", "minLength": 1},
                                    },
                                },
                            },
                        },
                    },
                },
            },
        }
    },
}


def _resource(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": METADATA,
            "spec": spec,
        },
    }


def _spec(required: list[str], **properties: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": required,
        "properties": properties,
    }


SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): _spec(
        ["selector", "endpoints"],
        selector=SELECTOR,
        namespaceSelector={
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "any": {"type": "boolean"},
                "matchNames": {"type": "array", "items": {"type": "string"}},
            },
        },
        endpoints={"type": "array", "minItems": 1, "items": ENDPOINT},
    ),
    ("monitoring.googleapis.com/v1", "PodMonitoring"): _spec(
        ["selector", "endpoints"],
        selector=SELECTOR,
        endpoints={"type": "array", "minItems": 1, "items": ENDPOINT},
    ),
    ("monitoring.coreos.com/v1", "PrometheusRule"): RULE_GROUPS,
    ("monitoring.googleapis.com/v1", "Rules"): RULE_GROUPS,
}
API_VERSIONS = {api for api, _ in SCHEMAS}


def validate(obj: dict[str, Any]) -> None:
    """Check a monitoring custom resource against its kind's schema."""
    spec = SCHEMAS[(obj["apiVersion"], obj["kind"])]
    jsonschema.Draft7Validator(_resource(obj["apiVersion"], obj["kind"], spec)).validate(obj)


@cache
def exposed() -> dict[str, frozenset[str]]:
    """Every sample name the code's metrics expose, with its labels: a counter's ``_total``,
    a histogram's ``_bucket`` (with ``le``), ``_sum`` and ``_count``, a gauge's own name."""
    labels: dict[str, tuple[str, ...]] = {}
    for module in (transcription.metrics, transcription_operator.metrics):
        for metric in vars(module).values():
            if isinstance(metric, MetricWrapperBase):
                # prometheus_client keeps a metric's label names to itself.
                labels[metric._name] = tuple(metric._labelnames)
    families = list(REGISTRY.collect())
    families += DatabaseCollector(cast(Any, None)).describe()
    names: dict[str, frozenset[str]] = {}
    for family in families:
        if not family.name.startswith("whisper_"):
            continue
        own = frozenset(labels.get(family.name, ()) or _family_labels(family))
        if family.type == "counter":
            names[f"{family.name}_total"] = own
        elif family.type == "histogram":
            names[f"{family.name}_bucket"] = own | {"le"}
            names[f"{family.name}_sum"] = names[f"{family.name}_count"] = own
        else:
            names[family.name] = own
    return names


def _family_labels(family: Any) -> tuple[str, ...]:
    return tuple(getattr(family, "_labelnames", ()))


def problems(expr: str) -> list[str]:
    """What is wrong with the names a PromQL expression uses; empty when nothing is."""
    known = exposed()
    found: list[str] = []
    if not _balanced(expr):
        found.append(f"unbalanced brackets in {expr!r}")
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    used: set[str] = set()
    for name, matchers in re.findall(r"([A-Za-z_:][\w:]*)\s*\{([^}]*)\}", text):
        used.add(name)
        for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers):
            if name in known and label not in known[name] | TARGET_LABELS:
                found.append(f"{name} has no label {label!r}")
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", text)
    for clause in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", text):
        for label in re.findall(r"\w+", clause):
            if label not in TARGET_LABELS and not any(label in ls for ls in known.values()):
                found.append(f"no metric has a label {label!r}")
    text = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", " ", text)
    for word, call in re.findall(r"(?<![\w.$])([A-Za-z_:][\w:]*)\s*(\()?", text):
        if call or word in PROMQL_WORDS:
            if word not in PROMQL_WORDS:
                found.append(f"unknown function {word!r}")
        else:
            used.add(word)
    if not used:
        found.append(f"{expr!r} names no metric")
    found += [f"no metric {name!r}" for name in sorted(used - known.keys())]
    return found


def _balanced(expr: str) -> bool:
    stack: list[str] = []
    pairs = {")": "(", "]": "[", "}": "{"}
    for char in re.sub(r'"(?:[^"\\]|\\.)*"', "", expr):
        if char in "([{":
            stack.append(char)
        elif char in pairs and (not stack or stack.pop() != pairs[char]):
            return False
    return not stack
