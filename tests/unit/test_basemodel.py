"""The base-model rule's three outcomes, and the teacher's, as the operator and the CLI both ask them."""

from __future__ import annotations

from support.jobs import DELETE, example, job, with_change

from kubeforge.basemodel import (
    BaseJob,
    NotAFinetune,
    NoTeacher,
    Resolved,
    ResolvedTeacher,
    WaitingForBaseJob,
    WaitingForFinetuneJob,
    resolve_base_model,
    resolve_teacher,
)
from kubeforge.status import BestTrial, JobStatus, SweepStatus

FINETUNE = job(example("finetune-lora-classify.yaml")[0])
BASE = BaseJob("PretrainJob", FINETUNE.spec.base_model.from_pretrain_job)  # type: ignore[union-attr,arg-type]
DONE = JobStatus(phase="Succeeded", export_uri="s3://b/base/export")


def test_a_pretrain_job_has_no_base_model() -> None:
    assert resolve_base_model(job(), lambda _: DONE) == NotAFinetune()


def test_a_finetune_waits_for_a_pretrain_job_that_is_missing_or_has_no_export() -> None:
    missing = resolve_base_model(FINETUNE, lambda _: None)
    assert isinstance(missing, WaitingForBaseJob) and missing.job == BASE and missing.status is None
    running = JobStatus(phase="Running", step_progress="10/300")
    assert resolve_base_model(FINETUNE, lambda _: running) == WaitingForBaseJob(
        BASE, running, FINETUNE.spec.base_model_wait_seconds)  # type: ignore[union-attr]


def test_a_finetune_resolves_to_the_pretrain_jobs_export_or_its_explicit_uri() -> None:
    assert resolve_base_model(FINETUNE, lambda name: DONE if name == BASE else None) == Resolved(
        "s3://b/base/export", f"PretrainJob {BASE.name}")
    explicit = job(example("finetune-lora-classify.yaml")[0], baseModel={"uri": "s3://models/explicit"})
    assert resolve_base_model(explicit, lambda _: None) == Resolved("s3://models/explicit")


def test_a_uri_resolved_before_stands_once_the_pretrain_job_is_gone() -> None:
    assert resolve_base_model(FINETUNE, lambda _: None, kept="s3://b/base/export") == Resolved("s3://b/base/export")


FROM_SWEEP = job(example("finetune-lora-classify.yaml")[0], baseModel={"fromSweepJob": "lr-search"})
SWEEP = BaseJob("SweepJob", "lr-search")
BEST = BestTrial(name="lr-search-t3", number=3, parameters={"training.learningRate": 3e-4}, value=0.875,
                 export_uri="s3://b/kf/default/finetunejob/lr-search-t3/export")


def test_a_finetune_from_a_sweep_waits_until_the_sweep_succeeded() -> None:
    missing = resolve_base_model(FROM_SWEEP, lambda _: None)
    assert missing == WaitingForBaseJob(SWEEP, None, FROM_SWEEP.spec.base_model_wait_seconds)  # type: ignore[union-attr]
    # A running sweep already has a best trial so far: it is not the sweep's result yet.
    running = SweepStatus(phase="Running", trials_progress="3/6", best_trial=BEST)
    assert isinstance(resolve_base_model(FROM_SWEEP, lambda _: running), WaitingForBaseJob)
    failed = SweepStatus(phase="Failed", reason="NoSuccessfulTrial")
    assert resolve_base_model(FROM_SWEEP, lambda _: failed).status == failed  # type: ignore[union-attr]


def test_a_finetune_from_a_sweep_starts_from_its_best_trials_export() -> None:
    done = SweepStatus(phase="Succeeded", trials_progress="6/6", best_trial=BEST)
    resolved = resolve_base_model(FROM_SWEEP, lambda base: done if base == SWEEP else None)
    assert resolved == Resolved(BEST.export_uri or "", "SweepJob lr-search's best trial lr-search-t3 (objective 0.875)")
    assert resolve_base_model(FROM_SWEEP, lambda _: None, kept="s3://kept") == Resolved("s3://kept")


STUDENT = job(with_change(example("finetune-lora-classify.yaml")[0], "spec.lora", DELETE),
              method="distill", teacher={"fromFinetuneJob": "big-teacher"})


def test_only_a_distilling_job_has_a_teacher() -> None:
    assert resolve_teacher(FINETUNE, lambda _: DONE) == NoTeacher()
    assert resolve_teacher(job(), lambda _: DONE) == NoTeacher()


def test_a_student_waits_for_its_teacher_then_resolves_to_its_export_or_its_uri() -> None:
    running = JobStatus(phase="Running")
    assert resolve_teacher(STUDENT, lambda _: running) == WaitingForFinetuneJob(
        "big-teacher", running, STUDENT.spec.base_model_wait_seconds)  # type: ignore[union-attr]
    assert resolve_teacher(STUDENT, lambda name: DONE if name == "big-teacher" else None) == ResolvedTeacher(
        "s3://b/base/export", from_finetune_job="big-teacher")
    by_uri = job(with_change(example("finetune-lora-classify.yaml")[0], "spec.lora", DELETE),
                 method="distill", teacher={"uri": "s3://models/teacher"})
    assert resolve_teacher(by_uri, lambda _: None) == ResolvedTeacher("s3://models/teacher")
    assert resolve_teacher(STUDENT, lambda _: None, kept="s3://kept") == ResolvedTeacher("s3://kept")
