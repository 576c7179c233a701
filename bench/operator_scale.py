"""Operator scale: N jobs created at once -> time until each has its pod, on the test API server
emulator and on a real control plane, against a floor measured in the same run.

    .venv/bin/python bench/operator_scale.py --jobs 10 100 500 --target emulator real

The operator runs as users run it, `kubeforge operator --standalone` in a process of its own, pointed
by a kubeconfig at the API server, watching the benchmark's namespace:
- `emulator`: the API server emulator of tests/k8s, serving from this process (with keep-alive, as a
  real API server does);
- `real`: the real control plane of ../shared/realk8s (or $KUBEFORGE_REALK8S), started for the run
  without controllers or scheduler (nothing but the operator acts on the objects) and stopped after;
  a fresh namespace per measurement.
No kubelet: pods stay Pending, which is what is measured. For each job, latency is the time from its
create call returning to its pod's ADDED event on a pod watch.

Two floors, measured before the operator at each size on the same API server, each a minimal
controller (`--floor-controller`, also a Python process of its own, on one asyncio client):
- `floor` watches the jobs and creates one pod per new job, nothing else: what the API server and
  this machine cost, without Kopf or the reconcile's other requests;
- `floor, same requests` makes, for each new job, the requests the operator makes (finalizer patch,
  pod list, Service, pod with the job in its env, status patch, event), nothing else: the cost of
  those requests, without Kopf.
"API requests per job" counts what the API server served (watches aside; its /metrics, real
control plane only), the benchmark's own job creates included.

Also reported, from the operator process alone: its reconcile-duration histogram (mean, from its
/metrics), its resident memory once every job has its pods, and again after `--settle` seconds of
resyncs (memory that grows with events rather than jobs would show there), and its peak.

`--baseline DIR` measures another build of the operator side by side, in the same run: DIR holds
an installed kubeforge package, e.g. the commit before the operator's rework:

    git worktree add /tmp/kf-base f8fb730
    .venv/bin/pip install --no-deps --target /tmp/kf-base-pkg /tmp/kf-base
    .venv/bin/python bench/operator_scale.py --jobs 10 100 --baseline /tmp/kf-base-pkg
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from k8s.cluster import emulated_cluster, real_cluster, realk8s  # noqa: E402
from k8s.kubelet import ApiError, KubeClient  # noqa: E402
from support.processes import stop_process  # noqa: E402

JOBS_PATH = "/apis/kubeforge.io/v1alpha1/namespaces/{namespace}/pretrainjobs"
FLOOR = "floor"
FLOOR_REQUESTS = "floor, same requests"
FLOORS = (FLOOR, FLOOR_REQUESTS)


WARM_UP = -1


def job_name(index: int) -> str:
    return "scale-warm-up" if index == WARM_UP else f"scale-{index:04d}"


def job(index: int) -> dict[str, object]:
    return {
        "apiVersion": "kubeforge.io/v1alpha1", "kind": "PretrainJob",
        "metadata": {"name": job_name(index)},
        "spec": {"data": {"train": {"uri": "s3://bench-data/train.txt"}}, "training": {"maxSteps": 100},
                 "resources": {"gpusPerWorker": 0}, "metrics": {"port": 0}},
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak) of a process, in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def reconcile_totals(metrics_text: str) -> tuple[float, float]:
    """(sum, count) of the operator's reconcile-duration histogram for PretrainJobs."""
    total = count = 0.0
    for family in text_string_to_metric_families(metrics_text):
        if family.name != "kubeforge_operator_reconcile_duration_seconds":
            continue
        for sample in family.samples:
            if sample.labels.get("kind") == "PretrainJob":
                if sample.name.endswith("_sum"):
                    total = sample.value
                elif sample.name.endswith("_count"):
                    count = sample.value
    return total, count


async def wait_for_metrics(port: int, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the operator exited with {process.returncode}")
        try:
            await asyncio.to_thread(scrape, port)
            return
        except OSError:
            await asyncio.sleep(0.2)
    raise RuntimeError(f"the operator's metrics did not answer within {timeout}s")


async def wait_for_log(path: Path, text: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the controller exited with {process.returncode}:\n{path.read_text()}")
        if text in path.read_text():
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"the controller did not log {text!r} within {timeout}s")


@contextlib.asynccontextmanager
async def bench_cluster(kubeconfig: str | None) -> Any:
    """(cluster, kubeconfig): a fresh namespace on the real control plane of `kubeconfig`, else the emulator."""
    if kubeconfig:
        async with real_cluster(kubeconfig) as cluster:
            yield cluster, kubeconfig
        return
    async with emulated_cluster() as cluster:
        assert cluster.emulator is not None
        cluster.emulator.keep_alive = True
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "kubeconfig"
            path.write_text(yaml.safe_dump({
                "apiVersion": "v1", "kind": "Config", "current-context": "bench",
                "clusters": [{"name": "bench", "cluster": {"server": cluster.url}}],
                "users": [{"name": "bench", "user": {}}],
                "contexts": [{"name": "bench", "context": {"cluster": "bench", "user": "bench"}}],
            }))
            yield cluster, str(path)


async def measure(count: int, kubeconfig: str | None, controller: str, timeout: float, settle: float,
                  resync: float) -> dict[str, float]:
    """One size on one API server with one controller: FLOOR, or an operator build (a PYTHONPATH, '' for
    this tree)."""
    async with bench_cluster(kubeconfig) as (cluster, config_path):
        with tempfile.TemporaryDirectory() as tmp:
            metrics_port = free_port()
            env = {**os.environ, "KUBECONFIG": config_path, "KUBEFORGE_METRICS_PORT": str(metrics_port),
                   "KUBEFORGE_STORAGE_ROOT": "s3://bench/kf", "KUBEFORGE_ALLOWED_URI_PREFIXES": "s3://bench-data",
                   "KUBEFORGE_RESYNC_SECONDS": str(resync),
                   "KUBEFORGE_NAMESPACES": cluster.namespace}
            if controller in FLOORS:
                argv = [sys.executable, __file__, "--floor-controller", config_path, cluster.namespace, controller]
            else:
                argv = [sys.executable, "-m", "kubeforge", "operator", "--standalone",
                        "--health-port", str(free_port())]
                if controller:
                    env["PYTHONPATH"] = controller
            log_path = Path(tmp) / "controller.log"
            with open(log_path, "wb") as log:
                # Not from the repository root: `python -m` puts the working directory first on sys.path,
                # and its kubeforge/ would shadow the build under test (--baseline's PYTHONPATH).
                process = subprocess.Popen(argv, env=env, stdout=log, stderr=log, cwd=tmp)
                try:
                    if controller in FLOORS:
                        await wait_for_log(log_path, "watching", process, timeout=60)
                    else:
                        await wait_for_metrics(metrics_port, process, timeout=60)
                    # Measured once the controller's watches work (Kopf's start after its metrics
                    # endpoint): a first job's pod proves it, and is not counted.
                    await cluster.apply(job(WARM_UP))
                    await until_exit(cluster.wait_for(lambda: cluster.list_pods({"kubeforge.io/job-name": job_name(
                        WARM_UP)}), 60, "the warm-up job's pod"), process, log_path)
                    result = await until_exit(drive(cluster, count, timeout), process, log_path)
                    if controller not in FLOORS:
                        result.update({f"{k}_all_pods": v for k, v in memory_mb(process.pid).items()})
                        await asyncio.sleep(settle)
                        result.update({f"{k}_settled": v for k, v in memory_mb(process.pid).items()})
                        total, reconciles = reconcile_totals(await asyncio.to_thread(scrape, metrics_port))
                        result.update(reconciles=reconciles, reconcile_mean_ms=1000 * total / max(reconciles, 1))
                finally:
                    stop_process(process, grace=30)
    return result


async def until_exit(work: Any, process: subprocess.Popen[bytes], log_path: Path) -> Any:
    """Await work, unless the controller exits first: then fail with its log."""
    task = asyncio.ensure_future(work)
    while not task.done():
        await asyncio.wait([task], timeout=0.5)
        if process.poll() is not None and not task.done():
            task.cancel()
            raise RuntimeError(f"the controller exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
    return task.result()


async def floor_controller(kubeconfig: str, namespace: str, floor: str) -> None:
    """The least a controller can do: on each new job, create one pod with the job's labels (FLOOR);
    or make the requests the operator makes for a new job, in the same order, with nothing else
    (FLOOR_REQUESTS): what those requests cost the API server and this machine, without Kopf."""
    client = KubeClient.from_kubeconfig(kubeconfig)
    creating: set[asyncio.Task[Any]] = set()

    async def create_pod(job: dict[str, Any]) -> None:
        name = job["metadata"]["name"]
        labels = {"kubeforge.io/job-name": name, "kubeforge.io/job-kind": "ptj"}
        container = {"name": "trainer", "image": "kubeforge-trainer:bench"}
        if floor == FLOOR_REQUESTS:
            await client.patch("PretrainJob", name, {"metadata": {"finalizers": ["kubeforge.io/operator"]}},
                               namespace, api_version=job["apiVersion"])
            await client.list("Pod", namespace, label_selector=",".join(f"{k}={v}" for k, v in labels.items()))
            await client.create({"apiVersion": "v1", "kind": "Service", "metadata": {
                "name": f"{name}-ptj", "namespace": namespace, "labels": labels},
                "spec": {"clusterIP": "None", "selector": labels, "ports": [{"name": "c10d", "port": 29500}]}})
            container["env"] = [{"name": "KUBEFORGE_JOB", "value": json.dumps(job)}]
        await client.create({"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": f"{name}-floor", "namespace": namespace, "labels": labels},
            "spec": {"containers": [container]}})
        if floor == FLOOR_REQUESTS:
            await client.patch("PretrainJob", name, {"status": {"phase": "Pending"}}, namespace,
                               subresource="status", api_version=job["apiVersion"])
            await client.create({"apiVersion": "v1", "kind": "Event", "metadata": {
                "generateName": f"{name}.", "namespace": namespace},
                "involvedObject": {"apiVersion": job["apiVersion"], "kind": "PretrainJob", "name": name,
                                   "namespace": namespace, "uid": job["metadata"]["uid"]},
                "reason": "Launched", "message": "1 pod", "type": "Normal"})

    deadline = time.monotonic() + 60
    while True:
        try:
            # Ready once the server has accepted the watch: the driver creates the jobs only then.
            async for event in client.watch(JOBS_PATH.format(namespace=namespace),
                                            on_open=lambda: print("watching", flush=True)):
                if event["type"] == "ADDED":
                    task = asyncio.create_task(create_pod(event["object"]))
                    creating.add(task)
                    task.add_done_callback(creating.discard)
            return
        except ApiError as exc:  # 429 while a new CRD's watch cache fills: as client-go does, retry
            if exc.status != 429 or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def api_requests(cluster: Any) -> float:
    """Requests the API server has served, but watches (apiserver_request_total; NaN where the server
    has no /metrics, as the emulator): all clients together, the benchmark's own creates included."""
    try:
        text = await cluster.client.request("GET", "/metrics")
    except ApiError:
        return float("nan")
    return sum(sample.value for family in text_string_to_metric_families(text)
               if family.name == "apiserver_request" for sample in family.samples
               if sample.name == "apiserver_request_total" and sample.labels.get("verb") != "WATCH")


async def drive(cluster: Any, count: int, timeout: float) -> dict[str, float]:
    """Create `count` jobs one after another; a pod watch notes when each job's first pod appears."""
    created_at: dict[str, float] = {}
    seen_at: dict[str, float] = {}
    path = f"/api/v1/namespaces/{cluster.namespace}/pods"

    async def watch_pods() -> None:
        async for event in cluster.client.watch(path, {"labelSelector": "kubeforge.io/job-kind=ptj"}):
            name = event["object"]["metadata"]["labels"]["kubeforge.io/job-name"]
            if event["type"] == "ADDED" and name != job_name(WARM_UP):
                seen_at.setdefault(name, time.perf_counter())
                if len(seen_at) == count:
                    return

    watching = asyncio.create_task(watch_pods())
    requests_before = await api_requests(cluster)
    started = time.perf_counter()
    for index in range(count):
        await cluster.apply(job(index))
        created_at[job_name(index)] = time.perf_counter()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(watching, timeout)
    all_pods = time.perf_counter() - started
    latencies = [seen_at[n] - created_at[n] for n in seen_at]
    return {
        "jobs": count, "with_pods": len(seen_at), "p50": statistics.median(latencies) if latencies else float("nan"),
        "p99": percentile(latencies, 0.99) if latencies else float("nan"), "all": all_pods,
        # The create loop competes for this machine's two cores with the controller and the API server:
        # a controller that costs them more CPU slows the creates, and "all" with them.
        "created": max(created_at.values()) - started,
        "requests_per_job": (await api_requests(cluster) - requests_before) / count,
    }


def table_row(target: str, build: str, r: dict[str, float]) -> str:
    operator_only = [f"{r['reconciles']:.0f}", f"{r['reconcile_mean_ms']:.1f}", f"{r['VmRSS_all_pods']:.0f}",
                     f"{r['VmRSS_settled']:.0f}", f"{r['VmHWM_settled']:.0f}"] if "reconciles" in r else ["-"] * 5
    return "| " + " | ".join([target, build, f"{r['jobs']}", f"{r['with_pods']}", f"{r['p50']:.3f}",
                              f"{r['p99']:.3f}", f"{r['created']:.1f}", f"{r['all']:.1f}",
                              f"{r['requests_per_job']:.1f}", *operator_only]) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--jobs", type=int, nargs="+", default=[10, 100, 500])
    parser.add_argument("--target", nargs="+", choices=["emulator", "real"], default=["emulator", "real"])
    parser.add_argument("--timeout", type=float, default=300.0, help="bound on the wait for all pods, per size")
    parser.add_argument("--settle", type=float, default=30.0, help="seconds of resyncs before memory is read again")
    parser.add_argument("--resync", type=float, default=5.0, help="the operator's KUBEFORGE_RESYNC_SECONDS")
    parser.add_argument("--baseline", help="a directory with another installed kubeforge, measured alongside")
    parser.add_argument("--floor-controller", nargs=3, metavar=("KUBECONFIG", "NAMESPACE", "FLOOR"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_controller:
        asyncio.run(floor_controller(*args.floor_controller))
        return
    builds = [(floor, floor) for floor in FLOORS] + ([("baseline", args.baseline)] if args.baseline else [])
    builds.append(("this tree", ""))
    print("| API server | controller | jobs | with pods | p50 create->pods (s) | p99 (s) | all created after (s) | "
          "all pods after (s) | API requests per job | reconciles | mean reconcile (ms) | "
          "operator RSS, all pods (MB) | RSS after settle (MB) | peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for target in args.target:
        with realk8s(CONTROLLERS="0", SCHEDULER="0") if target == "real" else contextlib.nullcontext() as kubeconfig:
            for count in args.jobs:
                for build, controller in builds:
                    r = asyncio.run(measure(count, kubeconfig, controller, args.timeout, args.settle, args.resync))
                    print(table_row(target, build, r), flush=True)


if __name__ == "__main__":
    main()
