"""The CustomResourceDefinitions, generated from the pydantic models in ``transcription.resources``.

``python -m transcription_operator.crds crds/`` rewrites the YAML files; a test checks they match.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from transcription import resources

_KEEP = {
    "type", "description", "properties", "required", "items", "enum", "format", "default",
    "minimum", "maximum", "minLength", "maxLength", "pattern", "minItems", "maxItems",
    "additionalProperties", "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
}  # fmt: skip


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    """Turn pydantic's JSON Schema into a structural OpenAPI v3 schema: refs inlined, no nulls."""
    if isinstance(node, list):
        return [_structural(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = dict(defs[node["$ref"].rsplit("/", 1)[-1]])
        target.update({k: v for k, v in node.items() if k != "$ref"})
        return _structural(target, defs)
    if "anyOf" in node:
        # Optional fields are ``anyOf: [X, null]``; an absent field says "unset" on its own.
        branches = [b for b in node["anyOf"] if b.get("type") != "null"]
        assert len(branches) == 1, node
        merged = {**branches[0], **{k: v for k, v in node.items() if k != "anyOf"}}
        return _structural(merged, defs)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "exclusiveMinimum":  # OpenAPI v3.0 spells it as a flag next to minimum
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "properties":
            out[key] = {name: _structural(prop, defs) for name, prop in value.items()}
        elif key == "additionalProperties" and value is False:
            # Structural schemas forbid it next to properties; the API server prunes instead.
            continue
        elif key in _KEEP:
            out[key] = _structural(value, defs)
    if out.get("default") is None:
        out.pop("default", None)
    return out


def schema_of(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True)
    return dict(_structural(raw, raw.get("$defs", {})))


def _crd(
    *,
    kind: str,
    plural: str,
    short: str,
    description: str,
    spec: type[BaseModel],
    status: type[BaseModel],
    columns: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{resources.GROUP}"},
        "spec": {
            "group": resources.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short],
                "categories": [resources.CATEGORY],
            },
            "versions": [
                {
                    "name": resources.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        *columns,
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": description,
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {
                                    "type": "string",
                                    "description": "Versioned schema of this representation.",
                                },
                                "kind": {
                                    "type": "string",
                                    "description": "REST resource this object represents.",
                                },
                                "metadata": {"type": "object"},
                                "spec": schema_of(spec),
                                "status": schema_of(status),
                            },
                        }
                    },
                }
            ],
        },
    }


def transcription_job_crd() -> dict[str, Any]:
    return _crd(
        kind="TranscriptionJob",
        plural=resources.TJ_PLURAL,
        short="tj",
        description="One mp3 to transcribe with Whisper, paid for by a credit code.",
        spec=resources.TranscriptionJobSpec,
        status=resources.TranscriptionJobStatus,
        columns=[
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {
                "name": "Audio",
                "type": "number",
                "jsonPath": ".status.audioSeconds",
                "description": "Seconds of audio.",
            },
            {
                "name": "Charged",
                "type": "integer",
                "jsonPath": ".status.chargedSeconds",
                "description": "Seconds of credit charged.",
            },
            {"name": "Progress", "type": "number", "jsonPath": ".status.progress"},
        ],
    )


def credit_code_crd() -> dict[str, Any]:
    return _crd(
        kind="CreditCode",
        plural=resources.CC_PLURAL,
        short="cc",
        description="A prepaid credit code; the operator mints it into a Secret of the same owner.",
        spec=resources.CreditCodeSpec,
        status=resources.CreditCodeStatus,
        columns=[
            {"name": "Remaining", "type": "integer", "jsonPath": ".status.remainingSeconds"},
            {"name": "Uses", "type": "integer", "jsonPath": ".status.uses"},
            {"name": "State", "type": "string", "jsonPath": ".status.state"},
        ],
    )


CRDS = {
    "transcriptionjobs.yaml": transcription_job_crd,
    "creditcodes.yaml": credit_code_crd,
}


def render(crd: dict[str, Any]) -> str:
    return yaml.safe_dump(crd, sort_keys=False, width=100)


def main(argv: list[str]) -> None:
    """Write every CRD into the directory given (default ``crds``)."""
    target = Path(argv[0] if argv else "crds")
    for file_name, build in CRDS.items():
        (target / file_name).write_text(render(build()))


if __name__ == "__main__":
    main(sys.argv[1:])
