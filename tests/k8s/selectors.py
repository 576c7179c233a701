"""Label and field selectors, as the API server parses and applies them to lists and watches."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from k8s.resources import FIELD_SELECTORS, Kind, Obj

# ---------------------------------------------------------------------------------------------------
# Selectors


_SELECTOR_TERM = re.compile(
    r"^\s*(?P<neg>!)?\s*(?P<key>[A-Za-z0-9][-A-Za-z0-9_./]*)\s*"
    r"(?:(?P<op>==|=|!=)\s*(?P<value>[-A-Za-z0-9_.]*)|\s+(?P<setop>in|notin)\s*\((?P<values>[^)]*)\))?\s*$")


def _split_terms(text: str) -> list[str]:
    terms, depth, current = [], 0, ""
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += char
    terms.append(current)
    return [t for t in terms if t.strip()]


def parse_label_selector(text: str | None) -> Callable[[dict[str, str]], bool]:
    """A predicate over labels for `a=b,c!=d,e,!f,g in (x,y),h notin (z)`; ValueError when malformed."""
    checks: list[Callable[[dict[str, str]], bool]] = []
    for term in _split_terms(text or ""):
        match = _SELECTOR_TERM.match(term)
        if not match or (match["neg"] and (match["op"] or match["setop"])):
            raise ValueError(f"unable to parse requirement: {term.strip()!r}")
        key = match["key"]
        if match["neg"]:
            checks.append(lambda labels, k=key: k not in labels)
        elif match["op"] in ("=", "=="):
            checks.append(lambda labels, k=key, v=match["value"]: labels.get(k) == v)
        elif match["op"] == "!=":
            checks.append(lambda labels, k=key, v=match["value"]: labels.get(k) != v)
        elif match["setop"]:
            values = {v.strip() for v in match["values"].split(",") if v.strip()}
            if match["setop"] == "in":
                checks.append(lambda labels, k=key, vs=values: labels.get(k) in vs)
            else:
                checks.append(lambda labels, k=key, vs=values: labels.get(k) not in vs)
        else:
            checks.append(lambda labels, k=key: k in labels)
    return lambda labels: all(check(labels) for check in checks)


def _field_value(obj: Obj, path: str) -> str:
    if path == "source":  # events: the reporting component
        path = "source.component"
    node: Any = obj
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, bool):
        return str(node).lower()
    return "" if node is None else str(node)


def parse_field_selector(text: str | None, kind: Kind) -> Callable[[Obj], bool]:
    allowed = {"metadata.name", "metadata.namespace"} | FIELD_SELECTORS.get(kind.kind, set())
    checks: list[Callable[[Obj], bool]] = []
    for term in _split_terms(text or ""):
        match = re.match(r"^\s*([A-Za-z0-9_.]+)\s*(==|=|!=)\s*(.*?)\s*$", term)
        if not match:
            raise ValueError(f"invalid selector: {term.strip()!r}")
        path, op, value = match.groups()
        if path not in allowed:
            raise ValueError(f'"{path}" is not a known field selector: only "{", ".join(sorted(allowed))}"')
        if op == "!=":
            checks.append(lambda obj, p=path, v=value: _field_value(obj, p) != v)
        else:
            checks.append(lambda obj, p=path, v=value: _field_value(obj, p) == v)
    return lambda obj: all(check(obj) for check in checks)
