"""PATCH bodies as the API server applies them: JSON merge patch and strategic merge patch."""

from __future__ import annotations

import copy
from typing import Any

# ---------------------------------------------------------------------------------------------------
# Patching


# List fields that strategic merge patch merges by a key (the rest are replaced).
MERGE_KEYS = {
    "containers": "name", "initContainers": "name", "ephemeralContainers": "name", "env": "name",
    "volumes": "name", "volumeMounts": "mountPath", "conditions": "type", "containerStatuses": "name",
    "initContainerStatuses": "name", "ownerReferences": "uid", "imagePullSecrets": "name", "podIPs": "ip",
    "hostIPs": "ip", "addresses": "type", "taints": "key", "ports": "containerPort|port",
}
PRIMITIVE_MERGE = {"finalizers"}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """Kubernetes strategic merge patch, for the list fields of core kinds in MERGE_KEYS."""
    if not isinstance(patch, dict) or not isinstance(target, dict):
        return copy.deepcopy(_without_directives(patch))
    if patch.get("$patch") == "replace":
        return _without_directives(patch)
    result = dict(target)
    retain = patch.get("$retainKeys")
    for key, value in patch.items():
        if key.startswith("$setElementOrder/") or key in ("$patch", "$retainKeys"):
            continue
        if key.startswith("$deleteFromPrimitiveList/"):
            name = key.split("/", 1)[1]
            result[name] = [v for v in result.get(name) or [] if v not in value]
            continue
        if value is None or (isinstance(value, dict) and value.get("$patch") == "delete"):
            result.pop(key, None)
        elif isinstance(value, dict):
            result[key] = strategic_merge_patch(result.get(key), value)
        elif isinstance(value, list) and key in PRIMITIVE_MERGE:
            merged = list(result.get(key) or [])
            merged += [v for v in value if v not in merged]
            result[key] = merged
        elif isinstance(value, list) and key in MERGE_KEYS and isinstance(result.get(key), list):
            result[key] = _merge_list(result[key], value, MERGE_KEYS[key])
        else:
            result[key] = _without_directives(value)
    if retain is not None:
        result = {k: v for k, v in result.items() if k in retain}
    return result


def _merge_list(current: list[Any], patch: list[Any], keys: str) -> list[Any]:
    items = [item for item in patch if isinstance(item, dict)]
    key = next((k for k in keys.split("|") if any(k in item for item in items + current)), keys.split("|")[0])
    if any(isinstance(i, dict) and i.get("$patch") == "replace" for i in patch):
        return [_without_directives(i) for i in patch if not (isinstance(i, dict) and "$patch" in i)]
    result = [copy.deepcopy(item) for item in current]
    for item in items:
        index = next((n for n, old in enumerate(result) if isinstance(old, dict) and old.get(key) == item.get(key)),
                     None)
        if item.get("$patch") == "delete":
            if index is not None:
                del result[index]
        elif index is None:
            result.append(_without_directives(item))
        else:
            result[index] = strategic_merge_patch(result[index], item)
    return result


def _without_directives(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_directives(v) for k, v in value.items() if not k.startswith("$")}
    if isinstance(value, list):
        return [_without_directives(v) for v in value]
    return value
