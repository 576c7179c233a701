"""Operator scale against the test API server: N jobs created at once -> time until each has its pods.

    .venv/bin/python bench/operator_scale.py --jobs 10 100 500

The operator runs as users run it, `kubeforge operator` in a process of its own, pointed by a
kubeconfig at the API server emulator of tests/k8s, which serves from this process (with keep-alive,
as a real API server does). No kubelet: pods stay Pending, which is what is measured. For each job,
latency is the time from its create call returning to its pod's ADDED event on a pod watch. Also reported,
from the operator process alone: its reconcile-duration histogram (mean, from its /metrics), its
resident memory once every job has its pods, and again after `--settle` seconds of resyncs (memory
that grows with events rather than jobs would show there), and its peak.

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

from k8s.cluster import emulated_cluster  # noqa: E402


def job(index: int) -> dict[str, object]:
    return {
        "apiVersion": "kubeforge.io/v1alpha1", "kind": "PretrainJob",
        "metadata": {"name": f"scale-{index:04d}"},
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


async def measure(count: int, timeout: float, settle: float, resync: float,
                  pythonpath: str | None = None) -> dict[str, float]:
    async with emulated_cluster() as cluster:
        assert cluster.emulator is not None
        cluster.emulator.keep_alive = True
        with tempfile.TemporaryDirectory() as tmp:
            kubeconfig = Path(tmp) / "kubeconfig"
            kubeconfig.write_text(yaml.safe_dump({
                "apiVersion": "v1", "kind": "Config", "current-context": "bench",
                "clusters": [{"name": "bench", "cluster": {"server": cluster.url}}],
                "users": [{"name": "bench", "user": {}}],
                "contexts": [{"name": "bench", "context": {"cluster": "bench", "user": "bench"}}],
            }))
            metrics_port = free_port()
            env = {**os.environ, "KUBECONFIG": str(kubeconfig), "KUBEFORGE_METRICS_PORT": str(metrics_port),
                   "KUBEFORGE_STORAGE_ROOT": "s3://bench/kf", "KUBEFORGE_RESYNC_SECONDS": str(resync)}
            if pythonpath:
                env["PYTHONPATH"] = pythonpath
            with open(Path(tmp) / "operator.log", "wb") as log:
                operator = subprocess.Popen([sys.executable, "-m", "kubeforge", "operator", "--standalone",
                                             "--health-port", str(free_port())], env=env, stdout=log, stderr=log)
                try:
                    await wait_for_metrics(metrics_port, operator, timeout=60)
                    await asyncio.sleep(1.0)  # Kopf's watches start after its metrics endpoint
                    result = await drive(cluster, count, timeout)
                    result.update({f"{k}_all_pods": v for k, v in memory_mb(operator.pid).items()})
                    await asyncio.sleep(settle)
                    result.update({f"{k}_settled": v for k, v in memory_mb(operator.pid).items()})
                    total, reconciles = reconcile_totals(await asyncio.to_thread(scrape, metrics_port))
                    result.update(reconciles=reconciles, reconcile_mean_ms=1000 * total / max(reconciles, 1))
                finally:
                    operator.terminate()
                    try:
                        operator.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        operator.kill()
    return result


async def drive(cluster: Any, count: int, timeout: float) -> dict[str, float]:
    """Create `count` jobs one after another; a pod watch notes when each job's first pod appears."""
    created_at: dict[str, float] = {}
    seen_at: dict[str, float] = {}
    path = f"/api/v1/namespaces/{cluster.namespace}/pods"

    async def watch_pods() -> None:
        async for event in cluster.client.watch(path, {"labelSelector": "kubeforge.io/job-kind=ptj"}):
            if event["type"] == "ADDED":
                seen_at.setdefault(event["object"]["metadata"]["labels"]["kubeforge.io/job-name"], time.perf_counter())
                if len(seen_at) == count:
                    return

    watching = asyncio.create_task(watch_pods())
    started = time.perf_counter()
    for index in range(count):
        await cluster.apply(job(index))
        created_at[f"scale-{index:04d}"] = time.perf_counter()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(watching, timeout)
    latencies = [seen_at[n] - created_at[n] for n in seen_at]
    return {
        "jobs": count, "with_pods": len(seen_at), "p50": statistics.median(latencies) if latencies else float("nan"),
        "p99": percentile(latencies, 0.99) if latencies else float("nan"), "all": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--jobs", type=int, nargs="+", default=[10, 100, 500])
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--settle", type=float, default=30.0, help="seconds of resyncs before memory is read again")
    parser.add_argument("--resync", type=float, default=5.0, help="the operator's KUBEFORGE_RESYNC_SECONDS")
    parser.add_argument("--baseline", help="a directory with another installed kubeforge, measured alongside")
    args = parser.parse_args()
    builds = [("baseline", args.baseline), ("this tree", None)] if args.baseline else [("this tree", None)]
    print("| operator | jobs | with pods | p50 create->pods (s) | p99 (s) | all pods after (s) | reconciles | "
          "mean reconcile (ms) | operator RSS, all pods (MB) | RSS after settle (MB) | peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for count in args.jobs:
        for build, pythonpath in builds:
            r = asyncio.run(measure(count, args.timeout, args.settle, args.resync, pythonpath))
            print(f"| {build} | {r['jobs']} | {r['with_pods']} | {r['p50']:.3f} | {r['p99']:.3f} | {r['all']:.1f} | "
                  f"{r['reconciles']:.0f} | {r['reconcile_mean_ms']:.1f} | {r['VmRSS_all_pods']:.0f} | "
                  f"{r['VmRSS_settled']:.0f} | {r['VmHWM_settled']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
