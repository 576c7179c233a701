"""CustomResourceDefinitions generated from the spec and status models: `kubeforge crds` writes crds/.

The API server then rejects what the models reject (types, enums, bounds, patterns, required
fields, CEL rules for cross-field checks and immutability) before the operator ever sees it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from kubeforge.spec import ALL_KINDS, JOB_NAME, JOB_NAME_MAX_LENGTH, SWEEP_KIND
from kubeforge.status import JobStatus, SweepStatus

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Step", "type": "string", "jsonPath": ".status.stepProgress", "description": "step/total"},
    {"name": "Loss", "type": "number", "jsonPath": ".status.loss"},
    {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    # `kubectl get -o wide` only: most jobs quantize nothing.
    {"name": "Trainable", "type": "integer", "jsonPath": ".status.trainableParameters", "priority": 1,
     "description": "the parameters the optimizer trains"},
    {"name": "Quantized", "type": "string", "jsonPath": ".status.compression.summary", "priority": 1,
     "description": "export.quantize: size and eval metric against the full model"},
    {"name": "Pruned", "type": "string", "jsonPath": ".status.pruning.summary", "priority": 1,
     "description": "export.prune: sparsity and eval metric against the full model"},
]
SWEEP_PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Trials", "type": "string", "jsonPath": ".status.trialsProgress", "description": "done/maxTrials"},
    {"name": "Best", "type": "number", "jsonPath": ".status.bestValue", "description": "the best objective value"},
    {"name": "Pruned", "type": "integer", "jsonPath": ".status.prunedTrials"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]

# JSON Schema keywords a Kubernetes structural schema takes as they are.
KEPT = {"type", "description", "enum", "minimum", "maximum", "pattern", "minLength", "maxLength",
        "minItems", "maxItems", "required", "x-kubernetes-validations", "x-kubernetes-preserve-unknown-fields"}


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    return value


def structural(schema: dict[str, Any], defs: dict[str, Any], defaults: bool = True) -> dict[str, Any]:
    """Pydantic's JSON Schema as an OpenAPI v3 structural schema: refs inlined, `X | None` as X.

    `defaults=False` leaves the model's defaults out: the API server would otherwise fill them in."""
    if "$ref" in schema:
        target = defs[schema["$ref"].rsplit("/", 1)[-1]]
        schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
    if "anyOf" in schema:
        options = [o for o in schema["anyOf"] if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"a structural schema cannot express anyOf {schema['anyOf']}")
        schema = {**structural(options[0], defs, defaults), **{k: v for k, v in schema.items() if k != "anyOf"}}
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
    if defaults and default is not None and default != {}:
        out["default"] = default
    if "properties" in schema:
        out["type"] = "object"
        out["properties"] = {name: structural(sub, defs, defaults) for name, sub in schema["properties"].items()}
    elif schema.get("type") == "object" and "additionalProperties" in schema and schema["additionalProperties"]:
        out["additionalProperties"] = structural(schema["additionalProperties"], defs, defaults)
    if "items" in schema:
        out["items"] = structural(schema["items"], defs, defaults)
    return out


def status_schema(model: type[BaseModel] = JobStatus) -> dict[str, Any]:
    """The schema of a kind's status: `JobStatus` for the training kinds, `SweepStatus` for sweeps.

    No defaults: status holds what the operator wrote and nothing else. Unknown fields are kept, not
    pruned: they are the operator's or Kopf's, and the API server need not know them to store them."""
    json_schema = model.model_json_schema(by_alias=True, mode="validation")
    schema = structural(json_schema, json_schema.get("$defs", {}), defaults=False)
    return {**schema, "x-kubernetes-preserve-unknown-fields": True}


def crd(kind: str) -> dict[str, Any]:
    names = ALL_KINDS[kind]
    sweep = kind == SWEEP_KIND.kind
    json_schema = names.model.model_json_schema(by_alias=True, mode="validation")
    defs = json_schema.get("$defs", {})
    spec_schema = structural(json_schema["properties"]["spec"], defs)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{names.plural}.{names.group}", "labels": {"app.kubernetes.io/part-of": "kubeforge"}},
        "spec": {
            "group": names.group,
            "scope": "Namespaced",
            "names": {"kind": kind, "listKind": f"{kind}List", "plural": names.plural, "singular": kind.lower(),
                      "shortNames": [names.short_name], "categories": [names.category]},
            "versions": [{
                "name": names.version,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": SWEEP_PRINTER_COLUMNS if sweep else PRINTER_COLUMNS,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": (names.model.__doc__ or kind).strip().splitlines()[0],
                    "required": ["spec"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        # The only metadata a CRD may constrain: names the operator can derive objects from.
                        "metadata": {"type": "object", "properties": {"name": {
                            "type": "string", "maxLength": JOB_NAME_MAX_LENGTH, "pattern": JOB_NAME}}},
                        "spec": spec_schema,
                        "status": status_schema(SweepStatus if sweep else JobStatus),
                    },
                }},
            }],
        },
    }


class _PlainDumper(yaml.SafeDumper):
    """Writes a subschema shared by several fields out at each, not as a YAML anchor and alias."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render(kind: str) -> str:
    header = "# Generated from kubeforge/spec.py and kubeforge/status.py by `kubeforge crds`: do not edit.\n"
    return header + yaml.dump(crd(kind), Dumper=_PlainDumper, sort_keys=False, width=120)


def write(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for kind, names in ALL_KINDS.items():
        path = directory / f"{names.plural}.{names.group}.yaml"
        path.write_text(render(kind))
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------------
# The reference documentation: every field of every kind, from the same schemas as the CRDs.

REFERENCE_HEADER = """# CRD reference

Generated from kubeforge/spec.py and kubeforge/status.py by `kubeforge crds`: do not edit. Every
field of `spec`, with its type, default and constraints, as the API server enforces them (`kubectl
explain ptj.spec` says the same). Rules that span fields are listed under the object they apply to.
What each field of `status` means is at the end.
"""
TABLE_HEADER = "| field | type | required | default | constraints | description |\n|---|---|---|---|---|---|\n"


def _type_of(node: dict[str, Any]) -> str:
    if node.get("type") == "array":
        return f"[]{_type_of(node.get('items', {}))}"
    if node.get("type") == "object" and "additionalProperties" in node:
        return f"map[string]{_type_of(node['additionalProperties'])}"
    return str(node.get("type", "any"))


def _constraints(node: dict[str, Any]) -> str:
    parts = []
    if "enum" in node:
        parts.append("one of " + ", ".join(f"`{v}`" for v in node["enum"]))
    for bound, sign, strict in (("minimum", ">=", "exclusiveMinimum"), ("maximum", "<=", "exclusiveMaximum")):
        if bound in node:
            parts.append(f"{sign.rstrip('=') if node.get(strict) else sign} {node[bound]}")
    for keyword, label in (("minLength", "length >="), ("maxLength", "length <="), ("minItems", "items >="),
                           ("maxItems", "items <=")):
        if keyword in node:
            parts.append(f"{label} {node[keyword]}")
    if "pattern" in node:
        parts.append(f"pattern `{node['pattern']}`")
    if any(rule["rule"] == "self == oldSelf" for rule in node.get("x-kubernetes-validations", [])):
        parts.append("immutable")
    return "; ".join(parts)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _rows(node: dict[str, Any], path: str, required: bool, out: list[str], rules: list[str]) -> None:
    default = node.get("default")
    shown = "" if default is None or isinstance(default, dict) else f"`{json.dumps(default)}`"
    out.append(f"| `{path}` | {_type_of(node)} | {'yes' if required else ''} | {shown} | "
               f"{_cell(_constraints(node))} | {_cell(node.get('description', ''))} |")
    for rule in node.get("x-kubernetes-validations", []):
        if rule["rule"] != "self == oldSelf":
            rules.append(f"- `{path}`: {rule['message']} (`{rule['rule']}`)")
    for name, sub in node.get("properties", {}).items():
        _rows(sub, f"{path}.{name}", name in node.get("required", []), out, rules)
    if "items" in node and "properties" in node["items"]:
        for name, sub in node["items"]["properties"].items():
            _rows(sub, f"{path}[].{name}", name in node["items"].get("required", []), out, rules)


def reference() -> str:
    sections = [REFERENCE_HEADER]
    for kind, names in ALL_KINDS.items():
        schema = crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        rows: list[str] = []
        rules: list[str] = []
        _rows(schema["properties"]["spec"], "spec", True, rows, rules)
        sections.append(f"## {kind}\n\n`apiVersion: {names.api_version}`, short name `{names.short_name}`. "
                        f"{schema['description']}\n\n" + TABLE_HEADER + "\n".join(rows) + "\n")
        if rules:
            sections.append(f"Rules across fields of a {kind}:\n\n" + "\n".join(rules) + "\n")
    rows = []
    _rows(status_schema(), "status", False, rows, [])
    sections.append("## Status\n\nThe same for both training kinds, and the operator's to write (from "
                    "kubeforge/status.py); other fields in it are kept as they are.\n\n"
                    + TABLE_HEADER + "\n".join(rows) + "\n")
    rows = []
    _rows(status_schema(SweepStatus), "status", False, rows, [])
    sections.append("## SweepJob status\n\nThe operator's (or `kubeforge run`'s) to write: its trials are "
                    "the study, rebuilt from them after any restart.\n\n" + TABLE_HEADER + "\n".join(rows) + "\n")
    return "\n".join(sections)


def write_reference(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(reference())
    return path
