"""The base-model rule's three outcomes, as the operator and the CLI both ask it."""

from __future__ import annotations

from support.jobs import example, job

from kubeforge.basemodel import NotAFinetune, Resolved, WaitingForPretrainJob, resolve_base_model
from kubeforge.status import JobStatus

FINETUNE = job(example("finetune-lora-classify.yaml")[0])
BASE = FINETUNE.spec.base_model.from_pretrain_job  # type: ignore[union-attr]
DONE = JobStatus(phase="Succeeded", export_uri="s3://b/base/export")


def test_a_pretrain_job_has_no_base_model() -> None:
    assert resolve_base_model(job(), lambda _: DONE) == NotAFinetune()


def test_a_finetune_waits_for_a_pretrain_job_that_is_missing_or_has_no_export() -> None:
    missing = resolve_base_model(FINETUNE, lambda _: None)
    assert isinstance(missing, WaitingForPretrainJob) and missing.name == BASE and missing.status is None
    running = JobStatus(phase="Running", step_progress="10/300")
    assert resolve_base_model(FINETUNE, lambda _: running) == WaitingForPretrainJob(
        BASE, running, FINETUNE.spec.base_model_wait_seconds)  # type: ignore[union-attr]


def test_a_finetune_resolves_to_the_pretrain_jobs_export_or_its_explicit_uri() -> None:
    assert resolve_base_model(FINETUNE, lambda name: DONE if name == BASE else None) == Resolved(
        "s3://b/base/export", from_pretrain_job=BASE)
    explicit = job(example("finetune-lora-classify.yaml")[0], baseModel={"uri": "s3://models/explicit"})
    assert resolve_base_model(explicit, lambda _: None) == Resolved("s3://models/explicit")


def test_a_uri_resolved_before_stands_once_the_pretrain_job_is_gone() -> None:
    assert resolve_base_model(FINETUNE, lambda _: None, kept="s3://b/base/export") == Resolved("s3://b/base/export")
