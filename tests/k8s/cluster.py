"""pytest fixtures for end-to-end tests: a `cluster` (the emulator, or a real cluster) and a `kubelet`.

Register them for the suite with `pytest_plugins = ["k8s.cluster"]` in tests/conftest.py.

Which cluster, for the whole session (`pytest --cluster=...`, or `KUBEFORGE_E2E_CLUSTER`):
- `emulator` (the default): an `Emulator` on 127.0.0.1 per test, with a namespace `kubeforge-e2e`;
- `real`: the real control plane of `../shared/realk8s` next to the repository (or the folder in
  `KUBEFORGE_REALK8S`), started for the session with its up.sh and stopped with its down.sh. Only the
  tests that take the `cluster` fixture run (the others do not depend on a cluster); tests marked
  `emulator_only("why")` are skipped, saying why (and those marked `real_only("why")` on the
  emulator). Without that folder they are skipped, saying so, unless `KUBEFORGE_REALK8S_REQUIRED=1`
  (CI), which fails the session instead;
- `node`: the control plane of `real` with the real node of its node-up.sh (kubelet, containerd):
  only the tests marked `node` (tests/node/) run, each in pods of kubeforge's own images, under the
  chart as installed with its kind values (support.node). Those tests run in no other mode.
- `KUBEFORGE_E2E_KUBECONFIG=PATH` (with either): the cluster of that kubeconfig, as it is.
On a real cluster our CRDs are applied if missing, and each test gets a fresh namespace, deleted
afterwards. Either way the fixture is a `Cluster`.
- `kubelet`: the `Kubelet` harness for the cluster's namespace; None on a real cluster that has
  schedulable nodes of its own (its kubelets run the pods). On a real control plane it registers a
  Node of its own and lets the scheduler bind.
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
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml

from k8s.admission import CRD_DIR
from k8s.emulator import Emulator, serve
from k8s.kubelet import (
    EMULATED_NODE_LABEL,
    MERGE_PATCH,
    NODE_LEASE_NAMESPACE,
    ApiError,
    KubeClient,
    Kubelet,
    LoopThread,
    register_node,
    wait_schedulable,
)

log = logging.getLogger(__name__)

KUBECONFIG_ENV = "KUBEFORGE_E2E_KUBECONFIG"
CLUSTER_ENV = "KUBEFORGE_E2E_CLUSTER"
REALK8S_ENV = "KUBEFORGE_REALK8S"
REALK8S_REQUIRED_ENV = "KUBEFORGE_REALK8S_REQUIRED"
EMULATED_NAMESPACE = "kubeforge-e2e"
ROOT = Path(__file__).resolve().parents[2]

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
        """A Node the kubelet harness plays, with `nvidia.com/gpu` allocatable if gpus > 0, once the
        scheduler may use it. (Deleted after the test; on a real cluster the harness keeps it alive.)"""
        self._nodes.append(name)
        node = await register_node(self.client, name, gpus=gpus, labels=labels, taints=taints, cpu=cpu,
                                   memory=memory)
        await wait_schedulable(self.client, name, timeout=30)
        return node

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
                await self.client.delete("Lease", name, NODE_LEASE_NAMESPACE)


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


async def ensure_crds(client: KubeClient, crds: Iterable[Obj] | None = None, timeout: float = 60.0) -> None:
    """Apply the CRDs (default: those of crds/) where the cluster lacks them and wait until they are
    Established."""
    if crds is None:
        crds = [yaml.safe_load(path.read_text()) for path in sorted(CRD_DIR.glob("*.yaml"))]
    names = []
    for crd in crds:
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
# The session's cluster: pytest --cluster=emulator|real


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--cluster", choices=["emulator", "real", "node"],
                     default=os.environ.get(CLUSTER_ENV) or "emulator",
                     help="where tests taking the `cluster` fixture run: a fresh API server emulator per test, "
                          f"or the real control plane of ../shared/realk8s (${REALK8S_ENV}), started for the "
                          "session; `real` runs only those tests; `node` runs only the tests of tests/node/, "
                          "on that control plane's real node (default: $KUBEFORGE_E2E_CLUSTER or emulator)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "emulator_only(why): the test needs the emulator; skipped on a real "
                                       "cluster, saying why")
    config.addinivalue_line("markers", "real_only(why): the test needs a real API server; skipped on the "
                                       "emulator, saying why")
    config.addinivalue_line("markers", "node: the test runs kubeforge's images on the real node; only with "
                                       "--cluster=node")
    if config.getoption("--cluster") == "node" and not os.environ.get("REALK8S_HOME"):
        # node-up.sh's dnsmasq drops to `nobody` and then reads its hosts folder under REALK8S_HOME:
        # under the default ~/.cache of a root whose home is private it could not ("bad dynamic
        # directory ... Permission denied"), and no pod name resolved. A folder anyone may enter.
        os.environ["REALK8S_HOME"] = str(Path(tempfile.gettempdir()) / "kubeforge-realk8s-node")


def missing_node_tools() -> str:
    """What the real node and the image build need that this machine lacks, said as what to do; empty
    when nothing is missing."""
    from support.node import missing_tools

    if os.geteuid() != 0:
        return "the real node runs as root (kubelet, containerd, a bridge of its own)"
    missing = missing_tools()
    return f"the real node needs Debian's packages: apt-get install {' '.join(missing)}" if missing else ""


def realk8s_dir() -> Path:
    return Path(os.environ.get(REALK8S_ENV) or ROOT.parent / "shared" / "realk8s")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mode = config.getoption("--cluster")
    real = mode == "real" or bool(os.environ.get(KUBECONFIG_ENV))
    if mode == "node":
        kept = [item for item in items if item.get_closest_marker("node")]
    elif mode == "real":
        kept = [item for item in items if "cluster" in getattr(item, "fixturenames", ())
                and not item.get_closest_marker("node")]
    else:
        kept = [item for item in items if not item.get_closest_marker("node")]
    config.hook.pytest_deselected(items=[item for item in items if item not in kept])
    items[:] = kept
    if mode != "emulator":
        why = ""
        if mode == "node" and (missing := missing_node_tools()):
            why = missing
        elif not os.environ.get(KUBECONFIG_ENV) and not (realk8s_dir() / "up.sh").exists():
            why = (f"no real control plane: {realk8s_dir() / 'up.sh'} does not exist (a checkout of the "
                   f"project's shared/realk8s next to the repository, or set {REALK8S_ENV})")
        if why and os.environ.get(REALK8S_REQUIRED_ENV) == "1":
            raise pytest.UsageError(why)
        for item in items if why else []:
            item.add_marker(pytest.mark.skip(reason=why))
    for item in items:
        marker = item.get_closest_marker("emulator_only" if real else "real_only")
        if marker is not None:
            where = "emulator only" if real else "real cluster only"
            item.add_marker(pytest.mark.skip(reason=f"{where}: {marker.args[0]}"))


@pytest.fixture(scope="session")
def real_kubeconfig(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """The kubeconfig of the session's real cluster: $KUBEFORGE_E2E_KUBECONFIG, or with --cluster=real
    the control plane of realk8s, started here and stopped at the end (unless it already ran: then it
    is someone else's and stays). None for the emulator."""
    if os.environ.get(KUBECONFIG_ENV):
        yield os.environ[KUBECONFIG_ENV]
        return
    if request.config.getoption("--cluster") not in ("real", "node"):
        yield None
        return
    with realk8s() as kubeconfig:
        yield kubeconfig


@contextlib.contextmanager
def realk8s(**env: str) -> Iterator[str]:
    """The real control plane of `realk8s_dir()`, started (its up.sh, with `env` added: e.g.
    CONTROLLERS="0") and stopped (its down.sh) around the block: its admin kubeconfig. One already
    running is someone else's: it is used as it is and left running."""
    folder = realk8s_dir()
    up = subprocess.run([str(folder / "up.sh")], capture_output=True, text=True, timeout=180,
                        env={**os.environ, **env})
    if up.returncode != 0:
        raise RuntimeError(f"{folder / 'up.sh'} failed ({up.returncode}):\n{up.stdout}{up.stderr}")
    ours = "already running" not in up.stderr
    try:
        yield up.stdout.strip().splitlines()[-1]
    finally:
        if ours:
            subprocess.run([str(folder / "down.sh")], capture_output=True, timeout=120, check=False)


# ---------------------------------------------------------------------------------------------------
# Fixtures


@pytest_asyncio.fixture
async def emulator() -> AsyncIterator[Emulator]:
    """A running `Emulator` (serving at `emulator.api_url`)."""
    async with serve() as running:
        yield running


@pytest_asyncio.fixture
async def cluster(real_kubeconfig: str | None) -> AsyncIterator[Cluster]:
    """The emulator, or the session's real cluster, with a fresh test namespace."""
    if real_kubeconfig:
        async with real_cluster(real_kubeconfig) as real:
            yield real
    else:
        async with emulated_cluster() as emulated:
            yield emulated


@contextlib.asynccontextmanager
async def node_harness(cluster: Cluster, directory: Path, **options: Any) -> AsyncIterator[Kubelet]:
    """A kubelet harness playing the node for the test namespace, attached to the cluster while used.

    A real control plane has a scheduler: it binds, and the harness is just the node (named after
    the test's namespace: the pods of an earlier test's namespace may still be bound to its node)."""
    if cluster.real:
        options = {"binds_pods": False, "node_name": f"kubelet-{cluster.namespace}", **options}
    harness = Kubelet(cluster.client, cluster.namespace, directory, **options)
    await harness.start(threaded=True)
    cluster.kubelet = harness
    try:
        yield harness
    finally:
        await harness.stop()
        cluster.kubelet = None


@pytest_asyncio.fixture
async def kubelet(cluster: Cluster, tmp_path: Path) -> AsyncIterator[Kubelet | None]:
    """The harness for the test namespace (None on a real cluster whose own nodes run pods)."""
    if cluster.real and await cluster.has_schedulable_nodes():
        yield None
        return
    async with node_harness(cluster, tmp_path / "kubelet") as harness:
        yield harness
    if harness.errors:
        raise AssertionError(f"the kubelet harness failed ({len(harness.errors)}x): {harness.errors!r}")

