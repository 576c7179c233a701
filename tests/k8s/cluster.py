"""pytest fixtures for end-to-end tests: a `cluster` (the emulator, or a real cluster) and a `kubelet`.

Register them for the suite with `pytest_plugins = ["k8s.cluster"]` in tests/conftest.py.

- `cluster`: with `KUBEFORGE_E2E_KUBECONFIG` set, the cluster of that kubeconfig (its current
  context): our CRDs are applied if missing, a fresh namespace is created and deleted afterwards.
  Otherwise an `Emulator` on 127.0.0.1 with a namespace `kubeforge-e2e`. Either way a `Cluster`.
- `kubelet`: the `Kubelet` harness for the cluster's namespace; None on a real cluster that has
  schedulable nodes of its own (its kubelets run the pods).
- `emulator`: a bare running `Emulator` (no namespace, no client), for tests of the emulator.

Every helper is async: the emulator serves from the test's own event loop, so a blocking call
from that loop would deadlock. The operator's sync kubernetes client (`cluster.api_client()`) is fine
from Kopf's sync handlers, which run in threads. Run Kopf inside the test body, with
`async with running_operator(registry, cluster): ...`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import pytest_asyncio
import yaml

from k8s.emulator import CRD_DIR, Emulator, serve
from k8s.kubelet import EMULATED_NODE_LABEL, GPU, MERGE_PATCH, ApiError, KubeClient, Kubelet, LoopThread

log = logging.getLogger(__name__)

KUBECONFIG_ENV = "KUBEFORGE_E2E_KUBECONFIG"
EMULATED_NAMESPACE = "kubeforge-e2e"

Obj = dict[str, Any]


class Cluster:
    """One API server and one test namespace, with the few helpers end-to-end tests need."""

    def __init__(self, client: KubeClient, namespace: str, *, emulator: Emulator | None = None,
                 kubeconfig: str | None = None):
        self.client = client
        self.namespace = namespace
        self.emulator = emulator
        self.kubeconfig = kubeconfig
        self.kubelet: Kubelet | None = None  # set by the kubelet fixture: its logs go into timeouts
        self._nodes: list[str] = []

    @property
    def real(self) -> bool:
        return self.emulator is None

    @property
    def url(self) -> str:
        """The API server's base URL."""
        return self.client.server

    # -- for the operator ------------------------------------------------------------------------------

    def configuration(self) -> Any:
        """`kubernetes.client.Configuration` for this cluster."""
        return self.client.configuration()

    def api_client(self) -> Any:
        """A sync `kubernetes.client.ApiClient` for this cluster (for the operator's `create_registry`)."""
        return self.client.api_client()

    def connection_info(self) -> Any:
        """`kopf.ConnectionInfo` for this cluster."""
        return self.client.connection_info(default_namespace=self.namespace)

    @property
    def login(self) -> Callable[..., Any]:
        """A `@kopf.on.login` handler: `create_registry(..., login=cluster.login)`."""
        def login(**_: Any) -> Any:
            return self.connection_info()
        return login

    # -- objects ---------------------------------------------------------------------------------------

    async def apply(self, manifest: Obj | Iterable[Obj] | str | Path) -> list[Obj]:
        """Create each object (in the test namespace if namespaced and none given); patch it if it
        exists (strategic merge, or merge for custom resources), roughly as `kubectl apply` does.
        A manifest: a dict, dicts, YAML text or a YAML file."""
        if isinstance(manifest, Path):
            manifest = manifest.read_text()
        if isinstance(manifest, str):
            documents = [d for d in yaml.safe_load_all(manifest) if d]
        elif isinstance(manifest, dict):
            documents = [manifest]
        else:
            documents = list(manifest)
        applied = []
        for document in documents:
            body = dict(document)
            version, _, namespaced = await self.client.resolve(body["kind"], body.get("apiVersion"))
            body["metadata"] = dict(body.get("metadata") or {})
            if namespaced:
                body["metadata"].setdefault("namespace", self.namespace)
            try:
                applied.append(await self.client.create(body))
            except ApiError as exc:
                if exc.status != 409:
                    raise
                patch = {k: v for k, v in body.items() if k not in ("status", "apiVersion", "kind")}
                where = (body["kind"], body["metadata"]["name"], patch, body["metadata"].get("namespace"))
                try:  # built-in kinds: lists merge by key, as kubectl's patches do
                    applied.append(await self.client.patch(*where, api_version=version,
                                                           content_type="application/strategic-merge-patch+json"))
                except ApiError as unsupported:
                    if unsupported.status != 415:
                        raise
                    applied.append(await self.client.patch(*where, api_version=version))
        return applied

    async def get(self, kind: str, name: str, *, namespace: str | None = None) -> Obj | None:
        """The object (in the test namespace if namespaced), or None."""
        return await self.client.get(kind, name, namespace or self.namespace)

    async def list(self, kind: str, selector: str | dict[str, str] | None = None, *,
                   field_selector: str | None = None) -> list[Obj]:
        return await self.client.list(kind, self.namespace, label_selector=_selector(selector),
                                      field_selector=field_selector)

    async def list_pods(self, selector: str | dict[str, str] | None = None) -> list[Obj]:
        """The test namespace's pods matching a label selector (`a=b,c` or {"a": "b"}), by name."""
        pods = await self.list("Pod", selector)
        return sorted(pods, key=lambda p: p["metadata"]["name"])

    async def delete(self, kind: str, name: str, *, propagation: str = "Background",
                     grace_period_seconds: int | None = None) -> Obj | None:
        """Delete (None if it was not there); the object may linger while finalizers/kubelets finish."""
        return await self.client.delete(kind, name, self.namespace, propagation_policy=propagation,
                                        grace_period_seconds=grace_period_seconds)

    async def patch(self, kind: str, name: str, body: Any, *, subresource: str | None = None,
                    content_type: str = MERGE_PATCH) -> Obj:
        """Merge-patch (by default) the object, or its `status` with subresource="status"."""
        return await self.client.patch(kind, name, body, self.namespace, subresource=subresource,
                                       content_type=content_type)

    async def events(self, name: str | None = None) -> list[Obj]:
        """Events in the test namespace, about the object `name` if given, oldest first."""
        selector = f"involvedObject.name={name}" if name else None
        events = await self.client.list("Event", self.namespace, field_selector=selector)
        return sorted(events, key=lambda e: (e.get("lastTimestamp") or e.get("eventTime") or "",
                                             int(e["metadata"].get("resourceVersion", 0))))

    async def add_node(self, name: str, gpus: int = 0, *, labels: dict[str, str] | None = None,
                       taints: list[Obj] | None = None, cpu: str = "16", memory: str = "64Gi") -> Obj:
        """A Node the kubelet harness plays, with `nvidia.com/gpu` allocatable if gpus > 0.
        (On a real cluster it is deleted after the test.)"""
        resources = {"cpu": cpu, "memory": memory, "pods": "110"} | ({GPU: str(gpus)} if gpus else {})
        status = {"capacity": resources, "allocatable": resources,
                  "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
                  "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                                {"type": "Hostname", "address": name}]}
        node = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": {EMULATED_NODE_LABEL: "true", "kubernetes.io/hostname": name,
                                                      **(labels or {})}},
                "spec": {"taints": taints} if taints else {}, "status": status}
        await self.client.create(node)
        self._nodes.append(name)
        # Real servers may drop the status of a new node: set it through the subresource too.
        return await self.client.patch("Node", name, {"status": status}, subresource="status")

    async def create_secret(self, name: str, data: dict[str, str | bytes]) -> Obj:
        """An Opaque Secret in the test namespace (values as text or bytes; sent base64 as `data`)."""
        import base64

        encoded = {k: base64.b64encode(v if isinstance(v, bytes) else v.encode()).decode() for k, v in data.items()}
        return await self.client.create({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                                         "metadata": {"name": name, "namespace": self.namespace}, "data": encoded})

    async def wait_for(self, predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
        """Poll predicate (sync or async) until it returns something truthy, and return that; after
        timeout seconds fail the test naming `what`, with the namespace's pods and their logs."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            value = predicate()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
            if asyncio.get_running_loop().time() >= deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{await self.describe()}")
            await asyncio.sleep(interval)

    async def describe(self) -> str:
        """The namespace's pods (phase, exit codes) and the kubelet's logs: a failing test's context."""
        lines = []
        try:
            for pod in await self.list_pods():
                status = pod.get("status") or {}
                states = [s.get("state") for s in status.get("containerStatuses") or []]
                deleting = " (deleting)" if pod["metadata"].get("deletionTimestamp") else ""
                lines.append(f"pod {pod['metadata']['name']}{deleting}: {status.get('phase')} {states}")
        except Exception as exc:  # diagnostics must not hide the failure they describe
            lines.append(f"(cannot list pods: {exc!r})")
        if self.kubelet is not None:
            lines.append(self.kubelet.all_logs()[-8000:])
            if self.kubelet.errors:
                lines.append(f"kubelet harness errors: {self.kubelet.errors!r}")
        return "\n".join(lines)

    async def has_schedulable_nodes(self) -> bool:
        """Whether nodes of the cluster's own (not ours) can run pods: Ready, schedulable, untainted."""
        for node in await self.client.list("Node"):
            labels = node["metadata"].get("labels") or {}
            spec, status = node.get("spec") or {}, node.get("status") or {}
            ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
            tainted = any(t.get("effect") in ("NoSchedule", "NoExecute") for t in spec.get("taints") or [])
            if ready and not spec.get("unschedulable") and not tainted and EMULATED_NODE_LABEL not in labels:
                return True
        return False

    async def _cleanup_nodes(self) -> None:
        for name in self._nodes:
            with contextlib.suppress(ApiError):
                await self.client.delete("Node", name)


def _selector(selector: str | dict[str, str] | None) -> str | None:
    if isinstance(selector, dict):
        return ",".join(f"{k}={v}" for k, v in selector.items())
    return selector


# ---------------------------------------------------------------------------------------------------
# Setting up and tearing down


@contextlib.asynccontextmanager
async def threaded_emulator() -> AsyncIterator[Emulator]:
    """An emulator served from a thread of its own (see `LoopThread`): the test's loop runs Kopf."""
    thread = LoopThread("emulator")
    test_loop = asyncio.get_running_loop()
    started: asyncio.Future[tuple[Emulator, asyncio.Event]] = test_loop.create_future()

    async def hold() -> None:
        stop = asyncio.Event()
        async with serve() as running:
            test_loop.call_soon_threadsafe(started.set_result, (running, stop))
            await stop.wait()

    serving = asyncio.wrap_future(thread.submit(hold()))
    try:
        await asyncio.wait([started, serving], timeout=30, return_when=asyncio.FIRST_COMPLETED)
        if not started.done():
            if serving.done():
                serving.result()  # raises why it could not start
            raise AssertionError("the emulator did not start within 30s")
        emulator, stop = started.result()
        try:
            yield emulator
        finally:
            thread.loop.call_soon_threadsafe(stop.set)
            await serving  # raises the emulator's internal errors, if any
    finally:
        thread.close()


@contextlib.asynccontextmanager
async def emulated_cluster(namespace: str = EMULATED_NAMESPACE) -> AsyncIterator[Cluster]:
    async with threaded_emulator() as emulator:
        client = KubeClient.from_url(emulator.api_url)
        try:
            await client.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
            yield Cluster(client, namespace, emulator=emulator)
        finally:
            await client.close()


async def ensure_crds(client: KubeClient, timeout: float = 60.0) -> None:
    """Apply crds/ where the cluster lacks them and wait until they are Established."""
    names = []
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        names.append(crd["metadata"]["name"])
        if await client.get("CustomResourceDefinition", crd["metadata"]["name"]) is None:
            await client.create(crd)
    deadline = asyncio.get_running_loop().time() + timeout
    for name in names:
        while True:
            crd = await client.get("CustomResourceDefinition", name) or {}
            conditions = (crd.get("status") or {}).get("conditions") or []
            if any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions):
                break
            if asyncio.get_running_loop().time() >= deadline:
                raise AssertionError(f"CRD {name} not Established within {timeout}s")
            await asyncio.sleep(0.5)


@contextlib.asynccontextmanager
async def real_cluster(kubeconfig: str) -> AsyncIterator[Cluster]:
    client = KubeClient.from_kubeconfig(kubeconfig)
    namespace = f"kf-e2e-{uuid.uuid4().hex[:8]}"
    cluster = Cluster(client, namespace, kubeconfig=kubeconfig)
    try:
        await ensure_crds(client)
        metadata = {"name": namespace, "labels": {"kubeforge.io/e2e": "true"}}
        await client.create({"apiVersion": "v1", "kind": "Namespace", "metadata": metadata})
        yield cluster
    finally:
        with contextlib.suppress(Exception):
            await client.delete("Namespace", namespace, propagation_policy="Background")
        await cluster._cleanup_nodes()
        await client.close()


@contextlib.asynccontextmanager
async def running_operator(registry: Any, cluster: Cluster | None = None, *, settings: Any = None,
                           ready_timeout: float = 30.0, stop_timeout: float = 30.0
                           ) -> AsyncIterator[asyncio.Task[None]]:
    """Kopf with `registry`, cluster-wide and standalone, in the current task's event loop.

    Use it inside the test body (Kopf cancels tasks created after it started, so a fixture's
    teardown cannot stop it). `settings`: a `kopf.OperatorSettings` (default: quick back-offs and
    watch reconnects, as tests want); the registry's startup handlers may change it further.
    With `cluster`, the registry gets a login handler for it (for registries that have none).
    """
    import kopf

    if settings is None:
        settings = kopf.OperatorSettings()
        settings.execution.default_backoff = 0.5
        settings.watching.server_timeout = 30
    if cluster is not None:
        kopf.on.login(registry=registry)(cluster.login)
    stop_flag: asyncio.Event = asyncio.Event()
    ready_flag: asyncio.Event = asyncio.Event()
    task = asyncio.create_task(kopf.operator(registry=registry, settings=settings, clusterwide=True, standalone=True,
                                             stop_flag=stop_flag, ready_flag=ready_flag), name="kopf operator")
    try:
        done, _ = await asyncio.wait([task, asyncio.create_task(ready_flag.wait())], timeout=ready_timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()  # it failed to start: raise why
            raise AssertionError("the operator exited before it was ready")
        if not ready_flag.is_set():
            raise AssertionError(f"the operator was not ready within {ready_timeout}s")
        yield task
    finally:
        stop_flag.set()
        try:
            await asyncio.wait_for(task, stop_timeout)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            log.warning("the operator did not stop within %ss: cancelled", stop_timeout)


# ---------------------------------------------------------------------------------------------------
# Fixtures


@pytest_asyncio.fixture
async def emulator() -> AsyncIterator[Emulator]:
    """A running `Emulator` (serving at `emulator.api_url`)."""
    async with serve() as running:
        yield running


@pytest_asyncio.fixture
async def cluster() -> AsyncIterator[Cluster]:
    """The emulator, or the cluster of $KUBEFORGE_E2E_KUBECONFIG, with a fresh test namespace."""
    kubeconfig = os.environ.get(KUBECONFIG_ENV)
    if kubeconfig:
        async with real_cluster(kubeconfig) as real:
            yield real
    else:
        async with emulated_cluster() as emulated:
            yield emulated


@pytest_asyncio.fixture
async def kubelet(cluster: Cluster, tmp_path: Path) -> AsyncIterator[Kubelet | None]:
    """The harness for the test namespace (None on a real cluster whose own nodes run pods)."""
    if cluster.real and await cluster.has_schedulable_nodes():
        yield None
        return
    harness = Kubelet(cluster.client, cluster.namespace, tmp_path / "kubelet")
    await harness.start(threaded=True)
    cluster.kubelet = harness
    try:
        yield harness
    finally:
        await harness.stop()
        cluster.kubelet = None
    if harness.errors:
        raise AssertionError(f"the kubelet harness failed ({len(harness.errors)}x): {harness.errors!r}")

