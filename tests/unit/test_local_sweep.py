"""`kubeforge run sweep.yaml`'s loop, with a stand-in trainer: trials one after another, evaluations fed to
the pruner, the status written after each change and resumed from when run again."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
from support.jobs import example, with_change

from kubeforge.cli import _order
from kubeforge.localsweep import read_status, run_sweep, status_path
from kubeforge.spec import Job, SweepJob, parse_job, parse_sweep
from kubeforge.status import EarlyStopped, EvalObserver, SweepStatus, TrainerResult

EXAMPLE = example("sweep-lora-classify.yaml")[1]


def sweep(**changes: Any) -> SweepJob:
    document = copy.deepcopy(EXAMPLE)
    document["spec"].update(changes)
    return parse_sweep(document)


class FakeTrainer:
    """Eval loss falls faster the nearer the learning rate is to 1e-2; `fail` names trials that raise."""

    def __init__(self, fail: tuple[str, ...] = ()) -> None:
        self.fail = fail
        self.runs: list[str] = []

    def __call__(self, job: Job, on_eval: EvalObserver) -> TrainerResult:
        self.runs.append(job.name)
        if job.name in self.fail:
            raise RuntimeError("the trainer's process died")
        rate = 1.0 / (1.0 + abs(math.log10(job.spec.training.learning_rate) + 2))
        total = job.spec.training.max_steps or 0
        loss = 0.7
        for step in range(50, total + 1, 50):
            loss = 0.7 - 0.2 * rate * step / total
            if step < total and on_eval(step, {"loss": loss}):
                raise EarlyStopped(f"stopped at step {step}")
        return TrainerResult(step=total, total_steps=total, resumed_from_step=0, final_eval={"loss": loss},
                             export_uri=f"runs/{job.name}/export", checkpoint_uri=f"runs/{job.name}", job=job.name,
                             namespace=job.namespace, kind=job.kind, tokens_seen=0, eval_history=[], device="cpu",
                             workers=1)


def test_trials_run_one_after_another_and_the_best_is_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                              ) -> None:
    trainer = FakeTrainer()
    status = run_sweep(sweep(), str(tmp_path), trainer)
    assert status.phase == "Succeeded" and status.trials_done == 6 and len(trainer.runs) == 6
    assert status.pruned_trials >= 1  # the median pruner stopped at least one early
    best = min((t for t in status.trials if t.state == "Succeeded"), key=lambda t: t.value or 0)
    assert status.best_trial is not None and status.best_trial.name == best.name
    assert status.best_trial.export_uri == f"runs/{best.name}/export"
    written = SweepStatus.model_validate_json(status_path(sweep(), str(tmp_path)).read_text())
    assert written == status
    table = capsys.readouterr().err
    assert all(f"review-sweep-t{n}" in table for n in range(6)) and "Pruned" in table


def test_a_rerun_goes_on_from_the_status_and_reruns_nothing_finished(tmp_path: Path) -> None:
    first = run_sweep(sweep(maxTrials=3), str(tmp_path), FakeTrainer())
    again = FakeTrainer()
    more = run_sweep(sweep(maxTrials=3), str(tmp_path), again)
    assert again.runs == [] and more.trials == first.trials
    # An interrupted run: its last trial recorded as running is trained again, the others kept.
    interrupted = first.model_copy(update={"trials": [*first.trials[:2], first.trials[2].model_copy(
        update={"state": "Running", "value": None, "intermediate": []})], "phase": "Running"})
    status_path(sweep(), str(tmp_path)).write_text(interrupted.model_dump_json(by_alias=True))
    resumed = FakeTrainer()
    final = run_sweep(sweep(maxTrials=3), str(tmp_path), resumed)
    assert resumed.runs == ["review-sweep-t2"] and final.best_trial == first.best_trial


def test_failed_trials_count_and_too_many_fail_the_sweep(tmp_path: Path) -> None:
    status = run_sweep(sweep(maxFailedTrials=1), str(tmp_path / "a"),
                       FakeTrainer(fail=("review-sweep-t1",)))
    assert status.phase == "Succeeded" and status.failed_trials == 1
    assert status.trials[1].state == "Failed" and "process died" in (status.trials[1].message or "")
    failing = FakeTrainer(fail=("review-sweep-t0", "review-sweep-t1"))
    status = run_sweep(sweep(maxFailedTrials=1), str(tmp_path / "b"), failing)
    assert status.phase == "Failed" and status.reason == "TooManyFailedTrials" and failing.runs == [
        "review-sweep-t0", "review-sweep-t1"]


def test_run_orders_a_finetune_after_the_sweep_it_starts_from_and_the_sweep_after_its_templates_base() -> None:
    pretrain, review_sweep = example("sweep-lora-classify.yaml")
    finetune = with_change(example("finetune-lora-classify.yaml")[0], "spec.baseModel",
                           {"fromSweepJob": "review-sweep"})
    finetune["metadata"]["name"] = "from-best"
    listed = [parse_job(finetune), parse_sweep(review_sweep), parse_job(pretrain)]
    assert [m.name for m in _order(listed)] == ["tiny-shakespeare", "review-sweep", "from-best"]  # type: ignore[arg-type]


def test_a_finetune_reads_the_status_a_local_sweep_wrote_under_the_same_root(tmp_path: Path) -> None:
    assert read_status(str(tmp_path), "default", "review-sweep") is None  # never ran here
    status = run_sweep(sweep(maxTrials=2), str(tmp_path), FakeTrainer())
    assert read_status(str(tmp_path), "default", "review-sweep") == status
