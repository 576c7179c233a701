"""A Kubernetes API server for tests: kmock's `KubernetesEmulator`, made strict where a real server is.

kmock 0.8 keeps objects and streams watch events, but it stamps no uid/resourceVersion/generation/
creationTimestamp, replays everything on every watch, ignores selectors, has no PUT, no status/spec
split, no validation, no garbage collection, and merges every PATCH as a plain dict merge.
`Emulator` keeps kmock's plumbing (its aiohttp server, discovery, the object store with history in
`.objects`, the request log, scripted reactions such as
`emulator['post /api/v1/namespaces/ns/pods'][:1] << 500`) and serves the API itself:

- metadata: `uid`, `creationTimestamp`, `generation` (custom resources: 1, then +1 when anything but
  metadata/status changes, and when deletion starts), `resourceVersion` from one global counter that
  every change bumps; no-op writes change nothing and emit no event, as on a real server;
- list: the current resourceVersion, `labelSelector` (=, ==, !=, in, notin, exists, !exists),
  `fieldSelector` (=, ==, != on the fields the real server supports), `limit`/`continue`;
- watch: from a resourceVersion (410 Expired when too old), or current state then changes; selectors,
  with ADDED/DELETED when an object starts/stops matching; bookmarks; `sendInitialEvents`;
  `timeoutSeconds`;
- writes: POST (201, 409 AlreadyExists, `generateName`, namespace must exist and not be terminating),
  PUT, PATCH as merge / JSON (a failed `test` is 422) / strategic merge (415 for custom resources) /
  apply (approximated as a merge that may create), 409 Conflict on a stale resourceVersion; a body
  that is not JSON or YAML by its Content-Type (none: JSON) is 415;
- the status subresource (CRDs, pods, nodes, namespaces, services): `/status` writes change only
  `.status`, main-resource writes keep the stored `.status`, create resets it;
- validation: our CRDs' schemas (pruning, defaults, OpenAPI + CEL with `oldSelf`, via
  `k8s/admission.py::admit`, which tests/unit/test_crds.py checks) on create and every update -> 422
  naming the field; names, labels, ownerReferences, pods (containers, env, ports, volumes; spec
  immutable but for the fields a real server lets change), services, secrets (`stringData` becomes base64 `data`);
- deletion: finalizers and `deletionTimestamp`; graceful deletion of pods bound to a node (the
  kubelet finishes it with gracePeriodSeconds=0); propagation Background/Foreground/Orphan; an
  asynchronous garbage collector for `ownerReferences`; namespace deletion cascades;
- `pods/{name}/binding` (how a scheduler sets `spec.nodeName`).

Run it with `serve()` (an async context manager giving a started server on 127.0.0.1).

This module holds the object store and its versions, writes, deletion and garbage collection, watch
streams and the serving of requests; its parts live next to it: `resources` (kinds, request paths,
`Status` errors), `selectors`, `patching`, and `admission` (what a write must pass: built-in kinds,
CRDs, our custom resources' schema and CEL rules).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import copy
import datetime
import json
import logging
import random
import re
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp.web
import jsonpatch
import kmock
import yaml
from kmock._internal import parsing as _kmock_parsing

from k8s import admission
from k8s.admission import (
    CRD_DIR,
    POD_MUTABLE,
    SECRET_KEY,
    Problems,
    check_metadata,
    check_pod,
    check_service,
    crd_problems,
    pod_spec_for_comparison,
    prune,
)
from k8s.patching import merge_patch, strategic_merge_patch
from k8s.resources import (
    KOPF_RESOURCES,
    STATUS_ON_CREATE,
    ApiPath,
    Kind,
    Obj,
    api_error,
    bad_request,
    conflict,
    invalid,
    not_found,
    parse_api_path,
)
from k8s.selectors import parse_field_selector, parse_label_selector

log = logging.getLogger(__name__)


# kmock 0.8 cannot even parse `/api/v1/namespaces` (an unpacking error, served as 500): keep its
# parser for everything else, and give that request a sane parse. The emulator re-parses paths itself.
def _patch_kmock_path_parser() -> None:
    original = _kmock_parsing.parse_path
    if getattr(original, "_kubeforge_fixed", False):
        return

    def parse_path(path: str) -> Any:
        try:
            return original(path)
        except ValueError:
            parts = path.strip("/").split("/")
            group, version = ("", parts[1]) if parts[0] == "api" else (parts[1], parts[2])
            return _kmock_parsing.ParsedPath(group, version, parts[-1])

    parse_path._kubeforge_fixed = True  # type: ignore[attr-defined]
    _kmock_parsing.parse_path = parse_path


_patch_kmock_path_parser()



_WARNED_CRDS: set[str] = set()  # CRDs a real API server would refuse, warned about once per session


# ---------------------------------------------------------------------------------------------------
# The emulator


def _now(offset: float = 0) -> str:
    moment = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=offset)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _without_rv(obj: Obj) -> Obj:
    out = dict(obj)
    out["metadata"] = {k: v for k, v in obj.get("metadata", {}).items() if k != "resourceVersion"}
    return out


@dataclass
class Change:
    """One entry of the change log that watches replay and stream."""

    rv: int
    kind: Kind
    namespace: str | None
    type: str
    old: Obj | None
    new: Obj


@dataclass(eq=False)
class _Watcher:
    resource: kmock.resource
    queue: asyncio.Queue[Change | None] = field(default_factory=asyncio.Queue)


class Emulator(kmock.KubernetesEmulator):
    """A stricter KubernetesEmulator: see the module docstring for what it adds.

    Construct with `Emulator()` (our CRDs from crds/ installed, namespaces default/kube-system),
    serve with `serve()`. Knobs (attributes, set before serving): `gc_delay` (seconds before the
    garbage collector acts on a deletion), `bookmark_interval`, `history_limit` (changes kept for
    watches to resume from; older resourceVersions get 410 Expired), `keep_alive` (reuse connections,
    as a real API server does: only for clients in another process than Kopf's tests).
    """

    gc_delay: float = 0.05
    bookmark_interval: float = 5.0
    history_limit: int = 100_000
    keep_alive: bool = False

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        # Requests the stock emulator has no reaction for (PUT, subresource POSTs, deletecollection).
        self._api_reaction = self.fallback[re.compile(r"/apis?/.+")] << self._dispatch
        self._builtin_reactions = len(self._payloads)
        self._rv = 1000
        self._kinds: dict[kmock.resource, Kind] = {}
        self._admitted_kinds: set[str] = set()  # custom kinds validated by admission.admit
        self._schemas: dict[str, Obj] = {}  # custom kind -> openAPIV3Schema (pruning and defaults)
        self._uids: dict[str, tuple[kmock.resource, str | None, str]] = {}
        self._changes: collections.deque[Change] = collections.deque()
        self._log_floor = self._rv  # watches from resourceVersions below this get 410 Expired
        self._watchers: set[_Watcher] = set()
        self._closing = False
        self._gc_task: asyncio.Task[None] | None = None
        self._gc_wakeup: asyncio.Event | None = None
        self._background_errors: list[BaseException] = []
        self._cluster_ips = iter(f"10.96.{n // 250}.{n % 250 + 1}" for n in range(1, 60000))
        self.crd_problems: dict[str, list[str]] = {}

        with warnings.catch_warnings():  # kmock's own use of a deprecated importlib API
            warnings.simplefilter("ignore", DeprecationWarning)
            self.resources.load_bundled()
        for resource in list(self.resources):
            info = self.resources[resource]
            if resource.plural and info.kind:
                self._register(Kind(resource.group or "", resource.version or "", resource.plural, info.kind,
                                    bool(info.namespaced), frozenset(info.subresources)))
        for group, plural, kind, namespaced in KOPF_RESOURCES:
            self._register(Kind(group, "v1", plural, kind, namespaced), verbs=True, custom=True)
        for name in ("default", "kube-system", "kube-public", "kube-node-lease"):
            self._create(self._kinds[kmock.resource("", "v1", "namespaces")], None,
                         {"metadata": {"name": name}})
        for path in sorted(CRD_DIR.glob("*.yaml")):
            self.install_crd(yaml.safe_load(path.read_text()), admitted=True)

    # -- registration ---------------------------------------------------------------------------------

    def _register(self, kind: Kind, *, verbs: bool = False, custom: bool | None = None,
                  short_names: Iterable[str] = (), categories: Iterable[str] = (), singular: str | None = None
                  ) -> Kind:
        if custom is not None:
            kind = Kind(kind.group, kind.version, kind.plural, kind.kind, kind.namespaced, kind.subresources, custom)
        self._kinds[kind.resource] = kind
        if verbs or kind.resource not in self.resources:
            self.resources[kind.resource] = kmock.ResourceInfo(
                kind=kind.kind, namespaced=kind.namespaced, singular=singular or kind.kind.lower(),
                verbs={"create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"},
                shortnames=set(short_names), categories=set(categories), subresources=set(kind.subresources))
        return kind

    def install_crd(self, crd: Obj, *, admitted: bool = False) -> None:
        """Store a CRD and serve its resource (as `kubectl apply -f crd.yaml` and waiting would)."""
        problems = crd_problems(crd)
        if problems:
            name = crd.get("metadata", {}).get("name")
            self.crd_problems[name] = problems
            if name not in _WARNED_CRDS:  # once per test session, not per test
                _WARNED_CRDS.add(name)
                log.warning("a real API server would reject CRD %s: %s", name, "; ".join(problems))
        kind = self._kinds[kmock.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")]
        if self._current(kind, None, crd["metadata"]["name"]) is None:
            self._create(kind, None, crd)
        if admitted:
            self._admitted_kinds.add(crd["spec"]["names"]["kind"])

    def _establish_crd(self, kind: Kind, crd: Obj) -> None:
        """The conditions a real server sets on a CRD it serves (at once, where a real one takes a moment)."""
        accepted = (("NamesAccepted", "NoConflicts"), ("Established", "InitialNamesAccepted"))
        status = {"conditions": [{"type": t, "status": "True", "reason": r, "lastTransitionTime": _now()}
                                 for t, r in accepted],
                  "acceptedNames": crd["spec"]["names"], "storedVersions": [v["name"] for v in crd["spec"]["versions"]]}
        self._write(kind, crd["metadata"]["name"], crd, {**crd, "status": status}, subresource="status")

    def _serve_crd(self, crd: Obj) -> None:
        spec = crd.get("spec", {})
        names = spec.get("names", {})
        for version in spec.get("versions", []):
            if not version.get("served", True):
                continue
            kind = Kind(spec["group"], version["name"], names["plural"], names["kind"],
                        spec.get("scope", "Namespaced") == "Namespaced",
                        frozenset(version.get("subresources") or {}), custom=True)
            self._register(kind, verbs=True, short_names=names.get("shortNames", ()),
                           categories=names.get("categories", ()), singular=names.get("singular"))
            schema = (version.get("schema") or {}).get("openAPIV3Schema")
            if schema is not None:
                self._schemas[names["kind"]] = schema

    def _kind(self, api: ApiPath) -> Kind:
        kind = self._kinds.get(kmock.resource(api.group, api.version, api.plural))
        if kind is None:
            raise api_error(404, "NotFound", "the server could not find the requested resource")
        return kind

    def kind_of(self, api_version: str, kind_name: str) -> Kind:
        for kind in self._kinds.values():
            if kind.api_version == api_version and kind.kind == kind_name:
                return kind
        raise KeyError(f"{api_version} {kind_name} is not served")

    # -- the store ------------------------------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        return self._rv

    def _key(self, kind: Kind, namespace: str | None, name: str) -> tuple[kmock.resource, str | None, str]:
        return kind.resource, namespace if kind.namespaced else None, name

    def _current(self, kind: Kind, namespace: str | None, name: str) -> Obj | None:
        key = self._key(kind, namespace, name)
        if key not in self._objects:
            return None
        obj = self._objects[key]
        return None if obj.deleted else obj.last.raw

    def _live(self, kind: Kind | None = None, namespace: str | None = None) -> list[tuple[Kind, Obj]]:
        found = []
        for (resource, ns, _), obj in self._objects.items():
            if obj.deleted or (kind is not None and resource != kind.resource):
                continue
            if namespace is not None and ns != namespace:
                continue
            found.append((self._kinds[resource], obj.last.raw))
        return found

    def _commit(self, kind: Kind, type_: str, new: Obj, old: Obj | None) -> Obj:
        """The only way state changes: a new resourceVersion, the store, the change log, watchers."""
        self._rv += 1
        meta = new["metadata"]
        meta["resourceVersion"] = str(self._rv)
        key = self._key(kind, meta.get("namespace"), meta["name"])
        if type_ == "DELETED":
            self._objects[key].delete()
            self._uids.pop(meta.get("uid", ""), None)
        elif key in self._objects:
            self._objects[key].history.append(new)
        else:
            self._objects[key] = new
        if type_ != "DELETED":
            self._uids[meta["uid"]] = key
        if len(self._changes) >= self.history_limit:
            self._log_floor = self._changes.popleft().rv
        change = Change(self._rv, kind, key[1], type_, old, new)
        self._changes.append(change)
        for watcher in self._watchers:
            if watcher.resource == kind.resource:
                watcher.queue.put_nowait(change)
        if type_ == "DELETED" or meta.get("deletionTimestamp"):
            self._wake_gc()
        if type_ == "ADDED" and kind.kind == "CustomResourceDefinition":
            self._serve_crd(new)
            self._establish_crd(kind, new)
        return new

    # -- create ---------------------------------------------------------------------------------------

    def _create(self, kind: Kind, namespace: str | None, body: Any, *, dry_run: bool = False) -> Obj:
        if not isinstance(body, dict):
            raise bad_request("the body of the request must be a JSON object")
        obj = copy.deepcopy(body)
        self._check_type(kind, obj)
        meta = obj.get("metadata")
        if not isinstance(meta, dict):
            meta = obj["metadata"] = {}
        if kind.namespaced:
            if namespace is None:
                raise api_error(404, "NotFound", "the server could not find the requested resource")
            if meta.get("namespace", namespace) != namespace:
                raise bad_request("the namespace of the provided object does not match the namespace sent on "
                                  "the request")
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise invalid(kind, "", [("metadata.name", "Required value: name or generateName is required")])
            alphabet = "bcdfghjklmnpqrstvwxz2456789"
            meta["name"] = meta["generateName"] + "".join(random.choice(alphabet) for _ in range(5))
        name = meta["name"]
        existing = self._current(kind, namespace, name)
        if existing is not None:
            why = " (object is being deleted)" if existing["metadata"].get("deletionTimestamp") else ""
            raise api_error(409, "AlreadyExists", f'{kind.group_resource} "{name}" already exists{why}',
                            kind=kind, name=name)
        if kind.namespaced:
            ns_kind = self._kinds[kmock.resource("", "v1", "namespaces")]
            ns_obj = self._current(ns_kind, None, namespace or "")
            if ns_obj is None:
                raise not_found(ns_kind, namespace or "")
            if ns_obj["metadata"].get("deletionTimestamp"):
                raise api_error(403, "Forbidden", f'{kind.group_resource} "{name}" is forbidden: unable to create '
                                f"new content in namespace {namespace} because it is being terminated",
                                kind=kind, name=name)
        for server_owned in ("uid", "resourceVersion", "creationTimestamp", "deletionTimestamp",
                             "deletionGracePeriodSeconds", "generation", "selfLink", "managedFields"):
            meta.pop(server_owned, None)
        if "status" in kind.subresources and kind.kind != "Node":
            obj.pop("status", None)
            if kind.kind in STATUS_ON_CREATE:
                obj["status"] = STATUS_ON_CREATE[kind.kind](obj)
        self._default(kind, obj, None)
        problems = check_metadata(kind, obj) + self._check_kind(kind, obj, None)
        if problems:
            raise invalid(kind, name, problems)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        if kind.custom:
            meta["generation"] = 1
        if dry_run:
            return obj
        return self._commit(kind, "ADDED", obj, None)

    def _check_type(self, kind: Kind, obj: Obj) -> None:
        if obj.get("apiVersion", kind.api_version) != kind.api_version or obj.get("kind", kind.kind) != kind.kind:
            raise bad_request(f"the API version in the data ({obj.get('apiVersion')}) and kind ({obj.get('kind')}) "
                              f"do not match the URL ({kind.api_version}, {kind.kind})")
        obj["apiVersion"], obj["kind"] = kind.api_version, kind.kind

    def _default(self, kind: Kind, obj: Obj, old: Obj | None) -> None:
        """Defaults and conversions the API server applies on write."""
        if kind.custom and kind.kind in self._schemas:
            schema = self._schemas[kind.kind]
            pruned = prune(schema, obj, root=True)
            if kind.kind in self._admitted_kinds:
                pruned = admission.with_defaults(schema, pruned)
            obj.clear()
            obj.update(pruned)
        elif kind.kind == "Secret":
            obj.setdefault("type", "Opaque")
            string_data = obj.pop("stringData", None) or {}
            data = obj.setdefault("data", {}) if string_data or obj.get("data") else obj.get("data")
            for key, value in string_data.items():
                data[key] = base64.b64encode(str(value).encode()).decode()
        elif kind.kind == "Namespace":
            obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
            obj["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = obj["metadata"]["name"]
        elif kind.kind == "Service" and old is None:
            spec = obj.setdefault("spec", {})
            spec.setdefault("type", "ClusterIP")
            spec.setdefault("sessionAffinity", "None")
            if not spec.get("clusterIP"):
                spec["clusterIP"] = next(self._cluster_ips)
            spec.setdefault("clusterIPs", [spec["clusterIP"]])
            for port in spec.get("ports") or []:
                port.setdefault("protocol", "TCP")
                port.setdefault("targetPort", port.get("port"))
        elif kind.kind == "Pod" and old is None:
            self._default_pod(obj)

    @staticmethod
    def _default_pod(pod: Obj) -> None:
        spec = pod.setdefault("spec", {})
        spec.setdefault("restartPolicy", "Always")
        spec.setdefault("terminationGracePeriodSeconds", 30)
        spec.setdefault("dnsPolicy", "ClusterFirst")
        spec.setdefault("schedulerName", "default-scheduler")
        spec.setdefault("securityContext", {})
        spec.setdefault("enableServiceLinks", True)
        spec.setdefault("priority", 0)
        guaranteed, any_resources = True, False
        for container in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
            container.setdefault("terminationMessagePath", "/dev/termination-log")
            container.setdefault("terminationMessagePolicy", "File")
            image = str(container.get("image", ""))
            latest = ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest")
            container.setdefault("imagePullPolicy", "Always" if latest else "IfNotPresent")
            resources = container.setdefault("resources", {})
            limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
            any_resources = any_resources or bool(limits or requests)
            for port in container.get("ports") or []:
                port.setdefault("protocol", "TCP")
            for resource in ("cpu", "memory"):
                if resource not in limits or requests.get(resource, limits[resource]) != limits[resource]:
                    guaranteed = False
        qos = "BestEffort" if not any_resources else "Guaranteed" if guaranteed else "Burstable"
        pod["status"] = {"phase": "Pending", "qosClass": qos}

    def _check_kind(self, kind: Kind, obj: Obj, old: Obj | None) -> Problems:
        if kind.kind in self._admitted_kinds:
            return [self._split_problem(p) for p in admission.admit(obj, old)]
        if kind.kind == "Pod":
            return check_pod(obj)
        if kind.kind == "Service":
            return check_service(obj)
        if kind.kind == "Secret":
            problems: Problems = []
            for key, value in (obj.get("data") or {}).items():
                if not SECRET_KEY.match(key):
                    problems.append((f"data[{key}]", "Invalid value: a valid config key must consist of "
                                                     "alphanumeric characters, '-', '_' or '.'"))
                try:
                    base64.b64decode(value, validate=True)
                except (binascii.Error, TypeError, ValueError):
                    raise bad_request(f"illegal base64 data in secret data key {key!r}") from None
            return problems
        return []

    @staticmethod
    def _split_problem(problem: str) -> tuple[str, str]:
        where, _, message = problem.partition(": ")
        return where.lstrip("."), f"Invalid value: {message}"

    # -- update ---------------------------------------------------------------------------------------

    def _write(self, kind: Kind, name: str, old: Obj, candidate: Any, *, subresource: str | None,
               precondition: str | None = None, validate: bool = True, dry_run: bool = False) -> Obj:
        """Persist `candidate` (a PUT body or a patched copy of `old`) as the next state of `old`.

        `precondition`: the resourceVersion the writer based its change on (409 if stale), if any.
        """
        if not isinstance(candidate, dict):
            raise bad_request("the object must be a JSON object")
        new = copy.deepcopy(candidate)
        meta_old = old["metadata"]
        meta = new.get("metadata")
        if not isinstance(meta, dict):
            meta = new["metadata"] = {}
        if meta.get("name", name) != name:
            raise bad_request(f"the name of the object ({meta.get('name')}) does not match the name on the URL "
                              f"({name})")
        if kind.namespaced and meta.get("namespace", meta_old["namespace"]) != meta_old["namespace"]:
            raise bad_request("the namespace of the object does not match the namespace on the request")
        self._check_type(kind, new)
        if precondition and precondition != meta_old["resourceVersion"]:
            raise conflict(kind, name)
        if meta.get("uid") and meta["uid"] != meta_old["uid"]:
            raise conflict(kind, name, f"Precondition failed: UID in precondition: {meta['uid']}, UID in object "
                                       f"meta: {meta_old['uid']}")
        for owned in ("name", "namespace", "uid", "creationTimestamp", "generation", "deletionTimestamp",
                      "deletionGracePeriodSeconds", "resourceVersion", "managedFields"):
            if owned in meta_old:
                meta[owned] = meta_old[owned]
            else:
                meta.pop(owned, None)
        if subresource == "status":
            status = new.get("status")
            new = copy.deepcopy(old)
            if status is None:
                new.pop("status", None)
            else:
                new["status"] = status
        elif "status" in kind.subresources:
            new.pop("status", None)
            if "status" in old:
                new["status"] = copy.deepcopy(old["status"])
        self._default(kind, new, old)
        if validate:
            problems = check_metadata(kind, new) + self._check_update(kind, old, new)
            if problems:
                raise invalid(kind, name, problems)
        if _without_rv(new) == _without_rv(old):
            return old  # a no-op: no new resourceVersion, no event
        if kind.custom and "generation" in meta_old:
            strip = ("metadata", "status")
            if {k: v for k, v in new.items() if k not in strip} != {k: v for k, v in old.items() if k not in strip}:
                new["metadata"]["generation"] = meta_old["generation"] + 1
        if dry_run:
            return new
        committed = self._commit(kind, "MODIFIED", new, old)
        return self._finish_if_released(kind, committed)

    def _check_update(self, kind: Kind, old: Obj, new: Obj) -> Problems:
        problems = self._check_kind(kind, new, old)
        if old["metadata"].get("deletionTimestamp"):
            added = set(new["metadata"].get("finalizers") or []) - set(old["metadata"].get("finalizers") or [])
            if added:
                problems.append(("metadata.finalizers", f"Forbidden: no new finalizers can be added if the object "
                                                        f"is being deleted, found new finalizers {sorted(added)}"))
        if kind.kind == "Pod" and pod_spec_for_comparison(new.get("spec") or {}) != \
                pod_spec_for_comparison(old.get("spec") or {}):
            problems.append(("spec", f"Forbidden: pod updates may not change fields other than {POD_MUTABLE}"))
        if kind.kind == "Service" and (new.get("spec") or {}).get("clusterIP") != (old.get("spec") or {}).get(
                "clusterIP"):
            problems.append(("spec.clusterIP", "Invalid value: field is immutable"))
        return problems

    def _finish_if_released(self, kind: Kind, obj: Obj) -> Obj:
        """Deleting objects go away when their last finalizer does (pods: once the kubelet is done too)."""
        meta = obj["metadata"]
        if not meta.get("deletionTimestamp") or meta.get("finalizers"):
            return obj
        if kind.kind == "Pod" and meta.get("deletionGracePeriodSeconds", 0) > 0:
            return obj
        if kind.kind == "Namespace" and (obj.get("spec") or {}).get("finalizers"):
            return obj
        self._commit(kind, "DELETED", copy.deepcopy(obj), obj)
        return obj

    def _patch(self, kind: Kind, namespace: str | None, name: str, subresource: str | None, content_type: str,
               body: Any, params: dict[str, str]) -> tuple[int, Obj]:
        old = self._current(kind, namespace, name)
        dry_run = "dryRun" in params
        if content_type == "application/apply-patch+yaml":
            if not params.get("fieldManager"):
                raise bad_request("PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is "
                                  "required for apply patch")
            if old is None:
                if subresource:
                    raise not_found(kind, name)
                body = dict(body or {})
                body.setdefault("metadata", {}).setdefault("name", name)
                return 201, self._create(kind, namespace, body, dry_run=dry_run)
        if old is None:
            raise not_found(kind, name)
        if content_type == "application/json-patch+json":
            if not isinstance(body, list):
                raise bad_request("a JSON patch must be a list of operations")
            try:
                candidate = jsonpatch.apply_patch(copy.deepcopy(old), body)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, KeyError, TypeError) as exc:
                raise api_error(422, "Invalid", f"the server rejected our request due to an error in our "
                                f"request: {exc}") from None
            # A JSON patch is conditional only if it sets the resourceVersion (or `test`s it: done above).
            precondition = (candidate.get("metadata") or {}).get("resourceVersion")
        elif content_type in ("application/merge-patch+json", "application/apply-patch+yaml"):
            candidate = merge_patch(old, body)
            precondition = ((body or {}).get("metadata") or {}).get("resourceVersion")
        elif content_type == "application/strategic-merge-patch+json":
            if kind.custom:
                raise api_error(415, "UnsupportedMediaType", "the body of the request was in an unknown format - "
                                "accepted media types include: application/json-patch+json, "
                                "application/merge-patch+json, application/apply-patch+yaml")
            candidate = strategic_merge_patch(old, body)
            precondition = ((body or {}).get("metadata") or {}).get("resourceVersion")
        else:
            raise api_error(415, "UnsupportedMediaType", f"the media type {content_type!r} is not a patch type")
        return 200, self._write(kind, name, old, candidate, subresource=subresource, precondition=precondition,
                                dry_run=dry_run)

    def _replace(self, kind: Kind, namespace: str | None, name: str, subresource: str | None, body: Any,
                 params: dict[str, str]) -> tuple[int, Obj]:
        old = self._current(kind, namespace, name)
        if old is None:
            raise not_found(kind, name)
        precondition = ((body.get("metadata") or {}).get("resourceVersion")) if isinstance(body, dict) else None
        return 200, self._write(kind, name, old, body, subresource=subresource, precondition=precondition,
                                dry_run="dryRun" in params)

    # -- delete ---------------------------------------------------------------------------------------

    def _delete(self, kind: Kind, namespace: str | None, name: str, options: Obj | None = None) -> tuple[int, Obj]:
        options = options or {}
        old = self._current(kind, namespace, name)
        if old is None:
            raise not_found(kind, name)
        meta_old = old["metadata"]
        preconditions = options.get("preconditions") or {}
        if preconditions.get("uid") and preconditions["uid"] != meta_old["uid"]:
            raise conflict(kind, name, f"Precondition failed: UID in precondition: {preconditions['uid']}, UID in "
                                       f"object meta: {meta_old['uid']}")
        if preconditions.get("resourceVersion") and preconditions["resourceVersion"] != meta_old["resourceVersion"]:
            raise conflict(kind, name)
        if options.get("dryRun"):
            return 200, old
        grace = self._grace_period(kind, old, options.get("gracePeriodSeconds"))
        policy = options.get("propagationPolicy") or ("Orphan" if options.get("orphanDependents") else "Background")
        if meta_old.get("deletionTimestamp"):
            # Already terminating: only a shorter grace period (the kubelet's final 0) changes anything.
            if kind.kind == "Pod" and grace < meta_old.get("deletionGracePeriodSeconds", 0):
                new = copy.deepcopy(old)
                new["metadata"]["deletionGracePeriodSeconds"] = grace
                new["metadata"]["deletionTimestamp"] = _now(grace)
                committed = self._commit(kind, "MODIFIED", new, old)
                self._finish_if_released(kind, committed)
                return (200 if self._current(kind, namespace, name) is None else 202), committed
            return 202, old
        if policy == "Orphan":
            self._orphan(meta_old["uid"])
        finalizers = list(meta_old.get("finalizers") or [])
        if policy == "Foreground" and "foregroundDeletion" not in finalizers and self._dependents(meta_old["uid"]):
            finalizers.append("foregroundDeletion")
        waits = bool(finalizers) or grace > 0 or kind.kind == "Namespace"
        if not waits:
            final = copy.deepcopy(old)
            self._commit(kind, "DELETED", final, old)
            return 200, final
        new = copy.deepcopy(old)
        meta = new["metadata"]
        meta["deletionTimestamp"] = _now(grace)
        meta["deletionGracePeriodSeconds"] = grace
        if finalizers:
            meta["finalizers"] = finalizers
        if "generation" in meta:
            meta["generation"] += 1
        if kind.kind == "Namespace":
            new.setdefault("status", {})["phase"] = "Terminating"
        committed = self._commit(kind, "MODIFIED", new, old)
        return 202, committed

    @staticmethod
    def _grace_period(kind: Kind, obj: Obj, requested: Any) -> int:
        if kind.kind != "Pod":
            return 0
        spec, status = obj.get("spec") or {}, obj.get("status") or {}
        if not spec.get("nodeName") or status.get("phase") in ("Succeeded", "Failed"):
            return 0  # unscheduled or finished pods go at once, as on a real server
        grace = requested if requested is not None else spec.get("terminationGracePeriodSeconds", 30)
        return max(0, int(grace))

    def _dependents(self, uid: str) -> list[tuple[Kind, Obj]]:
        return [(k, o) for k, o in self._live()
                if any(ref.get("uid") == uid for ref in o["metadata"].get("ownerReferences") or [])]

    def _orphan(self, uid: str) -> None:
        for kind, obj in self._dependents(uid):
            new = copy.deepcopy(obj)
            new["metadata"]["ownerReferences"] = [r for r in obj["metadata"]["ownerReferences"] if r.get("uid") != uid]
            if not new["metadata"]["ownerReferences"]:
                del new["metadata"]["ownerReferences"]
            self._commit(kind, "MODIFIED", new, obj)

    # -- garbage collection, namespace cleanup --------------------------------------------------------

    def start_collector(self) -> None:
        """Start the garbage collector's task (`serve()` does, before anything else can start tasks)."""
        if self._gc_wakeup is None:
            self._gc_wakeup = asyncio.Event()
        if (self._gc_task is None or self._gc_task.done()) and not self._closing:
            self._gc_task = asyncio.get_running_loop().create_task(self._gc_loop(), name="emulator collector")

    def _wake_gc(self) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # not serving yet: the collector runs once the server does
        self.start_collector()
        assert self._gc_wakeup is not None
        self._gc_wakeup.set()

    async def _gc_loop(self) -> None:
        assert self._gc_wakeup is not None
        while not self._closing:
            await self._gc_wakeup.wait()
            self._gc_wakeup.clear()
            await asyncio.sleep(self.gc_delay)  # a real collector acts asynchronously, after the deletion
            try:
                self.collect_garbage()
            except Exception as exc:  # an emulator bug: reported when the server stops
                log.exception("garbage collection failed")
                self._background_errors.append(exc)

    def collect_garbage(self) -> None:
        """One pass of the garbage collector and the namespace controller (also callable directly)."""
        for _ in range(100):  # until nothing changes (cascades), bounded
            if not self._gc_pass():
                return

    def _gc_pass(self) -> bool:
        changed = False
        for kind, obj in self._live():
            meta = obj["metadata"]
            current = self._current(kind, meta.get("namespace"), meta["name"])
            if current is None or current["metadata"]["resourceVersion"] != meta["resourceVersion"]:
                continue  # changed earlier in this pass
            refs = meta.get("ownerReferences") or []
            gone = [ref for ref in refs if ref.get("uid") not in self._uids]
            if gone and len(gone) < len(refs):
                new = copy.deepcopy(obj)
                new["metadata"]["ownerReferences"] = [r for r in refs if r.get("uid") in self._uids]
                self._commit(kind, "MODIFIED", new, obj)
                changed = True
            elif gone and not meta.get("deletionTimestamp"):
                self._delete(kind, meta.get("namespace"), meta["name"])
                changed = True
            elif meta.get("deletionTimestamp") and "foregroundDeletion" in (meta.get("finalizers") or []):
                changed |= self._foreground(kind, obj)
            elif kind.kind == "Namespace" and meta.get("deletionTimestamp"):
                changed |= self._clean_namespace(kind, obj)
        return changed

    def _foreground(self, kind: Kind, owner: Obj) -> bool:
        uid = owner["metadata"]["uid"]
        changed = False
        blocking = False
        for dep_kind, dep in self._dependents(uid):
            dep_meta = dep["metadata"]
            if not dep_meta.get("deletionTimestamp"):
                self._delete(dep_kind, dep_meta.get("namespace"), dep_meta["name"])
                changed = True
            ref = next(r for r in dep_meta.get("ownerReferences") or [] if r.get("uid") == uid)
            blocking |= bool(ref.get("blockOwnerDeletion")) and self._current(
                dep_kind, dep_meta.get("namespace"), dep_meta["name"]) is not None
        if not blocking:
            new = copy.deepcopy(owner)
            new["metadata"]["finalizers"] = [f for f in owner["metadata"]["finalizers"] if f != "foregroundDeletion"]
            if not new["metadata"]["finalizers"]:
                del new["metadata"]["finalizers"]
            committed = self._commit(kind, "MODIFIED", new, owner)
            self._finish_if_released(kind, committed)
            changed = True
        return changed

    def _clean_namespace(self, kind: Kind, namespace: Obj) -> bool:
        name = namespace["metadata"]["name"]
        contents = [(k, o) for k, o in self._live() if k.namespaced and o["metadata"].get("namespace") == name]
        changed = False
        for content_kind, obj in contents:
            if not obj["metadata"].get("deletionTimestamp"):
                self._delete(content_kind, name, obj["metadata"]["name"])
                changed = True
        if not contents and (namespace.get("spec") or {}).get("finalizers"):
            new = copy.deepcopy(namespace)
            new["spec"]["finalizers"] = []
            committed = self._commit(kind, "MODIFIED", new, namespace)
            self._finish_if_released(kind, committed)
            changed = True
        return changed

    # -- binding --------------------------------------------------------------------------------------

    def _bind(self, kind: Kind, namespace: str | None, name: str, body: Any) -> tuple[int, Obj]:
        pod = self._current(kind, namespace, name)
        if pod is None:
            raise not_found(kind, name)
        node = ((body or {}).get("target") or {}).get("name")
        if not node:
            raise invalid(kind, name, [("target.name", "Required value")])
        if pod["metadata"].get("deletionTimestamp"):
            raise conflict(kind, name, f"pod {name} is being deleted, cannot be assigned to a host")
        if (pod.get("spec") or {}).get("nodeName"):
            raise conflict(kind, name, f"pod {name} is already assigned to node \"{pod['spec']['nodeName']}\"")
        new = copy.deepcopy(pod)
        new["spec"]["nodeName"] = node
        conditions = [c for c in new.setdefault("status", {}).get("conditions", []) if c.get("type") != "PodScheduled"]
        new["status"]["conditions"] = [{"type": "PodScheduled", "status": "True", "lastTransitionTime": _now(),
                                        "lastProbeTime": None}, *conditions]
        self._commit(kind, "MODIFIED", new, pod)
        return 201, {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Success", "code": 201}

    # -- list and watch -------------------------------------------------------------------------------

    def _selector(self, kind: Kind, params: dict[str, str], name: str | None = None) -> Callable[[Obj], bool]:
        try:
            labels = parse_label_selector(params.get("labelSelector"))
            fields = parse_field_selector(params.get("fieldSelector"), kind)
        except ValueError as exc:
            raise bad_request(str(exc)) from None
        return lambda obj: (name is None or obj["metadata"]["name"] == name) and \
            labels(obj["metadata"].get("labels") or {}) and fields(obj)

    def _list(self, kind: Kind, namespace: str | None, params: dict[str, str]) -> Obj:
        selected = self._selector(kind, params)
        items = [o for _, o in self._live(kind, namespace if kind.namespaced else None) if selected(o)]
        items.sort(key=lambda o: (o["metadata"].get("namespace") or "", o["metadata"]["name"]))
        rv = self._rv
        if params.get("continue"):
            try:
                token = json.loads(base64.urlsafe_b64decode(params["continue"]))
                rv, start = int(token["rv"]), tuple(token["start"])
            except (ValueError, KeyError, TypeError):
                raise bad_request("continue key is not valid") from None
            if rv < self._log_floor:
                raise api_error(410, "Expired", "The provided continue parameter is too old to display a "
                                "consistent list result.")
            items = [o for o in items if (o["metadata"].get("namespace") or "", o["metadata"]["name"]) > start]
        meta: Obj = {"resourceVersion": str(rv)}
        limit = int(params.get("limit") or 0)
        if limit and len(items) > limit:
            last = items[limit - 1]["metadata"]
            token = {"rv": rv, "start": [last.get("namespace") or "", last["name"]]}
            meta["continue"] = base64.urlsafe_b64encode(json.dumps(token).encode()).decode()
            meta["remainingItemCount"] = len(items) - limit
            items = items[:limit]
        if not kind.custom:  # items of built-in lists carry no kind/apiVersion, as on a real server
            items = [{k: v for k, v in o.items() if k not in ("kind", "apiVersion")} for o in items]
        return {"apiVersion": kind.api_version, "kind": f"{kind.kind}List", "metadata": meta, "items": items}

    def _watch(self, kind: Kind, namespace: str | None, name: str | None, params: dict[str, str],
               request: kmock.Request) -> AsyncIterator[Any]:
        selected = self._selector(kind, params, name)
        scope = namespace if kind.namespaced else None
        since = params.get("resourceVersion")
        bookmarks = params.get("allowWatchBookmarks") == "true"
        initial_events = params.get("sendInitialEvents") == "true"
        timeout = float(params["timeoutSeconds"]) if params.get("timeoutSeconds") else None

        def in_scope(obj: Obj) -> bool:
            return scope is None or obj["metadata"].get("namespace") == scope

        def translate(change: Change) -> Obj | None:
            if not in_scope(change.new):
                return None
            now_ = selected(change.new)
            before = change.old is not None and change.type == "MODIFIED" and selected(change.old)
            if change.type == "ADDED":
                kind_ = "ADDED" if now_ else None
            elif change.type == "DELETED":
                kind_ = "DELETED" if now_ else None
            else:
                kind_ = "MODIFIED" if now_ and before else "ADDED" if now_ else "DELETED" if before else None
            return {"type": kind_, "object": change.new} if kind_ else None

        def bookmark(rv: int, initial_end: bool = False) -> Obj:
            meta: Obj = {"resourceVersion": str(rv)}
            if initial_end:
                meta["annotations"] = {"k8s.io/initial-events-end": "true"}
            return {"type": "BOOKMARK", "object": {"kind": kind.kind, "apiVersion": kind.api_version,
                                                   "metadata": meta}}

        initial: list[Obj] = []
        expired = False
        if since in (None, "", "0") or initial_events:
            objs = [o for _, o in self._live(kind, scope) if selected(o)]
            initial = [{"type": "ADDED", "object": o} for o in objs]
            if initial_events and bookmarks:
                initial.append(bookmark(self._rv, initial_end=True))
        else:
            try:
                rv = int(since)
            except ValueError:
                raise bad_request(f"invalid resource version: {since!r}") from None
            if rv < self._log_floor:
                expired = True
            else:
                initial = [e for c in self._changes if c.rv > rv and c.kind.resource == kind.resource
                           for e in [translate(c)] if e]
        watcher = _Watcher(kind.resource)
        if not expired:
            self._watchers.add(watcher)
        raw_request = request._raw_request

        async def stream() -> AsyncIterator[Any]:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout if timeout is not None else None
            last_bookmark = loop.time()
            try:
                yield b""  # the headers go out now, as a real server's do
                if expired:
                    yield {"type": "ERROR", "object": {
                        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "code": 410,
                        "reason": "Expired", "message": f"too old resource version: {since} ({self._log_floor})"}}
                    return
                for event in initial:
                    yield event
                while not self._closing:
                    wait = 0.5 if deadline is None else min(0.5, deadline - loop.time())
                    if wait <= 0:
                        return
                    try:
                        change = await asyncio.wait_for(watcher.queue.get(), wait)
                    except TimeoutError:
                        transport = raw_request.transport if raw_request is not None else None
                        if transport is None or transport.is_closing():
                            return  # the client went away
                        if bookmarks and loop.time() - last_bookmark >= self.bookmark_interval:
                            last_bookmark = loop.time()
                            yield bookmark(self._rv)  # the queue is empty: nothing newer is pending
                        continue
                    if change is None:
                        return
                    event = translate(change)
                    if event:
                        yield event
            finally:
                self._watchers.discard(watcher)

        return stream()

    # -- HTTP -----------------------------------------------------------------------------------------

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        response = await super().__call__(raw_request)
        # One request per connection unless `keep_alive`: no idle keep-alive handler task outlives its
        # request. (Kopf in the same process, when it stops, cancels every task created while it ran; a
        # cancelled server task behind a pooled connection would leave the next request on it hanging.)
        if not self.keep_alive:
            response.force_close()
        return response

    # The stock emulator changes its store before dispatching, even for requests a scripted reaction
    # answers; here the store changes only when the emulator itself serves the request.
    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        # kmock picks a reaction by replaying every request served so far through each reaction's
        # filters: O(requests) per request, quadratic under a benchmark. While a test has scripted no
        # reaction of its own (`emulator[...] << 500`), every API request goes to `_dispatch` anyway.
        if len(self._payloads) == self._builtin_reactions and parse_api_path(request.url.path) is not None:
            return await self._api_reaction(request)
        return await super(kmock.KubernetesEmulator, self)._handle(request)

    async def _serve_list(self, request: kmock.Request) -> Any:
        return await self._dispatch(request)

    async def _serve_watch(self, request: kmock.Request) -> Any:  # type: ignore[override]
        return await self._dispatch(request)

    async def _serve_fetch(self, request: kmock.Request) -> Any:
        return await self._dispatch(request)

    async def _serve_create(self, request: kmock.Request) -> Any:
        return await self._dispatch(request)

    async def _serve_update(self, request: kmock.Request) -> Any:
        return await self._dispatch(request)

    async def _serve_delete(self, request: kmock.Request) -> Any:
        return await self._dispatch(request)

    async def _dispatch(self, request: kmock.Request) -> kmock.Response:
        api = parse_api_path(request.url.path)
        if api is None:
            raise api_error(404, "NotFound", "the server could not find the requested resource")
        kind = self._kind(api)
        if (api.namespace is not None and not kind.namespaced) or (
                api.name is not None and kind.namespaced and api.namespace is None):
            raise api_error(404, "NotFound", "the server could not find the requested resource")
        method = str(request.method.value).upper()
        params = {k: str(v) for k, v in request.params.items()}
        content_type, body = self._body(request)
        status, payload = self._serve(kind, api, method, params, content_type, body, request)
        return kmock.Response(status=status, payload=payload)

    def _serve(self, kind: Kind, api: ApiPath, method: str, params: dict[str, str], content_type: str, body: Any,
               request: kmock.Request) -> tuple[int, Any]:
        ns, name, sub = api.namespace, api.name, api.subresource
        watch = params.get("watch") in ("true", "1")
        if name is None:
            if method == "GET":
                return 200, (self._watch(kind, ns, None, params, request) if watch else self._list(kind, ns, params))
            if method == "POST":
                return 201, self._create(kind, ns, body, dry_run="dryRun" in params)
            if method == "DELETE":
                selected = self._selector(kind, params)
                items = [o for _, o in self._live(kind, ns if kind.namespaced else None) if selected(o)]
                for obj in items:
                    self._delete(kind, ns, obj["metadata"]["name"], body if isinstance(body, dict) else None)
                return 200, {"apiVersion": kind.api_version, "kind": f"{kind.kind}List",
                             "metadata": {"resourceVersion": str(self._rv)}, "items": items}
            raise api_error(405, "MethodNotAllowed", f"the server does not allow this method on the requested "
                            f"resource ({method})")
        if sub is not None and (sub not in kind.subresources or sub not in ("status", "binding")):
            raise api_error(404, "NotFound", "the server could not find the requested resource")
        if method == "GET" and watch:
            return 200, self._watch(kind, ns, name, params, request)
        if method == "GET":
            obj = self._current(kind, ns, name)
            if obj is None or sub == "binding":
                raise not_found(kind, name)
            return 200, obj
        if sub == "binding":
            if method != "POST":
                raise api_error(405, "MethodNotAllowed", "only POST is allowed on pods/binding")
            return self._bind(kind, ns, name, body)
        if method == "PATCH":
            return self._patch(kind, ns, name, sub, content_type, body, params)
        if method == "PUT":
            return self._replace(kind, ns, name, sub, body, params)
        if method == "DELETE" and sub is None:
            options = dict(body) if isinstance(body, dict) else {}  # DeleteOptions, or query parameters
            if "gracePeriodSeconds" in params:
                options.setdefault("gracePeriodSeconds", int(params["gracePeriodSeconds"]))
            if "orphanDependents" in params:
                options.setdefault("orphanDependents", params["orphanDependents"] == "true")
            for key in ("propagationPolicy", "dryRun"):
                if key in params:
                    options.setdefault(key, params[key])
            return self._delete(kind, ns, name, options)
        raise api_error(405, "MethodNotAllowed", f"the server does not allow this method on the requested resource "
                        f"({method})")

    @staticmethod
    def _body(request: kmock.Request) -> tuple[str, Any]:
        headers = {k.lower(): v for k, v in request.headers.items()}
        content_type = headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if not request.body:
            return content_type, None
        if "json" not in content_type and "yaml" not in content_type:  # as kube-apiserver; protobuf aside
            raise api_error(415, "UnsupportedMediaType", "the body of the request was in an unknown format - "
                            "accepted media types include: application/json, application/yaml")
        try:
            if "yaml" in content_type:
                return content_type, yaml.safe_load(request.body)
            return content_type, json.loads(request.body)
        except (ValueError, yaml.YAMLError) as exc:
            raise bad_request(f"the body of the request could not be decoded: {exc}") from None

    async def _serve_version(self, request: kmock.Request) -> Any:
        served = await super()._serve_version(request)
        served["groupVersion"] = served["groupVersion"].lstrip("/")  # kmock says "/v1" for the core group
        return served

    async def _render_error(self, exc: Exception) -> aiohttp.web.StreamResponse:
        if isinstance(exc, kmock.KubernetesError):
            body: Obj = {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
                         "message": exc.message, "reason": exc.reason, "code": exc.status}
            if exc.details:
                body["details"] = exc.details
            return aiohttp.web.json_response(body, status=exc.status)
        return await super()._render_error(exc)

    # -- lifecycle ------------------------------------------------------------------------------------

    @property
    def api_url(self) -> str:
        """The base URL of the API, e.g. http://127.0.0.1:34567 (no trailing slash)."""
        return str(self.url).rstrip("/")

    @property
    def internal_errors(self) -> list[BaseException]:
        """Failures of the emulator itself (500s, collector crashes): bugs here, not in the client."""
        served = [e for e in self.errors if not isinstance(e, kmock.KubernetesError)] if self.active else []
        return served + self._background_errors

    async def shutdown(self) -> None:
        """End every watch stream and the collector, so that the HTTP server can stop at once."""
        self._closing = True
        for watcher in list(self._watchers):
            watcher.queue.put_nowait(None)
        if self._gc_task is not None:
            self._gc_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._gc_task


@contextlib.asynccontextmanager
async def serve(emulator: Emulator | None = None, *, host: str = "127.0.0.1") -> AsyncIterator[Emulator]:
    """Run an emulator on host (a random port) for the duration of the block.

    Leaving the block ends the watch streams first (Kopf or the kubelet harness must be stopped by
    then), then the server. Failures of the emulator itself fail the block (they are its bugs).
    """
    emulator = emulator if emulator is not None else Emulator()
    errors: list[BaseException] = []
    async with emulator, kmock.Server(emulator, host=host):
        emulator.start_collector()
        emulator.collect_garbage()  # whatever was deleted before serving
        try:
            yield emulator
        finally:
            errors = emulator.internal_errors
            await emulator.shutdown()
    if errors:
        raise AssertionError(f"the emulator failed internally ({len(errors)}x); first: {errors[0]!r}") from errors[0]
