"""Faults with real containers (`pytest --cluster=node`): what a user or the cluster does to a running
job on a real kubelet, each reported with its figures in the fault table (docs/reliability.md).

- `kubectl delete pod` of a running worker: the kubelet sends SIGTERM, the trainer commits the step
  it is on and exits 143, the gang restarts and resumes there: no step lost;
- SIGKILL to the trainer inside its container: the pod fails with 137, the gang restarts and
  resumes from the newest committed checkpoint: at most one checkpoint interval lost;
- spec.suspend set and cleared: the pods are deleted (SIGTERM) and the job resumes where it stopped;
- two workers whose rendezvous goes through pod DNS (`w0.<job>-ptj`);
- the operator's pod deleted while jobs start: the Deployment replaces it, every job succeeds, and
  no pod is created twice.
"""

from __future__ import annotations

import copy
import os
import random
import re
import signal
import subprocess
import threading
import time
from typing import Any

import pytest
import yaml
from k8s.cluster import Cluster
from support.e2e import PTJ, no_job_pods, phase_is, status
from support.faults import FAULT_RESULTS, RESUMED_LINE, STEP_LINE
from support.jobs import EXAMPLES
from support.node import RELEASE, RELEASE_NAMESPACE, Node

pytestmark = [pytest.mark.node, pytest.mark.faults]

STOPPED_LINE = re.compile(r"stopped on SIGTERM at step (\d+) of \d+, its checkpoint committed")
WORLD_LINE = re.compile(r"steps \d+\.\.\d+ on (\w+) x(\d+)")
INTERVAL = 20
#: Rounds of each fault: a few in CI, more with --fault-size full.
ROUNDS = {"ci": 1, "full": 3}


def small_pretrain(name: str, steps: int, **resources: Any) -> dict[str, Any]:
    """The pipeline's PretrainJob (its data in the image), checkpointing every INTERVAL steps and
    logging every step: the tiny model trains some 20 steps a second here, so a fault's job needs
    about a thousand steps to still be running when the fault comes."""
    job = copy.deepcopy(next(d for d in yaml.safe_load_all((EXAMPLES / "pipeline.yaml").read_text())
                             if d["kind"] == PTJ))
    job["metadata"] = {"name": name}
    job["spec"]["training"].update(maxSteps=steps, evalInterval=steps, logInterval=1, warmupSteps=5)
    job["spec"]["checkpoint"] = {"intervalSteps": INTERVAL, "keep": 3}
    job["spec"]["resources"].update(resources)
    return job


class PodLog:
    """`kubectl logs -f` of one pod, read as it is written: the trainer's step, resume and stop lines."""

    def __init__(self, node: Node, namespace: str, pod: str):
        self.process = subprocess.Popen(
            [str(node.kubectl_path), "--kubeconfig", node.kubeconfig, "-n", namespace, "logs", "-f", pod],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    def last(self, pattern: re.Pattern[str]) -> int | None:
        found = [int(m[1]) for line in list(self.lines) if (m := pattern.search(line))]
        return found[-1] if found else None

    @property
    def step(self) -> int:
        return self.last(STEP_LINE) or 0

    def close(self) -> str:
        self.process.terminate()
        self.process.wait(10)
        self._reader.join(10)
        return "".join(self.lines)


class Follower:
    """The rank-0 trainer of one job, pod after pod: after a fault the operator may replace a pod as
    the next gang attempt or, when the gang never ran, as the same one: a new pod is a new uid."""

    def __init__(self, cluster: Cluster, node: Node, job: str):
        self.cluster, self.node, self.job = cluster, node, job
        self.seen: set[str] = set()
        self.pod: dict[str, Any] = {}

    async def next(self, timeout: float = 240) -> PodLog:
        """The log of the job's next rank-0 pod, once its container runs."""
        async def running() -> dict[str, Any] | None:
            for pod in await self.cluster.list_pods(f"kubeforge.io/job-name={self.job},kubeforge.io/rank=0"):
                states = [s.get("state", {}) for s in (pod.get("status") or {}).get("containerStatuses") or []]
                if pod["metadata"]["uid"] not in self.seen and states and "running" in states[0] \
                        and not pod["metadata"].get("deletionTimestamp"):
                    return pod
            return None

        self.pod = await self.cluster.wait_for(running, timeout, f"a new running rank-0 pod of {self.job}")
        self.seen.add(self.pod["metadata"]["uid"])
        return PodLog(self.node, self.cluster.namespace, self.pod["metadata"]["name"])

    @property
    def name(self) -> str:
        return str(self.pod["metadata"]["name"])

    @property
    def container_id(self) -> str:
        return str(self.pod["status"]["containerStatuses"][0]["containerID"])


async def resumed_at(cluster: Cluster, log: PodLog) -> int:
    """The step the trainer of log resumed from, once it says so."""
    await cluster.wait_for(lambda: log.last(RESUMED_LINE) is not None, 120, "the resume line")
    return log.last(RESUMED_LINE) or 0


async def wait_for_step(cluster: Cluster, log: PodLog, step: int, timeout: float = 300) -> int:
    await cluster.wait_for(lambda: log.step >= step, timeout, f"step {step} in the trainer's log")
    return log.step


async def finished(cluster: Cluster, name: str, timeout: float = 600) -> dict[str, Any]:
    return await cluster.wait_for(lambda: phase_is(cluster, PTJ, name, "Succeeded", "Failed"), timeout,
                                  f"{name} to finish", interval=1)


async def test_a_deleted_worker_pod_loses_no_step_and_a_sigkilled_trainer_resumes(
        node_cluster: Cluster, node: Node, fault_size: str) -> None:
    cluster, rng = node_cluster, random.Random(20)
    rounds = ROUNDS[fault_size]
    steps = 600 + 400 * rounds
    job = small_pretrain("faulted", steps)
    # Neither fault is a DisruptionTarget (no eviction, no preemption): each may count as a restart.
    job["spec"]["backoffLimit"] = 2 * rounds
    await cluster.apply(job)
    deleted_lost, deleted_seconds, killed_lost = [], [], []
    trainer, reached = Follower(cluster, node, "faulted"), 0
    for _ in range(rounds):
        # kubectl delete pod: the kubelet's SIGTERM, the job's grace period.
        log = await trainer.next()
        reached = await wait_for_step(cluster, log, rng.randint(reached + 5, reached + 100))
        sent = time.monotonic()
        node.kubectl("-n", cluster.namespace, "delete", "pod", trainer.name, timeout=120)
        deleted_seconds.append(time.monotonic() - sent)
        text = log.close()
        stopped = log.last(STOPPED_LINE)
        assert stopped is not None, text[-3000:]
        log = await trainer.next()
        resumed = await resumed_at(cluster, log)
        deleted_lost.append(stopped - resumed)

        # SIGKILL inside the container, from the node: no chance to commit.
        await wait_for_step(cluster, log, resumed + rng.randint(INTERVAL + 1, 100))
        os.kill(node.container_pid(trainer.container_id), signal.SIGKILL)
        log.process.wait(30)  # the stream ends with the container: its last line is the last step done
        killed_at = log.step
        log.close()
        log = await trainer.next()
        reached = await resumed_at(cluster, log)
        killed_lost.append(killed_at - reached)
        log.close()
    done = await finished(cluster, "faulted")
    assert done["phase"] == "Succeeded" and done["stepProgress"] == f"{steps}/{steps}", done
    assert deleted_lost == [0] * rounds, deleted_lost
    assert all(0 <= lost <= INTERVAL for lost in killed_lost), killed_lost
    FAULT_RESULTS.append((
        "real node: `kubectl delete pod` of a running worker (kubelet SIGTERM)", f"{rounds} times",
        "0 steps lost; gang restarts and resumes", f"{sum(deleted_lost)} steps lost; delete returned in max "
        f"{max(deleted_seconds):.1f}s; job Succeeded {done['stepProgress']}"))
    FAULT_RESULTS.append((
        "real node: SIGKILL to the trainer inside its container", f"{rounds} times",
        f"resumed from the newest checkpoint (interval {INTERVAL})",
        f"steps lost per kill {killed_lost}; job Succeeded, {len(trainer.seen)} rank-0 pods, "
        f"{done['restarts']} gang restarts"))


async def test_a_suspended_job_resumes_where_it_stopped(node_cluster: Cluster, node: Node) -> None:
    cluster = node_cluster
    await cluster.apply(small_pretrain("paused", 1000))
    trainer = Follower(cluster, node, "paused")
    log = await trainer.next()
    await wait_for_step(cluster, log, 30)
    await cluster.patch(PTJ, "paused", {"spec": {"suspend": True}})
    suspended = await cluster.wait_for(lambda: phase_is(cluster, PTJ, "paused", "Suspended"), 120, "Suspended",
                                       interval=0.5)
    await cluster.wait_for(lambda: no_job_pods(cluster, "paused"), 120, "the suspended job's pods deleted")
    text = log.close()
    stopped = log.last(STOPPED_LINE)
    assert stopped is not None, text[-3000:]
    await cluster.patch(PTJ, "paused", {"spec": {"suspend": False}})
    log = await trainer.next()
    resumed = await resumed_at(cluster, log)
    log.close()
    done = await finished(cluster, "paused")
    assert done["phase"] == "Succeeded" and done["stepProgress"] == "1000/1000", done
    assert resumed == stopped, (stopped, resumed)
    FAULT_RESULTS.append((
        "real node: spec.suspend set, then cleared", "1 time", "pods deleted, 0 steps lost",
        f"stopped at step {stopped}, resumed at {resumed}; Suspended reason {suspended.get('reason')}; "
        "job Succeeded 1000/1000"))


async def test_two_workers_rendezvous_through_pod_dns(node_cluster: Cluster, node: Node) -> None:
    cluster = node_cluster
    started = time.monotonic()
    await cluster.apply(small_pretrain("pair", 40, workers=2, cpu="500m", memory="2Gi"))
    log = await Follower(cluster, node, "pair").next()
    done = await finished(cluster, "pair", timeout=300)
    took = time.monotonic() - started
    text = log.close()
    assert done["phase"] == "Succeeded" and done["stepProgress"] == "40/40", (done, text[-3000:])
    world = WORLD_LINE.search(text)
    assert world and world[2] == "2", text[-3000:]
    FAULT_RESULTS.append((
        "real node: 2 workers, rendezvous at w0.<job>-ptj through pod DNS", "1 job", "Succeeded, world size 2",
        f"40 steps in {took:.0f}s from apply, on {world[1]} x{world[2]}"))


async def test_the_operator_pod_deleted_while_jobs_start(node_cluster: Cluster, node: Node) -> None:
    cluster = node_cluster
    names = [f"burst-{i}" for i in range(3)]
    for name in names:
        await cluster.apply(small_pretrain(name, 20, cpu="300m", memory="2Gi"))
    old = node.kubectl("-n", RELEASE_NAMESPACE, "get", "pods", "-l", "app.kubernetes.io/component=operator",
                       "-o", "name").stdout.split()
    sent = time.monotonic()
    node.kubectl("-n", RELEASE_NAMESPACE, "delete", "pod", "-l", "app.kubernetes.io/component=operator",
                 "--wait=false")
    node.kubectl("-n", RELEASE_NAMESPACE, "rollout", "status", f"deployment/{RELEASE}", "--timeout=180s",
                 timeout=200)
    replaced = time.monotonic() - sent
    seen: set[str] = set()

    async def all_finished() -> bool:
        seen.update(p["metadata"]["name"] for p in await cluster.list_pods("app.kubernetes.io/managed-by=kubeforge"))
        phases = [(await status(cluster, PTJ, name)).get("phase") for name in names]
        return all(p in ("Succeeded", "Failed") for p in phases)

    await cluster.wait_for(all_finished, 600, "the three jobs to finish", interval=0.5)
    took = time.monotonic() - sent
    new = node.kubectl("-n", RELEASE_NAMESPACE, "get", "pods", "-l", "app.kubernetes.io/component=operator",
                       "-o", "name").stdout.split()
    finals = {name: await status(cluster, PTJ, name) for name in names}
    assert {n: f["phase"] for n, f in finals.items()} == dict.fromkeys(names, "Succeeded"), finals
    assert {n: f.get("restarts", 0) for n, f in finals.items()} == dict.fromkeys(names, 0), finals
    assert seen <= {f"{name}-ptj-w0-a0" for name in names}, seen  # one pod per job, never a second
    assert set(new).isdisjoint(old), (old, new)
    FAULT_RESULTS.append((
        "real node: the operator's pod deleted as 3 jobs start", "1 time",
        "Deployment replaces it; all Succeeded; no duplicate pod",
        f"new operator Ready in {replaced:.0f}s; 3/3 Succeeded {took:.0f}s after the delete; "
        f"{len(seen)} pods for 3 jobs, 0 restarts"))
