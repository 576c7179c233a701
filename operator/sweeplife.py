"""A SweepJob's reconciliation, as one pure function: its status and its trials' jobs -> what to do.

The status is the study: every trial the sampler asked for, recorded there before its job is created,
with each evaluation seen and its end. A restarted operator reads it back and decides the same
(kubeforge/sweep.py): a recorded trial whose job is missing is created again, under the same name
and parameters, and no trial is asked twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kubeforge import sweep as engine
from kubeforge.operator.lifecycle import Event, set_condition
from kubeforge.spec import SWEEP_KIND, SweepJob, trial_manifest
from kubeforge.status import FAILED, SUCCEEDED, JobStatus, SweepStatus, TrialStatus

#: The label on each trial's job naming its sweep.
LABEL_SWEEP = "kubeforge.io/sweep"
FINAL = (SUCCEEDED, FAILED)


@dataclass
class SweepPlan:
    status: SweepStatus
    create: list[dict[str, Any]] = field(default_factory=list)  # trials' jobs, after status is written
    delete: list[str] = field(default_factory=list)  # trials' jobs to stop (pruned, or the sweep failed)
    events: list[Event] = field(default_factory=list)
    #: (outcome, trial) for the metrics: started, succeeded, pruned, failed.
    outcomes: list[tuple[str, str]] = field(default_factory=list)


def trial_job(sweep: SweepJob, trial: TrialStatus) -> dict[str, Any]:
    """A trial's job: the template with its parameters, owned by the sweep (deleted with it)."""
    manifest = trial_manifest(sweep.spec.template, trial.name, sweep.namespace, trial.parameters)
    manifest["metadata"]["labels"] = {LABEL_SWEEP: sweep.name, "kubeforge.io/trial": str(trial.number)}
    if sweep.metadata.uid:
        manifest["metadata"]["ownerReferences"] = [{
            "apiVersion": SWEEP_KIND.api_version, "kind": SWEEP_KIND.kind, "name": sweep.name,
            "uid": sweep.metadata.uid, "controller": True, "blockOwnerDeletion": True}]
    return manifest


def _observe(sweep: SweepJob, trials: list[TrialStatus], trial: TrialStatus, job: dict[str, Any] | None,
             plan: SweepPlan) -> TrialStatus:
    """A running trial after what its job says: evaluated, pruned, or ended."""
    spec = sweep.spec
    if job is None:
        plan.create.append(trial_job(sweep, trial))  # recorded, its job not created yet (or deleted)
        return trial
    reported = JobStatus.read(job.get("status"))
    seen = engine.with_evaluation(spec, trial, reported.eval_step, reported.eval_metrics)
    if reported.phase == SUCCEEDED:
        done = engine.ended(spec, seen, reported.eval_metrics or {}, reported.step, reported.export_uri)
        outcome = "succeeded" if done.state == "Succeeded" else "failed"
        plan.events.append(Event("Normal" if outcome == "succeeded" else "Warning",
                                 "TrialSucceeded" if outcome == "succeeded" else "TrialFailed",
                                 f"{trial.name}: {done.message}"))
        plan.outcomes.append((outcome, trial.name))
        return done
    if reported.phase == FAILED:
        plan.events.append(Event("Warning", "TrialFailed", f"{trial.name}: {reported.reason}: {reported.message}"))
        plan.outcomes.append(("failed", trial.name))
        return seen.model_copy(update={"state": "Failed", "reason": reported.reason or "Failed",
                                       "message": reported.message})
    if seen.intermediate == trial.intermediate:
        return seen
    pruned, attributes = engine.should_prune(spec, [*trials[:trial.number], seen], trial.number)
    seen = seen.model_copy(update={"optuna": attributes})
    if not pruned:
        return seen
    last = seen.intermediate[-1]
    message = (f"{spec.objective.metric} {last.value:.4f} at step {last.step}: "
               f"stopped by the {spec.early_stopping} pruner")
    plan.delete.append(trial.name)
    plan.events.append(Event("Normal", "TrialPruned", f"{trial.name}: {message}"))
    plan.outcomes.append(("pruned", trial.name))
    return seen.model_copy(update={"state": "Pruned", "reason": "Pruned", "message": message})


def _ask(sweep: SweepJob, trials: list[TrialStatus], plan: SweepPlan) -> None:
    for _ in range(sweep.spec.parallelism):  # at most a slot each
        if not engine.can_ask(sweep.spec, trials):
            return
        trial = engine.ask(sweep.spec, trials, sweep.trial_name(len(trials)))
        trials.append(trial)
        plan.create.append(trial_job(sweep, trial))
        plan.events.append(Event("Normal", "TrialStarted", f"{trial.name}: " + ", ".join(
            f"{k}={v}" for k, v in trial.parameters.items())))
        plan.outcomes.append(("started", trial.name))


def _stop_running(trials: list[TrialStatus], plan: SweepPlan) -> None:
    """A failed sweep runs nothing more: its running trials stop (their jobs deleted)."""
    for index, trial in enumerate(trials):
        if not trial.finished:
            trials[index] = trial.model_copy(update={"state": "Failed", "reason": "SweepFailed",
                                                     "message": "the sweep failed before the trial ended"})
            plan.delete.append(trial.name)


def _still_running(trials: list[TrialStatus], jobs: dict[str, dict[str, Any] | None], deleting: list[str]
                   ) -> list[str]:
    """The jobs of stopped trials that still exist: a deletion that failed is made again."""
    return [t.name for t in trials if (t.state == "Pruned" or t.reason == "SweepFailed")
            and jobs.get(t.name) is not None and t.name not in deleting]


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def plan_sweep(sweep: SweepJob, status: dict[str, Any], jobs: dict[str, dict[str, Any] | None], now: datetime,
               generation: int | None = None) -> SweepPlan:
    """What the sweep does now: `jobs` are its trials' jobs that exist, by name."""
    before = SweepStatus.read(status)
    plan = SweepPlan(status=before)
    if before.phase in FINAL:
        plan.delete = _still_running(before.trials, jobs, [])
        return plan
    trials = list(before.trials)
    for index, trial in enumerate(trials):
        if not trial.finished:
            trials[index] = _observe(sweep, trials, trial, jobs.get(trial.name), plan)
    current = engine.summary(sweep.spec, trials, before)
    if current.phase not in FINAL:
        _ask(sweep, trials, plan)
        current = engine.summary(sweep.spec, trials, current)
    elif current.phase == FAILED:
        _stop_running(trials, plan)
        current = engine.summary(sweep.spec, trials, current)
    plan.delete += _still_running(trials, jobs, plan.delete)
    plan.status = _conditions(current, before, now, generation)
    if current.phase in FINAL:
        kind = "Normal" if current.phase == SUCCEEDED else "Warning"
        plan.events.append(Event(kind, f"Sweep{current.phase}", current.message or ""))
    return plan


def _conditions(current: SweepStatus, before: SweepStatus, now: datetime, generation: int | None) -> SweepStatus:
    conditions = list(current.conditions)
    for kind in ("Running", SUCCEEDED, FAILED):
        conditions = set_condition(conditions, kind, current.phase == kind, current.reason or kind,
                                   current.message or "", now, generation)
    return current.model_copy(update={
        "conditions": conditions, "observed_generation": generation,
        "start_time": before.start_time or (_iso(now) if current.trials else None),
        "completion_time": _iso(now) if current.phase in FINAL else None})
