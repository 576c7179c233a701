"""Data-parallel training as a multi-worker pod runs it: torchrun, two CPU processes, gloo."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from support.corruption import committed_steps
from support.jobs import ROOT, tiny_pretrain, write_manifest
from support.processes import free_port, wait_until

from kubeforge.trainer.checkpoint import SHARDS, load_sharded
from kubeforge.trainer.data import Batches

BIN = Path(sys.executable).parent


def test_two_workers_train_and_only_rank_0_writes(tmp_path: Path) -> None:
    job = tiny_pretrain("tiny-ddp", maxSteps=20, batchSize=4, sequenceLength=32, warmupSteps=2,
                        evalInterval=10, evalBatches=2, logInterval=5)
    # keep is above the number of checkpoints, so retention cannot hide a second writer's directories.
    job["spec"]["checkpoint"] = {"intervalSteps": 5, "keep": 10}
    job["spec"]["resources"]["workers"] = 2
    manifest = write_manifest(tmp_path / "job.yaml", job)
    checkpoints, result_file = tmp_path / "out", tmp_path / "result.json"

    command = [
        str(BIN / "torchrun"), "--nnodes", "1", "--nproc_per_node", "2", "--rdzv_backend", "static",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "--no-python", str(BIN / "kubeforge"), "train", "--spec", str(manifest),
        "--checkpoint-uri", str(checkpoints), "--result", str(result_file),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    process = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    log = process.stdout + process.stderr
    assert process.returncode == 0, log

    # Both workers ran and logged, each under its own rank.
    assert re.search(r"INFO rank0 ", log) and re.search(r"INFO rank1 ", log), log
    assert "steps 0..20 on cpu x2" in log

    # One writer: every checkpoint commit and the export are rank 0's.
    commits = re.findall(r"INFO (rank\d) kubeforge\.trainer\.checkpoint: checkpoint step (\d+) committed", log)
    assert commits == [("rank0", "5"), ("rank0", "10"), ("rank0", "15"), ("rank0", "20")], log
    exports = re.findall(r"INFO (rank\d) \S+: exported the model", log)
    assert exports == ["rank0"], log

    directories = sorted(p.name for p in (checkpoints / "checkpoints").iterdir())
    assert directories == ["step-00000005", "step-00000010", "step-00000015", "step-00000020"]
    for name in directories:
        directory = checkpoints / "checkpoints" / name
        committed = json.loads((directory / "manifest.json").read_text())
        assert committed["rank"] == 0
        assert committed["step"] == int(name.removeprefix("step-"))
        listed = {entry["name"]: entry for entry in committed["files"]}
        assert set(listed) == {p.name for p in directory.iterdir()} - {"manifest.json"}
        for file_name, entry in listed.items():
            body = (directory / file_name).read_bytes()
            assert (entry["size"], entry["sha256"]) == (len(body), hashlib.sha256(body).hexdigest())
    assert (checkpoints / "export" / "manifest.json").is_file()
    assert (checkpoints / "export" / "config.json").is_file()

    result = json.loads(result_file.read_text())
    assert (result["workers"], result["step"], result["device"]) == (2, 20, "cpu")


def rows_of(batch: dict[str, torch.Tensor]) -> set[int]:
    return {int(row[0]) for row in batch["input_ids"]}


def test_ranks_get_disjoint_deterministic_shards() -> None:
    rows = torch.arange(40 * 3).view(40, 3)  # row i starts with 3 * i: every row is identifiable
    tensors = {"input_ids": rows, "labels": rows}
    rank0, rank1 = (Batches(tensors, batch_size=4, seed=7, rank=r, world_size=2) for r in (0, 1))
    assert rank0.per_epoch == rank1.per_epoch == 5

    for epoch in range(2):
        seen: list[int] = []
        for index in range(epoch * 5, (epoch + 1) * 5):
            a, b = rows_of(rank0[index].inputs), rows_of(rank1[index].inputs)
            assert len(a) == len(b) == 4
            assert not a & b, f"micro-batch {index}: both ranks train on rows {sorted(a & b)}"
            seen += [*a, *b]
        # One epoch across both ranks visits 40 distinct rows: no row is trained twice, none skipped.
        assert sorted(seen) == [3 * i for i in range(40)]

    # A micro-batch is a function of its index (what makes resuming exact), on a fresh instance too.
    again = Batches(tensors, batch_size=4, seed=7, rank=1, world_size=2)
    for index in (0, 3, 7, 12):
        assert torch.equal(again[index].inputs["input_ids"], rank1[index].inputs["input_ids"])
        assert torch.equal(again[index].inputs["labels"], rank1[index].inputs["labels"])
    # ...and each epoch is reshuffled rather than replayed.
    assert [rows_of(rank0[i].inputs) for i in range(5)] != [rows_of(rank0[i].inputs) for i in range(5, 10)]


def run_pods(tmp_path: Path, name: str, pods: int, processes: int, steps: int = 12) -> tuple[dict[str, Any], str]:
    """`pods` launchers of `processes` trainer processes each, as that many pods run them: ranks
    from NODE_RANK, rendezvous at one address."""
    job = tiny_pretrain(name, maxSteps=steps, batchSize=2, sequenceLength=32, warmupSteps=2, evalInterval=1000,
                        logInterval=1)
    job["spec"]["checkpoint"] = {"intervalSteps": 100}
    manifest = write_manifest(tmp_path / f"{name}.yaml", job)
    result_file, port = tmp_path / f"{name}-result.json", free_port()
    launched = []
    for node_rank in range(pods):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "NODE_RANK": str(node_rank),
               "WORLD_SIZE": str(pods * processes), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        command = [sys.executable, "-m", "kubeforge", "train", "--spec", str(manifest), "--checkpoint-uri",
                   str(tmp_path / name), "--result", str(result_file), "--processes", str(processes)]
        launched.append(subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True))
    logs = [process.communicate(timeout=300)[0] for process in launched]
    log = "\n".join(logs)
    assert [p.returncode for p in launched] == [0] * pods, log
    return json.loads(result_file.read_text()), log


def test_two_pods_of_two_processes_train_as_one_world_of_four(tmp_path: Path) -> None:
    two_by_two, log = run_pods(tmp_path, "two-by-two", pods=2, processes=2)
    assert {int(r) for r in re.findall(r"INFO rank(\d) ", log)} == {0, 1, 2, 3}, log
    assert "on cpu x4" in log
    one_by_four, _ = run_pods(tmp_path, "one-by-four", pods=1, processes=4)
    assert two_by_two["workers"] == one_by_four["workers"] == 4
    # The same ranks see the same data: the pods' split of the processes changes nothing but the
    # order of floating-point sums in the all-reduce.
    assert two_by_two["trainLoss"] == pytest.approx(one_by_four["trainLoss"], rel=1e-4)
    single, _ = run_pods(tmp_path, "one-by-one", pods=1, processes=1)
    assert single["workers"] == 1 and single["trainLoss"] != pytest.approx(two_by_two["trainLoss"], rel=1e-4)


def launch_pod(manifest: Path, checkpoints: Path, processes: int, *extra: str) -> subprocess.Popen[str]:
    """`kubeforge train --processes N` as a pod runs it, in a process group of its own: SIGKILL to
    the group is the pod's death, every trainer process at once."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    command = [sys.executable, "-m", "kubeforge", "train", "--spec", str(manifest), "--checkpoint-uri",
               str(checkpoints), "--result", str(checkpoints / "result.json"), "--processes", str(processes), *extra]
    return subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finished(process: subprocess.Popen[str], checkpoints: Path) -> tuple[dict[str, Any], str]:
    log = process.communicate(timeout=300)[0]
    assert process.returncode == 0, log[-3000:]
    return json.loads((checkpoints / "result.json").read_text()), log


def test_an_fsdp_run_killed_after_a_checkpoint_resumes_on_one_process_to_the_uninterrupted_loss(
        tmp_path: Path) -> None:
    steps = 120
    job = tiny_pretrain("tiny-fsdp", maxSteps=steps, batchSize=4, sequenceLength=32, warmupSteps=2,
                        evalInterval=1000, evalBatches=3, logInterval=50, parallelism="fsdp")
    job["spec"]["checkpoint"] = {"intervalSteps": 20, "keep": 2}
    manifest = write_manifest(tmp_path / "job.yaml", job)

    clean = tmp_path / "uninterrupted"
    uninterrupted, _ = finished(launch_pod(manifest, clean, processes=2), clean)

    checkpoints = tmp_path / "killed"
    pod = launch_pod(manifest, checkpoints, processes=2)
    try:
        wait_until(lambda: committed_steps(checkpoints), 120, "the first committed checkpoint")
    finally:
        os.killpg(pod.pid, signal.SIGKILL)
        pod.communicate(timeout=30)
    newest = committed_steps(checkpoints)[-1]
    assert 0 < newest < steps
    committed = json.loads((checkpoints / "checkpoints" / f"step-{newest:08d}" / "manifest.json").read_text())
    assert committed["sharded"] and committed["worldSize"] == 2
    assert {"shards/__0_0.distcp", "shards/__1_0.distcp"} <= {entry["name"] for entry in committed["files"]}

    resumed, log = finished(launch_pod(manifest, checkpoints, processes=1), checkpoints)
    assert f"resuming from checkpoint step {newest} " in log and "on cpu x1" in log
    assert (resumed["resumedFromStep"], resumed["step"], resumed["workers"]) == (newest, steps, 1)
    assert resumed["evalHistory"][0]["step"] == 0  # the history the two processes wrote, carried over
    # The one process trains both processes' micro-batches of each step, one after the other: the
    # same steps, up to the order of floating-point sums. (Training half the batch per step instead
    # ended 0.12 higher in a 200-step run.)
    start, clean_loss, resumed_loss = (resumed["evalHistory"][0]["loss"], uninterrupted["finalEval"]["loss"],
                                       resumed["finalEval"]["loss"])
    assert abs(resumed_loss - clean_loss) < 5e-3, (
        f"eval loss {start:.4f} at step 0; after {steps} steps {clean_loss:.4f} uninterrupted on 2 processes, "
        f"{resumed_loss:.4f} killed at step {newest} and resumed on 1")

    # The export of the sharded run is one Hugging Face model: the gathered weights of its last checkpoint.
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(clean / "export")
    final = AutoModelForCausalLM.from_config(exported.config)
    load_sharded(clean / "checkpoints" / f"step-{steps:08d}" / SHARDS, final)
    for (name, weight), (_, saved) in zip(exported.state_dict().items(), final.state_dict().items(), strict=True):
        assert torch.equal(weight, saved), name


@contextlib.contextmanager
def pod_running(manifest: Path, checkpoints: Path, processes: int, *extra: str) -> Iterator[subprocess.Popen[str]]:
    """launch_pod, the pod's whole process group killed if it is still running after the block."""
    pod = launch_pod(manifest, checkpoints, processes, *extra)
    try:
        yield pod
    finally:
        if pod.poll() is None:
            os.killpg(pod.pid, signal.SIGKILL)
            pod.communicate(timeout=30)


def local_rank_pid(launcher: int, local_rank: int) -> int | None:
    """The pid of the launcher's child process of that LOCAL_RANK (from /proc), None until it exists."""
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    for pid in map(int, children):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"LOCAL_RANK={local_rank}".encode() in environ:
            return pid
    return None


def test_a_killed_process_is_the_cause_its_pod_reports_not_the_siblings_it_stopped(tmp_path: Path) -> None:
    job = tiny_pretrain("tiny-sigkill", maxSteps=100_000, batchSize=2, sequenceLength=32, warmupSteps=2,
                        evalInterval=100_000, logInterval=1000)
    job["spec"]["checkpoint"] = {"intervalSteps": 2}
    manifest = write_manifest(tmp_path / "job.yaml", job)
    checkpoints, termination_log = tmp_path / "checkpoints", tmp_path / "termination-log"
    with pod_running(manifest, checkpoints, 2, "--termination-log", str(termination_log)) as pod:
        victim = wait_until(lambda: local_rank_pid(pod.pid, 1), 60, "local rank 1's process")
        wait_until(lambda: committed_steps(checkpoints), 120, "a committed checkpoint: both ranks train")
        os.kill(victim, signal.SIGKILL)
        log = pod.communicate(timeout=120)[0]
    assert pod.returncode == 128 + signal.SIGKILL, log[-3000:]
    # Rank 0, stopped by the launcher once its sibling died, wrote an outcome of its own; the pod's
    # termination message, which the operator reports, names the process that failed first.
    reported = json.loads(termination_log.read_text())
    assert reported == {"error": "local rank 1 exited with code 137 and left no message", "permanent": False}, log


def test_a_sigterm_to_a_two_process_fsdp_pod_commits_one_step_of_both_shards_and_says_so(tmp_path: Path) -> None:
    steps = 100_000
    job = tiny_pretrain("tiny-sigterm", maxSteps=steps, batchSize=2, sequenceLength=32, warmupSteps=2,
                        evalInterval=100_000, logInterval=1000, parallelism="fsdp")
    job["spec"]["checkpoint"] = {"intervalSteps": 7, "keep": 100}
    manifest = write_manifest(tmp_path / "job.yaml", job)
    checkpoints, termination_log = tmp_path / "checkpoints", tmp_path / "termination-log"
    with pod_running(manifest, checkpoints, 2, "--termination-log", str(termination_log)) as pod:
        wait_until(lambda: committed_steps(checkpoints), 120, "a committed checkpoint: both ranks train")
        pod.send_signal(signal.SIGTERM)  # the kubelet's SIGTERM reaches the pod's first process
        log = pod.communicate(timeout=120)[0]
    assert pod.returncode == 143, log[-3000:]
    stopped_at = committed_steps(checkpoints)[-1]
    committed = json.loads((checkpoints / "checkpoints" / f"step-{stopped_at:08d}" / "manifest.json").read_text())
    assert {"shards/__0_0.distcp", "shards/__1_0.distcp"} <= {entry["name"] for entry in committed["files"]}
    assert json.loads(termination_log.read_text()) == {
        "error": f"stopped on SIGTERM at step {stopped_at} of {steps}, its checkpoint committed", "permanent": False}
