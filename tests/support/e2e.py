"""The operator end to end: run in a test's own event loop against an API server (emulated or real),
and the questions tests ask of a job and its pods."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from k8s.cluster import running_operator

from kubeforge.operator.handlers import create_registry
from kubeforge.operator.metrics import OperatorMetrics
from kubeforge.operator.settings import OperatorSettings
from support.jobs import tiny_pretrain
from support.processes import free_port
from support.rbac import not_granted

SECRET = "kubeforge-s3"
PTJ, FTJ = "PretrainJob", "FinetuneJob"


@asynccontextmanager
async def operator(cluster: Any, settings: OperatorSettings) -> AsyncIterator[OperatorMetrics]:
    """The operator, in this test's loop; on the emulator, its requests are checked against the RBAC
    the Helm chart grants it once it stops."""
    metrics = OperatorMetrics()
    registry = create_registry(settings, cluster.api_client(), metrics, login=cluster.login)
    async with running_operator(registry):
        yield metrics
    if cluster.emulator is not None:
        assert not_granted(cluster.emulator) == set()


def pretrain(data: dict[str, str], name: str, steps: int, **spec: Any) -> dict[str, Any]:
    job = tiny_pretrain(name, maxSteps=steps, warmupSteps=min(20, steps // 4), evalInterval=1000, logInterval=10)
    job["spec"]["data"]["train"]["uri"] = data["shakespeare/train.txt"]
    job["spec"]["data"]["eval"]["uri"] = data["shakespeare/eval.txt"]
    job["spec"]["checkpoint"] = {"intervalSteps": 20, "keep": 2}
    job["spec"]["metrics"] = {"port": free_port()}
    job["spec"].update(spec)
    return job


async def status(cluster: Any, kind: str, name: str) -> dict[str, Any]:
    found = await cluster.get(kind, name)
    return (found or {}).get("status") or {}


async def phase_is(cluster: Any, kind: str, name: str, *phases: str) -> dict[str, Any] | None:
    current = await status(cluster, kind, name)
    return current if current.get("phase") in phases else None


def condition(current: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in current.get("conditions", []) if c["type"] == kind)


async def job_pods(cluster: Any, name: str, short: str = "ptj") -> list[dict[str, Any]]:
    return await cluster.list_pods({"kubeforge.io/job-name": name, "kubeforge.io/job-kind": short})
