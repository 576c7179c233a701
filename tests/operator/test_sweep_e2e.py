"""A SweepJob end to end: the operator runs its trials as FinetuneJobs, the kubelet harness runs their
pods with tests/support/fake_trainer.py as the trainer (eval losses that depend on the learning rate),
and the sweep ends with its best trial promoted and the unpromising ones pruned before their end."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from k8s.cluster import node_harness
from k8s.kubelet import Kubelet
from support.e2e import FTJ, SECRET, condition, operator, phase_is, status
from support.processes import free_port
from support.sweeps import same_search, undisturbed

from kubeforge.operator.settings import OperatorSettings

ROOT = Path(__file__).resolve().parents[2]
SWJ = "SweepJob"
STEPS = 60


@pytest.fixture
async def fake_kubelet(cluster: Any, tmp_path: Path, s3_env: dict[str, str]) -> AsyncIterator[Kubelet]:
    """The kubelet harness, with tests/support/fake_trainer.py as the pods' `kubeforge`."""
    if cluster.real and await cluster.has_schedulable_nodes():
        pytest.skip("the cluster's own nodes run pods: the fake trainer needs the kubelet harness")
    await cluster.create_secret(SECRET, {k: s3_env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")})
    python = tmp_path / "fake-python"
    # The harness runs `kubeforge ARGS` as `PYTHON -m kubeforge ARGS`: drop `-m kubeforge`.
    python.write_text(f'#!/bin/sh\nshift 2\nexec {sys.executable} {ROOT / "tests/support/fake_trainer.py"} "$@"\n')
    python.chmod(0o755)
    async with node_harness(cluster, tmp_path / "kubelet", python=str(python), kill_grace=2.0) as harness:
        yield harness


def review_sweep(data: dict[str, str], bucket: str) -> dict[str, Any]:
    template = {
        "baseModel": {"uri": f"s3://{bucket}/data/base-model"},
        "task": "sequence-classification", "method": "lora", "lora": {"alpha": 16},
        "data": {"train": {"uri": data["reviews/train.jsonl"]}, "eval": {"uri": data["reviews/eval.jsonl"]},
                 "textField": "text", "labelField": "label"},
        "training": {"maxSteps": STEPS, "evalInterval": 20, "batchSize": 8, "sequenceLength": 64},
        "resources": {"gpusPerWorker": 0, "cpu": "100m", "memory": "256Mi"},
        "metrics": {"port": free_port()},
        "podTemplate": {"env": [{"name": "FAKE_STEPS_PER_SECOND", "value": "8"}]},
    }
    return {"apiVersion": "kubeforge.io/v1alpha1", "kind": SWJ, "metadata": {"name": "review-sweep"}, "spec": {
        "template": {"kind": FTJ, "spec": template},
        "parameters": [{"path": "training.learningRate", "type": "float", "low": 1e-5, "high": 1e-1, "log": True},
                       {"path": "lora.r", "type": "choice", "values": [4, 8]}],
        "objective": {"metric": "eval.loss", "direction": "minimize"},
        "maxTrials": 6, "parallelism": 2, "earlyStopping": "median", "startupTrials": 1, "seed": 0}}


async def test_a_sweep_runs_six_trials_prunes_one_and_promotes_the_best(
        cluster: Any, fake_kubelet: Kubelet, settings: OperatorSettings, s3_data: dict[str, str], bucket: str) -> None:
    async with operator(cluster, settings) as metrics:
        await cluster.apply([review_sweep(s3_data, bucket)])
        done = await cluster.wait_for(lambda: phase_is(cluster, SWJ, "review-sweep", "Succeeded", "Failed"), 240,
                                      "the sweep to end")
        trials = {t["name"]: t for t in done["trials"]}
        jobs = {name: await cluster.get(FTJ, name) for name in trials}
    assert done["phase"] == "Succeeded", done.get("message")
    assert done["trialsDone"] == 6 and done["trialsProgress"] == "6/6" and len(trials) == 6
    assert all(t["state"] in ("Succeeded", "Pruned") for t in trials.values()), trials
    pruned = [t for t in trials.values() if t["state"] == "Pruned"]
    assert pruned and all(t["step"] < STEPS for t in pruned), [  # stopped before its last step
        (t["parameters"], t["intermediate"], t["state"]) for t in trials.values()]
    assert all(jobs[t["name"]] is None for t in pruned)  # its job deleted
    succeeded = [t for t in trials.values() if t["state"] == "Succeeded"]
    best = min(succeeded, key=lambda t: t["value"])
    assert done["bestTrial"]["name"] == best["name"] and done["bestValue"] == best["value"]
    assert done["bestTrial"]["exportUri"].endswith("/export")
    for trial in succeeded:
        job = jobs[trial["name"]]
        assert job is not None and job["metadata"]["ownerReferences"][0]["kind"] == SWJ
        assert (await status(cluster, FTJ, trial["name"]))["phase"] == "Succeeded"
        assert job["spec"]["training"]["learningRate"] == trial["parameters"]["training.learningRate"]
    assert metrics.sweep_trials.labels("started")._value.get() == 6
    assert metrics.sweep_trials.labels("pruned")._value.get() == len(pruned)


async def test_a_finetune_from_a_sweep_waits_for_it_and_starts_from_its_best_trial(
        cluster: Any, fake_kubelet: Kubelet, settings: OperatorSettings, s3_data: dict[str, str], bucket: str) -> None:
    sweep = review_sweep(s3_data, bucket)
    sweep["spec"].update(maxTrials=2, parallelism=2, earlyStopping="none")
    spec = {**sweep["spec"]["template"]["spec"], "baseModel": {"fromSweepJob": "review-sweep"},
            "metrics": {"port": free_port()}}
    spec["training"] = {**spec["training"], "learningRate": 1e-3}
    finetune = {"apiVersion": "kubeforge.io/v1alpha1", "kind": FTJ, "metadata": {"name": "from-best"}, "spec": spec}
    async with operator(cluster, settings):
        await cluster.apply([finetune, sweep])

        async def waiting_for_the_sweep() -> dict[str, Any] | None:
            current = await status(cluster, FTJ, "from-best")
            return current if "waiting for SweepJob review-sweep" in current.get("message", "") else None

        waiting = await cluster.wait_for(waiting_for_the_sweep, 60, "the finetune to wait for the sweep")
        done = await cluster.wait_for(lambda: phase_is(cluster, SWJ, "review-sweep", "Succeeded", "Failed"), 240,
                                      "the sweep to end")
        tuned = await cluster.wait_for(lambda: phase_is(cluster, FTJ, "from-best", "Succeeded", "Failed"), 120,
                                       "the finetune to end")
    assert waiting["phase"] == "Pending" and waiting["reason"] == "WaitingForBaseModel"
    assert done["phase"] == "Succeeded", done.get("message")
    assert tuned["phase"] == "Succeeded", tuned.get("message")
    assert tuned["baseModelUri"] == done["bestTrial"]["exportUri"]  # lineage: the best trial's model
    assert f"best trial {done['bestTrial']['name']}" in condition(tuned, "WaitingForBaseModel")["message"]


async def test_an_operator_restarted_mid_sweep_ends_as_an_undisturbed_one(
        cluster: Any, fake_kubelet: Kubelet, settings: OperatorSettings, s3_data: dict[str, str], bucket: str) -> None:
    manifest = review_sweep(s3_data, bucket)
    manifest["spec"]["parallelism"] = 3
    # Evaluations 4 s apart: each is still in its trial's status when the restarted operator first looks.
    manifest["spec"]["template"]["spec"]["podTemplate"]["env"][0]["value"] = "5"
    expected = undisturbed(manifest)

    async def mid_sweep() -> dict[str, Any] | None:
        current = await status(cluster, SWJ, "review-sweep")
        return current if 1 <= current.get("trialsDone", 0) < 5 else None

    async with operator(cluster, settings):
        await cluster.apply([manifest])
        await cluster.wait_for(mid_sweep, 120, "the sweep to be under way")
    # The operator is gone (its process state with it) while the trials' pods run on; a new one takes over.
    async with operator(cluster, settings):
        done = await cluster.wait_for(lambda: phase_is(cluster, SWJ, "review-sweep", "Succeeded", "Failed"), 240,
                                      "the restarted sweep to end")
    assert done["phase"] == "Succeeded" == expected["phase"]
    assert [t["name"] for t in done["trials"]] == [f"review-sweep-t{n}" for n in range(6)]  # none lost, none twice
    assert same_search(done["trials"]) == same_search(expected["trials"])
    best, expected_best = done["bestTrial"], expected["bestTrial"]
    assert (best["number"], best["parameters"], best["value"]) == (
        expected_best["number"], expected_best["parameters"], expected_best["value"])
