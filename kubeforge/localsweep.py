"""`kubeforge run sweep.yaml`: a SweepJob's trials on this machine, one after another, no cluster.

The same engine as the operator's (kubeforge/sweep.py): each trial is asked of the study rebuilt
from the sweep's status, trains in this process with its evaluations fed to the pruner, and its
outcome joins the status, which is written after every change to `<root>/<ns>/sweepjob/<name>/status.json`.
A run that stops (Ctrl-C, a crash) goes on from that file when run again: the finished trials stay,
the interrupted one resumes from its newest checkpoint.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from kubeforge import sweep as engine
from kubeforge.spec import JobError, SweepJob, job_storage_uri, parse_job, trial_manifest
from kubeforge.status import EarlyStopped, Preempted, SweepStatus, TrainerResult, TrialStatus
from kubeforge.storage import StorageError

log = logging.getLogger(__name__)

#: Trains one trial: (job, on_eval) -> its result (kubeforge run passes the trainer with its URIs).
TrainTrial = Callable[..., TrainerResult]


def status_path(sweep: SweepJob, root: str) -> Path:
    return _status_path(root, sweep.namespace, sweep.name)


def _status_path(root: str, namespace: str, name: str) -> Path:
    return Path(job_storage_uri(root, "SweepJob", namespace, name)) / "status.json"


def read_status(root: str, namespace: str, name: str) -> SweepStatus | None:
    """The status of a sweep run under `root` (a FinetuneJob's baseModel.fromSweepJob); None if it never ran."""
    path = _status_path(root, namespace, name)
    return _read(path) if path.exists() else None


def _read(path: Path) -> SweepStatus:
    return SweepStatus.model_validate_json(path.read_text()) if path.exists() else SweepStatus()


def _row(sweep: SweepJob, trial: TrialStatus) -> str:
    values = "  ".join(f"{p.path}={_shown(trial.parameters[p.path])}" for p in sweep.spec.parameters)
    value = f"{trial.value:.4f}" if trial.value is not None else "-"
    return f"  {trial.name:<24} {trial.state:<10} {value:>8} {str(trial.step or '-'):>6}  {values}"


def _shown(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else json.dumps(value)


def _run_trial(sweep: SweepJob, trials: list[TrialStatus], trial: TrialStatus, root: str,
               train_trial: TrainTrial) -> TrialStatus:
    """Train one trial to its end, pruned or failed; its evaluations judged as they come."""
    spec = sweep.spec
    job = parse_job(trial_manifest(spec.template, trial.name, sweep.namespace, trial.parameters))
    judged = trial

    def on_eval(step: int, metrics: dict[str, float]) -> bool:
        nonlocal judged
        judged = engine.with_evaluation(spec, judged, step, metrics)
        pruned, attributes = engine.should_prune(spec, [*trials[:judged.number], judged], judged.number)
        judged = judged.model_copy(update={"optuna": attributes})
        return pruned

    try:
        result = train_trial(job, on_eval=on_eval)
    except EarlyStopped as stopped:
        return judged.model_copy(update={"state": "Pruned", "reason": "Pruned", "message": str(stopped)})
    except (JobError, StorageError, Preempted, RuntimeError, ValueError) as exc:
        # A trial that fails counts against maxFailedTrials; the sweep goes on.
        log.warning("trial %s failed: %s", trial.name, exc)
        return judged.model_copy(update={"state": "Failed", "reason": "TrialFailed", "message": str(exc)[:500]})
    return engine.ended(spec, judged, result.final_eval, result.step, result.export_uri)


def run_sweep(sweep: SweepJob, root: str, train_trial: TrainTrial) -> SweepStatus:
    """Run the sweep's trials until it succeeds or fails; returns its final status (also written)."""
    spec, path = sweep.spec, status_path(sweep, root)
    status = _read(path)
    trials = list(status.trials)
    print(f"==> SweepJob {sweep.namespace}/{sweep.name}: {engine.capacity(spec)} trials, {spec.algorithm}, "
          f"early stopping {spec.early_stopping}; status in {path}", file=sys.stderr)
    print(f"  {'trial':<24} {'state':<10} {spec.objective.metric:>8} {'step':>6}  parameters", file=sys.stderr)
    for trial in trials:
        if trial.finished:
            print(_row(sweep, trial), file=sys.stderr)
    for _ in range(engine.capacity(spec) + 1):  # bounded: each pass finishes a trial, or the sweep ends
        status = engine.summary(spec, trials, status)
        _write(path, status)
        if status.phase in ("Succeeded", "Failed"):
            break
        running = next((t for t in trials if not t.finished), None)
        if running is None:
            running = engine.ask(spec, trials, sweep.trial_name(len(trials)))
            trials.append(running)
            _write(path, engine.summary(spec, trials, status))
        trials[running.number] = _run_trial(sweep, trials, running, root, train_trial)
        print(_row(sweep, trials[running.number]), file=sys.stderr)
    return status


def _write(path: Path, status: SweepStatus) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(status.to_json(), indent=2))
    partial.replace(path)  # never a half-written status to resume from
