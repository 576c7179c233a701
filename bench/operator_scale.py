"""Operator scale against the test API server: N jobs created at once -> time until each has its pods.

    .venv/bin/python bench/operator_scale.py --jobs 10 100 500

Runs the real operator (create_registry + Kopf) in this process against the emulator of tests/k8s
(no kubelet: pods stay Pending, which is what is measured). For each job, latency is the time from
its create call returning to its pod being listed by the API. Also reported: the operator's own
reconcile-duration histogram (mean) and this process's peak RSS growth.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from k8s.cluster import emulated_cluster, running_operator  # noqa: E402

from kubeforge.operator.main import create_registry  # noqa: E402
from kubeforge.operator.metrics import OperatorMetrics  # noqa: E402
from kubeforge.operator.settings import OperatorSettings  # noqa: E402


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


async def measure(count: int, timeout: float) -> dict[str, float]:
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    async with emulated_cluster() as cluster:
        metrics = OperatorMetrics()
        settings = OperatorSettings(storage_root="s3://bench/kf", resync_seconds=5.0)
        registry = create_registry(settings, cluster.api_client(), metrics, login=cluster.login)
        async with running_operator(registry):
            created_at: dict[str, float] = {}
            seen_at: dict[str, float] = {}
            started = time.perf_counter()
            for index in range(count):
                await cluster.apply(job(index))
                created_at[f"scale-{index:04d}"] = time.perf_counter()
            deadline = time.perf_counter() + timeout
            while len(seen_at) < count and time.perf_counter() < deadline:
                for pod in await cluster.list_pods({"kubeforge.io/job-kind": "ptj"}):
                    name = pod["metadata"]["labels"]["kubeforge.io/job-name"]
                    seen_at.setdefault(name, time.perf_counter())
                await asyncio.sleep(0.05)
            all_done = time.perf_counter() - started
        latencies = [seen_at[n] - created_at[n] for n in seen_at]
        samples = metrics.reconcile_seconds.labels("PretrainJob")
        reconcile_sum = samples._sum.get()
        reconcile_count = sum(bucket.get() for bucket in samples._buckets)
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "jobs": count, "with_pods": len(seen_at), "p50": statistics.median(latencies) if latencies else float("nan"),
        "p99": percentile(latencies, 0.99) if latencies else float("nan"), "all": all_done,
        "reconcile_mean_ms": 1000 * reconcile_sum / max(reconcile_count, 1), "reconciles": reconcile_count,
        "rss_growth_mb": (rss_after - rss_before) / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()
    print("| jobs | with pods | p50 create->pods (s) | p99 (s) | all pods after (s) | reconciles | "
          "mean reconcile (ms) | peak RSS growth (MB) |")
    print("|---|---|---|---|---|---|---|---|")
    for count in args.jobs:
        r = asyncio.run(measure(count, args.timeout))
        print(f"| {r['jobs']} | {r['with_pods']} | {r['p50']:.3f} | {r['p99']:.3f} | {r['all']:.1f} | "
              f"{r['reconciles']:.0f} | {r['reconcile_mean_ms']:.1f} | {r['rss_growth_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
