"""What the API server emulator serves: kinds, parsed request paths, and Kubernetes `Status` errors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import kmock

Obj = dict[str, Any]


# ---------------------------------------------------------------------------------------------------
# Resources


@dataclass(frozen=True)
class Kind:
    """A served resource: what URLs, discovery and the object store need to know about it."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    subresources: frozenset[str] = frozenset()
    custom: bool = False  # defined by a CRD: generation, pruning, schema validation

    @property
    def resource(self) -> kmock.resource:
        return kmock.resource(self.group, self.version, self.plural)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def group_resource(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def qualified_kind(self) -> str:
        return f"{self.kind}.{self.group}" if self.group else self.kind


@dataclass(frozen=True)
class ApiPath:
    group: str
    version: str
    plural: str
    namespace: str | None
    name: str | None
    subresource: str | None


def parse_api_path(path: str) -> ApiPath | None:
    """`/api/v1/namespaces/ns/pods/name/status` and friends; None for discovery and other paths."""
    parts = [p for p in path.strip("/").split("/") if p]
    if len(parts) >= 2 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    if not rest:
        return None
    namespace = None
    # /namespaces/NAME/status|finalize are the namespace object's own subresources.
    if rest[0] == "namespaces" and len(rest) >= 3 and not (len(rest) == 3 and rest[2] in ("status", "finalize")):
        namespace, rest = rest[1], rest[2:]
    plural = rest[0]
    name = rest[1] if len(rest) > 1 else None
    subresource = "/".join(rest[2:]) or None
    return ApiPath(group, version, plural, namespace, name, subresource)


FIELD_SELECTORS: dict[str, set[str]] = {
    "Pod": {"spec.nodeName", "spec.restartPolicy", "spec.schedulerName", "spec.serviceAccountName",
            "spec.hostNetwork", "status.phase", "status.podIP", "status.nominatedNodeName"},
    "Event": {"involvedObject.kind", "involvedObject.namespace", "involvedObject.name", "involvedObject.uid",
              "involvedObject.apiVersion", "involvedObject.resourceVersion", "involvedObject.fieldPath",
              "reason", "reportingComponent", "source", "type"},
    "Secret": {"type"},
    "Namespace": {"status.phase"},
    "Node": {"spec.unschedulable"},
}

# Subresources whose create resets `.status` (pods start Pending; CRs' status is the controller's).
STATUS_ON_CREATE: dict[str, Callable[[Obj], Any]] = {
    "Namespace": lambda obj: {"phase": "Active"},
    "Service": lambda obj: {"loadBalancer": {}},
}

# Kopf's peering resources, as the chart's crds/ installs them. Not the legacy zalando.org ones: Kopf
# keeps itself paused while a peering resource it can see lacks its peering object.
KOPF_RESOURCES = {
    ("kopf.dev", "kopfpeerings", "KopfPeering", True),
    ("kopf.dev", "clusterkopfpeerings", "ClusterKopfPeering", False),
}


# ---------------------------------------------------------------------------------------------------
# Errors: Kubernetes `Status` bodies, as the real server sends them.


def api_error(code: int, reason: str, message: str, *, kind: Kind | None = None, name: str | None = None,
              causes: list[Obj] | None = None, details_kind: str | None = None) -> kmock.KubernetesError:
    details: Obj = {}
    if name:
        details["name"] = name
    if kind is not None:
        details["group"] = kind.group
        details["kind"] = details_kind or kind.plural
    if causes:
        details["causes"] = causes
    return kmock.KubernetesError(status=code, reason=reason, message=message, details=details or None)


def not_found(kind: Kind, name: str) -> kmock.KubernetesError:
    return api_error(404, "NotFound", f'{kind.group_resource} "{name}" not found', kind=kind, name=name)


def bad_request(message: str) -> kmock.KubernetesError:
    return api_error(400, "BadRequest", message)


def conflict(kind: Kind, name: str, why: str = "the object has been modified; please apply your changes "
             "to the latest version and try again") -> kmock.KubernetesError:
    return api_error(409, "Conflict", f'Operation cannot be fulfilled on {kind.group_resource} "{name}": {why}',
                     kind=kind, name=name)


def invalid(kind: Kind, name: str, problems: list[tuple[str, str]]) -> kmock.KubernetesError:
    """422 Invalid: `Kind "name" is invalid: field: message` (or a bracketed list of several)."""
    lines = [f"{f}: {m}" if f else m for f, m in problems]
    text = lines[0] if len(lines) == 1 else "[" + ", ".join(lines) + "]"
    causes = [{"reason": "FieldValueInvalid", "message": m, "field": f} for f, m in problems]
    return api_error(422, "Invalid", f'{kind.qualified_kind} "{name}" is invalid: {text}', kind=kind, name=name,
                     causes=causes, details_kind=kind.kind)
