"""Fault injection, the operator's rows: real faults in real processes, with the figures printed.

The operator runs as its own process (`kubeforge operator`), against the API server emulator of
tests/k8s or a real control plane (`--cluster=real`; CI runs both); the kubelet harness runs the pods with
tests/support/fake_trainer.py as the trainer (the pod contract without torch: these rows are about the
operator). Faults: the operator SIGKILLed at random moments; the API server answering 5xx/429 (a
proxy in front of it); 200 fuzzed manifests; a NaN loss and a hung trainer among healthy jobs.

`.venv/bin/pytest -m faults` runs them at CI size; `--fault-size full` at the sizes of
docs/reliability.md. Each test prints a `FAULT |` line: the row of the table there.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from k8s.cluster import node_harness
from k8s.kubelet import ApiError, KubeClient, Kubelet
from support.e2e import phase_is
from support.fake_trainer import MODE_LABEL, RATE_LABEL
from support.faults import FAULT_RESULTS
from support.jobs import ROOT, tiny_pretrain
from support.processes import free_port, stop_process
from support.rbac import write_kubeconfig
from support.sweeps import same_search, undisturbed

from kubeforge.operator.sweeplife import LABEL_SWEEP

pytestmark = pytest.mark.faults

PTJ = "PretrainJob"
FTJ = "FinetuneJob"
#: The sizes of each row, per --fault-size: docs/reliability.md's (full) and CI's.
SCALE = {
    "ci": {"operator_kills": 3, "api_fault_rounds": 1, "api_fault_seconds": 20.0, "fuzzed_manifests": 60},
    "full": {"operator_kills": 10, "api_fault_rounds": 3, "api_fault_seconds": 60.0, "fuzzed_manifests": 200},
}
LIVENESS_SECONDS = 5.0
#: Kopf caches a probe's result this long (kopf/_core/engines/probing.py).
KOPF_PROBE_CACHE_SECONDS = 10.0


def report(row: str, **figures: Any) -> None:
    print(f"\nFAULT | {row} | " + ", ".join(f"{k}={v}" for k, v in figures.items()), flush=True)


# ---------------------------------------------------------------------------------------------------
# The world: API server (+ optional fault proxy), kubelet with the fake trainer, operator process


@pytest.fixture
async def fake_kubelet(cluster: Any, tmp_path: Path) -> AsyncIterator[Kubelet]:
    """The kubelet harness, with tests/support/fake_trainer.py as the pods' `kubeforge`."""
    if cluster.real and await cluster.has_schedulable_nodes():
        pytest.skip("the cluster's own nodes run pods: the fake trainer needs the kubelet harness")
    python = tmp_path / "fake-python"
    # The harness runs `kubeforge ARGS` as `PYTHON -m kubeforge ARGS`: drop `-m kubeforge`.
    python.write_text(f'#!/bin/sh\nshift 2\nexec {sys.executable} {ROOT / "tests/support/fake_trainer.py"} "$@"\n')
    python.chmod(0o755)
    async with node_harness(cluster, tmp_path / "kubelet", python=str(python), kill_grace=2.0) as harness:
        yield harness


def kubeconfig(cluster: Any, server: str, path: Path) -> Path:
    """The operator's kubeconfig for `server`: the cluster's own for a real cluster's API server; for
    the emulator or a fault proxy (which adds the cluster's credentials upstream), plain HTTP."""
    if cluster.real and server == cluster.url:
        return Path(cluster.kubeconfig)
    return write_kubeconfig(path, {"server": server}, {}, cluster.namespace)


class OperatorProcess:
    """`kubeforge operator --standalone`, as the chart runs it, that a test can kill and restart."""

    def __init__(self, config: Path, namespace: str, workdir: Path):
        self.metrics_port, self.health_port = free_port(), free_port()
        self.log_path = workdir / "operator.log"
        self.env = {**os.environ, "KUBECONFIG": str(config), "KUBEFORGE_NAMESPACES": namespace,
                    "KUBEFORGE_STORAGE_ROOT": "s3://faults/kf", "KUBEFORGE_ALLOWED_URI_PREFIXES": "s3://faults/data",
                    "KUBEFORGE_RESYNC_SECONDS": "0.5",
                    "KUBEFORGE_METRICS_PORT": str(self.metrics_port), "KUBEFORGE_ERROR_BACKOFF_SECONDS": "0.5",
                    "KUBEFORGE_ERROR_BACKOFF_MAX_SECONDS": "4", "KUBEFORGE_LIVENESS_SECONDS": str(LIVENESS_SECONDS)}
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    async def start(self, timeout: float = 60.0) -> None:
        with self.log_path.open("ab") as log:
            log.write(f"----- start {self.starts}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "kubeforge", "operator", "--standalone", "--health-port", str(self.health_port)],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT / "tests")
        self.starts += 1
        deadline = time.monotonic() + timeout
        while self.metrics() is None:
            if self.process.poll() is not None:
                raise AssertionError(f"the operator exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the operator's metrics did not answer within {timeout}s")
            await asyncio.sleep(0.2)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.process is not None
        self.process.send_signal(sig)
        self.process.wait(timeout=30)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def metrics(self) -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
                return str(response.read().decode())
        except OSError:
            return None

    def sample(self, name: str) -> float:
        """The sum of a metric's samples (every label set)."""
        text = self.metrics() or ""
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + "{") or line.startswith(name + " "))

    def health(self, timeout: float = 5.0) -> int:
        """/healthz's status code; 0 when it does not answer within `timeout` (a failed probe too)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=timeout) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except TimeoutError:
            return 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, grace=30)


@contextlib.asynccontextmanager
async def operator_process(cluster: Any, server: str, workdir: Path) -> AsyncIterator[OperatorProcess]:
    operator = OperatorProcess(kubeconfig(cluster, server, workdir / "kubeconfig"), cluster.namespace, workdir)
    await operator.start()
    try:
        yield operator
    finally:
        operator.stop()


class FaultProxy:
    """An HTTP proxy in front of the API server that answers 500/503/429 while `failing`, and cuts
    the watch streams open when a failure starts (as an API server that goes away does). It forwards
    every other request as `upstream` (TLS and credentials of a real cluster included)."""

    STATUSES = (500, 503, 429)

    def __init__(self, upstream: KubeClient):
        self.upstream = upstream
        self.refused = 0
        self.forwarded = 0
        self._failing = asyncio.Event()
        self._codes = itertools.cycle(self.STATUSES)
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self.url = ""
        self._hold_plural: str | None = None
        #: (plural, seconds): that resource's watch events reach the client this much late.
        self.watch_lag: tuple[str, float] | None = None
        self.held = asyncio.Event()  # a create is held, unanswered
        self._release = asyncio.Event()
        #: Seconds after which each status write is answered 504, never applied: an API server timing out.
        self.status_write_delay = 0.0
        self.status_write_slowed = asyncio.Event()  # one such write is in flight

    def hold_next_create(self, plural: str) -> None:
        """Hold the next POST that creates a `plural` object, unanswered and never forwarded, until
        `release`: the client's request is in flight when the test kills the client."""
        self._hold_plural = plural
        self.held.clear()
        self._release.clear()

    def release(self) -> None:
        self._release.set()

    @property
    def failing(self) -> bool:
        return self._failing.is_set()

    def fail(self, on: bool) -> None:
        if on:
            self._failing.set()
        else:
            self._failing.clear()

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        self.release()
        self.fail(True)  # ends the streams still open
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self._hold_plural and request.method == "POST" and request.path.endswith(f"/{self._hold_plural}"):
            self._hold_plural = None
            self.held.set()
            await self._release.wait()
            return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 503,
                                      "reason": "ServiceUnavailable", "message": "held, never forwarded"}, status=503)
        if self.status_write_delay and request.method == "PATCH" and request.path.endswith("/status"):
            self.status_write_slowed.set()
            await asyncio.sleep(self.status_write_delay)
            return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 504,
                                      "reason": "Timeout", "message": "injected: timed out"}, status=504)
        if self.failing:
            self.refused += 1
            code = next(self._codes)
            body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code,
                    "reason": "TooManyRequests" if code == 429 else "InternalError", "message": "injected fault"}
            return web.json_response(body, status=code, headers={"Retry-After": "1"} if code == 429 else None)
        self.forwarded += 1
        assert self._session is not None
        headers, tls = self.upstream.as_this_client(
            {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")})
        async with self._session.request(request.method, self.upstream.server + request.path_qs, headers=headers,
                                         data=await request.read() or None, ssl=tls,
                                         # as sent: a body without a type (the kubernetes client sends
                                         # JSON so) is JSON to an API server, and 415 as octet-stream
                                         skip_auto_headers=("Content-Type",)) as upstream:
            response = web.StreamResponse(status=upstream.status, headers={
                k: v for k, v in upstream.headers.items()
                if k.lower() not in ("content-length", "transfer-encoding", "content-encoding", "connection")})
            await response.prepare(request)
            lag = self._lag(request)
            writes: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
            writer = asyncio.ensure_future(self._write_late(response, writes, lag))
            failure = asyncio.ensure_future(self._failing.wait())
            try:
                while True:
                    chunk = asyncio.ensure_future(upstream.content.readany())
                    await asyncio.wait([chunk, failure], return_when=asyncio.FIRST_COMPLETED)
                    if not chunk.done():
                        chunk.cancel()
                        break  # the API server "went away": the client sees its stream end
                    data = chunk.result()
                    if not data or writer.done():  # writer done: the client went away
                        break
                    if lag:
                        writes.put_nowait((time.monotonic(), data))
                    else:
                        await response.write(data)
                if lag and not writer.done():
                    drained = asyncio.ensure_future(writes.join())
                    await asyncio.wait([drained, writer], timeout=lag + 5, return_when=asyncio.FIRST_COMPLETED)
                    drained.cancel()
            finally:
                failure.cancel()
                writer.cancel()
            return response

    def _lag(self, request: web.Request) -> float:
        watching = request.query.get("watch") in ("true", "1")
        if self.watch_lag is None or not watching or f"/{self.watch_lag[0]}" not in request.path:
            return 0.0
        return self.watch_lag[1]

    @staticmethod
    async def _write_late(response: web.StreamResponse, writes: asyncio.Queue[tuple[float, bytes]],
                          lag: float) -> None:
        """Each chunk `lag` seconds after it came from the API server, in order."""
        while True:
            arrived, data = await writes.get()
            await asyncio.sleep(max(0.0, arrived + lag - time.monotonic()))
            await response.write(data)
            writes.task_done()


@contextlib.asynccontextmanager
async def fault_proxy(upstream: KubeClient) -> AsyncIterator[FaultProxy]:
    proxy = FaultProxy(upstream)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()


# ---------------------------------------------------------------------------------------------------
# Jobs and what to check on them


def fake_job(name: str, steps: int, *, mode: str = "train", rate: float = 20, workers: int = 1,
             **spec: Any) -> dict[str, Any]:
    job = tiny_pretrain(name, maxSteps=steps, warmupSteps=0)
    job["metadata"]["labels"] = {MODE_LABEL: mode, RATE_LABEL: str(rate)}
    job["spec"]["resources"] = {"workers": workers, "gpusPerWorker": 0, "cpu": "100m", "memory": "64Mi"}
    job["spec"]["metrics"] = {"port": 9400}  # every pod has an IP of its own
    for split in ("train", "eval"):  # the shared corpora, as in a cluster (the fake trainer reads none)
        job["spec"]["data"][split]["uri"] = f"s3://faults/data/{split}.txt"
    job["spec"].update(spec)
    return job


async def statuses(cluster: Any) -> dict[str, dict[str, Any]]:
    return {j["metadata"]["name"]: j.get("status") or {} for j in await cluster.list(PTJ)}


async def all_final(cluster: Any, names: list[str]) -> dict[str, dict[str, Any]] | None:
    current = await statuses(cluster)
    done = all(current.get(n, {}).get("phase") in ("Succeeded", "Failed") for n in names)
    return current if done else None


class PodWatch:
    """Polls the namespace's pods: every pod (by uid) each job ever had, and the most pods of one
    job and rank alive (not being deleted) at once: 2 is a duplicate."""

    def __init__(self, cluster: Any):
        self.cluster = cluster
        self.uids: dict[str, set[str]] = defaultdict(set)
        self.most_alive_per_rank = 0
        self._task: asyncio.Task[None] | None = None

    async def _poll(self) -> None:
        while True:
            alive: dict[tuple[str, str], int] = defaultdict(int)
            for pod in await self.cluster.list_pods("kubeforge.io/job-kind=ptj"):
                labels = pod["metadata"]["labels"]
                self.uids[labels["kubeforge.io/job-name"]].add(pod["metadata"]["uid"])
                if not pod["metadata"].get("deletionTimestamp"):
                    alive[(labels["kubeforge.io/job-name"], labels["kubeforge.io/rank"])] += 1
            self.most_alive_per_rank = max([self.most_alive_per_rank, *alive.values()])
            await asyncio.sleep(0.2)

    def __enter__(self) -> PodWatch:
        self._task = asyncio.ensure_future(self._poll())
        return self

    def __exit__(self, *_: Any) -> None:
        assert self._task is not None
        self._task.cancel()


def tracebacks(operator: OperatorProcess) -> int:
    return operator.log().count("Traceback (most recent call last)")


# ---------------------------------------------------------------------------------------------------
# The rows


async def test_operator_killed_at_random_moments(cluster: Any, fake_kubelet: Kubelet, tmp_path: Path,
                                                fault_size: str) -> None:
    """SIGKILL the operator at random moments while jobs are created, run and finish: no job gets a
    duplicate pod or a spurious gang restart, and every job reaches its final phase."""
    kills = SCALE[fault_size]["operator_kills"]
    rng = random.Random(11)
    names = [f"kill-{i}" for i in range(kills + 2)]
    async with operator_process(cluster, cluster.url, tmp_path) as operator:
        with PodWatch(cluster) as pods:
            started = time.monotonic()
            for index, name in enumerate(names):
                await cluster.apply(fake_job(name, steps=rng.randint(40, 120), workers=1 + index % 2))
                if index < kills:
                    await asyncio.sleep(rng.uniform(0.2, 3.0))  # the operator is mid-whatever
                    operator.kill(signal.SIGKILL)
                    await operator.start()
            final = await cluster.wait_for(lambda: all_final(cluster, names), 300, "every job to finish")
            elapsed = time.monotonic() - started
            await asyncio.sleep(1.0)  # a last poll of the pods
    phases = {n: final[n].get("phase") for n in names}
    restarts = sum(final[n].get("restarts", 0) for n in names)
    workers = {n: 1 + i % 2 for i, n in enumerate(names)}
    extra_pods = sum(len(pods.uids[n]) - workers[n] for n in names)
    report("operator SIGKILLed at random moments", kills=kills, jobs=len(names),
           succeeded=sum(p == "Succeeded" for p in phases.values()), duplicate_pods=extra_pods,
           most_alive_per_rank=pods.most_alive_per_rank, gang_restarts=restarts, seconds=round(elapsed, 1))
    assert phases == {n: "Succeeded" for n in names}
    assert extra_pods == 0 and pods.most_alive_per_rank == 1 and restarts == 0


async def test_api_server_answering_errors(cluster: Any, fake_kubelet: Kubelet, tmp_path: Path,
                                          fault_size: str) -> None:
    """The API server answers every operator request with 500/503/429 for a while, rounds apart, and
    drops the operator's watches: every job still reaches its final phase, the operator process
    stays up, counts the failed reconciliations, and its liveness fails while it cannot work."""
    rounds, window = SCALE[fault_size]["api_fault_rounds"], SCALE[fault_size]["api_fault_seconds"]
    names = [f"api-{i}" for i in range(4)]
    rate = 10
    steps = int(rate * (rounds * (window + 10) + 15))  # still training when the last round ends
    async with fault_proxy(cluster.client) as proxy, operator_process(cluster, proxy.url, tmp_path) as operator:
        for name in names:
            await cluster.apply(fake_job(name, steps=steps, rate=rate))
        await cluster.wait_for(lambda: _all_phase(cluster, names, "Running"), 60, "every job Running")
        health_during: list[int] = []
        recovered: list[float] = []
        for _ in range(rounds):
            await asyncio.sleep(5)
            proxy.fail(True)
            started = time.monotonic()
            while time.monotonic() - started < window:
                await asyncio.sleep(1.0)
                if time.monotonic() - started > LIVENESS_SECONDS + KOPF_PROBE_CACHE_SECONDS + 1:
                    health_during.append(await asyncio.to_thread(operator.health))
            assert operator.alive(), operator.log()[-3000:]
            before = await statuses(cluster)
            proxy.fail(False)
            healed = time.monotonic()
            await cluster.wait_for(lambda b=before: _stepped(cluster, names, b), 120,
                                   "every job's status to move again")
            recovered.append(round(time.monotonic() - healed, 1))
        final = await cluster.wait_for(lambda: all_final(cluster, names), 300, "every job to finish")
        errors = operator.sample("kubeforge_operator_reconcile_errors_total")
        health_after = operator.health()
    phases = [final[n].get("phase") for n in names]
    report("API server answering 5xx/429", rounds=rounds, window_s=window, jobs=len(names),
           succeeded=phases.count("Succeeded"), requests_refused=proxy.refused, reconcile_errors_counted=int(errors),
           recovery_s=recovered, liveness_during=sorted(set(health_during)), liveness_after=health_after,
           operator_restarts=0)
    assert phases == ["Succeeded"] * len(names)
    assert errors > 0 and 500 in health_during and health_after == 200


async def _all_phase(cluster: Any, names: list[str], phase: str) -> bool:
    current = await statuses(cluster)
    return all(current.get(n, {}).get("phase") == phase for n in names)


async def _stepped(cluster: Any, names: list[str], before: dict[str, dict[str, Any]]) -> bool:
    current = await statuses(cluster)
    return all(current[n].get("step", 0) > before[n].get("step", 0) or current[n].get("phase") == "Succeeded"
               for n in names)


async def test_a_job_deleted_while_its_reconcile_waits_on_the_api_server_goes_at_once(
        cluster: Any, fake_kubelet: Kubelet, tmp_path: Path) -> None:
    """`kubectl delete` of a job whose reconcile is mid-request (its status write timing out after
    5 s, so no change follows that would wake Kopf): Kopf lets go of the job's finalizer only once that
    tick has ended, and looks again after settings.background.cancellation_polling, by default a minute."""
    delay = 5.0
    async with fault_proxy(cluster.client) as proxy, operator_process(cluster, proxy.url, tmp_path):
        await cluster.apply(fake_job("slowed", steps=100_000, rate=10))
        await cluster.wait_for(lambda: phase_is(cluster, PTJ, "slowed", "Running"), 60, "the job Running")
        proxy.status_write_delay = delay
        await asyncio.wait_for(proxy.status_write_slowed.wait(), 30)  # a reconcile is waiting on it now
        started = time.monotonic()
        await cluster.delete(PTJ, "slowed")
        await cluster.wait_for(lambda: _gone(cluster, "slowed"), 90, "the job to be deleted")
        took = time.monotonic() - started
    report("job deleted while its reconcile waits on the API server", status_write_timeout_s=delay,
           deletion_s=round(took, 1))
    assert took < delay + 10


async def _gone(cluster: Any, name: str) -> bool:
    return await cluster.get(PTJ, name) is None


async def test_nan_loss_and_a_hung_trainer_among_healthy_jobs(cluster: Any, fake_kubelet: Kubelet,
                                                              tmp_path: Path) -> None:
    """A diverged job fails with LossNotFinite, a hung one with Stalled; the healthy ones around
    them succeed, and the operator stays live throughout."""
    jobs = [fake_job("diverged", steps=400, mode="nan"),
            fake_job("hung", steps=400, mode="stall", stallTimeoutSeconds=10, backoffLimit=1),
            fake_job("healthy-a", steps=300), fake_job("healthy-b", steps=300, workers=2)]
    names = [j["metadata"]["name"] for j in jobs]
    async with operator_process(cluster, cluster.url, tmp_path) as operator:
        started = time.monotonic()
        for job in jobs:
            await cluster.apply(job)
        final = await cluster.wait_for(lambda: all_final(cluster, names), 180, "every job to finish")
        elapsed = time.monotonic() - started
        health = operator.health()
        errors = operator.sample("kubeforge_operator_reconcile_errors_total")
        exceptions = tracebacks(operator)
    outcome = {n: (final[n]["phase"], final[n].get("reason")) for n in names}
    report("NaN loss; a stalled trainer", jobs=len(names), outcomes=json.dumps(outcome),
           hung_restarts=final["hung"].get("restarts"), reconcile_errors=int(errors), seconds=round(elapsed, 1))
    assert outcome == {"diverged": ("Failed", "LossNotFinite"), "hung": ("Failed", "Stalled"),
                       "healthy-a": ("Succeeded", "Completed"), "healthy-b": ("Succeeded", "Completed")}
    assert final["hung"]["restarts"] == 1  # one Stalled restart, then backoffLimit 1 is spent
    assert health == 200 and errors == 0 and exceptions == 0


def fake_finetune(name: str, steps: int, *, mode: str = "train", **spec: Any) -> dict[str, Any]:
    """A FinetuneJob for the fake trainer (which reads no model or data): its base model a URI."""
    return {"apiVersion": "kubeforge.io/v1alpha1", "kind": FTJ,
            "metadata": {"name": name, "labels": {MODE_LABEL: mode, RATE_LABEL: "20"}},
            "spec": {"baseModel": {"uri": "s3://faults/data/base"}, "task": "sequence-classification", "method": "full",
                     "data": {"train": {"uri": "s3://faults/data/reviews.jsonl"}}, "training": {"maxSteps": steps},
                     "resources": {"gpusPerWorker": 0, "cpu": "100m", "memory": "64Mi"}, "metrics": {"port": 9400},
                     **spec}}


async def test_students_wait_for_their_teachers_and_one_fails_with_its_failed_teacher(
        cluster: Any, fake_kubelet: Kubelet, tmp_path: Path) -> None:
    """method distill: a student applied before its teacher FinetuneJob waits (no pods); it starts
    once the teacher succeeded, from its export (status.teacherUri); a student whose teacher
    diverged fails with TeacherFailed, naming teacher.fromFinetuneJob."""
    students = [fake_finetune(name, 40, method="distill", teacher={"fromFinetuneJob": teacher})
                for name, teacher in (("student", "teacher"), ("orphan", "diverged-teacher"))]
    teachers = [fake_finetune("teacher", 40), fake_finetune("diverged-teacher", 400, mode="nan")]
    names = ["student", "orphan", "teacher", "diverged-teacher"]

    async def finetunes() -> dict[str, dict[str, Any]]:
        return {j["metadata"]["name"]: j.get("status") or {} for j in await cluster.list(FTJ)}

    async def waiting_for_teachers() -> dict[str, dict[str, Any]] | None:
        current = await finetunes()
        reasons = {n: next((c["reason"] for c in current.get(n, {}).get("conditions", [])
                            if c["type"] == "WaitingForTeacher" and c["status"] == "True"), None)
                   for n in ("student", "orphan")}
        return current if set(reasons.values()) == {"TeacherMissing"} else None

    async def finished() -> dict[str, dict[str, Any]] | None:
        current = await finetunes()
        return current if all(current.get(n, {}).get("phase") in ("Succeeded", "Failed") for n in names) else None

    async with operator_process(cluster, cluster.url, tmp_path) as operator:
        for job in students:
            await cluster.apply(job)
        waiting = await cluster.wait_for(waiting_for_teachers, 60, "both students to wait for their teachers")
        assert {n: waiting[n]["phase"] for n in ("student", "orphan")} == {"student": "Pending", "orphan": "Pending"}
        assert not await cluster.list("Pod", {"kubeforge.io/job-kind": "ftj"})
        for job in teachers:
            await cluster.apply(job)
        final = await cluster.wait_for(finished, 180, "the teachers and their students to finish")
        exceptions = tracebacks(operator)
    assert final["teacher"]["phase"] == "Succeeded" and final["student"]["phase"] == "Succeeded", final
    assert final["student"]["teacherUri"] == final["teacher"]["exportUri"]
    assert final["diverged-teacher"]["reason"] == "LossNotFinite"
    assert (final["orphan"]["phase"], final["orphan"]["reason"]) == ("Failed", "TeacherFailed")
    assert final["orphan"]["message"].startswith(
        "teacher.fromFinetuneJob: its teacher, FinetuneJob diverged-teacher, failed: the trainer reported loss=nan")
    assert "teacherUri" not in final["orphan"] and exceptions == 0


# Fuzzing: one field of a valid job at a time, given a value of the wrong type, out of range, in an
# odd alphabet or huge. Valid results (some are) stay suspended: the row is about what is refused.
FIELDS = ["metadata.name", "spec.training.maxSteps", "spec.training.learningRate", "spec.training.batchSize",
          "spec.training.precision", "spec.training.warmupSteps", "spec.model.size", "spec.model.hiddenSize",
          "spec.tokenizer.vocabSize", "spec.data.train.uri", "spec.data.textField", "spec.checkpoint.uri",
          "spec.checkpoint.keep", "spec.resources.workers", "spec.resources.memory", "spec.resources.cpu",
          "spec.metrics.port", "spec.backoffLimit", "spec.stallTimeoutSeconds", "spec.s3", "spec.training",
          "spec.unknownField", "spec.terminationGracePeriodSeconds"]
# 2**63 - 1: the largest integer an API server parses (int64).
VALUES: list[Any] = [None, -1, 0, 2**63 - 1, 1e308, -0.5, "", "ünïcödé-ñame", "7b-pretrain", "a" * 60, "x" * 100_000,
                     "\u2028\u0000", "s3://", "../../etc/passwd", True, [], {}, {"nested": [1, 2]}, "1e9Gi", "NaN"]


def fuzzed(rng: random.Random, index: int) -> tuple[dict[str, Any], str]:
    job = fake_job(f"fuzz-{index}", steps=100, suspend=True)
    path, value = rng.choice(FIELDS), rng.choice(VALUES)
    if path == "metadata.name":
        # A name of another type is no object the API server parses at all (400); the emulator
        # has no such check, and fails on it.
        value = str(value)
    node = job
    *parents, leaf = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return job, f"{path}={str(value)[:20]!r}"


async def test_fuzzed_manifests(cluster: Any, fake_kubelet: Kubelet, tmp_path: Path,
                               fault_size: str) -> None:
    """Each manifest is refused by the CRD schema (naming the field) or reaches the operator, which
    fails it as InvalidSpec naming the field or (a valid job after all) keeps it Suspended; the
    operator raises no exception."""
    count = SCALE[fault_size]["fuzzed_manifests"]
    rng = random.Random(2026)
    refused, admitted, unnamed = 0, [], []
    async with operator_process(cluster, cluster.url, tmp_path) as operator:
        for index in range(count):
            job, what = fuzzed(rng, index)
            try:
                created = await cluster.client.create(job, cluster.namespace)
                admitted.append(created["metadata"]["name"])
            except ApiError as exc:
                refused += 1
                message = exc.body.get("message", "") if isinstance(exc.body, dict) else str(exc.body)
                if exc.status != 422 or not any(f in message for f in ("spec.", "metadata.name")):
                    unnamed.append(f"{what}: {exc.status} {message[:300]}")

        async def settled() -> dict[str, dict[str, Any]] | None:
            current = await statuses(cluster)
            done = all(current.get(n, {}).get("phase") in ("Failed", "Suspended") for n in admitted)
            return current if done else None

        final = await cluster.wait_for(settled, 120, "the operator to decide every admitted job")
        errors = operator.sample("kubeforge_operator_reconcile_errors_total")
        exceptions = tracebacks(operator)
        pods = await cluster.list_pods("kubeforge.io/job-kind=ptj")
    invalid = [n for n in admitted if final[n].get("reason") == "InvalidSpec"]
    unnamed += [f"{n}: {final[n].get('message')}" for n in invalid
                if not any(f in final[n].get("message", "") for f in ("spec.", "metadata.name"))]
    report("fuzzed manifests", manifests=count, refused_by_crd=refused, invalid_spec=len(invalid),
           valid_and_suspended=len(admitted) - len(invalid), unnamed_refusals=len(unnamed),
           reconcile_errors=int(errors), operator_exceptions=exceptions)
    assert unnamed == [] and errors == 0 and exceptions == 0 and pods == []


# A SweepJob killed mid-search. Its trials' evaluations come 8 s apart (20 steps at 2.5 a second): longer
# than the operator takes to restart, so the new one sees every evaluation an undisturbed one sees.
SWJ = "SweepJob"
SWEEP = "kill-sweep"
SWEEP_STEPS, SWEEP_EVAL_INTERVAL, SWEEP_RATE = 40, 20, 2.5


def fake_sweep(name: str) -> dict[str, Any]:
    """4 LoRA trials, 2 at a time, median pruning: FinetuneJobs for the fake trainer (eval loss by learning rate)."""
    template = {"baseModel": {"uri": "s3://faults/data/base"}, "task": "sequence-classification", "method": "lora",
                "lora": {"alpha": 16},
                "data": {"train": {"uri": "s3://faults/data/reviews.jsonl"},
                         "eval": {"uri": "s3://faults/data/reviews-eval.jsonl"}},
                "training": {"maxSteps": SWEEP_STEPS, "evalInterval": SWEEP_EVAL_INTERVAL},
                "resources": {"gpusPerWorker": 0, "cpu": "100m", "memory": "64Mi"}, "metrics": {"port": 9400},
                "podTemplate": {"env": [{"name": "FAKE_STEPS_PER_SECOND", "value": str(SWEEP_RATE)}]}}
    return {"apiVersion": "kubeforge.io/v1alpha1", "kind": SWJ, "metadata": {"name": name}, "spec": {
        "template": {"kind": FTJ, "spec": template},
        "parameters": [{"path": "training.learningRate", "type": "float", "low": 1e-5, "high": 1e-1, "log": True},
                       {"path": "lora.r", "type": "choice", "values": [4, 8]}],
        "objective": {"metric": "eval.loss", "direction": "minimize"},
        "maxTrials": 4, "parallelism": 2, "earlyStopping": "median", "startupTrials": 1, "seed": 0}}


class TrialWatch:
    """Polls a sweep's trial jobs and their pods: every uid each trial's job and its pods ever had.
    A second uid under one name is a trial created (or run) twice."""

    def __init__(self, cluster: Any, sweep: str):
        self.cluster, self.sweep = cluster, sweep
        self.jobs: dict[str, set[str]] = defaultdict(set)
        self.pods: dict[str, set[str]] = defaultdict(set)
        self.failed_polls: list[str] = []
        self._task: asyncio.Task[None] | None = None

    async def _poll(self) -> None:
        while True:
            try:
                jobs = await self.cluster.list(FTJ, {LABEL_SWEEP: self.sweep})
                pods = await self.cluster.list_pods("kubeforge.io/job-kind=ftj")
            except (ApiError, aiohttp.ClientError, TimeoutError) as exc:
                self.failed_polls.append(repr(exc))  # one poll missed; a job lives for seconds
                jobs, pods = [], []
            for job in jobs:
                self.jobs[job["metadata"]["name"]].add(job["metadata"]["uid"])
            for pod in pods:
                self.pods[pod["metadata"]["labels"]["kubeforge.io/job-name"]].add(pod["metadata"]["uid"])
            await asyncio.sleep(0.2)

    def __enter__(self) -> TrialWatch:
        self._task = asyncio.ensure_future(self._poll())
        return self

    def __exit__(self, *_: Any) -> None:
        assert self._task is not None
        if self._task.done():
            self._task.result()  # a poll that failed fails the test: it saw nothing after it
        self._task.cancel()


async def sweep_status(cluster: Any) -> dict[str, Any]:
    found = await cluster.get(SWJ, SWEEP)
    return (found or {}).get("status") or {}


async def first_trials_evaluated(cluster: Any) -> bool:
    trials = (await sweep_status(cluster)).get("trials", [])
    return len(trials) == 2 and all(t["state"] == "Running" and t.get("intermediate") for t in trials)


def sweep_reconciled(operator: OperatorProcess) -> bool:
    """Whether this operator process has reconciled the sweep once (it counts each kind it has seen)."""
    return 'kubeforge_operator_jobs_seen_total{kind="SweepJob"} 1.0' in (operator.metrics() or "")


async def test_operator_killed_mid_sweep(cluster: Any, fake_kubelet: Kubelet, tmp_path: Path) -> None:
    """SIGKILL the operator while a sweep's first trials run, and again between the status write that
    records the next trial and its job's creation (that create held at a proxy): no trial is created or
    run twice, none is lost, and the sweep ends with the trials and best trial of an undisturbed run."""
    manifest = fake_sweep(SWEEP)
    expected = undisturbed(manifest)
    recovery: list[float] = []
    async with fault_proxy(cluster.client) as proxy, operator_process(cluster, proxy.url, tmp_path) as operator:
        with TrialWatch(cluster, SWEEP) as watch:
            started = time.monotonic()
            await cluster.apply(manifest)
            await cluster.wait_for(lambda: first_trials_evaluated(cluster), 120, "the first 2 trials evaluated")
            operator.kill(signal.SIGKILL)
            killed = time.monotonic()
            await operator.start()
            await cluster.wait_for(lambda: sweep_reconciled(operator), 60, "the new operator to reconcile the sweep")
            recovery.append(round(time.monotonic() - killed, 1))

            proxy.hold_next_create("finetunejobs")  # the next trial's: its status is written first
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proxy.held.wait(), 60)
            assert proxy.held.is_set(), "no trial's creation came to hold"
            recorded = [t["name"] for t in (await sweep_status(cluster))["trials"]]
            unmade = [n for n in recorded if await cluster.get(FTJ, n) is None]
            operator.kill(signal.SIGKILL)
            killed = time.monotonic()
            proxy.release()
            await operator.start()
            await cluster.wait_for(lambda: _all_exist(cluster, unmade), 60, "the recorded trials' jobs")
            recovery.append(round(time.monotonic() - killed, 1))

            done = await cluster.wait_for(lambda: phase_is(cluster, SWJ, SWEEP, "Succeeded", "Failed"), 180,
                                          "the sweep to end")
            elapsed = time.monotonic() - started
            await asyncio.sleep(0.5)  # a last poll of the trials
        exceptions = tracebacks(operator)
    names = [t["name"] for t in done["trials"]]
    duplicate_jobs = sum(len(uids) - 1 for uids in watch.jobs.values())
    duplicate_pods = sum(max(0, len(uids) - 1) for uids in watch.pods.values())
    pruned = sum(t["state"] == "Pruned" for t in done["trials"])
    report("operator SIGKILLed mid-sweep", kills=2, trials=len(names), pruned=pruned,
           recorded_without_job_at_kill=len(unmade), duplicate_trial_jobs=duplicate_jobs,
           duplicate_trial_pods=duplicate_pods, recovery_s=recovery, missed_polls=len(watch.failed_polls),
           seconds=round(elapsed, 1))
    FAULT_RESULTS.append((
        "operator SIGKILLed mid-sweep (4 trials, 2 at a time, median pruning)",
        "2 times: trials running; between the status write recording a trial and its job's creation",
        "no trial created or run twice, none lost; trials and bestTrial as an undisturbed run's",
        f"{len(names)} trials ({pruned} pruned), {len(unmade)} recorded without a job at the 2nd kill; "
        f"{duplicate_jobs} duplicate trial jobs, {duplicate_pods} duplicate pods; recovered in {recovery} s; "
        f"{elapsed:.0f} s"))
    assert unmade, recorded  # the second kill came after the status write and before the create
    assert names == [f"{SWEEP}-t{n}" for n in range(4)] and sorted(watch.jobs) == names  # none lost, none twice
    assert duplicate_jobs == 0 and duplicate_pods == 0 and exceptions == 0, (dict(watch.jobs), dict(watch.pods))
    assert done["phase"] == expected["phase"] == "Succeeded", done.get("message")
    assert same_search(done["trials"]) == same_search(expected["trials"])
    best, expected_best = done["bestTrial"], expected["bestTrial"]
    assert (best["number"], best["parameters"], best["value"]) == (
        expected_best["number"], expected_best["parameters"], expected_best["value"])


def started_trials(operator: OperatorProcess) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in (operator.metrics() or "").splitlines()
               if line.startswith('kubeforge_operator_sweep_trials_total{outcome="started"}'))


async def test_a_sweep_whose_watch_lags(cluster: Any, fake_kubelet: Kubelet, tmp_path: Path) -> None:
    """The sweep's watch events reach the operator 2 s late (4 resyncs): Kopf hands its timer a sweep
    one status write or more behind. No trial is created or started twice; the sweep ends as an
    undisturbed one."""
    manifest = fake_sweep(SWEEP)
    expected = undisturbed(manifest)
    async with fault_proxy(cluster.client) as proxy:
        proxy.watch_lag = ("sweepjobs", 2.0)
        async with operator_process(cluster, proxy.url, tmp_path) as operator:
            with TrialWatch(cluster, SWEEP) as watch:
                started = time.monotonic()
                await cluster.apply(manifest)
                done = await cluster.wait_for(lambda: phase_is(cluster, SWJ, SWEEP, "Succeeded", "Failed"), 180,
                                              "the sweep to end")
                elapsed = time.monotonic() - started
                await asyncio.sleep(0.5)  # a last poll of the trials
            counted = started_trials(operator)
            exceptions = tracebacks(operator)
    duplicate_jobs = sum(len(uids) - 1 for uids in watch.jobs.values())
    duplicate_pods = sum(max(0, len(uids) - 1) for uids in watch.pods.values())
    report("a sweep's watch 2 s late", trials=len(done["trials"]), started_counted=int(counted),
           duplicate_trial_jobs=duplicate_jobs, duplicate_trial_pods=duplicate_pods,
           missed_polls=len(watch.failed_polls), seconds=round(elapsed, 1))
    FAULT_RESULTS.append((
        "a sweep's watch events 2 s late (4 resync intervals; a proxy delays them)", "the whole sweep",
        "no trial created or run twice; trials and bestTrial as an undisturbed run's",
        f"{len(done['trials'])} trials, {int(counted)} starts counted; {duplicate_jobs} duplicate trial jobs, "
        f"{duplicate_pods} duplicate pods; {elapsed:.0f} s"))
    assert sorted(watch.jobs) == [t["name"] for t in done["trials"]]  # the poll saw every trial
    assert duplicate_jobs == 0 and duplicate_pods == 0 and counted == 4 and exceptions == 0, dict(watch.jobs)
    assert same_search(done["trials"]) == same_search(expected["trials"])
    assert done["bestTrial"]["name"] == expected["bestTrial"]["name"]


async def _all_exist(cluster: Any, names: list[str]) -> bool:
    return all([await cluster.get(FTJ, n) is not None for n in names])
