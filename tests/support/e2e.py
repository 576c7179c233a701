"""The operator end to end: run in a test's own event loop against an API server (emulated or real),
or as the Helm chart deploys it, and the questions tests ask of a job and its pods."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from k8s.cluster import ensure_crds, running_operator
from k8s.kubelet import KubeClient

from kubeforge.operator.handlers import create_registry
from kubeforge.operator.metrics import OperatorMetrics
from kubeforge.operator.settings import OperatorSettings
from support.chart import container_env, crds, only, rendered
from support.jobs import tiny_pretrain
from support.processes import KUBEFORGE, free_port
from support.rbac import RBAC_KINDS, Permissions, granted, not_granted, service_account_kubeconfig, write_kubeconfig

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


@asynccontextmanager
async def operator_process(args: list[str], env: dict[str, str], log_path: Path
                           ) -> AsyncIterator[asyncio.subprocess.Process]:
    """`kubeforge ARGS` in a process of its own, its output in log_path; terminated after the block."""
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(*KUBEFORGE, *args, stdout=log, stderr=asyncio.subprocess.STDOUT,
                                                       env=env)
    try:
        yield process
    finally:
        if process.returncode is None:
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 30)
        except TimeoutError:
            process.kill()
            await process.wait()


@dataclass
class ChartInstall:
    """What the chart installs for the operator, applied to a cluster: who it runs as and what it may do."""

    objects: list[dict[str, Any]]  # everything the chart rendered, the Deployment included
    kubeconfig: Path  # the operator's credentials: on a real cluster, a token of the chart's ServiceAccount
    client: KubeClient  # the same credentials, for the test's own requests
    log_path: Path  # the operator's output, once chart_operator runs it

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def permissions(self, namespace: str) -> Permissions:
        """What the rendered roles grant the ServiceAccount (of release namespace `namespace`), wherever."""
        merged: Permissions = {}
        for where in granted(self.objects, namespace).values():
            for key, verbs in where.items():
                merged.setdefault(key, set()).update(verbs)
        return merged


@asynccontextmanager
async def chart_installed(cluster: Any, values: dict[str, Any], workdir: Path) -> AsyncIterator[ChartInstall]:
    """The chart rendered with `values` (the release in the test namespace, named after it) and its
    peering CRDs, ServiceAccount, roles, bindings and peering objects applied (the cluster-scoped ones
    deleted after the block), with a kubeconfig that acts as that ServiceAccount: on a real cluster a
    token from the TokenRequest API, on the emulator (which authenticates nobody) none."""
    release = cluster.namespace  # cluster-scoped objects are named after it: no clash with other tests
    objects = rendered(values, release=release, namespace=cluster.namespace)
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    installed = [o for o in objects if o["kind"] in (*RBAC_KINDS, "KopfPeering", "ClusterKopfPeering")]
    await ensure_crds(cluster.client, [crd for crd in crds() if crd["spec"]["group"] == "kopf.dev"])
    await cluster.apply(installed)
    try:
        config = workdir / "operator-kubeconfig"
        if cluster.real:
            await service_account_kubeconfig(cluster, pod["serviceAccountName"], config)
        else:
            write_kubeconfig(config, {"server": cluster.url}, {}, cluster.namespace)
        install = ChartInstall(objects, config, KubeClient.from_kubeconfig(config), workdir / "operator.log")
        try:
            yield install
        finally:
            await install.client.close()
    finally:
        for obj in installed:
            if "namespace" not in obj["metadata"]:  # the namespaced ones go with the test namespace
                await cluster.client.delete(obj["kind"], obj["metadata"]["name"])


@asynccontextmanager
async def chart_operator(cluster: Any, values: dict[str, Any], workdir: Path) -> AsyncIterator[ChartInstall]:
    """`kubeforge` run with the args and environment of the chart's Deployment, under what
    `chart_installed` applied (so on a real cluster it gets what the chart grants and no more), once its
    /healthz answers. On the emulator, which authorizes nothing, the requests it made are checked
    against what the chart's roles grant once it stops."""
    ports = {"operator": {**values.get("operator", {}), "healthPort": free_port()},
             "metrics": {**values.get("metrics", {}), "port": free_port()}}
    async with chart_installed(cluster, {**values, **ports}, workdir) as install:
        container = only(install.objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
        env = {**os.environ, **container_env(install.objects), "POD_ID": f"{cluster.namespace}-operator",
               "KUBECONFIG": str(install.kubeconfig)}
        async with operator_process(container["args"], env, install.log_path) as process:
            try:
                await cluster.wait_for(lambda: _healthy(process, ports["operator"]["healthPort"], install), 60,
                                       "the operator's /healthz")
                yield install
            except BaseException:
                print(f"the operator's log:\n{install.log()}")  # pytest shows it with the failure
                raise
    if cluster.emulator is not None:
        assert not_granted(cluster.emulator, install.permissions(cluster.namespace)) == set()


async def _healthy(process: asyncio.subprocess.Process, port: int, install: ChartInstall) -> bool:
    assert process.returncode is None, f"the operator exited with {process.returncode}"
    with contextlib.suppress(aiohttp.ClientError):
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/healthz") as response:
            return response.status == 200
    return False


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


async def no_job_pods(cluster: Any, name: str, short: str = "ptj") -> bool:
    return not await job_pods(cluster, name, short)
