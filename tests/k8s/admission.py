"""How the API server judges our custom resources: the CRD's schema (after its defaults) and its CEL rules.

The one place that knows it: tests/unit/test_crds.py checks it against the spec models, and the API server
emulator admits every write of a kubeforge job with it.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import celpy
import yaml
from jsonschema import Draft4Validator

CRD_DIR = Path(__file__).resolve().parents[2] / "crds"


def crd_file(kind: str) -> Path:
    return CRD_DIR / f"{kind.lower()}s.kubeforge.io.yaml"


@functools.cache  # the API server emulator admits every write with it
def schema_of(kind: str) -> dict[str, Any]:
    document = yaml.safe_load(crd_file(kind).read_text())
    return document["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def with_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Apply the schema's defaults the way the API server does before validating."""
    if not isinstance(value, dict) or "properties" not in schema:
        return value
    out = dict(value)
    for name, sub in schema["properties"].items():
        if name not in out and "default" in sub:
            out[name] = copy.deepcopy(sub["default"])
        if name in out:
            out[name] = with_defaults(sub, out[name])
    return out


@functools.cache  # parsing dominates; the API server emulator evaluates the same rules on every write
def cel_program(rule: str) -> Any:
    environment = celpy.Environment()
    return environment.program(environment.compile(rule))


def cel_violations(schema: dict[str, Any], value: Any, old: Any = None, path: str = "") -> list[str]:
    """The messages of every CEL rule that fails on value (transition rules only when old is given)."""
    failed = []
    for rule in schema.get("x-kubernetes-validations", []):
        transition = "oldSelf" in rule["rule"]
        if transition and old is None:
            continue
        activation = {"self": celpy.json_to_cel(value)}
        if transition:
            activation["oldSelf"] = celpy.json_to_cel(old)
        if not cel_program(rule["rule"]).evaluate(activation):
            failed.append(f"{path or '.'}: {rule['message']}")
    for name, sub in schema.get("properties", {}).items():
        if isinstance(value, dict) and name in value:
            previous = old.get(name) if isinstance(old, dict) else None
            if old is not None and previous is None:
                continue  # transition rules apply only where the old object had the field
            failed += cel_violations(sub, value[name], previous if old is not None else None, f"{path}.{name}")
    return failed


def admit(job: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    """What the API server would say about creating (or updating from old) this object."""
    schema = schema_of(job["kind"])
    defaulted = with_defaults(schema, job)
    problems = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                for e in Draft4Validator(schema).iter_errors(defaulted)]
    if problems:
        return problems  # as on the API server, CEL rules run only on objects of the right shape
    old_defaulted = with_defaults(schema, old) if old is not None else None
    return cel_violations(schema, defaulted, old_defaulted)
