"""A sweep's trials with the real trainer: each evaluation reaches the observer, which may stop the run,
`kubeforge run`'s loop ends with the best trial's exported model on disk, and a FinetuneJob in the
same file starts from it (baseModel.fromSweepJob)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from support.jobs import write_manifest
from support.models import finetune_manifest, tiny_base

from kubeforge import cli
from kubeforge.localsweep import run_sweep
from kubeforge.spec import Job, parse_job, parse_sweep
from kubeforge.status import EarlyStopped, EvalObserver, TrainerResult
from kubeforge.trainer.loop import train


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_base(tmp_path_factory.mktemp("base"))


def test_the_observer_sees_each_evaluation_and_may_stop_the_run(base: Path, tmp_path: Path) -> None:
    manifest = finetune_manifest(str(base), tmp_path / "ckpt", task="sequence-classification", method="lora",
                                 max_steps=6, textField="text", labelField="label")
    manifest["spec"]["training"]["evalInterval"] = 2
    seen: list[tuple[int, set[str]]] = []

    def observe(step: int, metrics: dict[str, float]) -> bool:
        seen.append((step, set(metrics)))
        return step >= 4

    with pytest.raises(EarlyStopped, match="step 4 of 6"):
        train(parse_job(manifest), checkpoint_root=str(tmp_path / "ckpt"), base_model_uri=str(base), on_eval=observe)
    assert seen == [(2, {"loss", "accuracy", "f1"}), (4, {"loss", "accuracy", "f1"})]


def test_a_local_sweep_of_two_trials_exports_its_best(base: Path, tmp_path: Path) -> None:
    template = finetune_manifest(str(base), tmp_path / "trials", task="sequence-classification", method="lora",
                                 max_steps=4, textField="text", labelField="label")["spec"]
    template["training"]["evalInterval"] = 2
    sweep = parse_sweep({"apiVersion": "kubeforge.io/v1alpha1", "kind": "SweepJob", "metadata": {"name": "tiny"},
                         "spec": {"template": {"kind": "FinetuneJob", "spec": template}, "maxTrials": 2,
                                  "parameters": [{"path": "training.learningRate", "type": "float", "low": 1e-4,
                                                  "high": 1e-2, "log": True}],
                                  "objective": {"metric": "eval.loss", "direction": "minimize"}}})

    def train_trial(job: Job, on_eval: EvalObserver) -> TrainerResult:
        assert job.spec.checkpoint.uri == str(tmp_path / "trials" / job.name)  # each trial its own checkpoints
        return train(job, checkpoint_root=job.spec.checkpoint.uri, base_model_uri=str(base), on_eval=on_eval)

    status = run_sweep(sweep, str(tmp_path / "runs"), train_trial)
    assert status.phase == "Succeeded" and [t.state for t in status.trials] == ["Succeeded", "Succeeded"]
    assert status.best_trial is not None and status.best_value == min(t.value or 0 for t in status.trials)
    assert (Path(status.best_trial.export_uri or "") / "config.json").exists()


def classifier(base: Path, name: str, steps: int) -> dict[str, Any]:
    """A LoRA review classifier laid out under `kubeforge run --output` (no checkpoint.uri)."""
    manifest = finetune_manifest(str(base), Path("unused"), task="sequence-classification", method="lora",
                                 max_steps=steps, textField="text", labelField="label")
    manifest["metadata"]["name"] = name
    del manifest["spec"]["checkpoint"]["uri"]
    return manifest


def test_kubeforge_run_runs_a_sweep_before_the_finetune_that_starts_from_its_best_trial(
        base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The finetune is listed before the SweepJob it names as baseModel.fromSweepJob: run orders them."""
    finetune = classifier(base, "from-best", steps=2)
    finetune["spec"]["baseModel"] = {"fromSweepJob": "lr-search"}
    sweep = {"apiVersion": "kubeforge.io/v1alpha1", "kind": "SweepJob", "metadata": {"name": "lr-search"},
             "spec": {"template": {"kind": "FinetuneJob", "spec": classifier(base, "trial", steps=2)["spec"]},
                      "maxTrials": 2, "objective": {"metric": "eval.loss", "direction": "minimize"},
                      "parameters": [{"path": "training.learningRate", "type": "float", "low": 1e-4, "high": 1e-2,
                                      "log": True}]}}
    pipeline = write_manifest(tmp_path / "pipeline.yaml", finetune, sweep)
    with pytest.raises(SystemExit) as exited:
        cli.main(["run", str(pipeline), "--output", str(tmp_path / "runs"), "--no-progress", "--json"])
    assert exited.value.code == 0
    printed = capsys.readouterr()
    swept, finetuned = json.loads(printed.out)
    assert swept["phase"] == "Succeeded" and finetuned["job"] == "from-best"
    best = swept["bestTrial"]
    assert f"base model: {best['exportUri']}, the export of SweepJob lr-search's best trial {best['name']}" in (
        printed.err)
    # New adapters start as a no-op: before its first step the finetune is the best trial's model.
    assert finetuned["evalHistory"][0]["step"] == 0
    assert finetuned["evalHistory"][0]["loss"] == pytest.approx(best["value"], rel=1e-4)


def test_kubeforge_run_refuses_a_finetune_from_a_sweep_that_never_ran(base: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    finetune = classifier(base, "from-best", steps=2)
    finetune["spec"]["baseModel"] = {"fromSweepJob": "lr-search"}
    with pytest.raises(SystemExit) as exited:
        cli.main(["run", str(write_manifest(tmp_path / "job.yaml", finetune)), "--output", str(tmp_path / "runs"),
                  "--no-progress"])
    assert exited.value.code == 2  # permanent: running it again as it is cannot help
    assert f"error: baseModel.fromSweepJob: SweepJob lr-search has not run under {tmp_path / 'runs'}" in (
        capsys.readouterr().err)
