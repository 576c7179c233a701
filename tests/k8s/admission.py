"""How the API server judges what is written: built-in kinds (the checks that catch an operator's mistakes),
CRDs (structural), and our custom resources (the CRD's schema after its defaults, and its CEL rules).

The one place that knows it: tests/unit/test_crds.py checks it against the spec models, and the API server
emulator admits every write of a kubeforge job with it.
"""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path
from typing import Any

import celpy
import yaml
from jsonschema import Draft4Validator

from k8s.resources import Kind, Obj

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
    # Unchanged objects stay the same object: the emulator keeps references into metadata.
    return value if out == value else out


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
    if "items" in schema and isinstance(value, list):
        # Items of a plain list have no old self to compare with: only their other rules apply.
        for index, item in enumerate(value):
            failed += cel_violations(schema["items"], item, None, f"{path}[{index}]")
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


# ---------------------------------------------------------------------------------------------------
# Validation of built-in kinds (the subset that catches real mistakes in an operator's objects)


DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
IANA_SVC_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
FIELD_REF_PATHS = {"metadata.name", "metadata.namespace", "metadata.uid", "spec.nodeName",
                   "spec.serviceAccountName", "status.hostIP", "status.hostIPs", "status.podIP", "status.podIPs"}
POD_MUTABLE = "`spec.containers[*].image`, `spec.initContainers[*].image`, `spec.activeDeadlineSeconds`, " \
              "`spec.tolerations` (only additions to existing tolerations), `spec.terminationGracePeriodSeconds`"

Problems = list[tuple[str, str]]


def _check_name(name: str, rule: str, field_: str = "metadata.name") -> Problems:
    patterns = {"label": (DNS1123_LABEL, 63, "a lowercase RFC 1123 label"),
                "subdomain": (DNS1123_SUBDOMAIN, 253, "a lowercase RFC 1123 subdomain"),
                "dns1035": (DNS1035_LABEL, 63, "a DNS-1035 label")}
    pattern, limit, what = patterns[rule]
    if not pattern.match(name or "") or len(name) > limit:
        return [(field_, f'Invalid value: "{name}": must be {what} of at most {limit} characters')]
    return []


def _check_qualified_key(key: str, field_: str) -> Problems:
    prefix, _, name = key.rpartition("/")
    if (prefix and (not DNS1123_SUBDOMAIN.match(prefix) or len(prefix) > 253)) \
            or not QUALIFIED_NAME.match(name) or len(name) > 63:
        return [(field_, f'Invalid value: "{key}": name part must consist of alphanumeric characters, '
                         "'-', '_' or '.', and must start and end with an alphanumeric character")]
    return []


def check_metadata(kind: Kind, obj: Obj) -> Problems:
    meta = obj["metadata"]
    rule = "dns1035" if kind.kind == "Service" else "label" if kind.kind == "Namespace" else "subdomain"
    problems = _check_name(meta["name"], rule)
    for key, value in (meta.get("labels") or {}).items():
        problems += _check_qualified_key(key, "metadata.labels")
        if not isinstance(value, str) or not LABEL_VALUE.match(value) or len(value) > 63:
            problems.append(("metadata.labels", f'Invalid value: "{value}": a valid label must be an empty '
                                                "string or alphanumeric with '-', '_' or '.', at most 63 characters"))
    for key, value in (meta.get("annotations") or {}).items():
        problems += _check_qualified_key(key, "metadata.annotations")
        if not isinstance(value, str):
            problems.append(("metadata.annotations", f"Invalid value: {value!r}: must be a string"))
    refs = meta.get("ownerReferences") or []
    for n, ref in enumerate(refs):
        for required in ("apiVersion", "kind", "name", "uid"):
            if not ref.get(required):
                problems.append((f"metadata.ownerReferences[{n}].{required}", "Required value"))
    if sum(1 for ref in refs if ref.get("controller")) > 1:
        problems.append(("metadata.ownerReferences", "Invalid value: only one reference can have Controller set "
                                                      "to true"))
    for n, finalizer in enumerate(meta.get("finalizers") or []):
        if not isinstance(finalizer, str) or not finalizer:
            problems.append((f"metadata.finalizers[{n}]", "Invalid value: must be a non-empty string"))
    return problems


def check_pod(pod: Obj) -> Problems:
    spec = pod.get("spec")
    if not isinstance(spec, dict):
        return [("spec", "Required value")]
    problems: Problems = []
    containers = spec.get("containers") or []
    if not containers:
        problems.append(("spec.containers", "Required value"))
    volumes = {v.get("name") for v in spec.get("volumes") or []}
    for n, volume in enumerate(spec.get("volumes") or []):
        problems += _check_name(volume.get("name", ""), "label", f"spec.volumes[{n}].name")
    if spec.get("restartPolicy", "Always") not in ("Always", "OnFailure", "Never"):
        problems.append(("spec.restartPolicy", f'Unsupported value: "{spec["restartPolicy"]}"'))
    for field_ in ("hostname", "subdomain"):
        if spec.get(field_):
            problems += _check_name(spec[field_], "label", f"spec.{field_}")
    names: set[str] = set()
    for group in ("initContainers", "containers"):
        for n, container in enumerate(spec.get(group) or []):
            where = f"spec.{group}[{n}]"
            name = container.get("name", "")
            problems += _check_name(name, "label", f"{where}.name")
            if name in names:
                problems.append((f"{where}.name", f'Duplicate value: "{name}"'))
            names.add(name)
            if not container.get("image"):
                problems.append((f"{where}.image", "Required value"))
            policy = container.get("terminationMessagePolicy", "File")
            if policy not in ("File", "FallbackToLogsOnError"):
                problems.append((f"{where}.terminationMessagePolicy", f'Unsupported value: "{policy}"'))
            problems += _check_env(container, where)
            port_names: set[str] = set()
            for p, port in enumerate(container.get("ports") or []):
                number = port.get("containerPort")
                if not isinstance(number, int) or not 1 <= number <= 65535:
                    problems.append((f"{where}.ports[{p}].containerPort", f"Invalid value: {number!r}: must be "
                                                                            "between 1 and 65535, inclusive"))
                if "name" in port:
                    if not IANA_SVC_NAME.match(port["name"]) or len(port["name"]) > 15:
                        problems.append((f"{where}.ports[{p}].name", f'Invalid value: "{port["name"]}": must be '
                                                                       "an IANA_SVC_NAME of at most 15 characters"))
                    if port["name"] in port_names:
                        problems.append((f"{where}.ports[{p}].name", f'Duplicate value: "{port["name"]}"'))
                    port_names.add(port["name"])
            for m, mount in enumerate(container.get("volumeMounts") or []):
                if mount.get("name") not in volumes:
                    problems.append((f"{where}.volumeMounts[{m}].name", f'Not found: "{mount.get("name")}"'))
    return problems


def _check_env(container: Obj, where: str) -> Problems:
    problems: Problems = []
    for e, var in enumerate(container.get("env") or []):
        name = var.get("name", "")
        if not ENV_NAME.match(name):
            problems.append((f"{where}.env[{e}].name", f'Invalid value: "{name}": a valid environment variable '
                                                        "name must consist of alphabetic characters, digits, "
                                                        "'_', '-', or '.', and must not start with a digit"))
        source = var.get("valueFrom")
        if source is None:
            continue
        if var.get("value"):
            problems.append((f"{where}.env[{e}].valueFrom", "Invalid value: may not be specified when `value` is "
                                                              "not empty"))
        kinds = [k for k in ("fieldRef", "resourceFieldRef", "configMapKeyRef", "secretKeyRef") if k in source]
        if len(kinds) != 1:
            problems.append((f"{where}.env[{e}].valueFrom", "Invalid value: may not have more than one field "
                                                              "specified at a time" if kinds else "Required value"))
        field_ref = source.get("fieldRef")
        if field_ref is not None:
            path = field_ref.get("fieldPath", "")
            if path not in FIELD_REF_PATHS and not re.match(r"^metadata\.(labels|annotations)\['[^']+'\]$", path):
                problems.append((f"{where}.env[{e}].valueFrom.fieldRef.fieldPath",
                                 f'Unsupported value: "{path}"'))
        for ref in ("secretKeyRef", "configMapKeyRef"):
            if ref in source and not (source[ref].get("name") and source[ref].get("key")):
                problems.append((f"{where}.env[{e}].valueFrom.{ref}", "Required value: name and key"))
    return problems


def check_service(service: Obj) -> Problems:
    spec = service.get("spec") or {}
    problems: Problems = []
    ports = spec.get("ports") or []
    for n, port in enumerate(ports):
        number = port.get("port")
        if not isinstance(number, int) or not 1 <= number <= 65535:
            problems.append((f"spec.ports[{n}].port", f"Invalid value: {number!r}: must be between 1 and 65535"))
        if len(ports) > 1 and not port.get("name"):
            problems.append((f"spec.ports[{n}].name", "Required value"))
    if not ports and spec.get("clusterIP") != "None" and spec.get("type", "ClusterIP") != "ExternalName":
        problems.append(("spec.ports", "Required value"))
    return problems


def pod_spec_for_comparison(spec: Obj) -> Obj:
    spec = copy.deepcopy(spec)
    for field_ in ("activeDeadlineSeconds", "tolerations", "terminationGracePeriodSeconds"):
        spec.pop(field_, None)
    for group in ("containers", "initContainers"):
        for container in spec.get(group) or []:
            container.pop("image", None)
    return spec


# ---------------------------------------------------------------------------------------------------
# CRDs: pruning, defaulting, validation (our CRDs through k8s/admission.py) and a structural check


def prune(schema: Obj, value: Any, root: bool = False) -> Any:
    """Drop the fields a structural schema does not know, as the API server does on every write."""
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        preserve = schema.get("x-kubernetes-preserve-unknown-fields")
        additional = schema.get("additionalProperties")
        out = {}
        for key, item in value.items():
            if root and key in ("apiVersion", "kind", "metadata"):
                out[key] = item
            elif key in properties:
                out[key] = prune(properties[key], item)
            elif isinstance(additional, dict):
                out[key] = prune(additional, item)
            elif preserve or additional is True:
                out[key] = item
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [prune(schema["items"], item) for item in value]
    return value


NUMERIC_KEYWORDS = ("minimum", "maximum", "multipleOf")
COUNT_KEYWORDS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")
TYPES = {"object", "array", "string", "integer", "number", "boolean"}


def crd_problems(crd: Obj) -> list[str]:
    """What a real API server would refuse in a CRD's schemas (a subset: types of schema keywords)."""
    problems: list[str] = []

    def walk(node: Any, path: str) -> None:
        if not isinstance(node, dict):
            problems.append(f"{path}: must be an object")
            return
        for key in NUMERIC_KEYWORDS:
            if key in node and (isinstance(node[key], bool) or not isinstance(node[key], int | float)):
                problems.append(f"{path}.{key}: Invalid value: {node[key]!r}: must be a number")
        for key in ("exclusiveMinimum", "exclusiveMaximum", "x-kubernetes-preserve-unknown-fields", "nullable"):
            if key in node and not isinstance(node[key], bool):
                problems.append(f"{path}.{key}: Invalid value: {node[key]!r}: must be a boolean")
        for key in COUNT_KEYWORDS:
            if key in node and (isinstance(node[key], bool) or not isinstance(node[key], int) or node[key] < 0):
                problems.append(f"{path}.{key}: Invalid value: {node[key]!r}: must be a non-negative integer")
        if "type" in node and node["type"] not in TYPES:
            problems.append(f"{path}.type: Unsupported value: {node['type']!r}")
        for name, sub in (node.get("properties") or {}).items():
            walk(sub, f"{path}.properties[{name}]")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}.items")
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], f"{path}.additionalProperties")

    for n, version in enumerate(crd.get("spec", {}).get("versions", [])):
        schema = (version.get("schema") or {}).get("openAPIV3Schema")
        if schema is not None:
            walk(schema, f"spec.versions[{n}].schema.openAPIV3Schema")
    return problems
