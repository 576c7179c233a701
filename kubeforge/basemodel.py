"""Where a FinetuneJob's base model comes from: one rule for the operator and for `kubeforge run`.

A finetune names its base model by URI or by the PretrainJob whose export it starts from
(baseModel.fromPretrainJob). The rule has three outcomes: the job is no finetune, it waits for that
PretrainJob, or its base model is a URI. Where a PretrainJob's status comes from is the caller's:
the API server for the operator, the same run's storage root for the CLI. No Kopf here: the CLI
imports it without the operator's dependencies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kubeforge.spec import FinetuneJob, Job
from kubeforge.status import SUCCEEDED, JobStatus


@dataclass(frozen=True)
class NotAFinetune:
    """A PretrainJob: it starts from no base model."""


@dataclass(frozen=True)
class WaitingForPretrainJob:
    """The PretrainJob named by baseModel.fromPretrainJob has exported no model yet."""

    name: str
    #: Its status as seen now; None when it does not exist.
    status: JobStatus | None
    #: How long the finetune may wait for it, from its creation (baseModelWaitSeconds).
    wait_seconds: int


@dataclass(frozen=True)
class Resolved:
    uri: str
    #: The PretrainJob whose export it is, when it was resolved from one just now.
    from_pretrain_job: str | None = None


BaseModelResolution = NotAFinetune | WaitingForPretrainJob | Resolved


def upstream_pretrain_job(job: Job) -> str | None:
    """The PretrainJob whose export the job starts from, if it names one."""
    return job.spec.base_model.from_pretrain_job if isinstance(job, FinetuneJob) else None


def resolve_base_model(job: Job, upstream: Callable[[str], JobStatus | None],
                       kept: str | None = None) -> BaseModelResolution:
    """The job's base model. `upstream(name)` is the named PretrainJob's status, or None when there
    is none; `kept` a URI resolved before, which stands even once that PretrainJob is gone (its TTL)."""
    if not isinstance(job, FinetuneJob):
        return NotAFinetune()
    if kept:
        return Resolved(kept)
    wanted = job.spec.base_model
    if wanted.uri:
        return Resolved(wanted.uri)
    name = wanted.from_pretrain_job
    assert name is not None  # the spec requires uri or fromPretrainJob
    status = upstream(name)
    if status is None or status.phase != SUCCEEDED or not status.export_uri:
        return WaitingForPretrainJob(name, status, job.spec.base_model_wait_seconds)
    return Resolved(status.export_uri, from_pretrain_job=name)
