"""What a job reports: the status the operator writes, and the outcome the trainer leaves behind.

A trainer pod tells the operator how it ended through its exit code (`EXIT_PERMANENT`: never retry)
and its termination message (`TrainerSummary` or `TrainerError`, as JSON); the operator turns that,
the pods and the trainer's progress into `JobStatus`. The CRDs' status schema and
docs/crd-reference.md are generated from `JobStatus`, as the spec's are from kubeforge/spec.py.
Field names are camelCase on the wire and snake_case in Python.
"""

from __future__ import annotations

import json
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.alias_generators import to_camel

#: The trainer's exit code for a job that can never succeed as written (bad spec, bad data): the
#: operator fails the job instead of restarting it. Any other non-zero code may succeed on a retry.
EXIT_PERMANENT = 2
#: The trainer's exit code after a graceful stop on SIGTERM (suspend, pod deletion, drain, eviction,
#: preemption): its step finished and a checkpoint committed, so a rerun loses no step. 128 + SIGTERM,
#: as a process killed by the signal would report: retryable, and no sign of a fault in the job.
EXIT_PREEMPTED = 143


class Preempted(RuntimeError):
    """The trainer stopped on SIGTERM at a step boundary, after committing that step's checkpoint."""

Phase = Literal["Pending", "Running", "Restarting", "Succeeded", "Failed", "Suspended"]
PENDING: Final = "Pending"
RUNNING: Final = "Running"
RESTARTING: Final = "Restarting"
SUCCEEDED: Final = "Succeeded"
FAILED: Final = "Failed"
SUSPENDED: Final = "Suspended"
FINISHED = (SUCCEEDED, FAILED)


class _Reported(BaseModel):
    # Read back from the API server or a pod, where an older or newer writer may have left other keys.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    def to_json(self) -> dict[str, Any]:
        """As written to the API server or the termination message: camelCase, unset fields left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


# ---------------------------------------------------------------------------------------------
# The job's status, written by the operator only


class Condition(_Reported):
    """One aspect of the job, as the Kubernetes API conventions have conditions."""

    type: str = Field(description="Running, Succeeded, Failed, Suspended, Restarting, WaitingForGPU, "
                                  "CPUFallback, WaitingForBaseModel or SpecChangePending")
    status: Literal["True", "False"] = Field(description="whether the condition holds")
    reason: str = Field(description="why, as one CamelCase word")
    message: str = Field(description="why, for people")
    last_transition_time: str = Field(description="when its status last changed (RFC 3339)")
    observed_generation: int | None = Field(None, description="the metadata.generation it was decided on")


class JobStatus(_Reported):
    """The job's status, written by the operator only: recomputed from what it observes at every resync."""

    phase: Phase | None = Field(None, description="where the job is in its lifecycle")
    reason: str | None = Field(None, description="why it is in this phase, as one CamelCase word")
    message: str | None = Field(None, description="why it is in this phase, for people")
    conditions: list[Condition] = Field([], description="the job's conditions, one per type")
    restarts: int = Field(0, ge=0, description="gang restarts so far: pods of attempt N are named `-aN`")
    disruptions: int = Field(0, ge=0, description="the restarts caused by an evicted or preempted worker "
                                                "(DisruptionTarget): they do not count against backoffLimit")
    observed_generation: int | None = Field(None, description="the metadata.generation this status is for")
    start_time: str | None = Field(None, description="when every worker first ran (RFC 3339)")
    completion_time: str | None = Field(None, description="when the job succeeded or failed (RFC 3339)")
    checkpoint_uri: str | None = Field(None, description="where the job's checkpoints are written")
    base_model_uri: str | None = Field(None, description="the model a FinetuneJob starts from")
    export_uri: str | None = Field(None, description="the trained Hugging Face model, once the job succeeded")
    device: Literal["cpu", "gpu"] | None = Field(None, description="what the workers train on")
    step: int | None = Field(None, description="the optimizer steps done")
    total_steps: int | None = Field(None, description="the optimizer steps the job trains for")
    step_progress: str | None = Field(None, description="step/totalSteps, for `kubectl get`")
    loss: float | None = Field(None, description="the training loss of the last logging interval")
    eval_metrics: dict[str, float] | None = Field(None, description="the last evaluation's metrics, by name")
    last_checkpoint_step: int | None = Field(None, description="the step of the newest committed checkpoint")
    last_step_time: str | None = Field(
        None, description="when the trainer last reported a new step, or the gang started running (RFC 3339): "
                          "stallTimeoutSeconds counts from it")

    @classmethod
    def read(cls, status: dict[str, Any] | None) -> JobStatus:
        """The status as read from a job's body (absent before the operator first writes it)."""
        return cls.model_validate(status or {})

    def condition(self, kind: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == kind), None)


# ---------------------------------------------------------------------------------------------
# The trainer's outcome: rank 0's termination message (`kubeforge train --termination-log`)


class TrainerSummary(_Reported):
    """How training ended, when it did: what the job's status reports once every worker succeeded."""

    step: int
    total_steps: int
    resumed_from_step: int
    train_loss: float | None = None  # None when no logging interval completed
    final_eval: dict[str, float] = {}
    export_uri: str
    checkpoint_uri: str


class TrainerResult(TrainerSummary):
    """A run's whole result: what `train` returns, `kubeforge run --json` prints and the export keeps
    as result.json. Its TrainerSummary part is the termination message (which must fit in 4 KiB)."""

    job: str
    namespace: str
    kind: str
    tokens_seen: int
    eval_history: list[dict[str, Any]]  # each evaluation's metrics, with its step
    device: str
    workers: int
    labels: list[str] | None = None  # the class names of a sequence-classification job
    #: A FinetuneJob's export: "merged" (one model) or "base+adapter" (prompt and prefix tuning:
    #: the base model, with peft's adapter under adapter/).
    export_format: Literal["merged", "base+adapter"] | None = None
    adapter_ranks: dict[str, int] | None = None  # AdaLoRA: each adapted layer's final rank

    def summary(self) -> TrainerSummary:
        return TrainerSummary.model_validate(self.model_dump(include=set(TrainerSummary.model_fields)))


class TrainerError(_Reported):
    """Why training stopped: `permanent` as the exit code `EXIT_PERMANENT` says it."""

    error: str
    permanent: bool


def termination_message(outcome: TrainerSummary | TrainerError) -> str:
    """The outcome as the compact JSON `read_termination_message` reads back."""
    return json.dumps(outcome.to_json(), separators=(",", ":"))


_OUTCOME: TypeAdapter[TrainerSummary | TrainerError] = TypeAdapter(TrainerSummary | TrainerError)


def read_termination_message(text: str) -> TrainerSummary | TrainerError | None:
    """The trainer's outcome, or None when the message is none: a log tail (FallbackToLogsOnError),
    a message cut at Kubernetes' 4 KiB, or a pod killed before it wrote one."""
    try:
        return _OUTCOME.validate_json(text)
    except ValidationError:
        return None
