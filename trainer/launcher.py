"""One process per GPU: what a pod runs when it has more than one (torchrun's job, without its agent).

Kept free of torch: the supervisor of a pod's processes need not load it."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

LAUNCHER_STOP_GRACE = 10.0


@dataclass(frozen=True)
class Exit:
    """How a pod's processes ended: the pod's exit code, and the local rank that decided it."""

    code: int
    #: The first process to fail (None when every process succeeded): its cause is the pod's.
    local_rank: int | None


def launch(processes: int, command: Callable[[int], list[str]], env: Mapping[str, str] = os.environ) -> Exit:
    """Run `command(local_rank)` once per local rank with torchrun's environment, and supervise them.

    The pod's NODE_RANK and WORLD_SIZE (every process of every pod) give each process
    RANK = NODE_RANK * processes + LOCAL_RANK. The first process to fail takes the others down and
    its exit code (128 + signal when killed) becomes the pod's, so one dead process fails the pod and
    the operator restarts the whole gang; SIGTERM to the pod reaches every process."""
    node_rank = int(env.get("NODE_RANK", "0"))
    world_size = int(env.get("WORLD_SIZE", str(processes)))
    if world_size % processes or node_rank >= world_size // processes:
        raise ValueError(f"NODE_RANK {node_rank} and WORLD_SIZE {world_size} do not fit {processes} processes per pod")
    children: dict[int, subprocess.Popen[bytes]] = {}
    local_ranks: dict[int, int] = {}
    for local_rank in range(processes):
        child_env = {**env, "RANK": str(node_rank * processes + local_rank), "LOCAL_RANK": str(local_rank),
                     "LOCAL_WORLD_SIZE": str(processes), "WORLD_SIZE": str(world_size)}
        child = subprocess.Popen(command(local_rank), env=child_env)
        children[child.pid] = child
        local_ranks[child.pid] = local_rank

    terminating = False

    def forward(signum: int, _frame: Any) -> None:
        nonlocal terminating
        terminating = True
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        code, failed = 0, None
        while children and code == 0:
            pid, status = os.wait()  # returns when a child exits: every child ends, or is ended below
            if pid in children:
                exit_code = children.pop(pid).returncode = os.waitstatus_to_exitcode(status)
                code = 128 - exit_code if exit_code < 0 else exit_code  # negative: killed by that signal
                if code:
                    failed = local_ranks[pid]
                    log.error("local rank %d (pid %d) exited with code %d: stopping the others", failed, pid, code)
        # On SIGTERM every process stops by itself at the same step; rank 0 may still be committing its
        # checkpoint after the others exit, so none is killed (the kubelet's grace period bounds the wait).
        _stop(list(children.values()), grace=None if terminating else LAUNCHER_STOP_GRACE)
        return Exit(code, failed)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop(children: list[subprocess.Popen[bytes]], grace: float | None) -> None:
    """Ask the processes to stop; after `grace` seconds (None: no limit) kill what is left."""
    for child in children:
        child.terminate()
    deadline = None if grace is None else time.monotonic() + grace
    for child in children:
        try:
            child.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
