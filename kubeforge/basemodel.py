"""Where a FinetuneJob's base model (and a distilling one's teacher) comes from: one rule for the
operator and for `kubeforge run`.

A finetune names its base model by URI, by the PretrainJob whose export it starts from
(baseModel.fromPretrainJob), or by the SweepJob whose best trial's export it starts from
(baseModel.fromSweepJob). The rule has three outcomes: the job is no finetune, it waits for that
job, or its base model is a URI. Where the upstream job's status comes from is the caller's: the API
server for the operator, the same run's storage root for the CLI. No Kopf here: the CLI imports it
without the operator's dependencies.

A distilling FinetuneJob's teacher follows the same rule: by URI, or the export of the FinetuneJob
named by teacher.fromFinetuneJob once it succeeded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kubeforge.spec import FinetuneJob, Job
from kubeforge.status import SUCCEEDED, JobStatus, SweepStatus


@dataclass(frozen=True)
class NotAFinetune:
    """A PretrainJob: it starts from no base model."""


@dataclass(frozen=True)
class BaseJob:
    """The job a finetune's base model is the export of: a PretrainJob, or a SweepJob's best trial."""

    kind: str
    name: str


#: A PretrainJob's status, or a SweepJob's; None when it does not exist.
UpstreamStatus = JobStatus | SweepStatus | None


@dataclass(frozen=True)
class WaitingForBaseJob:
    """The PretrainJob or SweepJob named by baseModel has exported no model yet."""

    job: BaseJob
    #: Its status as seen now; None when it does not exist.
    status: UpstreamStatus
    #: How long the finetune may wait for it, from its creation (baseModelWaitSeconds).
    wait_seconds: int


@dataclass(frozen=True)
class Resolved:
    uri: str
    #: Whose export it is, for people ("SweepJob lr's best trial lr-t3"), when resolved from a job just now.
    source: str | None = None


BaseModelResolution = NotAFinetune | WaitingForBaseJob | Resolved


def upstream_base_job(job: Job) -> BaseJob | None:
    """The job whose export the job starts from, if it names one."""
    if not isinstance(job, FinetuneJob):
        return None
    wanted = job.spec.base_model
    if wanted.from_pretrain_job:
        return BaseJob("PretrainJob", wanted.from_pretrain_job)
    if wanted.from_sweep_job:
        return BaseJob("SweepJob", wanted.from_sweep_job)
    return None


def resolve_base_model(job: Job, upstream: Callable[[BaseJob], UpstreamStatus],
                       kept: str | None = None) -> BaseModelResolution:
    """The job's base model. `upstream(base_job)` is the named job's status (a SweepJob's for a
    SweepJob), or None when there is none; `kept` a URI resolved before, which stands even once that
    job is gone (its TTL, or a sweep deleted with its trials)."""
    if not isinstance(job, FinetuneJob):
        return NotAFinetune()
    if kept:
        return Resolved(kept)
    if job.spec.base_model.uri:
        return Resolved(job.spec.base_model.uri)
    base_job = upstream_base_job(job)
    assert base_job is not None  # the spec requires exactly one of uri, fromPretrainJob or fromSweepJob
    status = upstream(base_job)
    resolved = _export(base_job, status)
    return resolved or WaitingForBaseJob(base_job, status, job.spec.base_model_wait_seconds)


def _export(base_job: BaseJob, status: UpstreamStatus) -> Resolved | None:
    """The upstream job's model, once it succeeded: a PretrainJob's export, a SweepJob's best trial's."""
    if status is None or status.phase != SUCCEEDED:
        return None
    if isinstance(status, SweepStatus):
        best = status.best_trial
        if best is None or not best.export_uri:
            return None
        return Resolved(best.export_uri, f"SweepJob {base_job.name}'s best trial {best.name} "
                                         f"(objective {best.value:.4g})")
    return Resolved(status.export_uri, f"{base_job.kind} {base_job.name}") if status.export_uri else None


@dataclass(frozen=True)
class NoTeacher:
    """A job that does not distill: it learns from no teacher."""


@dataclass(frozen=True)
class WaitingForFinetuneJob:
    """The FinetuneJob named by teacher.fromFinetuneJob has exported no model yet."""

    name: str
    #: Its status as seen now; None when it does not exist.
    status: JobStatus | None
    #: How long the student may wait for it, from its creation (baseModelWaitSeconds).
    wait_seconds: int


@dataclass(frozen=True)
class ResolvedTeacher:
    uri: str
    #: The FinetuneJob whose export it is, when it was resolved from one just now.
    from_finetune_job: str | None = None


TeacherResolution = NoTeacher | WaitingForFinetuneJob | ResolvedTeacher


def upstream_teacher_job(job: Job) -> str | None:
    """The FinetuneJob whose export the job distills from, if it names one."""
    teacher = job.spec.teacher if isinstance(job, FinetuneJob) else None
    return teacher.from_finetune_job if teacher is not None else None


def resolve_teacher(job: Job, upstream: Callable[[str], JobStatus | None],
                    kept: str | None = None) -> TeacherResolution:
    """The job's teacher, as resolve_base_model resolves a base model: `upstream(name)` is the named
    FinetuneJob's status (None when there is none), `kept` a URI resolved before."""
    teacher = job.spec.teacher if isinstance(job, FinetuneJob) else None
    if teacher is None:
        return NoTeacher()
    if kept:
        return ResolvedTeacher(kept)
    if teacher.uri:
        return ResolvedTeacher(teacher.uri)
    name = teacher.from_finetune_job
    assert name is not None and isinstance(job, FinetuneJob)  # the spec requires uri or fromFinetuneJob
    status = upstream(name)
    if status is None or status.phase != SUCCEEDED or not status.export_uri:
        return WaitingForFinetuneJob(name, status, job.spec.base_model_wait_seconds)
    return ResolvedTeacher(status.export_uri, from_finetune_job=name)
