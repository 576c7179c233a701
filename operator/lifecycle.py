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

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from kubeforge.operator.builders import (
    ANNOTATION_POD_SHAPE,
    LABEL_ATTEMPT,
    LABEL_RANK,
    LaunchPlan,
    pod_shape,
)
from kubeforge.operator.tenancy import UriPolicy, uri_violations
from kubeforge.spec import FinetuneJob, Job

PENDING, RUNNING, RESTARTING, SUCCEEDED, FAILED, SUSPENDED = (
    "Pending", "Running", "Restarting", "Succeeded", "Failed", "Suspended")
FINISHED = (SUCCEEDED, FAILED)
EXIT_PERMANENT = 2  # kubeforge.cli.EXIT_PERMANENT; not imported: the CLI pulls more than the operator needs


@dataclass(frozen=True)
class Progress:
    """What the rank-0 trainer's metrics endpoint said."""

    step: int
    total_steps: int
    loss: float | None = None
    eval_metrics: dict[str, float] = field(default_factory=dict)
    last_checkpoint_step: int | None = None


@dataclass(frozen=True)
class Observed:
    job: Job
    status: dict[str, Any]
    pods: list[dict[str, Any]]
    gpu_nodes: bool
    checkpoint_uri: str
    #: The PretrainJob named by baseModel.fromPretrainJob: its body, or None when it does not exist.
    base_job: dict[str, Any] | None = None
    progress: Progress | None = None
    generation: int | None = None
    #: The cluster's policy (KUBEFORGE_ALLOW_CPU_FALLBACK): False makes every job wait for GPUs.
    cpu_fallback_allowed: bool = True
    #: Which storage URIs the job's namespace may use (OperatorSettings.uri_policy); None: any.
    uri_policy: UriPolicy | None = None


@dataclass
class Plan:
    status: dict[str, Any]
    launch: LaunchPlan | None = None  # create the Service and any missing pod of this attempt
    delete_pods: list[str] = field(default_factory=list)
    delete_job: bool = False
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def set_condition(conditions: list[dict[str, Any]], kind: str, status: bool, reason: str, message: str,
                  now: datetime, generation: int | None) -> list[dict[str, Any]]:
    """Conditions as the API conventions have them: lastTransitionTime moves only when status does."""
    value = "True" if status else "False"
    previous = next((c for c in conditions if c["type"] == kind), None)
    changed_at = previous["lastTransitionTime"] if previous and previous["status"] == value else _iso(now)
    condition = {"type": kind, "status": value, "reason": reason, "message": message,
                 "lastTransitionTime": changed_at}
    if generation is not None:
        condition["observedGeneration"] = generation
    return [c for c in conditions if c["type"] != kind] + [condition]


def _termination(pod: dict[str, Any]) -> dict[str, Any] | None:
    for status in pod.get("status", {}).get("containerStatuses", []):
        if status.get("name") == "trainer" and "terminated" in status.get("state", {}):
            return status["state"]["terminated"]
    return None


def _summary(pod: dict[str, Any]) -> dict[str, Any]:
    """The JSON the trainer left in its termination message, if it parses."""
    message = (_termination(pod) or {}).get("message") or ""
    try:
        parsed = json.loads(message)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _failure(pod: dict[str, Any]) -> tuple[int | None, str]:
    terminated = _termination(pod) or {}
    code = terminated.get("exitCode")
    summary = _summary(pod)
    detail = summary.get("error") or (terminated.get("message") or "").strip()[-300:] or terminated.get("reason")
    return code, str(detail or pod.get("status", {}).get("reason") or "no reason given")


class _Decision:
    """Accumulates one reconciliation's outcome."""

    def __init__(self, seen: Observed, now: datetime):
        self.seen = seen
        self.now = now
        self.status = dict(seen.status)
        self.status["conditions"] = list(seen.status.get("conditions", []))
        self.plan = Plan(status=self.status)

    def condition(self, kind: str, status: bool, reason: str, message: str) -> None:
        self.status["conditions"] = set_condition(self.status["conditions"], kind, status, reason, message,
                                                  self.now, self.seen.generation)

    def phase(self, phase: str, reason: str, message: str) -> Plan:
        previous = self.seen.status.get("phase")
        self.status["phase"], self.status["reason"], self.status["message"] = phase, reason, message
        for kind in (RUNNING, SUCCEEDED, FAILED, SUSPENDED, RESTARTING):
            if kind == phase or any(c["type"] == kind for c in self.status["conditions"]):
                self.condition(kind, kind == phase, reason, message if kind == phase else "")
        if phase != previous:
            warning = phase in (FAILED, RESTARTING) or (phase == PENDING and reason.startswith("Waiting"))
            self.plan.events.append(("Warning" if warning else "Normal", reason, message))
        if phase in FINISHED and not self.status.get("completionTime"):
            self.status["completionTime"] = _iso(self.now)
        return self.plan


def reconcile(seen: Observed, now: datetime) -> Plan:
    decision = _Decision(seen, now)
    job, status = seen.job, decision.status
    spec = job.spec
    attempt = int(status.get("restarts", 0))
    status.setdefault("restarts", attempt)
    status["checkpointUri"] = seen.checkpoint_uri
    if seen.generation is not None:
        status["observedGeneration"] = seen.generation

    if status.get("phase") in FINISHED:
        return _after_finish(decision)

    live = [p for p in seen.pods if not p["metadata"].get("deletionTimestamp")]
    refused = uri_violations(job, seen.uri_policy) if seen.uri_policy else []
    if refused:
        decision.plan.delete_pods = [p["metadata"]["name"] for p in live]
        return decision.phase(FAILED, "URINotAllowed", "; ".join(refused))
    if spec.suspend:
        decision.plan.delete_pods = [p["metadata"]["name"] for p in live]
        decision.condition(SUSPENDED, True, "Suspended", "spec.suspend is true: pods deleted, checkpoints kept")
        return decision.phase(SUSPENDED, "Suspended", "spec.suspend is true: pods deleted, checkpoints kept")

    base_uri = _base_model(decision)
    if isinstance(job, FinetuneJob) and base_uri is None:
        return decision.plan

    if spec.active_deadline_seconds and status.get("startTime"):
        elapsed = now - parse_time(status["startTime"])
        if elapsed >= timedelta(seconds=spec.active_deadline_seconds):
            decision.plan.delete_pods = [p["metadata"]["name"] for p in live]
            return decision.phase(FAILED, "DeadlineExceeded",
                                  f"ran longer than activeDeadlineSeconds ({spec.active_deadline_seconds}s)")

    current = [p for p in live if p["metadata"]["labels"].get(LABEL_ATTEMPT) == str(attempt)]
    decision.plan.delete_pods = [p["metadata"]["name"] for p in live if p not in current]
    if not current:
        return _launch(decision, attempt, base_uri)

    _report_progress(decision)
    if any(p["metadata"].get("annotations", {}).get(ANNOTATION_POD_SHAPE) != pod_shape(job) for p in current):
        decision.condition("SpecChangePending", True, "PodsOutdated",
                           "resources, metrics or s3 changed while running: applied at the next restart "
                           "(suspend and resume to apply now)")
    phases = {int(p["metadata"]["labels"][LABEL_RANK]): p.get("status", {}).get("phase", PENDING) for p in current}
    workers = spec.resources.workers
    failed = [p for p in current if p.get("status", {}).get("phase") == FAILED]
    vanished = [r for r in range(workers) if r not in phases]
    if failed or (vanished and decision.seen.status.get("phase") in (RUNNING, RESTARTING)):
        return _gang_failure(decision, current, failed, vanished, attempt)
    if vanished:
        return _launch(decision, attempt, base_uri)  # pods still being created (or lost before starting)
    if all(phase == SUCCEEDED for phase in phases.values()):
        return _succeed(decision, current)
    if all(phase in (RUNNING, SUCCEEDED) for phase in phases.values()):
        status.setdefault("startTime", _iso(now))
        return decision.phase(RUNNING, "Training", f"{workers} worker(s) training")
    return decision.phase(RESTARTING if attempt else PENDING, "PodsStarting",
                          f"{sum(p == RUNNING for p in phases.values())}/{workers} workers running")


def _base_model(decision: _Decision) -> str | None:
    """The base model URI of a FinetuneJob, or None (and a WaitingForBaseModel condition) while unknown."""
    job = decision.seen.job
    if not isinstance(job, FinetuneJob):
        return None
    wanted = job.spec.base_model
    if wanted.uri:
        decision.status["baseModelUri"] = wanted.uri
        return wanted.uri
    name = wanted.from_pretrain_job
    base = decision.seen.base_job
    base_status = (base or {}).get("status") or {}
    if base is None:
        reason, message = "BaseModelMissing", f"PretrainJob {name} does not exist in namespace {job.namespace}"
    elif base_status.get("phase") == FAILED:
        reason, message = "BaseModelFailed", f"PretrainJob {name} failed: {base_status.get('message', '')}"
    elif base_status.get("phase") != SUCCEEDED or not base_status.get("exportUri"):
        progress = base_status.get("stepProgress")
        reason = "BaseModelNotReady"
        message = f"waiting for PretrainJob {name} to succeed (now {base_status.get('phase', PENDING)}" + (
            f", step {progress})" if progress else ")")
    else:
        decision.condition("WaitingForBaseModel", False, "BaseModelReady",
                           f"starting from PretrainJob {name}: {base_status['exportUri']}")
        decision.status["baseModelUri"] = base_status["exportUri"]
        return str(base_status["exportUri"])
    decision.condition("WaitingForBaseModel", True, reason, message)
    decision.phase(PENDING, "WaitingForBaseModel", message)
    return None


def _launch(decision: _Decision, attempt: int, base_uri: str | None) -> Plan:
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
            return decision.phase(PENDING, "WaitingForGPU", message)
        cpu_fallback = True
        decision.condition("CPUFallback", True, "NoGPUNodes",
                           "no node has allocatable nvidia.com/gpu: training on CPU (gloo) as allowed")
    elif resources.gpus_per_worker:
        decision.condition("CPUFallback", False, "GPUsAvailable", "training on GPUs")
    if any(c["type"] == "WaitingForGPU" for c in decision.status["conditions"]):
        decision.condition("WaitingForGPU", False, "Scheduled", "pods created")
    decision.status["device"] = "cpu" if cpu_fallback or not resources.gpus_per_worker else "gpu"
    decision.plan.launch = LaunchPlan(decision.seen.checkpoint_uri, base_uri, cpu_fallback)
    if attempt:
        return decision.phase(RESTARTING, "PodsCreated",
                              f"restart {attempt}: {resources.workers} worker(s) resume from the last checkpoint")
    return decision.phase(PENDING, "PodsCreated", f"{resources.workers} worker(s) created")


def _gang_failure(decision: _Decision, current: list[dict[str, Any]], failed: list[dict[str, Any]],
                  vanished: list[int], attempt: int) -> Plan:
    job = decision.seen.job
    decision.plan.delete_pods += [p["metadata"]["name"] for p in current]
    causes = []
    for pod in failed:
        code, detail = _failure(pod)
        rank = pod["metadata"]["labels"][LABEL_RANK]
        if code == EXIT_PERMANENT:
            return decision.phase(FAILED, "PermanentError", f"worker {rank} cannot succeed as written: {detail}")
        causes.append(f"worker {rank} exited with code {code}: {detail}")
    causes += [f"worker {rank} disappeared (its node may be gone)" for rank in vanished]
    cause = "; ".join(causes)
    if attempt >= job.spec.backoff_limit:
        return decision.phase(FAILED, "BackoffLimitExceeded",
                              f"{attempt} restart(s), backoffLimit {job.spec.backoff_limit}: {cause}")
    decision.status["restarts"] = attempt + 1
    return decision.phase(RESTARTING, "GangRestart",
                          f"{cause}; replacing all {job.spec.resources.workers} worker(s) "
                          f"(restart {attempt + 1} of at most {job.spec.backoff_limit})")


def _report_progress(decision: _Decision) -> None:
    progress = decision.seen.progress
    if progress is None:
        return
    status = decision.status
    status["step"], status["totalSteps"] = progress.step, progress.total_steps
    status["stepProgress"] = f"{progress.step}/{progress.total_steps}"
    if progress.loss is not None:
        status["loss"] = round(progress.loss, 4)
    if progress.eval_metrics:
        status["evalMetrics"] = {k: round(v, 4) for k, v in progress.eval_metrics.items()}
    if progress.last_checkpoint_step:
        status["lastCheckpointStep"] = progress.last_checkpoint_step


def _succeed(decision: _Decision, current: list[dict[str, Any]]) -> Plan:
    status = decision.status
    rank0 = next((p for p in current if p["metadata"]["labels"][LABEL_RANK] == "0"), current[0])
    summary = _summary(rank0)
    if summary:
        status["step"], status["totalSteps"] = summary["step"], summary["totalSteps"]
        status["stepProgress"] = f"{summary['step']}/{summary['totalSteps']}"
        status["lastCheckpointStep"] = summary["step"]
        status["exportUri"] = summary["exportUri"]
        status["evalMetrics"] = {k: round(v, 4) for k, v in summary.get("finalEval", {}).items()}
        if summary.get("trainLoss") is not None:
            status["loss"] = round(summary["trainLoss"], 4)
    return decision.phase(SUCCEEDED, "Completed", f"trained to step {status.get('step', '?')}; model at "
                          f"{status.get('exportUri', 'an unknown location')}")


def _after_finish(decision: _Decision) -> Plan:
    spec = decision.seen.job.spec
    live = [p for p in decision.seen.pods if not p["metadata"].get("deletionTimestamp")]
    if spec.clean_pod_policy == "All":
        decision.plan.delete_pods = [p["metadata"]["name"] for p in live]
    elif spec.clean_pod_policy == "Running":
        decision.plan.delete_pods = [p["metadata"]["name"] for p in live
                                     if p.get("status", {}).get("phase") not in FINISHED]
    finished = decision.status.get("completionTime")
    if spec.ttl_seconds_after_finished is not None and finished:
        decision.plan.delete_job = decision.now >= parse_time(finished) + timedelta(
            seconds=spec.ttl_seconds_after_finished)
    return decision.plan
