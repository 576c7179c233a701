"""CustomResourceDefinitions generated from the spec models: `kubeforge crds` writes crds/.

The API server then rejects what the models reject (types, enums, bounds, patterns, required
fields, CEL rules for cross-field checks and immutability) before the operator ever sees it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kubeforge.spec import API_GROUP, FinetuneJob, PretrainJob

VERSION = "v1alpha1"
KINDS: dict[str, tuple[type[PretrainJob] | type[FinetuneJob], str]] = {
    "PretrainJob": (PretrainJob, "ptj"),
    "FinetuneJob": (FinetuneJob, "ftj"),
}

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Step", "type": "string", "jsonPath": ".status.stepProgress", "description": "step/total"},
    {"name": "Loss", "type": "number", "jsonPath": ".status.loss"},
    {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]

# JSON Schema keywords a Kubernetes structural schema takes as they are.
KEPT = {"type", "description", "enum", "minimum", "maximum", "pattern", "minLength", "maxLength",
        "minItems", "maxItems", "required", "x-kubernetes-validations"}


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    return value


def structural(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Pydantic's JSON Schema as an OpenAPI v3 structural schema: refs inlined, `X | None` as X."""
    if "$ref" in schema:
        target = defs[schema["$ref"].rsplit("/", 1)[-1]]
        schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
    if "anyOf" in schema:
        options = [o for o in schema["anyOf"] if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"a structural schema cannot express anyOf {schema['anyOf']}")
        schema = {**structural(options[0], defs), **{k: v for k, v in schema.items() if k != "anyOf"}}
    out: dict[str, Any] = {k: v for k, v in schema.items() if k in KEPT}
    validations = schema.get("x-kubernetes-validations", []) + out.pop("x-kubernetes-validations", [])
    if validations:
        # Both a field's own rules and its type's rules apply; keep each once.
        unique = {(v["rule"], v["message"]): v for v in validations}
        out["x-kubernetes-validations"] = list(unique.values())
    # JSON Schema's numeric exclusive bounds become OpenAPI v3.0's minimum + boolean flag; an
    # option merged from anyOf above is already converted.
    for bound, limit in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        value = schema.get(bound)
        if value is True:
            out.update({limit: schema[limit], bound: True})
        elif value is not None:
            out.update({limit: value, bound: True})
    if "const" in schema:
        out["enum"] = [schema["const"]]
    default = _without_nulls(schema.get("default"))
    if default is not None and default != {}:
        out["default"] = default
    if "properties" in schema:
        out["type"] = "object"
        out["properties"] = {name: structural(sub, defs) for name, sub in schema["properties"].items()}
    elif schema.get("type") == "object" and "additionalProperties" in schema and schema["additionalProperties"]:
        out["additionalProperties"] = structural(schema["additionalProperties"], defs)
    if "items" in schema:
        out["items"] = structural(schema["items"], defs)
    return out


def crd(kind: str) -> dict[str, Any]:
    model, short_name = KINDS[kind]
    json_schema = model.model_json_schema(by_alias=True, mode="validation")
    defs = json_schema.get("$defs", {})
    spec_schema = structural(json_schema["properties"]["spec"], defs)
    plural = kind.lower() + "s"
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{API_GROUP}", "labels": {"app.kubernetes.io/part-of": "kubeforge"}},
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {"kind": kind, "listKind": f"{kind}List", "plural": plural, "singular": kind.lower(),
                      "shortNames": [short_name], "categories": ["kubeforge"]},
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": PRINTER_COLUMNS,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": (model.__doc__ or kind).strip().splitlines()[0],
                    "required": ["spec"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": spec_schema,
                        # Written by the operator only; Kopf keeps its own bookkeeping here too.
                        "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                    },
                }},
            }],
        },
    }


def render(kind: str) -> str:
    header = "# Generated from kubeforge/spec.py by `kubeforge crds`: do not edit.\n"
    return header + yaml.safe_dump(crd(kind), sort_keys=False, width=120)


def write(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for kind in KINDS:
        path = directory / f"{kind.lower()}s.{API_GROUP}.yaml"
        path.write_text(render(kind))
        written.append(path)
    return written
