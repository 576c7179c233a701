"""A kubelet (and scheduler) for tests: runs pods' containers as local processes.

`KubeClient` is the small async API client the harness and the fixtures use: built from the
emulator's URL or from a kubeconfig, so the same code drives the emulator and a real cluster.

`Kubelet` plays the nodes for the pods of one namespace: its own node and every Node labelled
`kubeforge.io/emulated-node` (`Cluster.add_node`). It polls the pods through the API and runs only
those bound to a node it plays. Who binds them depends on the API server:

- on the emulator (`binds_pods=True`: it has no scheduler, so the harness is one) it binds each new pod
  (`pods/{name}/binding`) to an emulated Node that fits it (nodeSelector, taints, `nvidia.com/gpu`),
  else to its own virtual node when there are no such Nodes; pods that fit nowhere get
  `PodScheduled=False/Unschedulable`, as from a scheduler;
- on a real control plane (`binds_pods=False`) the real scheduler binds: the harness registers its
  own Node, keeps every Node it plays alive as a kubelet does (a Lease in `kube-node-lease`, renewed;
  else the node-lifecycle controller taints the node and evicts its pods) and deletes its Node when it
  stops. Pods are told apart by uid: one replaced under the same name is a new pod;
- gives it a distinct loopback IP (127.0.0.2, 127.0.0.3, ...: Linux routes all of 127/8 to `lo`);
- resolves the container's env as a kubelet does (values with `$(VAR)` expansion, `fieldRef`,
  `secretKeyRef`, `configMapKeyRef`, `envFrom` secrets/config maps; a missing secret holds the pod in
  `CreateContainerConfigError`), and resolves `HOST.SUBDOMAIN[.NS[.svc...]]` values naming a pod
  behind a headless Service (MASTER_ADDR=w0.job-ptj) to that pod's IP, waiting for it (bounded);
- gives each rendezvous its own port: in a cluster every pod has its own network namespace, so
  every gang's rank 0 listens on MASTER_PORT 29500; here all pods share this machine's, and torch's
  store listens on every address, so MASTER_PORT becomes a free port chosen once per MASTER_ADDR;
- runs the `trainer` container (else the first) as a subprocess: `kubeforge ...` as
  `python -m kubeforge ...`, `python ...` with this interpreter, anything else as it is; its
  terminationMessagePath in argv becomes a per-pod temp file; stdout+stderr go to a per-pod log;
- reports Running, then Succeeded/Failed with the exit code (128+signal when killed) and the
  termination message (the file, or with FallbackToLogsOnError the log's tail on failure);
- on deletion (deletionTimestamp), SIGTERMs the process group, SIGKILLs it after the grace period
  (bounded by `kill_grace`), reports the outcome, and completes the deletion (gracePeriodSeconds=0).

Every wait is bounded; `stop()` kills whatever still runs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import re
import signal
import socket
import ssl
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

log = logging.getLogger(__name__)

Obj = dict[str, Any]
T = TypeVar("T")
EMULATED_NODE_LABEL = "kubeforge.io/emulated-node"
GPU = "nvidia.com/gpu"
MERGE_PATCH = "application/merge-patch+json"


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------------------
# An event loop of its own


class LoopThread:
    """An event loop in a daemon thread: for what must not share the test's loop.

    Kopf, when it stops, cancels every task created in its loop while it ran: a kubelet or an API
    server in that loop would lose its work to an operator restart. And a sync client (kubernetes)
    called from a loop that also serves the API would deadlock.
    """

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    async def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run coroutine in this thread's loop; await it from any other loop."""
        return await asyncio.wrap_future(self.submit(coroutine))

    def close(self, timeout: float = 10.0) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.submit(cancel_all()).result(timeout)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.loop.close()


# ---------------------------------------------------------------------------------------------------
# The API client


class ApiError(Exception):
    """A non-2xx answer from the API server, with its `Status` body."""

    def __init__(self, status: int, body: Any, method: str = "", path: str = ""):
        self.status = status
        self.body = body
        self.reason = body.get("reason", "") if isinstance(body, dict) else ""
        self.message = body.get("message", "") if isinstance(body, dict) else str(body)
        super().__init__(f"{method} {path}: {status} {self.reason}: {self.message}")


# Kinds the tests name, so that they need no discovery round-trip (others are discovered).
WELL_KNOWN: dict[str, tuple[str, str, bool]] = {
    "Pod": ("v1", "pods", True), "Service": ("v1", "services", True), "Secret": ("v1", "secrets", True),
    "ConfigMap": ("v1", "configmaps", True), "Event": ("v1", "events", True), "Node": ("v1", "nodes", False),
    "Namespace": ("v1", "namespaces", False),
    "PretrainJob": ("kubeforge.io/v1alpha1", "pretrainjobs", True),
    "FinetuneJob": ("kubeforge.io/v1alpha1", "finetunejobs", True),
    "CustomResourceDefinition": ("apiextensions.k8s.io/v1", "customresourcedefinitions", False),
    "Lease": ("coordination.k8s.io/v1", "leases", True),
}


class KubeClient:
    """Async access to one API server: `from_url()` (the emulator) or `from_kubeconfig()` (a cluster)."""

    def __init__(self, server: str, *, ssl_context: ssl.SSLContext | None = None,
                 authorization: Callable[[], str | None] = lambda: None, configuration: Any = None,
                 timeout: float = 30.0):
        self.server = server.rstrip("/")
        self._ssl = ssl_context
        self._authorization = authorization
        self._configuration = configuration
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._kinds: dict[tuple[str | None, str], tuple[str, str, bool]] = {}

    def clone(self) -> KubeClient:
        """The same server and credentials, with a session of its own (a session serves one loop)."""
        return KubeClient(self.server, ssl_context=self._ssl, authorization=self._authorization,
                          configuration=self._configuration, timeout=self._timeout)

    @classmethod
    def from_url(cls, url: str) -> KubeClient:
        """An API server with no authentication (the emulator)."""
        return cls(url)

    @classmethod
    def from_kubeconfig(cls, path: str | os.PathLike[str], context: str | None = None) -> KubeClient:
        """The server, TLS settings and credentials of a kubeconfig context, as kubectl would use them."""
        from kubernetes import client, config

        configuration = client.Configuration()
        config.load_kube_config(config_file=str(path), context=context, client_configuration=configuration)
        context_ = ssl.create_default_context(cafile=configuration.ssl_ca_cert)
        if configuration.cert_file:
            context_.load_cert_chain(configuration.cert_file, configuration.key_file)
        if not configuration.verify_ssl:
            context_.check_hostname = False
            context_.verify_mode = ssl.CERT_NONE

        def authorization() -> str | None:
            if configuration.refresh_api_key_hook is not None:
                configuration.refresh_api_key_hook(configuration)  # exec plugins and expiring tokens
            for setting in configuration.auth_settings().values():  # e.g. BearerToken: "Bearer ..."
                if setting.get("in") == "header" and str(setting.get("key")).lower() == "authorization" \
                        and setting.get("value"):
                    return str(setting["value"])
            return None

        return cls(configuration.host, ssl_context=context_, authorization=authorization,
                   configuration=configuration)

    # -- for the operator: the sync kubernetes client and Kopf ---------------------------------------

    def configuration(self) -> Any:
        """A `kubernetes.client.Configuration` for the same server (what the operator's ApiClient needs)."""
        from kubernetes import client

        if self._configuration is not None:
            return self._configuration
        configuration = client.Configuration()
        configuration.host = self.server
        return configuration

    def api_client(self) -> Any:
        """A `kubernetes.client.ApiClient`: sync, so call it from threads (Kopf's sync handlers), not
        from the event loop that runs the emulator."""
        from kubernetes import client

        return client.ApiClient(self.configuration())

    def connection_info(self, default_namespace: str | None = None) -> Any:
        """`kopf.ConnectionInfo` for this server, for a `@kopf.on.login` handler."""
        import kopf

        configuration = self._configuration
        if configuration is None:
            return kopf.ConnectionInfo(server=self.server, insecure=True, default_namespace=default_namespace)
        token = self._authorization()
        scheme, _, credentials = (token or "").partition(" ")
        return kopf.ConnectionInfo(
            server=configuration.host, ca_path=configuration.ssl_ca_cert, insecure=not configuration.verify_ssl,
            certificate_path=configuration.cert_file, private_key_path=configuration.key_file,
            scheme=scheme or None, token=credentials or None, default_namespace=default_namespace)

    # -- HTTP ------------------------------------------------------------------------------------------

    async def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout))
        return self._session

    @property
    def _tls(self) -> ssl.SSLContext | bool:
        """aiohttp's `ssl=`: the kubeconfig's context, or its default checks."""
        return self._ssl if self._ssl is not None else True

    def _credentials(self) -> dict[str, str]:
        token = self._authorization()
        return {"Authorization": token} if token else {}

    def _headers(self, content_type: str | None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        return headers | self._credentials()

    def as_this_client(self, headers: Mapping[str, str]) -> tuple[dict[str, str], ssl.SSLContext | bool]:
        """`headers` with this client's credentials in place of any others, and the TLS setting for
        aiohttp: what a proxy needs to forward someone else's request to this server as this client."""
        forwarded = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        return forwarded | self._credentials(), self._tls

    async def request(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                      body: Any = None, content_type: str = "application/json") -> Any:
        session = await self._ensure_session()
        query = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in (params or {}).items()
                 if v is not None}
        data = json.dumps(body) if body is not None else None
        async with session.request(method, self.server + path, params=query, data=data,
                                   headers=self._headers(content_type if body is not None else None),
                                   ssl=self._tls) as response:
            text = await response.text()
            try:
                data = await response.json(content_type=None) if text else None
            except ValueError:
                data = text
            if response.status >= 400:
                raise ApiError(response.status, data, method, path)
            return data

    async def watch(self, path: str, params: Mapping[str, Any] | None = None, *,
                    on_open: Callable[[], None] | None = None) -> AsyncIterator[Obj]:
        """The events of a watch request, until the server ends the stream; `on_open` is called once the
        server has accepted it (before any event)."""
        session = await self._ensure_session()
        query = {"watch": "true", **{k: str(v) for k, v in (params or {}).items() if v is not None}}
        async with session.get(self.server + path, params=query, headers=self._headers(None),
                               timeout=aiohttp.ClientTimeout(total=None, sock_read=None),
                               ssl=self._tls) as response:
            if response.status >= 400:
                raise ApiError(response.status, await response.json(content_type=None), "WATCH", path)
            if on_open is not None:
                on_open()
            async for line in response.content:
                if line.strip():
                    yield json.loads(line)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- resources -------------------------------------------------------------------------------------

    async def resolve(self, kind: str, api_version: str | None = None) -> tuple[str, str, bool]:
        """(apiVersion, plural, namespaced) of a kind, from the well-known ones or API discovery."""
        if (api_version, kind) in self._kinds:
            return self._kinds[api_version, kind]
        known = WELL_KNOWN.get(kind)
        if known is not None and api_version in (None, known[0]):
            return known
        versions = [api_version] if api_version else ["v1"] + [
            group["preferredVersion"]["groupVersion"] for group in (await self.request("GET", "/apis"))["groups"]]
        for version in versions:
            listing = await self.request("GET", f"/api/{version}" if "/" not in version else f"/apis/{version}")
            for resource in listing.get("resources", []):
                if resource.get("kind") == kind and "/" not in resource["name"]:
                    found = (version, resource["name"], bool(resource.get("namespaced")))
                    self._kinds[api_version, kind] = found
                    return found
        raise LookupError(f"the server does not serve the kind {kind} ({api_version or 'any version'})")

    @staticmethod
    def path(api_version: str, plural: str, namespace: str | None = None, name: str | None = None,
             subresource: str | None = None) -> str:
        base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
        parts = [base] + ([f"namespaces/{namespace}"] if namespace else []) + [plural]
        parts += [urllib.parse.quote(name)] if name else []
        parts += [subresource] if subresource else []
        return "/".join(parts)

    async def path_of(self, kind: str, namespace: str | None = None, name: str | None = None,
                      subresource: str | None = None, api_version: str | None = None) -> str:
        version, plural, namespaced = await self.resolve(kind, api_version)
        return self.path(version, plural, namespace if namespaced else None, name, subresource)

    async def get(self, kind: str, name: str, namespace: str | None = None, *,
                  api_version: str | None = None) -> Obj | None:
        """The object, or None if there is none."""
        try:
            return await self.request("GET", await self.path_of(kind, namespace, name, api_version=api_version))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def list(self, kind: str, namespace: str | None = None, *, label_selector: str | None = None,
                   field_selector: str | None = None, api_version: str | None = None) -> list[Obj]:
        listing = await self.request("GET", await self.path_of(kind, namespace, api_version=api_version),
                                     params={"labelSelector": label_selector, "fieldSelector": field_selector})
        return list(listing.get("items") or [])

    async def create(self, body: Obj, namespace: str | None = None) -> Obj:
        path = await self.path_of(body["kind"], namespace or body.get("metadata", {}).get("namespace"),
                                  api_version=body.get("apiVersion"))
        return await self.request("POST", path, body=body)

    async def patch(self, kind: str, name: str, body: Any, namespace: str | None = None, *,
                    subresource: str | None = None, content_type: str = MERGE_PATCH,
                    api_version: str | None = None) -> Obj:
        path = await self.path_of(kind, namespace, name, subresource, api_version=api_version)
        return await self.request("PATCH", path, body=body, content_type=content_type)

    async def delete(self, kind: str, name: str, namespace: str | None = None, *,
                     grace_period_seconds: int | None = None, propagation_policy: str | None = None,
                     uid: str | None = None, api_version: str | None = None) -> Obj | None:
        """Delete; None if it was already gone."""
        options: Obj = {"apiVersion": "v1", "kind": "DeleteOptions"}
        if grace_period_seconds is not None:
            options["gracePeriodSeconds"] = grace_period_seconds
        if propagation_policy:
            options["propagationPolicy"] = propagation_policy
        if uid:
            options["preconditions"] = {"uid": uid}
        try:
            return await self.request("DELETE", await self.path_of(kind, namespace, name, api_version=api_version),
                                      body=options)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise


# ---------------------------------------------------------------------------------------------------
# The kubelet


class ContainerConfigError(Exception):
    """What keeps a container from starting, as the kubelet reports it (reason, message)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(eq=False)
class PodRun:
    """One pod's process on this node."""

    name: str
    uid: str
    ip: str
    container: str
    log_path: Path
    termination_path: Path
    termination_policy: str
    grace: int
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    process: asyncio.subprocess.Process | None = None
    started_at: str = ""
    monitor: asyncio.Task[None] | None = None
    terminating: bool = False  # the pod is being deleted: finish the deletion after the exit
    lost: bool = False  # the node "died": report nothing
    exit_code: int | None = None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None


PASSTHROUGH = ("PATH", "HOME", "PYTHONPATH", "LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV")
PASSTHROUGH_PREFIXES = ("AWS_",)
DNS_NAME = re.compile(r"^(?P<host>[a-z0-9]([-a-z0-9]*[a-z0-9])?)\.(?P<sub>[a-z0-9]([-a-z0-9]*[a-z0-9])?)"
                      r"(\.(?P<ns>[a-z0-9]([-a-z0-9]*[a-z0-9])?)(\.svc(\.cluster\.local)?)?)?$")
VAR_REF = re.compile(r"\$\$|\$\(([-._a-zA-Z][-._a-zA-Z0-9]*)\)")


def expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: defined variables expand, `$$` escapes, others stay as they are."""
    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))
    return VAR_REF.sub(replace, value)


def tolerates(tolerations: Iterable[Obj], taint: Obj) -> bool:
    for toleration in tolerations:
        if toleration.get("effect") and toleration["effect"] != taint.get("effect"):
            continue
        if toleration.get("operator") == "Exists" and toleration.get("key") in (None, "", taint.get("key")):
            return True
        if toleration.get("key") == taint.get("key") and toleration.get("value", "") == taint.get("value", ""):
            return True
    return False


def pod_gpus(pod: Obj) -> int:
    total = 0
    for container in (pod.get("spec") or {}).get("containers") or []:
        resources = container.get("resources") or {}
        value = (resources.get("limits") or {}).get(GPU) or (resources.get("requests") or {}).get(GPU) or 0
        total += int(value)
    return total


NODE_LEASE_NAMESPACE = "kube-node-lease"
NODE_HEARTBEAT_SECONDS = 10.0


def node_manifest(name: str, *, gpus: int = 0, labels: Mapping[str, str] | None = None,
                  taints: list[Obj] | None = None, cpu: str = "16", memory: str = "64Gi") -> Obj:
    """A Ready Node played by the harness (`nvidia.com/gpu` allocatable if gpus > 0)."""
    resources = {"cpu": cpu, "memory": memory, "pods": "110"} | ({GPU: str(gpus)} if gpus else {})
    stamp = now()
    status = {"capacity": resources, "allocatable": resources,
              "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                              "lastHeartbeatTime": stamp, "lastTransitionTime": stamp}],
              "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": name}]}
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {EMULATED_NODE_LABEL: "true", "kubernetes.io/hostname": name,
                                                  **(labels or {})}},
            "spec": {"taints": taints} if taints else {}, "status": status}


async def register_node(client: KubeClient, name: str, **node: Any) -> Obj:
    """Create the Node (see `node_manifest`) and its Lease."""
    manifest = node_manifest(name, **node)
    await client.create(manifest)
    await renew_lease(client, name)
    # A real server drops the status of a created Node: it is set through the subresource.
    return await client.patch("Node", name, {"status": manifest["status"]}, subresource="status")


async def renew_lease(client: KubeClient, node: str) -> None:
    """The node's heartbeat: its Lease in kube-node-lease, created or renewed."""
    renewed = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    try:
        await client.patch("Lease", node, {"spec": {"renewTime": renewed}}, NODE_LEASE_NAMESPACE)
    except ApiError as exc:
        if exc.status != 404:
            raise
        try:
            await client.create({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                                 "metadata": {"name": node, "namespace": NODE_LEASE_NAMESPACE},
                                 "spec": {"holderIdentity": node, "leaseDurationSeconds": 40, "renewTime": renewed}})
        except ApiError as conflict:
            if conflict.status != 409:  # 409: a heartbeat created it meanwhile
                raise


async def wait_schedulable(client: KubeClient, name: str, timeout: float) -> None:
    """Until the Node has no `node.kubernetes.io/not-ready` taint (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        node = await client.get("Node", name) or {}
        taints = (node.get("spec") or {}).get("taints") or []
        if node and not any(t.get("key") == "node.kubernetes.io/not-ready" for t in taints):
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"node {name} still not schedulable after {timeout}s: taints {taints}")
        await asyncio.sleep(0.2)


#: The port each rendezvous address got (MASTER_ADDR, a pod IP here -> a free port), shared by the
#: kubelets of one test process so that every rank of a gang is told the same port.
_RENDEZVOUS_PORTS: dict[str, int] = {}
_RENDEZVOUS_LOCK = threading.Lock()


def _rendezvous_port(address: str) -> int:
    with _RENDEZVOUS_LOCK:
        if address not in _RENDEZVOUS_PORTS:
            with contextlib.closing(socket.socket()) as probe:
                probe.bind(("127.0.0.1", 0))
                _RENDEZVOUS_PORTS[address] = probe.getsockname()[1]
        return _RENDEZVOUS_PORTS[address]


class Kubelet:
    """Plays the node for the pods of `namespace` (see the module docstring).

    `workdir` holds per-pod logs (`logs/POD.log`), termination files and working directories.
    """

    def __init__(self, client: KubeClient, namespace: str, workdir: str | os.PathLike[str], *,
                 node_name: str = "kubeforge-kubelet", binds_pods: bool = True, poll_interval: float = 0.1,
                 kill_grace: float = 10.0, dns_wait: float = 60.0, python: str = sys.executable,
                 extra_env: Mapping[str, str] | None = None, cwd: str | os.PathLike[str] | None = None):
        self.client = client
        self.namespace = namespace
        self.workdir = Path(workdir)
        self.node_name = node_name
        self.binds_pods = binds_pods
        self.poll_interval = poll_interval
        self.kill_grace = kill_grace
        self.dns_wait = dns_wait
        self.python = python
        # One torch thread per pod unless told otherwise: every pod of a test shares this machine's few
        # cores, and two pods each spinning a thread per core slow each other down many times over.
        self.extra_env = {"OMP_NUM_THREADS": "1", **(extra_env or {})}
        self.cwd = Path(cwd) if cwd is not None else None
        self.runs: dict[str, PodRun] = {}  # by pod name: the latest run of that name
        self.errors: list[BaseException] = []  # failures of the harness itself (not of the pods)
        self._all_runs: list[PodRun] = []
        self._launching: dict[str, asyncio.Task[None]] = {}  # by pod uid
        self._finishing: set[str] = set()  # uids whose deletion we are completing
        self._ip_counter = 1
        self._loop_task: asyncio.Task[None] | None = None
        self._unschedulable: dict[str, str] = {}  # uid -> the message reported
        self._thread: LoopThread | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None

    # -- public ----------------------------------------------------------------------------------------

    async def start(self, *, threaded: bool = False) -> None:
        """Start polling; `threaded`: in an event loop of its own (immune to Kopf's stop, which cancels
        every task created in its loop while it ran). Its async methods work from any loop."""
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        if threaded:
            self._thread = LoopThread(f"kubelet {self.namespace}")
            self.client = self.client.clone()
            await self._thread.run(self._start())
        else:
            await self._start()

    async def _start(self) -> None:
        if not self.binds_pods:
            await self._register_node()
            self._heartbeat_task = asyncio.create_task(self._heartbeat(), name=f"heartbeat {self.node_name}")
        self._loop_task = asyncio.create_task(self._run(), name=f"kubelet {self.namespace}")

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop polling and kill every process (SIGTERM, then SIGKILL after `timeout`/2 seconds)."""
        if self._thread is None:
            await self._stop(timeout)
            return
        try:
            await self._thread.run(self._stop(timeout))
            await self._thread.run(self.client.close())
        finally:
            self._thread.close()

    async def _in_loop(self, coroutine: Coroutine[Any, Any, T]) -> T:
        if self._thread is None or asyncio.get_running_loop() is self._thread.loop:
            return await coroutine
        return await self._thread.run(coroutine)

    async def _stop(self, timeout: float) -> None:
        tasks = [t for t in [self._loop_task, self._heartbeat_task, *self._launching.values()] if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        alive = [run for run in self._all_runs if run.alive]
        for run in alive:
            run.lost = True  # nothing to report: the test is over
            self._signal(run, signal.SIGTERM)
        await self._wait_exit(alive, timeout / 2)
        for run in alive:
            if run.alive:
                self._signal(run, signal.SIGKILL)
        await self._wait_exit(alive, timeout / 2)
        monitors = [run.monitor for run in self._all_runs if run.monitor is not None]
        for monitor in monitors:
            monitor.cancel()
        for monitor in monitors:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await monitor
        if not self.binds_pods:  # its pods, if any are left, go with it (the pod GC deletes them)
            with contextlib.suppress(ApiError, aiohttp.ClientError):
                await self.client.delete("Node", self.node_name)
                await self.client.delete("Lease", self.node_name, NODE_LEASE_NAMESPACE)

    def log_path(self, pod_name: str) -> Path:
        return self.workdir / "logs" / f"{pod_name}.log"

    def logs(self, pod_name: str) -> str:
        """Everything the pod's process wrote (all runs of that pod name), or '' if it never ran."""
        path = self.log_path(pod_name)
        return path.read_text(errors="replace") if path.exists() else ""

    def all_logs(self) -> str:
        """Every pod's log, with headers: for a failing test's message."""
        return "\n".join(f"===== {path.stem} =====\n{path.read_text(errors='replace')[-20000:]}"
                         for path in sorted((self.workdir / "logs").glob("*.log")))

    def running(self) -> list[str]:
        return sorted(name for name, run in self.runs.items() if run.alive)

    async def kill(self, pod_name: str, sig: int = signal.SIGKILL, timeout: float = 10.0) -> None:
        """Send sig to the pod's process group (a crash, with SIGKILL) and wait for it to exit."""
        await self._in_loop(self._kill(pod_name, sig, timeout))

    async def _kill(self, pod_name: str, sig: int, timeout: float) -> None:
        run = self._run_of(pod_name)
        self._signal(run, sig)
        await self._wait_exit([run], timeout)

    async def lose_node(self, pod_name: str, timeout: float = 10.0) -> None:
        """The pod's node dies: its process is killed and the pod is removed without a final status."""
        await self._in_loop(self._lose_node(pod_name, timeout))

    async def _lose_node(self, pod_name: str, timeout: float) -> None:
        run = self._run_of(pod_name)
        run.lost = True
        self._signal(run, signal.SIGKILL)
        await self._wait_exit([run], timeout)
        await self.client.delete("Pod", pod_name, self.namespace, grace_period_seconds=0, uid=run.uid)

    async def wait_running(self, pod_name: str, timeout: float = 30.0) -> PodRun:
        """The pod's run once its process has started (bounded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.runs.get(pod_name)
            if run is not None and run.process is not None:
                return run
            await asyncio.sleep(0.05)
        raise AssertionError(f"pod {pod_name} did not start within {timeout}s; harness errors: {self.errors}")

    # -- the loop --------------------------------------------------------------------------------------

    def _run_of(self, pod_name: str) -> PodRun:
        run = self.runs.get(pod_name)
        if run is None or run.process is None:
            raise LookupError(f"pod {pod_name} has no process on this node (running: {self.running()})")
        return run

    async def _run(self) -> None:
        while True:
            try:
                await self._sync()
            except asyncio.CancelledError:
                raise
            except ApiError as exc:
                if exc.status >= 500 or exc.status == 404:  # transient, or the namespace is going away
                    log.debug("kubelet: %s", exc)
                else:
                    self.errors.append(exc)
                    log.exception("kubelet sync failed")
            except aiohttp.ClientError as exc:
                log.debug("kubelet: %s", exc)
            except Exception as exc:
                self.errors.append(exc)
                log.exception("kubelet sync failed")
            await asyncio.sleep(self.poll_interval)

    async def _sync(self) -> None:
        pods = await self.client.list("Pod", self.namespace)
        by_uid = {p["metadata"]["uid"]: p for p in pods}
        for run in self._all_runs:  # pods that vanished (force-deleted): stop their processes
            if run.uid not in by_uid and run.alive and not run.terminating:
                run.terminating = True
                self._spawn(self._terminate(run, 0))
        nodes: list[Obj] | None = None
        for pod in pods:
            meta, spec = pod["metadata"], pod.get("spec") or {}
            uid = meta["uid"]
            node = spec.get("nodeName")
            if not node and not self.binds_pods:
                continue  # the scheduler has yet to bind it
            if node and node != self.node_name:
                if nodes is None:
                    nodes = await self._nodes()
                if node not in {n["metadata"]["name"] for n in nodes}:
                    continue  # another kubelet's pod
            run = next((r for r in self._all_runs if r.uid == uid), None)
            if meta.get("deletionTimestamp"):
                if run is not None and run.alive and not run.terminating:
                    run.terminating = True
                    self._spawn(self._terminate(run, int(meta.get("deletionGracePeriodSeconds") or 0)))
                elif (run is None or not run.alive) and node and uid not in self._launching \
                        and uid not in self._finishing and (run is None or run.monitor is None or run.monitor.done()):
                    self._finishing.add(uid)
                    self._spawn(self._finish_deletion(meta["name"], uid))
                continue
            phase = (pod.get("status") or {}).get("phase")
            if run is not None or uid in self._launching or phase in ("Succeeded", "Failed"):
                continue
            if nodes is None:
                nodes = await self._nodes()
            self._launching[uid] = asyncio.create_task(self._launch(pod, pods, nodes), name=f"launch {meta['name']}")
            self._launching[uid].add_done_callback(lambda _, u=uid: self._launching.pop(u, None))

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._launching[f"task-{id(task)}"] = task
        task.add_done_callback(lambda t: self._launching.pop(f"task-{id(t)}", None))

    async def _nodes(self) -> list[Obj]:
        return await self.client.list("Node", label_selector=EMULATED_NODE_LABEL)

    # -- the node, on a real control plane ----------------------------------------------------------

    async def _register_node(self, timeout: float = 30.0) -> None:
        """Create this harness's Node, Ready, and wait until the scheduler may use it: the API server
        taints a new Node `node.kubernetes.io/not-ready` until the node-lifecycle controller has seen
        it Ready."""
        await register_node(self.client, self.node_name)
        await wait_schedulable(self.client, self.node_name, timeout)

    async def _heartbeat(self) -> None:
        """Renew the Lease of every Node this harness plays, as kubelets do every 10 s (the
        node-lifecycle controller calls a node unreachable after 40 s without one)."""
        while True:
            try:
                for node in {self.node_name, *(n["metadata"]["name"] for n in await self._nodes())}:
                    await renew_lease(self.client, node)
            except asyncio.CancelledError:
                raise
            except (ApiError, aiohttp.ClientError) as exc:
                log.debug("kubelet heartbeat: %s", exc)
            await asyncio.sleep(NODE_HEARTBEAT_SECONDS)

    # -- scheduling ------------------------------------------------------------------------------------

    def _schedule(self, pod: Obj, pods: list[Obj], nodes: list[Obj]) -> tuple[str | None, str]:
        """The node for pod, or (None, why not)."""
        if not nodes:
            return self.node_name, ""
        spec = pod.get("spec") or {}
        wanted = pod_gpus(pod)
        reasons: list[str] = []
        for node in sorted(nodes, key=lambda n: n["metadata"]["name"]):
            name = node["metadata"]["name"]
            labels = node["metadata"].get("labels") or {}
            if (node.get("spec") or {}).get("unschedulable"):
                reasons.append("node(s) were unschedulable")
                continue
            if any(labels.get(k) != v for k, v in (spec.get("nodeSelector") or {}).items()):
                reasons.append("node(s) didn't match Pod's node affinity/selector")
                continue
            taints = [t for t in (node.get("spec") or {}).get("taints") or []
                      if t.get("effect") in ("NoSchedule", "NoExecute")]
            if not all(tolerates(spec.get("tolerations") or [], t) for t in taints):
                reasons.append("node(s) had untolerated taint(s)")
                continue
            allocatable = int(((node.get("status") or {}).get("allocatable") or {}).get(GPU, 0))
            used = sum(pod_gpus(p) for p in pods if (p.get("spec") or {}).get("nodeName") == name
                       and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed"))
            if wanted and allocatable - used < wanted:
                reasons.append(f"Insufficient {GPU}")
                continue
            return name, ""
        counts: dict[str, int] = {}
        for reason in reasons:
            counts[reason] = counts.get(reason, 0) + 1
        detail = ", ".join(f"{n} {r}" for r, n in sorted(counts.items()))
        return None, f"0/{len(nodes)} nodes are available: {detail}."

    async def _launch(self, pod: Obj, pods: list[Obj], nodes: list[Obj]) -> None:
        meta = pod["metadata"]
        name, uid = meta["name"], meta["uid"]
        try:
            node = (pod.get("spec") or {}).get("nodeName")
            if not node:  # only with binds_pods: _sync skips unbound pods otherwise
                node, why = self._schedule(pod, pods, nodes)
                if node is None:
                    await self._report_unschedulable(pod, why)
                    return
                try:
                    await self.client.request("POST", KubeClient.path("v1", "pods", self.namespace, name, "binding"),
                                              body={"apiVersion": "v1", "kind": "Binding",
                                                    "metadata": {"name": name, "uid": uid},
                                                    "target": {"apiVersion": "v1", "kind": "Node", "name": node}})
                except ApiError as exc:
                    if exc.status in (404, 409):
                        return  # gone, or bound (or being deleted) meanwhile: the next sync sees it
                    raise
            pod = await self.client.get("Pod", name, self.namespace) or {}
            if pod.get("metadata", {}).get("uid") != uid or pod["metadata"].get("deletionTimestamp"):
                return
            await self._start_pod(pod)
        except asyncio.CancelledError:
            raise
        except ApiError as exc:
            if exc.status != 404:
                self.errors.append(exc)
                log.exception("kubelet: starting pod %s failed", name)
        except Exception as exc:
            self.errors.append(exc)
            log.exception("kubelet: starting pod %s failed", name)

    async def _report_unschedulable(self, pod: Obj, why: str) -> None:
        uid = pod["metadata"]["uid"]
        if self._unschedulable.get(uid) == why:
            return
        self._unschedulable[uid] = why
        condition = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": why,
                     "lastTransitionTime": now(), "lastProbeTime": None}
        await self._patch_status(pod["metadata"]["name"], uid, {"phase": "Pending", "conditions": [condition]})

    # -- running ---------------------------------------------------------------------------------------

    def _next_ip(self) -> str:
        self._ip_counter += 1
        high, low = divmod(self._ip_counter - 2, 253)
        return f"127.0.{high}.{low + 2}"

    async def _start_pod(self, pod: Obj) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        name, uid = meta["name"], meta["uid"]
        containers = spec.get("containers") or []
        container = next((c for c in containers if c.get("name") == "trainer"), containers[0])
        ip = self._next_ip()
        self.log_path(name).parent.mkdir(parents=True, exist_ok=True)
        pod_dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.workdir))
        run = PodRun(name=name, uid=uid, ip=ip, container=container["name"], log_path=self.log_path(name),
                     termination_path=pod_dir / "termination-log",
                     termination_policy=container.get("terminationMessagePolicy", "File"),
                     grace=int(spec.get("terminationGracePeriodSeconds", 30)))
        run.termination_path.touch()
        self.runs[name] = run
        self._all_runs.append(run)
        started = now()
        base_status = {"hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}], "podIP": ip, "podIPs": [{"ip": ip}],
                       "startTime": started}
        waiting = {"containerStatuses": [self._container_status(container, {"waiting": {
            "reason": "ContainerCreating"}})]}
        await self._patch_status(name, uid, {"phase": "Pending", **base_status, **waiting,
                                             "conditions": self._conditions(ready=False, reason="ContainersNotReady")})
        deadline = time.monotonic() + self.dns_wait
        while True:
            try:
                env = await self._environment(pod, container, ip, deadline)
                break
            except ContainerConfigError as exc:
                await self._patch_status(name, uid, {"containerStatuses": [self._container_status(container, {
                    "waiting": {"reason": exc.reason, "message": str(exc)}})]})
                await asyncio.sleep(max(self.poll_interval, 0.5))
                current = await self.client.get("Pod", name, self.namespace)
                if current is None or current["metadata"]["uid"] != uid or current["metadata"].get("deletionTimestamp"):
                    run.exit_code = None
                    return  # deleted while waiting: the sync loop finishes the deletion
        try:
            run.argv = self._argv(container, env, run.termination_path)
        except ContainerConfigError as exc:
            await self._patch_status(name, uid, {"containerStatuses": [self._container_status(container, {
                "waiting": {"reason": exc.reason, "message": str(exc)}})]})
            return
        run.env = env
        cwd = self.cwd or pod_dir / "work"
        cwd.mkdir(parents=True, exist_ok=True)
        with run.log_path.open("ab") as log_file:
            log_file.write(f"----- {now()} kubelet: starting pod {name} ({uid}) at {ip}: {run.argv}\n".encode())
            log_file.flush()
            try:
                run.process = await asyncio.create_subprocess_exec(
                    *run.argv, stdout=log_file, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL,
                    env=env, cwd=cwd, start_new_session=True)
            except OSError as exc:
                log_file.write(f"kubelet: cannot start {run.argv[0]}: {exc}\n".encode())
                run.exit_code = 128
                await self._report_exit(run, container, started, message=str(exc), reason="StartError")
                return
        run.started_at = now()
        run.monitor = asyncio.create_task(self._monitor(run, container), name=f"monitor {name}")
        running = {"running": {"startedAt": run.started_at}}
        await self._patch_status(name, uid, {"phase": "Running", **base_status,
                                             "conditions": self._conditions(ready=True),
                                             "containerStatuses": [self._container_status(container, running,
                                                                                          ready=True, pid=run)]})

    def _argv(self, container: Obj, env: Mapping[str, str], termination_path: Path) -> list[str]:
        argv = [expand(a, env) for a in [*(container.get("command") or []), *(container.get("args") or [])]]
        if not argv:
            raise ContainerConfigError("CreateContainerError", "the emulated kubelet needs a command: it runs no "
                                                               "image entrypoints")
        if argv[0] == "kubeforge":
            argv = [self.python, "-m", "kubeforge", *argv[1:]]
        elif re.fullmatch(r"python(3(\.\d+)?)?", os.path.basename(argv[0])):
            argv = [self.python, *argv[1:]]
        path = container.get("terminationMessagePath", "/dev/termination-log")
        return [str(termination_path) if a == path else a.replace(f"={path}", f"={termination_path}")
                if a.endswith(f"={path}") else a for a in argv]

    @staticmethod
    def _conditions(ready: bool, reason: str | None = None) -> list[Obj]:
        stamp = now()
        conditions = [{"type": t, "status": "True", "lastTransitionTime": stamp, "lastProbeTime": None}
                      for t in ("PodScheduled", "Initialized")]
        for kind in ("ContainersReady", "Ready"):
            condition: Obj = {"type": kind, "status": "True" if ready else "False", "lastTransitionTime": stamp,
                              "lastProbeTime": None}
            if reason:
                condition["reason"] = reason
            conditions.append(condition)
        return conditions

    @staticmethod
    def _container_status(container: Obj, state: Obj, ready: bool = False, pid: PodRun | None = None) -> Obj:
        status = {"name": container["name"], "image": container.get("image", ""), "imageID": "",
                  "state": state, "lastState": {}, "ready": ready, "restartCount": 0,
                  "started": "running" in state}
        if pid is not None and pid.process is not None:
            status["containerID"] = f"emulated://{pid.process.pid}"
        return status

    async def _monitor(self, run: PodRun, container: Obj) -> None:
        assert run.process is not None
        code = await run.process.wait()
        run.exit_code = 128 - code if code < 0 else code  # killed by signal N: 128+N, as a runtime reports
        if run.lost:
            return
        try:
            await self._report_exit(run, container, run.started_at)
            if run.terminating:
                await self._finish_deletion(run.name, run.uid)
        except ApiError as exc:
            if exc.status != 404:
                self.errors.append(exc)
        except aiohttp.ClientError as exc:
            log.debug("kubelet: %s", exc)

    def _termination_message(self, run: PodRun) -> str:
        try:
            message = run.termination_path.read_bytes()[:4096].decode(errors="replace")
        except OSError:
            message = ""
        if not message.strip() and run.termination_policy == "FallbackToLogsOnError" and run.exit_code:
            # As a kubelet: the log's tail, at most 2048 bytes or 80 lines, whichever is smaller.
            with contextlib.suppress(OSError):
                tail = run.log_path.read_bytes()[-2048:].decode(errors="replace")
                message = "\n".join(tail.splitlines()[-80:])
        return message

    async def _report_exit(self, run: PodRun, container: Obj, started: str, *, message: str | None = None,
                           reason: str | None = None) -> None:
        code = run.exit_code or 0
        terminated: Obj = {"exitCode": code, "reason": reason or ("Completed" if code == 0 else "Error"),
                           "startedAt": started or now(), "finishedAt": now()}
        message = self._termination_message(run) if message is None else message
        if message:
            terminated["message"] = message
        if run.process is not None:
            terminated["containerID"] = f"emulated://{run.process.pid}"
        status = {"phase": "Succeeded" if code == 0 else "Failed",
                  "conditions": self._conditions(ready=False, reason="PodCompleted" if code == 0 else "PodFailed"),
                  "containerStatuses": [self._container_status(container, {"terminated": terminated})]}
        await self._patch_status(run.name, run.uid, status)

    async def _patch_status(self, name: str, uid: str, status: Obj) -> None:
        """Patch the status of the pod `name` only while it is still the pod `uid`: the uid in the patch
        is its precondition. A pod replaced under the same name refuses it: 409 from the emulator, 422
        (`metadata.uid: field is immutable`) from a real API server. Either way the run is over."""
        try:
            await self.client.patch("Pod", name, {"metadata": {"uid": uid}, "status": status}, self.namespace,
                                    subresource="status")
        except ApiError as exc:
            replaced = exc.status == 422 and "metadata.uid" in exc.message
            if exc.status not in (404, 409) and not replaced:
                raise

    # -- stopping --------------------------------------------------------------------------------------

    def _signal(self, run: PodRun, sig: int) -> None:
        if run.alive and run.process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(run.process.pid, sig)

    @staticmethod
    async def _wait_exit(runs: list[PodRun], timeout: float) -> None:
        waits = [asyncio.create_task(r.process.wait()) for r in runs if r.process is not None and r.alive]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=timeout)
            for task in pending:
                task.cancel()

    async def _terminate(self, run: PodRun, grace: int) -> None:
        """SIGTERM, then SIGKILL after the grace period (bounded by kill_grace); the monitor reports."""
        self._signal(run, signal.SIGTERM)
        await self._wait_exit([run], min(float(grace), self.kill_grace))
        if run.alive:
            self._signal(run, signal.SIGKILL)
            await self._wait_exit([run], self.kill_grace)

    async def _finish_deletion(self, name: str, uid: str) -> None:
        """The kubelet's last word on a terminating pod: delete it with no grace period left."""
        try:
            await self.client.delete("Pod", name, self.namespace, grace_period_seconds=0, uid=uid)
        except ApiError as exc:
            if exc.status not in (404, 409):  # gone, or a new pod of that name
                raise
        finally:
            self._finishing.discard(uid)

    # -- the environment -------------------------------------------------------------------------------

    async def _environment(self, pod: Obj, container: Obj, ip: str, deadline: float) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if k in PASSTHROUGH or k.startswith(PASSTHROUGH_PREFIXES)}
        base |= self.extra_env
        spec = pod["spec"]
        env: dict[str, str] = {"HOSTNAME": spec.get("hostname") or pod["metadata"]["name"]}
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "secretRef" in source:
                data = await self._secret(source["secretRef"].get("name", ""), source["secretRef"].get("optional"))
            else:
                data = await self._config_map(source.get("configMapRef", {}).get("name", ""),
                                              source.get("configMapRef", {}).get("optional"))
            env |= {prefix + k: v for k, v in (data or {}).items()}
        for var in container.get("env") or []:
            if "valueFrom" not in var:
                value = expand(var.get("value", ""), env)
                env[var["name"]] = await self._resolve_dns(value, pod, deadline)
                continue
            value_from = var["valueFrom"]
            if "fieldRef" in value_from:
                env[var["name"]] = self._field(pod, value_from["fieldRef"]["fieldPath"], ip)
            elif "secretKeyRef" in value_from or "configMapKeyRef" in value_from:
                ref = value_from.get("secretKeyRef") or value_from["configMapKeyRef"]
                data = await (self._secret if "secretKeyRef" in value_from else self._config_map)(
                    ref["name"], ref.get("optional"))
                if data is None:
                    continue
                if ref["key"] not in data:
                    if ref.get("optional"):
                        continue
                    what = "secret" if "secretKeyRef" in value_from else "configmap"
                    raise ContainerConfigError("CreateContainerConfigError",
                                               f"couldn't find key {ref['key']} in {what.capitalize()} "
                                               f"{self.namespace}/{ref['name']}")
                env[var["name"]] = data[ref["key"]]
            elif "resourceFieldRef" in value_from:
                env[var["name"]] = "0"
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        if "MASTER_PORT" in env and "MASTER_ADDR" in env:
            env["MASTER_PORT"] = str(_rendezvous_port(env["MASTER_ADDR"]))
        return {**base, **env}

    @staticmethod
    def _field(pod: Obj, path: str, ip: str) -> str:
        meta, spec = pod["metadata"], pod["spec"]
        match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
        if match:
            return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
        values = {"metadata.name": meta["name"], "metadata.namespace": meta.get("namespace", ""),
                  "metadata.uid": meta["uid"], "spec.nodeName": spec.get("nodeName", ""),
                  "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
                  "status.hostIP": "127.0.0.1", "status.hostIPs": "127.0.0.1", "status.podIP": ip,
                  "status.podIPs": ip}
        return values.get(path, "")

    async def _secret(self, name: str, optional: bool | None) -> dict[str, str] | None:
        import base64

        secret = await self.client.get("Secret", name, self.namespace)
        if secret is None:
            if optional:
                return None
            raise ContainerConfigError("CreateContainerConfigError", f'secret "{name}" not found')
        return {k: base64.b64decode(v).decode(errors="replace") for k, v in (secret.get("data") or {}).items()}

    async def _config_map(self, name: str, optional: bool | None) -> dict[str, str] | None:
        config_map = await self.client.get("ConfigMap", name, self.namespace)
        if config_map is None:
            if optional:
                return None
            raise ContainerConfigError("CreateContainerConfigError", f'configmap "{name}" not found')
        return dict(config_map.get("data") or {})

    async def _resolve_dns(self, value: str, pod: Obj, deadline: float) -> str:
        """`HOST.SUBDOMAIN[.NS[.svc[.cluster.local]]]` -> the IP of that pod, if a headless Service makes
        it a DNS name; waits (until deadline) for the pod to have an IP. Other values are unchanged."""
        match = DNS_NAME.match(value)
        if not match or (match["ns"] or self.namespace) != self.namespace:
            return value
        service = await self.client.get("Service", match["sub"], self.namespace)
        if service is None or (service.get("spec") or {}).get("clusterIP") != "None":
            return value
        selector = (service.get("spec") or {}).get("selector") or {}
        while True:
            candidates = [p for p in await self.client.list("Pod", self.namespace)
                          if (p.get("spec") or {}).get("hostname") == match["host"]
                          and (p.get("spec") or {}).get("subdomain") == match["sub"]
                          and all((p["metadata"].get("labels") or {}).get(k) == v for k, v in selector.items())
                          and (p.get("status") or {}).get("podIP")
                          and not p["metadata"].get("deletionTimestamp")
                          and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")]
            if candidates:
                newest = max(candidates, key=lambda p: (p["metadata"].get("creationTimestamp", ""),
                                                        int(p["metadata"].get("resourceVersion", 0))))
                return str(newest["status"]["podIP"])
            if time.monotonic() >= deadline:
                log.warning("kubelet: %s did not resolve within %ss; passing it on as it is", value, self.dns_wait)
                return value
            await asyncio.sleep(max(self.poll_interval, 0.1))
