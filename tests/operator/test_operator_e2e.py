"""The operator end to end: jobs applied to an API server, pods run by the kubelet harness, S3 from moto.

Against the emulator by default; against a real cluster when KUBEFORGE_E2E_KUBECONFIG is set (data
and checkpoints go through S3 either way, so pods need nothing from this machine's disk).
"""

from __future__ import annotations

import copy
import os
import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import boto3
from support.e2e import (
    FTJ,
    PTJ,
    condition,
    job_pods,
    no_job_pods,
    operator,
    operator_process,
    phase_is,
    pretrain,
    status,
)
from support.jobs import example, tiny_pretrain
from support.processes import free_port
from support.rbac import write_kubeconfig

from kubeforge.operator.settings import OperatorSettings


async def test_pipeline_pretrain_then_finetune_by_name(world: Any, settings: OperatorSettings, kubelet: Any,
                                                       s3_data: dict[str, str], bucket: str) -> None:
    cluster = world
    base = pretrain(s3_data, "tiny-shakespeare", 300, resources={"gpusPerWorker": 1})
    tuned = copy.deepcopy(example("finetune-lora-classify.yaml")[0])
    tuned["spec"]["data"]["train"]["uri"] = s3_data["reviews/train.jsonl"]
    tuned["spec"]["data"]["eval"]["uri"] = s3_data["reviews/eval.jsonl"]
    tuned["spec"]["training"]["maxSteps"] = 60
    async with operator(cluster, settings) as metrics:
        await cluster.apply([base, tuned])
        waiting = await cluster.wait_for(lambda: phase_is(cluster, FTJ, "review-sentiment", "Pending"), 30,
                                         "the finetune job to wait for its base model")
        assert condition(waiting, "WaitingForBaseModel")["status"] == "True"
        assert await job_pods(cluster, "review-sentiment", "ftj") == []

        async def mid_run() -> dict[str, Any] | None:
            current = await status(cluster, PTJ, "tiny-shakespeare")
            return current if current.get("phase") == "Running" and 0 < current.get("step", 0) < 300 else None

        running = await cluster.wait_for(mid_run, 120, "progress in the pretrain job's status")
        assert running["stepProgress"] == f"{running['step']}/300" and running["totalSteps"] == 300
        assert condition(running, "CPUFallback")["status"] == "True"  # no GPU node here

        done = await cluster.wait_for(lambda: phase_is(cluster, PTJ, "tiny-shakespeare", "Succeeded"), 180,
                                      "the pretrain job to succeed")
        tuned_done = await cluster.wait_for(lambda: phase_is(cluster, FTJ, "review-sentiment", "Succeeded",
                                                             "Failed"), 240, "the finetune job to finish")
        pods_gone = await cluster.wait_for(
            lambda: no_job_pods(cluster, "tiny-shakespeare"), 30, "cleanPodPolicy All to delete finished pods")
    assert pods_gone
    uid = (await cluster.get(PTJ, "tiny-shakespeare"))["metadata"]["uid"]
    assert done["stepProgress"] == "300/300" and done["restarts"] == 0 and done["loss"] > 0
    assert done["exportUri"] == f"s3://{bucket}/kf/{cluster.namespace}/pretrainjob/tiny-shakespeare-{uid[:8]}/export"
    assert done["evalMetrics"]["perplexity"] > 1 and done["completionTime"] >= done["startTime"]
    assert condition(done, "Succeeded")["status"] == "True" and condition(done, "Running")["status"] == "False"
    assert tuned_done["phase"] == "Succeeded", tuned_done
    assert tuned_done["baseModelUri"] == done["exportUri"]
    assert condition(tuned_done, "WaitingForBaseModel")["status"] == "False"
    assert tuned_done["evalMetrics"]["accuracy"] > 0
    exported = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=done["exportUri"].split(bucket + "/")[1])
    assert any(o["Key"].endswith("export/manifest.json") for o in exported.get("Contents", []))
    reasons = [e["reason"] for e in await cluster.events("tiny-shakespeare")]
    assert "PodsCreated" in reasons and "Completed" in reasons
    assert metrics.succeeded.labels(PTJ)._value.get() == 1


async def test_a_killed_worker_restarts_the_gang_from_the_last_checkpoint(
        world: Any, settings: OperatorSettings, kubelet: Any, s3_data: dict[str, str]) -> None:
    cluster = world
    job = pretrain(s3_data, "gang", 400, resources={"workers": 2, "gpusPerWorker": 0})
    async with operator(cluster, settings) as metrics:
        await cluster.apply(job)

        async def checkpointed() -> dict[str, Any] | None:
            current = await status(cluster, PTJ, "gang")
            return current if current.get("lastCheckpointStep", 0) >= 20 and current.get("step", 0) < 380 else None

        before = await cluster.wait_for(checkpointed, 180, "a committed checkpoint mid-run")
        await kubelet.kill("gang-ptj-w1-a0", signal.SIGKILL)
        restarting = await cluster.wait_for(lambda: phase_is(cluster, PTJ, "gang", "Restarting"), 30,
                                            "the gang restart")
        assert restarting["restarts"] == 1 and "worker 1 exited with code" in restarting["message"]
        done = await cluster.wait_for(lambda: phase_is(cluster, PTJ, "gang", "Succeeded", "Failed"), 240,
                                      "the restarted job to finish")
    assert done["phase"] == "Succeeded" and done["restarts"] == 1 and done["stepProgress"] == "400/400"
    resumed_log = kubelet.logs("gang-ptj-w0-a1")
    assert "resuming from checkpoint step " in resumed_log
    resumed_step = int(resumed_log.split("resuming from checkpoint step ")[1].split()[0])
    assert resumed_step >= before["lastCheckpointStep"] > 0
    assert metrics.restarted.labels(PTJ)._value.get() == 1


def child_pids(pid: int) -> list[int]:
    """The processes a pod's launcher started (Linux /proc)."""
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


async def test_two_pods_of_two_processes_and_one_killed_process_restarts_the_gang(
        world: Any, settings: OperatorSettings, kubelet: Any, s3_data: dict[str, str]) -> None:
    cluster = world
    # Four processes share this machine's cores: a short run, checkpointed often.
    job = pretrain(s3_data, "quad", 60, resources={"workers": 2, "gpusPerWorker": 0, "processesPerWorker": 2},
                   checkpoint={"intervalSteps": 10, "keep": 2})
    async with operator(cluster, settings) as metrics:
        await cluster.apply(job)

        async def checkpointed() -> dict[str, Any] | None:
            current = await status(cluster, PTJ, "quad")
            return current if current.get("lastCheckpointStep", 0) >= 10 and current.get("step", 0) < 50 else None

        before = await cluster.wait_for(checkpointed, 300, "a committed checkpoint mid-run")
        assert before["restarts"] == 0, (before, kubelet.all_logs()[-5000:])
        run = await kubelet.wait_running("quad-ptj-w1-a0")
        assert run.process.returncode is None, (run.process.returncode, kubelet.logs("quad-ptj-w1-a0")[-5000:])
        trainers = child_pids(run.process.pid)
        assert len(trainers) == 2, trainers  # one process per local rank in the pod
        os.kill(trainers[1], signal.SIGKILL)  # one process of one pod: global rank 3
        restarting = await cluster.wait_for(lambda: phase_is(cluster, PTJ, "quad", "Restarting"), 60,
                                            "the gang restart")
        assert restarting["restarts"] == 1 and "worker 1 exited with code 137" in restarting["message"]
        done = await cluster.wait_for(lambda: phase_is(cluster, PTJ, "quad", "Succeeded", "Failed"), 480,
                                      "the restarted job to finish")
    assert (done["phase"], done["restarts"], done["stepProgress"]) == ("Succeeded", 1, "60/60"), done
    log = kubelet.logs("quad-ptj-w0-a1")
    assert "on cpu x4" in log
    resumed_step = int(log.split("resuming from checkpoint step ")[1].split()[0])
    assert resumed_step >= before["lastCheckpointStep"] > 0
    assert metrics.restarted.labels(PTJ)._value.get() == 1


async def test_failures_stop_at_the_backoff_limit_or_at_once_when_permanent(
        world: Any, settings: OperatorSettings, kubelet: Any, s3_data: dict[str, str], bucket: str) -> None:
    cluster = world
    flaky = pretrain(s3_data, "flaky", 20, backoffLimit=1)
    flaky["spec"]["data"]["train"]["uri"] = "s3://no-such-bucket-kf/data/train.txt"  # a storage error: retryable
    hopeless = pretrain(s3_data, "hopeless", 20, backoffLimit=5)
    hopeless["spec"]["data"]["train"]["uri"] = f"s3://{bucket}/data/nothing-here/"  # no data: permanent
    # The bucket that is not there is one this namespace may use: the storage error is what is tested.
    settings = replace(settings, allowed_uri_prefixes=(*settings.allowed_uri_prefixes, "s3://no-such-bucket-kf"))
    async with operator(cluster, settings):
        await cluster.apply([flaky, hopeless])
        failed = await cluster.wait_for(lambda: phase_is(cluster, PTJ, "flaky", "Failed"), 120, "flaky to fail")
        permanent = await cluster.wait_for(lambda: phase_is(cluster, PTJ, "hopeless", "Failed"), 60,
                                           "hopeless to fail")
    assert failed["reason"] == "BackoffLimitExceeded" and failed["restarts"] == 1
    assert "no-such-bucket-kf" in failed["message"]
    assert permanent["reason"] == "PermanentError" and permanent["restarts"] == 0
    assert "data.train.uri: " in permanent["message"]
    assert "no .txt, .jsonl(.gz/.zst) or .parquet files found" in permanent["message"]
    assert "testing-secret-key" not in str(failed) + str(permanent)


async def test_cpu_fallback_and_waiting_for_gpus(world: Any, settings: OperatorSettings, kubelet: Any,
                                                 s3_data: dict[str, str]) -> None:
    cluster = world
    strict = pretrain(s3_data, "needs-gpu", 20, resources={"gpusPerWorker": 1, "allowCpuFallback": False})
    async with operator(cluster, settings):
        await cluster.apply(strict)
        waiting = await cluster.wait_for(lambda: _condition_set(cluster, "needs-gpu", "WaitingForGPU"), 30,
                                         "the job to wait for GPUs")
        assert waiting["phase"] == "Pending" and "allowCpuFallback is false" in waiting["message"]
        assert await job_pods(cluster, "needs-gpu") == []
        warnings = [e for e in await cluster.events("needs-gpu") if e["type"] == "Warning"]
        assert any(e["reason"] == "WaitingForGPU" for e in warnings)
        await cluster.add_node("gpu-node-1", gpus=8)
        pods = await cluster.wait_for(lambda: job_pods(cluster, "needs-gpu"), 30, "pods once a GPU node exists")
        container = pods[0]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert container["image"] == settings.trainer_image
        await cluster.delete(PTJ, "needs-gpu")


async def test_a_job_outside_its_namespace_prefix_fails_without_pods(
        world: Any, settings: OperatorSettings, kubelet: Any, s3_data: dict[str, str], bucket: str) -> None:
    """Tenancy through the running operator: another team's checkpoints are refused by field name."""
    cluster = world
    trespasser = pretrain(s3_data, "trespasser", 20)
    trespasser["spec"]["checkpoint"] = {"uri": f"s3://{bucket}/kf/team-b/pretrainjob/theirs"}
    async with operator(cluster, settings):
        await cluster.apply(trespasser)
        failed = await cluster.wait_for(lambda: phase_is(cluster, PTJ, "trespasser", "Failed"), 30,
                                        "the job to fail")
        assert failed["reason"] == "URINotAllowed"
        assert failed["message"].startswith(f"spec.checkpoint.uri s3://{bucket}/kf/team-b/pretrainjob/theirs ")
        assert await job_pods(cluster, "trespasser") == []


async def _condition_set(cluster: Any, name: str, kind: str) -> dict[str, Any] | None:
    current = await status(cluster, PTJ, name)
    found = [c for c in current.get("conditions", []) if c["type"] == kind and c["status"] == "True"]
    return current if found else None


async def test_suspend_resume_operator_restart_and_deletion(world: Any, settings: OperatorSettings, kubelet: Any,
                                                            s3_data: dict[str, str]) -> None:
    cluster = world
    job = pretrain(s3_data, "pausable", 3000, resources={"gpusPerWorker": 0})
    async with operator(cluster, settings):
        await cluster.apply(job)

        async def checkpointed() -> dict[str, Any] | None:
            current = await status(cluster, PTJ, "pausable")
            return current if current.get("lastCheckpointStep", 0) >= 20 else None

        await cluster.wait_for(checkpointed, 180, "a checkpoint before suspending")
        await cluster.patch(PTJ, "pausable", {"spec": {"suspend": True}})
        suspended = await cluster.wait_for(lambda: phase_is(cluster, PTJ, "pausable", "Suspended"), 30, "Suspended")
        await cluster.wait_for(lambda: no_job_pods(cluster, "pausable"), 30, "the pods to go")
        assert condition(suspended, "Suspended")["status"] == "True"
        await cluster.patch(PTJ, "pausable", {"spec": {"suspend": False}})
        await cluster.wait_for(lambda: phase_is(cluster, PTJ, "pausable", "Running"), 60, "Running again")
        await cluster.wait_for(lambda: "resuming from checkpoint step" in kubelet.logs("pausable-ptj-w0-a0"), 60,
                               "the recreated pod to resume from the checkpoint")

    # A new operator process adopts what is there: same pods, no duplicates, no restart.
    names_before = sorted(p["metadata"]["name"] for p in await job_pods(cluster, "pausable"))
    async with operator(cluster, settings):
        await cluster.wait_for(lambda: _resynced(cluster), 30, "the new operator to reconcile")
        names_after = sorted(p["metadata"]["name"] for p in await job_pods(cluster, "pausable"))
        assert names_after == names_before == ["pausable-ptj-w0-a0"]
        assert (await status(cluster, PTJ, "pausable"))["restarts"] == 0

        await cluster.delete(PTJ, "pausable")
        await cluster.wait_for(lambda: no_job_pods(cluster, "pausable"), 60, "deletion to remove the pods")
        gone = await cluster.wait_for(lambda: _job_gone(cluster, "pausable"), 30, "the job to be deleted")
    assert gone


async def _resynced(cluster: Any) -> bool:
    current = await status(cluster, PTJ, "pausable")
    return current.get("phase") == "Running" and current.get("step", 0) > 0


async def _job_gone(cluster: Any, name: str) -> bool:
    return await cluster.get(PTJ, name) is None


async def test_the_operator_command_runs_standalone_next_to_the_crds_alone(cluster: Any, tmp_path: Path) -> None:
    """The README's cluster path: `kubectl apply -f crds/`, then `kubeforge operator`. Without the chart
    there is no peering object to join: it says so, runs standalone and reconciles a job at once."""
    kubeconfig = cluster.kubeconfig or str(write_kubeconfig(tmp_path / "kubeconfig", {"server": cluster.url}, {}))
    env = {**os.environ, "KUBECONFIG": kubeconfig, "KUBEFORGE_METRICS_PORT": str(free_port()),
           "KUBEFORGE_STORAGE_ROOT": "s3://kubeforge/jobs", "KUBEFORGE_ALLOWED_URI_PREFIXES": "s3://kubeforge/data"}
    log_path = tmp_path / "operator.log"
    async with operator_process(["operator", "--health-port", str(free_port())], env, log_path) as process:
        def logged(text: str) -> bool:
            assert process.returncode is None, f"the operator exited:\n{log_path.read_text()}"
            return text in log_path.read_text()

        await cluster.wait_for(lambda: logged("running standalone"), 60, "the operator to say it runs standalone")
        assert "ClusterKopfPeering/kubeforge" in log_path.read_text()
        started = time.monotonic()
        bare = tiny_pretrain("bare")
        for split in ("train", "eval"):  # the shared corpora, as a cluster's users keep them
            bare["spec"]["data"][split]["uri"] = f"s3://kubeforge/data/shakespeare/{split}.txt"
        await cluster.apply(bare)
        await cluster.wait_for(lambda: job_pods(cluster, "bare"), 10, f"the job's pod\n{log_path.read_text()}")
        await cluster.wait_for(lambda: phase_is(cluster, PTJ, "bare", "Pending", "Running"), 10 - (
            time.monotonic() - started), f"the job's phase\n{log_path.read_text()}")
