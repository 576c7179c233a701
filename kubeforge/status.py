"""What a job reports: the status the operator writes, and the outcome the trainer leaves behind.

A trainer pod tells the operator how it ended through its exit code (`EXIT_PERMANENT`: never retry)
and its termination message (`TrainerSummary` or `TrainerError`, as JSON); the operator turns that,
the pods and the trainer's progress into `JobStatus`. The CRDs' status schema and
docs/crd-reference.md are generated from `JobStatus`, as the spec's are from kubeforge/spec.py.
Field names are camelCase on the wire and snake_case in Python.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, WithJsonSchema
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

class EarlyStopped(RuntimeError):
    """Training stopped after an evaluation because its observer asked (a sweep's pruner)."""


#: What sees each evaluation of a run in progress: (step, metrics) -> stop now.
EvalObserver = Callable[[int, dict[str, float]], bool]

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
# What export.quantize and export.prune cost: written by the trainer, copied into the status by the operator


class ExportedModel(_Reported):
    """One exported model, evaluated on the job's eval set."""

    uri: str | None = Field(None, description="where it is; none for a full-precision model not kept")
    size_bytes: int = Field(description="its weight files' bytes on disk")
    eval: dict[str, float] = Field(description="its metrics on the eval set, by name")


class CompressionReport(_Reported):
    """The quantized export next to the full-precision one it was made from."""

    quantize: Literal["int8", "int4"] = Field(description="export.quantize")
    scheme: str = Field(description="what the quantized weights are, in words")
    full: ExportedModel = Field(description="the full-precision model")
    quantized: ExportedModel = Field(description="the quantized model")
    size_ratio: float = Field(description="the quantized model's size over the full one's")
    summary: str = Field(description="size and eval metric of both, for `kubectl get`")


class PruningReport(_Reported):
    """The pruned export next to the full model it was pruned from."""

    sparsity: float = Field(description="the fraction of the pruned layers' weights that are zero")
    full: ExportedModel = Field(description="the full model")
    pruned: ExportedModel = Field(description="the pruned model")
    summary: str = Field(description="sparsity and eval metric of both, for `kubectl get`")


# ---------------------------------------------------------------------------------------------
# The job's status, written by the operator only


class Condition(_Reported):
    """One aspect of the job, as the Kubernetes API conventions have conditions."""

    type: str = Field(description="Running, Succeeded, Failed, Suspended, Restarting, WaitingForGPU, "
                                  "CPUFallback, WaitingForBaseModel, WaitingForTeacher or SpecChangePending")
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
    teacher_uri: str | None = Field(None, description="method distill: the teacher model the student learns from")
    export_uri: str | None = Field(None, description="the trained Hugging Face model, once the job succeeded")
    device: Literal["cpu", "gpu"] | None = Field(None, description="what the workers train on")
    step: int | None = Field(None, description="the optimizer steps done")
    total_steps: int | None = Field(None, description="the optimizer steps the job trains for")
    step_progress: str | None = Field(None, description="step/totalSteps, for `kubectl get`")
    loss: float | None = Field(None, description="the training loss of the last logging interval")
    eval_metrics: dict[str, float] | None = Field(None, description="the last evaluation's metrics, by name")
    eval_step: int | None = Field(None, description="the step of the last evaluation (a sweep's pruner judges by it)")
    last_checkpoint_step: int | None = Field(None, description="the step of the newest committed checkpoint")
    compression: CompressionReport | None = Field(
        None, description="export.quantize: size and eval metrics of the quantized and the full model")
    pruning: PruningReport | None = Field(
        None, description="export.prune: sparsity and eval metrics of the pruned and the full model")
    trainable_parameters: int | None = Field(
        None, description="the parameters the optimizer trains: a peft method's adapters, else the whole model")
    corpus_tokens_prepared: int | None = Field(
        None, description="a PretrainJob's corpus tokens that rank 0 has tokenized into shards, while it prepares "
        "them (stepProgress: preparing)")
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
# A SweepJob's status: every trial it asked for, from which the operator rebuilds the study

TrialState = Literal["Running", "Succeeded", "Pruned", "Failed"]
TRIAL_FINISHED = ("Succeeded", "Pruned", "Failed")
#: Parameter values and Optuna's bookkeeping: any JSON, kept as it is.
FreeObject = Annotated[dict[str, Any], WithJsonSchema({"type": "object", "x-kubernetes-preserve-unknown-fields": True})]


class IntermediateValue(_Reported):
    """The objective at one evaluation of a running trial: what the pruner judges."""

    step: int = Field(description="the trial's step at that evaluation")
    value: float = Field(description="the objective metric then")


class TrialStatus(_Reported):
    """One trial: asked of the sampler, run as a job `<sweep>-t<number>`, and how it ended."""

    number: int = Field(ge=0, description="the trial's number, in the order the sampler asked")
    name: str = Field(description="the trial's job")
    parameters: FreeObject = Field(description="the value of each parameter, by path")
    state: TrialState = Field(description="Running, Succeeded, Pruned or Failed")
    reason: str | None = Field(None, description="why it ended so, as one CamelCase word")
    message: str | None = Field(None, description="why it ended so, for people")
    intermediate: list[IntermediateValue] = Field([], description="the objective at each evaluation seen")
    value: float | None = Field(None, description="the objective at the trial's end, once it succeeded")
    step: int | None = Field(None, description="the step the trial reached")
    export_uri: str | None = Field(None, description="the trial's exported model, once it succeeded")
    optuna: FreeObject = Field({}, description="Optuna's own attributes of the trial (grid point, halving rungs)")

    @property
    def finished(self) -> bool:
        return self.state in TRIAL_FINISHED


class BestTrial(_Reported):
    """The succeeded trial with the best objective (the lowest number among equals)."""

    name: str = Field(description="the trial's job")
    number: int = Field(description="the trial's number")
    parameters: FreeObject = Field(description="its parameters")
    value: float = Field(description="its objective value")
    export_uri: str | None = Field(None, description="its exported model")


class SweepStatus(_Reported):
    """A SweepJob's status, written by the operator (or `kubeforge run`): the trials are the study."""

    phase: Literal["Pending", "Running", "Succeeded", "Failed"] | None = Field(None, description="the sweep's phase")
    reason: str | None = Field(None, description="why it is in this phase, as one CamelCase word")
    message: str | None = Field(None, description="why it is in this phase, for people")
    conditions: list[Condition] = Field([], description="the sweep's conditions, one per type")
    observed_generation: int | None = Field(None, description="the metadata.generation this status is for")
    trials: list[TrialStatus] = Field([], description="every trial asked so far, by number")
    trials_done: int = Field(0, ge=0, description="trials finished: succeeded, pruned or failed")
    trials_progress: str | None = Field(None, description="trialsDone/maxTrials, for `kubectl get`")
    pruned_trials: int = Field(0, ge=0, description="trials stopped early by the pruner")
    failed_trials: int = Field(0, ge=0, description="trials that failed (or reported no objective)")
    best_value: float | None = Field(None, description="the best objective value so far")
    best_trial: BestTrial | None = Field(None, description="the best trial so far")
    start_time: str | None = Field(None, description="when the first trial was asked (RFC 3339)")
    completion_time: str | None = Field(None, description="when the sweep succeeded or failed (RFC 3339)")

    @classmethod
    def read(cls, status: dict[str, Any] | None) -> SweepStatus:
        return cls.model_validate(status or {})


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
    compression: CompressionReport | None = None  # export.quantize's measurements
    pruning: PruningReport | None = None  # export.prune's
    teacher_uri: str | None = None  # method distill: the teacher's model, the student's lineage
    trainable_parameters: int | None = None  # what the optimizer trained


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
