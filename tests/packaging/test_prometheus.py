"""A real Prometheus scrapes the operator and a running trainer through an end-to-end job, and PromQL
over its HTTP API shows what a platform team would watch: the step rising, the loss falling, a
checkpoint recorded, the job's phase; the chart's alert rules load and stay quiet on a healthy job;
every query of the chart's Grafana dashboard runs and returns data.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from k8s.cluster import running_operator
from prometheus_client import start_http_server
from support import prometheus as prometheus_server
from support.jobs import ROOT, tiny_pretrain
from support.processes import free_port, stop_process
from support.prometheus import Prometheus

from kubeforge.operator.handlers import create_registry
from kubeforge.operator.metrics import OperatorMetrics
from kubeforge.operator.settings import OperatorSettings

DASHBOARD = ROOT / "charts/kubeforge/files/grafana-dashboard.json"
SECRET = "kubeforge-s3"
JOB = "watched"
STEPS, CHECKPOINT_EVERY = 500, 50
# Panels with no series on a CPU-only run (docs/metrics.md: these metrics exist only on a GPU)...
GPU_ONLY = ("kubeforge_trainer_model_flops_utilization", "kubeforge_trainer_gpu_memory")
# ...and on a run where no job fails (the counter gets a series per reason at the first failure).
EMPTY_WHEN_HEALTHY = ("kubeforge_operator_jobs_failed_total",)
# Grafana's variables, as a user picking the test's job would have them.
VARIABLES = {"namespace": "team-a", "job_name": JOB, "__rate_interval": "1m"}


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Prometheus]:
    process, server = prometheus_server.start(tmp_path / "prometheus", free_port(),
                                              ["kubeforge-operator", "kubeforge-trainers"])
    try:
        yield server
    finally:
        stop_process(process)


def values(series: dict[str, Any]) -> list[float]:
    return [float(v) for _, v in series["values"]]


def dashboard_queries(variables: dict[str, str]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel target, with Grafana's variables substituted."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in variables.items():
                expr = expr.replace(f"${name}", value)
            assert "$" not in expr, f"{panel['title']}: an unknown variable in {expr}"
            queries.append((panel["title"], expr))
    return queries


async def test_prometheus_follows_a_job_through_the_trainer_and_the_operator(
        cluster: Any, kubelet: Any, s3_env: dict[str, str], bucket: str, s3_endpoint: str,
        prometheus: Prometheus) -> None:
    async def query(expr: str) -> list[dict[str, Any]]:
        return await asyncio.to_thread(prometheus.query, expr)

    await cluster.create_secret(SECRET, {k: s3_env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")})
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    job = tiny_pretrain(JOB, maxSteps=STEPS, warmupSteps=20, evalInterval=100, logInterval=10)
    for split, name in (("train", "train.txt"), ("eval", "eval.txt")):
        s3.upload_file(str(ROOT / "examples/data/shakespeare" / name), bucket, f"data/{name}")
        job["spec"]["data"][split]["uri"] = f"s3://{bucket}/data/{name}"
    job["spec"]["checkpoint"] = {"intervalSteps": CHECKPOINT_EVERY, "keep": 2}
    job["spec"]["metrics"] = {"port": free_port()}
    settings = OperatorSettings(trainer_image="kubeforge-trainer:test", trainer_cpu_image="kubeforge-trainer-cpu:test",
                                storage_root=f"s3://{bucket}/kf", s3_endpoint=s3_endpoint,
                                s3_credentials_secret=SECRET, resync_seconds=0.5,
                                allowed_uri_prefixes=(f"s3://{bucket}/data",))  # the shared corpora

    # The operator's metrics endpoint, served as `kubeforge operator` serves it.
    metrics = OperatorMetrics()
    operator_port = free_port()
    http_server, http_thread = start_http_server(operator_port, addr="127.0.0.1", registry=metrics.registry)
    prometheus.discover("kubeforge-operator", [f"127.0.0.1:{operator_port}"])
    started = time.time()
    try:
        async with running_operator(create_registry(settings, cluster.api_client(), metrics, login=cluster.login)):
            await cluster.apply(job)

            async def rank0_address() -> str | None:
                for pod in await cluster.list_pods({"kubeforge.io/job-name": JOB}):
                    if (pod.get("status") or {}).get("podIP"):
                        return f"{pod['status']['podIP']}:{job['spec']['metrics']['port']}"
                return None

            # The pod's IP is known once the kubelet runs it: service discovery finds it then.
            trainer = await cluster.wait_for(rank0_address, 60, "the trainer pod's IP")
            prometheus.discover("kubeforge-trainers", [trainer], {"pod": f"{JOB}-ptj-w0-a0"})
            await cluster.wait_for(
                lambda: query(f'kubeforge_operator_job_phase{{job_name="{JOB}", phase="Running"}} == 1'), 120,
                "Prometheus to see the job Running")
            await cluster.wait_for(lambda: query(f'kubeforge_trainer_step{{job_name="{JOB}"}} > 0'), 120,
                                   "Prometheus to scrape the trainer's first steps")
            await cluster.wait_for(lambda: _succeeded(cluster), 300, "the job to succeed")
            await cluster.wait_for(
                lambda: query(f'kubeforge_operator_job_phase{{job_name="{JOB}", phase="Succeeded"}} == 1'), 30,
                "Prometheus to see the job Succeeded")
            # One series per job: its previous phase's went stale with the scrape that brought this one.
            current = await query(f'kubeforge_operator_job_phase{{job_name="{JOB}"}}')
            assert [s["metric"]["phase"] for s in current] == ["Succeeded"], current
            [succeeded] = await query('kubeforge_operator_jobs_succeeded_total{kind="PretrainJob"}')
            assert float(succeeded["value"][1]) == 1
            end = time.time()  # the range queries below end here, where Succeeded is known to be scraped
    finally:
        http_server.shutdown()
        http_thread.join(timeout=10)
    start = end - math.ceil(end - started)  # whole steps, so that `end` itself is evaluated

    def over_the_run(expr: str) -> list[dict[str, Any]]:
        return prometheus.query_range(expr, start, end)

    # The trainer's series, as scraped: its job_name label leaves Prometheus's own `job` alone.
    [step] = over_the_run(f'kubeforge_trainer_step{{job_name="{JOB}"}}')
    assert step["metric"]["job"] == "kubeforge-trainers" and "exported_job" not in step["metric"]
    assert {k: step["metric"][k] for k in ("namespace", "kind", "rank", "pod")} == {
        "namespace": cluster.namespace, "kind": "PretrainJob", "rank": "0", "pod": f"{JOB}-ptj-w0-a0"}
    steps = values(step)
    assert steps == sorted(steps) and len(set(steps)) >= 2, steps  # rising, seen at several scrapes
    [loss] = over_the_run(f'kubeforge_trainer_loss{{job_name="{JOB}"}}')
    losses = values(loss)
    assert losses[-1] < losses[0] - 0.5, losses  # falling (from about ln(vocabulary) = 6.9)
    [throughput] = over_the_run(f'rate(kubeforge_trainer_tokens_total{{job_name="{JOB}"}}[5s])')
    assert max(values(throughput)) > 0
    [checkpointed] = over_the_run(f'kubeforge_trainer_last_checkpoint_step{{job_name="{JOB}"}}')
    assert max(values(checkpointed)) >= CHECKPOINT_EVERY and max(values(checkpointed)) % CHECKPOINT_EVERY == 0
    [uploads] = over_the_run(f'kubeforge_trainer_checkpoint_duration_seconds_count{{job_name="{JOB}"}}')
    assert max(values(uploads)) >= 1
    # On a CPU: no MFU and no GPU memory series at all.
    assert over_the_run(f'{{__name__=~"kubeforge_trainer_(model_flops|gpu).*", job_name="{JOB}"}}') == []

    # The operator's view: the job went Pending -> Running -> Succeeded, one series per phase held.
    phases = over_the_run(f'kubeforge_operator_job_phase{{job_name="{JOB}"}} == 1')
    assert {s["metric"]["phase"] for s in phases} >= {"Running", "Succeeded"}
    assert all(s["metric"]["job_namespace"] == cluster.namespace for s in phases)

    # The chart's alert rules evaluate cleanly in a real Prometheus, and a healthy job sets off none.
    rules = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
    assert len(rules) >= 7 and all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError"))
                                                                        for r in rules]
    assert prometheus.api("alerts")["alerts"] == []

    # Every dashboard query parses and, but for the GPU-only panels, has data from this run.
    for title, expr in dashboard_queries(VARIABLES | {"namespace": cluster.namespace}):
        found = prometheus.query_range(expr, start, end)
        if not any(metric in expr for metric in GPU_ONLY + EMPTY_WHEN_HEALTHY):
            assert found, f"dashboard panel {title!r} shows nothing: {expr}"


async def _succeeded(cluster: Any) -> bool:
    found = await cluster.get("PretrainJob", JOB) or {}
    phase = (found.get("status") or {}).get("phase")
    assert phase != "Failed", found.get("status")
    return phase == "Succeeded"


def test_dashboard_and_rules_use_only_documented_metrics() -> None:
    documented = documented_metrics()
    used = set()
    for _, expr in dashboard_queries(VARIABLES):
        used |= set(re.findall(r"\bkubeforge_[a-z_]+", expr))
    used |= set(re.findall(r"\bkubeforge_[a-z_]+", prometheus_server.RULES.read_text()))
    histogram_parts = {f"{name}{suffix}" for name in documented for suffix in ("_bucket", "_sum", "_count")}
    assert used - documented - histogram_parts == set()
    assert len(used) > 10  # the pattern found the dashboard's and the rules' metrics


def documented_metrics() -> set[str]:
    """The metric names in the tables of docs/metrics.md (rows starting with | `kubeforge_...`)."""
    return set(re.findall(r"^\| `(kubeforge_[a-z_]+)`", (ROOT / "docs/metrics.md").read_text(), re.MULTILINE))
