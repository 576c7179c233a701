"""The job state machine, as one pure function: what is observed -> status, actions and events.

Status is computed from observations (pods, the base job, trainer progress, nodes), so replaying an
event or restarting the operator converges on the same answer. The only state carried in status
that observations cannot give back is the gang attempt (`restarts`), the start and completion times.

    Pending -> Running -> Succeeded
       |         |  \\--> Failed (permanent exit, backoffLimit, deadline)
       |         \\-> Restarting -> Running ...
       \\-> Suspended (spec.suspend) -> Pending ...
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from kubeforge.basemodel import (
    BaseJob,
    BaseModelResolution,
    Resolved,
    ResolvedTeacher,
    TeacherResolution,
    UpstreamStatus,
    WaitingForBaseJob,
    WaitingForFinetuneJob,
    resolve_base_model,
    resolve_teacher,
)
from kubeforge.operator.contract import LaunchPlan, pod_shape
from kubeforge.operator.pods import PodView, live, of_attempt, owned
from kubeforge.operator.tenancy import UriPolicy, uri_violations
from kubeforge.spec import Job
from kubeforge.status import (
    EXIT_PERMANENT,
    FAILED,
    FINISHED,
    PENDING,
    RESTARTING,
    RUNNING,
    SUCCEEDED,
    SUSPENDED,
    Condition,
    JobStatus,
    Phase,
    SweepStatus,
    TrainerSummary,
)


@dataclass(frozen=True)
class Progress:
    """What the rank-0 trainer's metrics endpoint said."""

    step: int
    total_steps: int
    loss: float | None = None
    eval_metrics: dict[str, float] = field(default_factory=dict)
    eval_step: int | None = None
    last_checkpoint_step: int | None = None
    #: Whether rank 0 is preparing the corpus (tokenizing it into shards), and its tokens so far.
    preparing: bool = False
    tokens_prepared: int = 0
    #: What the optimizer trains, once the model is built.
    trainable_parameters: int | None = None


@dataclass(frozen=True)
class Observed:
    job: Job
    #: The job's status as the API server has it (JSON): what earlier reconciliations wrote.
    status: dict[str, Any]
    pods: list[PodView]
    gpu_nodes: bool
    checkpoint_uri: str
    #: The PretrainJob named by baseModel.fromPretrainJob, or the SweepJob named by baseModel.fromSweepJob:
    #: its body, or None when it does not exist.
    base_job: dict[str, Any] | None = None
    progress: Progress | None = None
    generation: int | None = None
    #: The cluster's policy (KUBEFORGE_ALLOW_CPU_FALLBACK): False makes every job wait for GPUs.
    cpu_fallback_allowed: bool = True
    #: Which storage URIs the job's namespace may use (OperatorSettings.uri_policy); None: any.
    uri_policy: UriPolicy | None = None
    #: metadata.creationTimestamp: a FinetuneJob's wait for its base model counts from it.
    created: datetime | None = None
    #: Where the namespace's jobs keep hf:// base models once fetched (spec.base_model_cache_uri).
    base_model_cache: str | None = None
    #: Where the namespace's PretrainJobs keep prepared corpora (spec.corpus_cache_uri).
    corpus_cache: str | None = None
    #: The FinetuneJob named by teacher.fromFinetuneJob: its body, or None when it does not exist.
    teacher_job: dict[str, Any] | None = None


class Event(NamedTuple):
    """A Kubernetes Event for the job, which the reconciler posts."""

    type: str  # Normal or Warning
    reason: str
    message: str


@dataclass
class Plan:
    job_status: JobStatus
    launch: LaunchPlan | None = None  # create the Service and any missing pod of this attempt
    delete_pods: list[str] = field(default_factory=list)
    delete_job: bool = False
    events: list[Event] = field(default_factory=list)

    @property
    def status(self) -> dict[str, Any]:
        """The job's whole status as JSON: the reconciler patches the fields that changed."""
        return self.job_status.to_json()


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def set_condition(conditions: list[Condition], kind: str, status: bool, reason: str, message: str,
                  now: datetime, generation: int | None) -> list[Condition]:
    """Conditions as the API conventions have them: lastTransitionTime moves only when status does."""
    value = "True" if status else "False"
    previous = next((c for c in conditions if c.type == kind), None)
    changed_at = previous.last_transition_time if previous and previous.status == value else _iso(now)
    condition = Condition(type=kind, status=value, reason=reason, message=message, last_transition_time=changed_at,
                          observed_generation=generation)
    return [c for c in conditions if c.type != kind] + [condition]


class _Decision:
    """Accumulates one reconciliation's outcome: the new status, and what to do."""

    def __init__(self, seen: Observed, now: datetime):
        self.seen = seen
        self.now = now
        self.before = JobStatus.read(seen.status)
        self.status = JobStatus.read(seen.status)
        self.launch: LaunchPlan | None = None
        self.delete_pods: list[str] = []
        self.delete_job = False

    def condition(self, kind: str, status: bool, reason: str, message: str) -> None:
        self.status.conditions = set_condition(self.status.conditions, kind, status, reason, message,
                                               self.now, self.seen.generation)

    def phase(self, phase: Phase, reason: str, message: str) -> None:
        self.status.phase, self.status.reason, self.status.message = phase, reason, message
        for kind in (RUNNING, SUCCEEDED, FAILED, SUSPENDED, RESTARTING):
            if kind == phase or self.status.condition(kind):
                self.condition(kind, kind == phase, reason, message if kind == phase else "")
        if phase in FINISHED and not self.status.completion_time:
            self.status.completion_time = _iso(self.now)

    def events(self) -> list[Event]:
        """One event when the phase changed, saying why: a warning for a failure, a restart or a wait."""
        phase, reason = self.status.phase, self.status.reason or ""
        if phase is None or phase == self.before.phase:
            return []
        warning = phase in (FAILED, RESTARTING) or (phase == PENDING and reason.startswith("Waiting"))
        return [Event("Warning" if warning else "Normal", reason, self.status.message or "")]

    def plan(self) -> Plan:
        return Plan(job_status=self.status, launch=self.launch, delete_pods=self.delete_pods,
                    delete_job=self.delete_job, events=self.events())


def reconcile(seen: Observed, now: datetime) -> Plan:
    """The job's status and what to do about it, from what is observed now."""
    decision = _Decision(seen, now)
    _decide(decision)
    # A predecessor's pods (same name, another uid) would hold the names this job's pods need.
    ours = owned(seen.pods, seen.job)
    decision.delete_pods += [p.name for p in live(seen.pods) if p not in ours]
    return decision.plan()


def _decide(decision: _Decision) -> None:
    seen, status, now = decision.seen, decision.status, decision.now
    job, spec = seen.job, seen.job.spec
    attempt = status.restarts
    status.checkpoint_uri = seen.checkpoint_uri
    if seen.generation is not None:
        status.observed_generation = seen.generation

    if status.phase in FINISHED:
        _after_finish(decision)
        return

    if not seen.checkpoint_uri.startswith("s3://"):
        decision.phase(FAILED, "CheckpointNotDurable",
                       f"spec.checkpoint.uri {seen.checkpoint_uri!r} is a path inside the pod: its checkpoints and "
                       "model would be lost with the pod; use an s3:// URI (local paths are for `kubeforge run`)")
        return

    our_pods = live(owned(seen.pods, seen.job))
    refused = uri_violations(job, seen.uri_policy) if seen.uri_policy else []
    if refused:
        decision.delete_pods = [p.name for p in our_pods]
        decision.phase(FAILED, "URINotAllowed", "; ".join(refused))
        return
    if spec.suspend:
        decision.delete_pods = [p.name for p in our_pods]
        decision.condition(SUSPENDED, True, "Suspended", "spec.suspend is true: pods deleted, checkpoints kept")
        decision.phase(SUSPENDED, "Suspended", "spec.suspend is true: pods deleted, checkpoints kept")
        return

    base_model = _base_model(decision)
    if isinstance(base_model, WaitingForBaseJob):
        _wait_for_upstream(decision, BASE_MODEL[base_model.job.kind], base_model.job.name, base_model.status,
                           base_model.wait_seconds)
        return
    base_uri = base_model.uri if isinstance(base_model, Resolved) else None
    teacher = _teacher(decision)
    if isinstance(teacher, WaitingForFinetuneJob):
        _wait_for_upstream(decision, TEACHER, teacher.name, teacher.status, teacher.wait_seconds)
        return

    if spec.active_deadline_seconds and status.start_time:
        elapsed = now - parse_time(status.start_time)
        if elapsed >= timedelta(seconds=spec.active_deadline_seconds):
            decision.delete_pods = [p.name for p in our_pods]
            decision.phase(FAILED, "DeadlineExceeded",
                           f"ran longer than activeDeadlineSeconds ({spec.active_deadline_seconds}s)")
            return

    current = of_attempt(our_pods, attempt)
    decision.delete_pods = [p.name for p in our_pods if p not in current]
    if current:
        _follow_gang(decision, current, attempt, base_uri)
    else:
        _launch(decision, attempt, base_uri)


def _non_finite(values: dict[str, float | None]) -> str | None:
    """'name=value' of the first NaN or infinite value, or None when all are finite (or absent)."""
    return next((f"{name}={value}" for name, value in values.items()
                 if value is not None and not math.isfinite(value)), None)


def _loss_not_finite(decision: _Decision, which: str, pods: list[PodView]) -> None:
    decision.delete_pods += [p.name for p in pods if p.name not in decision.delete_pods]
    decision.phase(FAILED, "LossNotFinite",
                   f"the trainer reported {which}: training diverged (lower training.learningRate, or raise "
                   "training.warmupSteps or maxGradNorm's clipping) and a retry would diverge again")


def _follow_gang(decision: _Decision, current: list[PodView], attempt: int, base_uri: str | None) -> None:
    """What the pods of the current attempt say: progress, and whether the gang runs, failed or finished."""
    job, status = decision.seen.job, decision.status
    spec = job.spec
    progress = decision.seen.progress
    if progress is not None:
        bad = _non_finite({"loss": progress.loss, **{f"eval {k}": v for k, v in progress.eval_metrics.items()}})
        if bad:
            _loss_not_finite(decision, bad, current)
            return
    _report_progress(decision)
    if any(p.shape != pod_shape(job) for p in current):
        decision.condition("SpecChangePending", True, "PodsOutdated",
                           "resources, metrics or s3 changed while running: applied at the next restart "
                           "(suspend and resume to apply now)")
    phases = {p.rank: p.phase for p in current}
    workers = spec.resources.workers
    failed = [p for p in current if p.phase == FAILED]
    vanished = [r for r in range(workers) if r not in phases]
    if failed or (vanished and decision.before.phase in (RUNNING, RESTARTING)):
        _gang_failure(decision, current, failed, vanished, attempt)
    elif vanished:
        _launch(decision, attempt, base_uri)  # pods still being created (or lost before starting)
    elif all(phase == SUCCEEDED for phase in phases.values()):
        _succeed(decision, current)
    elif all(phase in (RUNNING, SUCCEEDED) for phase in phases.values()):
        status.start_time = status.start_time or _iso(decision.now)
        status.last_step_time = status.last_step_time or _iso(decision.now)
        if _stalled(decision):
            _gang_failure(decision, current, [], [], attempt, stalled=True)
            return
        progress = decision.seen.progress
        if progress is not None and progress.preparing:
            decision.phase(RUNNING, "PreparingCorpus", f"{workers} worker(s) preparing the corpus: "
                           f"{progress.tokens_prepared} tokens on rank 0 so far")
        else:
            decision.phase(RUNNING, "Training", f"{workers} worker(s) training")
    else:
        decision.phase(RESTARTING if attempt else PENDING, "PodsStarting",
                       f"{sum(p == RUNNING for p in phases.values())}/{workers} workers running")


def _stalled(decision: _Decision) -> bool:
    """Whether the trainer has reported no new step for spec.stallTimeoutSeconds (only measurable
    when it reports progress at all: metrics.port)."""
    spec, status = decision.seen.job.spec, decision.status
    if not spec.stall_timeout_seconds or not spec.metrics.port or not status.last_step_time:
        return False
    return decision.now - parse_time(status.last_step_time) >= timedelta(seconds=spec.stall_timeout_seconds)


def _base_model(decision: _Decision) -> BaseModelResolution:
    """The job's base model, kept in status once resolved and used from then on: the base PretrainJob
    (or SweepJob, with its trials) may be deleted later (its TTL) without the finetune noticing."""
    seen = decision.seen

    def upstream(base_job: BaseJob) -> UpstreamStatus:
        if seen.base_job is None:
            return None
        reported = seen.base_job.get("status")
        return SweepStatus.read(reported) if base_job.kind == "SweepJob" else JobStatus.read(reported)

    resolution = resolve_base_model(seen.job, upstream, kept=decision.before.base_model_uri)
    if isinstance(resolution, Resolved) and resolution.uri != decision.before.base_model_uri:
        decision.status.base_model_uri = resolution.uri
        if resolution.source:
            decision.condition("WaitingForBaseModel", False, "BaseModelReady",
                               f"starting from {resolution.source}: {resolution.uri}")
    return resolution


def _teacher(decision: _Decision) -> TeacherResolution:
    """A distilling job's teacher, kept in status once resolved as the base model is (see _base_model)."""
    seen = decision.seen
    resolution = resolve_teacher(
        seen.job, lambda _: JobStatus.read(seen.teacher_job.get("status")) if seen.teacher_job is not None else None,
        kept=decision.before.teacher_uri)
    if isinstance(resolution, ResolvedTeacher) and resolution.uri != decision.before.teacher_uri:
        decision.status.teacher_uri = resolution.uri
        if resolution.from_finetune_job:
            decision.condition(TEACHER.condition, False, "TeacherReady",
                               f"distilling from FinetuneJob {resolution.from_finetune_job}: {resolution.uri}")
    return resolution


@dataclass(frozen=True)
class _Upstream:
    """A job another one waits for the export of: its kind, and the condition and reasons of the wait."""

    kind: str
    condition: str
    #: The reasons' stem: BaseModelMissing, TeacherFailed...
    stem: str
    #: What it is to the waiting job, in messages.
    role: str
    #: The field that names it, in the timeout's message.
    field: str


#: By the kind of job the base model is the export of.
BASE_MODEL = {kind: _Upstream(kind, "WaitingForBaseModel", "BaseModel", "its base model", f"baseModel.from{kind}")
              for kind in ("PretrainJob", "SweepJob")}
TEACHER = _Upstream("FinetuneJob", "WaitingForTeacher", "Teacher", "its teacher", "teacher.fromFinetuneJob")


def _wait_for_upstream(decision: _Decision, upstream: _Upstream, name: str, upstream_status: UpstreamStatus,
                       limit: int) -> None:
    """Pending while the upstream job is missing or still training, within baseModelWaitSeconds;
    failed when it failed or that time is up."""
    job, stem = decision.seen.job, upstream.stem
    if upstream_status is None:
        reason, message = f"{stem}Missing", f"{upstream.kind} {name} does not exist in namespace {job.namespace}"
    elif upstream_status.phase == FAILED:
        message = (f"{upstream.field}: {upstream.role}, {upstream.kind} {name}, failed: "
                   f"{upstream_status.message or upstream_status.reason}")
        decision.condition(upstream.condition, False, f"{stem}Failed", message)
        decision.phase(FAILED, f"{stem}Failed", message)
        return
    else:
        reason = f"{stem}NotReady"
        message = (f"waiting for {upstream.kind} {name} to succeed (now {upstream_status.phase or PENDING}"
                   f"{_upstream_progress(upstream_status)})")
    created = decision.seen.created
    if created is not None and decision.now - created >= timedelta(seconds=limit):
        message = f"{message}; gave up after baseModelWaitSeconds ({limit}s)"
        decision.condition(upstream.condition, False, f"{stem}Timeout", message)
        decision.phase(FAILED, f"{stem}Timeout", message)
        return
    decision.condition(upstream.condition, True, reason, message)
    decision.phase(PENDING, upstream.condition, message)


def _upstream_progress(status: JobStatus | SweepStatus) -> str:
    """How far the upstream job is, after its phase: its steps, or a sweep's trials."""
    if isinstance(status, SweepStatus):
        return f", {status.trials_progress} trials done" if status.trials_progress else ""
    return f", step {status.step_progress}" if status.step_progress else ""


def _launch(decision: _Decision, attempt: int, base_uri: str | None) -> None:
    job = decision.seen.job
    resources = job.spec.resources
    cpu_fallback = False
    if resources.gpus_per_worker and not decision.seen.gpu_nodes:
        if not resources.allow_cpu_fallback or not decision.seen.cpu_fallback_allowed:
            refused_by = ("resources.allowCpuFallback is false" if not resources.allow_cpu_fallback
                          else "the operator does not allow CPU fallback (KUBEFORGE_ALLOW_CPU_FALLBACK=false)")
            message = (f"no node has allocatable nvidia.com/gpu and {refused_by}: "
                       f"waiting for {resources.gpus_per_worker} GPU(s) per worker")
            decision.condition("WaitingForGPU", True, "NoGPUNodes", message)
            decision.phase(PENDING, "WaitingForGPU", message)
            return
        cpu_fallback = True
        decision.condition("CPUFallback", True, "NoGPUNodes",
                           "no node has allocatable nvidia.com/gpu: training on CPU (gloo) as allowed")
    elif resources.gpus_per_worker:
        decision.condition("CPUFallback", False, "GPUsAvailable", "training on GPUs")
    if decision.status.condition("WaitingForGPU"):
        decision.condition("WaitingForGPU", False, "Scheduled", "pods created")
    decision.status.device = "cpu" if cpu_fallback or not resources.gpus_per_worker else "gpu"
    decision.launch = LaunchPlan(decision.seen.checkpoint_uri, base_uri, cpu_fallback, decision.seen.base_model_cache,
                                 decision.seen.corpus_cache, teacher_uri=decision.status.teacher_uri)
    if attempt:
        decision.phase(RESTARTING, "PodsCreated",
                       f"restart {attempt}: {resources.workers} worker(s) resume from the last checkpoint")
    else:
        decision.phase(PENDING, "PodsCreated", f"{resources.workers} worker(s) created")


def _gang_failure(decision: _Decision, current: list[PodView], failed: list[PodView],
                  vanished: list[int], attempt: int, stalled: bool = False) -> None:
    job, status = decision.seen.job, decision.status
    decision.delete_pods += [p.name for p in current]
    # Evicted pods may already be terminating (no longer `current`): look at every pod of this attempt.
    disrupted = sorted(str(p.rank) for p in of_attempt(owned(decision.seen.pods, job), attempt) if p.disrupted)
    if disrupted and not stalled:
        status.restarts, status.disruptions, status.last_step_time = attempt + 1, status.disruptions + 1, None
        decision.phase(RESTARTING, "Disrupted",
                       f"worker(s) {', '.join(disrupted)} evicted or preempted (DisruptionTarget); replacing all "
                       f"{job.spec.resources.workers} worker(s), not counted against backoffLimit")
        return
    causes = []
    for pod in failed:
        code, detail = pod.failure()
        if code == EXIT_PERMANENT:
            decision.phase(FAILED, "PermanentError", f"worker {pod.rank} cannot succeed as written: {detail}")
            return
        causes.append(f"worker {pod.rank} exited with code {code}: {detail}")
    causes += [f"worker {rank} disappeared (its node may be gone)" for rank in vanished]
    if stalled:
        causes.append(f"no new step since {status.last_step_time} (stallTimeoutSeconds "
                      f"{job.spec.stall_timeout_seconds}): the trainer is hung")
    cause = "; ".join(causes)
    counted = attempt - status.disruptions
    if counted >= job.spec.backoff_limit:
        decision.phase(FAILED, "Stalled" if stalled else "BackoffLimitExceeded",
                       f"{counted} restart(s), backoffLimit {job.spec.backoff_limit}: {cause}")
        return
    status.restarts, status.last_step_time = attempt + 1, None
    decision.phase(RESTARTING, "Stalled" if stalled else "GangRestart",
                   f"{cause}; replacing all {job.spec.resources.workers} worker(s) "
                   f"(restart {counted + 1} of at most {job.spec.backoff_limit})")


def _report_progress(decision: _Decision) -> None:
    progress = decision.seen.progress
    if progress is None:
        return
    status = decision.status
    if progress.trainable_parameters is not None:
        status.trainable_parameters = progress.trainable_parameters
    if progress.preparing:
        # Preparing a large corpus takes hours without a step: while it advances it is no stall.
        if progress.tokens_prepared != decision.before.corpus_tokens_prepared:
            status.last_step_time = _iso(decision.now)
        status.corpus_tokens_prepared = progress.tokens_prepared
        status.step_progress = "preparing"
        return
    if progress.step != decision.before.step:
        status.last_step_time = _iso(decision.now)
    status.step, status.total_steps = progress.step, progress.total_steps
    status.step_progress = f"{progress.step}/{progress.total_steps}"
    if progress.loss is not None:
        status.loss = round(progress.loss, 4)
    if progress.eval_metrics:
        status.eval_metrics = {k: round(v, 4) for k, v in progress.eval_metrics.items()}
        status.eval_step = progress.eval_step
    if progress.last_checkpoint_step:
        status.last_checkpoint_step = progress.last_checkpoint_step


def _succeed(decision: _Decision, current: list[PodView]) -> None:
    status = decision.status
    rank0 = next((p for p in current if p.rank == 0), current[0])
    summary = rank0.outcome
    if isinstance(summary, TrainerSummary):
        bad = _non_finite({"trainLoss": summary.train_loss,
                           **{f"finalEval {k}": v for k, v in summary.final_eval.items()}})
        if bad:
            _loss_not_finite(decision, bad, [])
            return
        status.step, status.total_steps = summary.step, summary.total_steps
        status.step_progress = f"{summary.step}/{summary.total_steps}"
        status.last_checkpoint_step = summary.step
        status.export_uri = summary.export_uri
        status.teacher_uri = summary.teacher_uri or status.teacher_uri
        status.trainable_parameters = summary.trainable_parameters or status.trainable_parameters
        status.eval_metrics = {k: round(v, 4) for k, v in summary.final_eval.items()}
        status.compression = summary.compression
        status.pruning = summary.pruning
        status.eval_step = summary.step if summary.final_eval else status.eval_step
        if summary.train_loss is not None:
            status.loss = round(summary.train_loss, 4)
    step = status.step if status.step is not None else "?"
    decision.phase(SUCCEEDED, "Completed", f"trained to step {step}; model at "
                   f"{status.export_uri or 'an unknown location'}")


def _after_finish(decision: _Decision) -> None:
    spec = decision.seen.job.spec
    if spec.clean_pod_policy == "All":
        decision.delete_pods = [p.name for p in live(decision.seen.pods)]
    elif spec.clean_pod_policy == "Running":
        decision.delete_pods = [p.name for p in live(decision.seen.pods) if p.phase not in FINISHED]
    finished = decision.status.completion_time
    if spec.ttl_seconds_after_finished is not None and finished:
        decision.delete_job = decision.now >= parse_time(finished) + timedelta(
            seconds=spec.ttl_seconds_after_finished)
