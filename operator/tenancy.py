"""Tenancy: which storage URIs a job may use, and which namespaces the operator acts in. Pure rules.

One operator serves several teams, each in its own namespace, and trainer pods hold whatever
storage credentials their namespace gives them. Without a rule, a job in team A's namespace could
name team B's checkpoints as its `checkpoint.uri` (and overwrite them, or delete them through
retention) or as its `baseModel.uri`. The operator refuses such a job before any pod exists: every
URI a job names must lie under its namespace's prefix of the storage root
(`<root>/<namespace>/...`) or under an allow-listed prefix. Separate credentials per namespace
(docs/security.md) enforce the same boundary in the storage itself.

A relative path is the one exception: in a trainer pod it names a file of the image's working
directory (`examples/data/...`), which is read-only and the same for every namespace, so it holds
nothing of another team's. Absolute paths (where volumes are mounted) follow the prefix rule.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from kubeforge.spec import FinetuneJob, Job

NAMESPACE_PLACEHOLDER = "{namespace}"
_SELECTOR_TERM = re.compile(
    r"^\s*(?:(?P<absent>!)\s*(?P<absent_key>[\w./-]+)"
    r"|(?P<key>[\w./-]+)\s*(?:(?P<op>==|=|!=)\s*(?P<value>[\w.-]*)"
    r"|\s+(?P<set_op>in|notin)\s+\((?P<values>[^)]*)\))?)\s*$")


class SettingError(ValueError):
    """An operator setting that cannot be used; the message names its variable."""


@dataclass(frozen=True)
class UriPolicy:
    """What storage a job may use: under `<storage_root>/<namespace>` or an allowed prefix."""

    storage_root: str
    #: URI prefixes any namespace may also use; `{namespace}` in one stands for the job's namespace.
    allowed_prefixes: tuple[str, ...] = ()
    #: False turns the rule off (a single-tenant cluster).
    enforced: bool = True

    def prefixes_for(self, namespace: str) -> list[str]:
        own = f"{self.storage_root.rstrip('/')}/{namespace}"
        return [own, *(p.replace(NAMESPACE_PLACEHOLDER, namespace) for p in self.allowed_prefixes)]


def _segments(uri: str) -> list[str] | None:
    """The '/'-separated parts of a URI, or None when one is empty, '.' or '..': such a URI names a
    different place than its text suggests (a local path walks up; S3 keeps the dots literally)."""
    uri = uri.removeprefix("file://")
    scheme, found, rest = uri.partition("://")
    head = [f"{scheme}://"] if found else (["/"] if uri.startswith("/") else [])
    body = (rest if found else uri.lstrip("/")).rstrip("/").split("/")
    if any(part in ("", ".", "..") for part in body):
        return None
    return head + body


def uri_within(uri: str, prefix: str) -> bool:
    """Whether uri is prefix or lies under it, segment by segment (jobs/team-a is not under jobs/team)."""
    inside, outer = _segments(uri), _segments(prefix)
    return inside is not None and outer is not None and inside[:len(outer)] == outer


def in_image(uri: str) -> bool:
    """Whether uri is a relative path that stays inside the trainer's working directory (no scheme,
    no leading '/', no '.', '..' or empty segment): a file the trainer image ships."""
    return "://" not in uri and not uri.startswith("/") and _segments(uri) is not None


def job_uris(job: Job) -> list[tuple[str, str]]:
    """(field path, URI) of every storage location the job names itself."""
    spec = job.spec
    named = [("spec.data.train.uri", spec.data.train.uri)]
    if spec.data.eval is not None:
        named.append(("spec.data.eval.uri", spec.data.eval.uri))
    if spec.checkpoint.uri:
        named.append(("spec.checkpoint.uri", spec.checkpoint.uri))
    if spec.checkpoint.warm_start_from:  # read: another team's weights are theirs
        named.append(("spec.checkpoint.warmStartFrom", spec.checkpoint.warm_start_from))
    # A Hub model is no storage of anyone's: its copy is kept under the namespace's own prefix.
    if isinstance(job, FinetuneJob) and job.spec.base_model.uri and not job.spec.base_model.from_hub():
        named.append(("spec.baseModel.uri", job.spec.base_model.uri))
    if isinstance(job, FinetuneJob) and job.spec.teacher is not None and job.spec.teacher.uri:
        named.append(("spec.teacher.uri", job.spec.teacher.uri))
    return named


def uri_violations(job: Job, policy: UriPolicy) -> list[str]:
    """One message per URI of the job that its namespace may not use (empty: the job may run)."""
    if not policy.enforced:
        return []
    allowed = policy.prefixes_for(job.namespace)
    return [f"{field} {uri} is outside what namespace {job.namespace} may use ({', '.join(allowed)})"
            for field, uri in job_uris(job)
            if not in_image(uri) and not any(uri_within(uri, prefix) for prefix in allowed)]


# ---------------------------------------------------------------------------------------------
# Namespaces


@dataclass(frozen=True)
class SelectorTerm:
    key: str
    operator: str  # "in", "notin", "exists", "!exists"
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "exists":
            return self.key in labels
        if self.operator == "!exists":
            return self.key not in labels
        if self.operator == "in":
            return labels.get(self.key) in self.values
        return labels.get(self.key) not in self.values  # notin, as Kubernetes: an absent label matches


def parse_label_selector(text: str, variable: str) -> tuple[SelectorTerm, ...]:
    """A Kubernetes label selector string (`a=b,c!=d,e in (f,g),h,!i`), terms ANDed."""
    terms = []
    for part in re.split(r",(?![^(]*\))", text):
        if not part.strip():
            continue
        match = _SELECTOR_TERM.match(part)
        if not match:
            raise SettingError(f"{variable}: {part.strip()!r} is not a label selector term "
                               "(key=value, key!=value, key in (a,b), key notin (a,b), key or !key)")
        if match["absent"]:
            terms.append(SelectorTerm(match["absent_key"], "!exists"))
        elif match["op"]:
            terms.append(SelectorTerm(match["key"], "notin" if match["op"] == "!=" else "in", (match["value"],)))
        elif match["set_op"]:
            values = tuple(v.strip() for v in match["values"].split(",") if v.strip())
            terms.append(SelectorTerm(match["key"], match["set_op"], values))
        else:
            terms.append(SelectorTerm(match["key"], "exists"))
    return tuple(terms)


def namespace_allowed(namespace: str, labels: Mapping[str, str] | None, names: tuple[str, ...],
                      selector: tuple[SelectorTerm, ...]) -> bool:
    """Whether the operator may act on a job in namespace: in `names` when a list is set, and with
    labels matching `selector` when one is set. `labels` None: the namespace is not known (yet),
    so a selector cannot match it."""
    if names and namespace not in names:
        return False
    if selector:
        return labels is not None and all(term.matches(labels) for term in selector)
    return True
