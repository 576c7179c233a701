"""The SweepJob's reconciliation, pure: trials recorded in status before their jobs exist, evaluations
judged by the pruner, ends counted, the best trial promoted; a restart at any point decides the same."""

from __future__ import annotations

import copy
import math
from datetime import UTC, datetime
from typing import Any, cast

from prometheus_client import generate_latest
from support.jobs import example

from kubeforge.operator.metrics import OperatorMetrics
from kubeforge.operator.sweeplife import LABEL_SWEEP, plan_sweep
from kubeforge.operator.sweeps import SweepReconciler
from kubeforge.spec import FinetuneJob, SweepJob, parse_job, parse_sweep

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
EXAMPLE = example("sweep-lora-classify.yaml")[1]


def sweep(**changes: Any) -> SweepJob:
    document = copy.deepcopy(EXAMPLE)
    document["metadata"]["uid"] = "0f4e-sweep"
    document["spec"].update(changes)
    return parse_sweep(document)


class Trials:
    """The trials' jobs as the API server would hold them, each advanced one evaluation per tick:
    eval loss falls faster the nearer its learning rate is to 1e-2."""

    def __init__(self) -> None:
        self.jobs: dict[str, dict[str, Any]] = {}
        self.created: list[str] = []

    def apply(self, create: list[dict[str, Any]], delete: list[str]) -> None:
        for manifest in create:
            if manifest["metadata"]["name"] not in self.jobs:
                self.jobs[manifest["metadata"]["name"]] = {**manifest, "status": {}}
                self.created.append(manifest["metadata"]["name"])
        for name in delete:
            self.jobs.pop(name, None)

    def tick(self, failing: tuple[str, ...] = ()) -> None:
        for name, body in self.jobs.items():
            job = parse_job(body)
            assert isinstance(job, FinetuneJob)
            status, total = body["status"], job.spec.training.max_steps or 0
            if status.get("phase") in ("Succeeded", "Failed"):
                continue
            if name in failing:
                body["status"] = {"phase": "Failed", "reason": "BackoffLimitExceeded", "message": "3 restarts"}
                continue
            step = status.get("step", 0) + job.spec.training.eval_interval
            rate = 1.0 / (1.0 + abs(math.log10(job.spec.training.learning_rate) + 2))
            loss = round(0.7 - 0.2 * rate * step / total, 4)
            body["status"] = {"phase": "Running", "step": step, "evalStep": step, "evalMetrics": {"loss": loss}}
            if step >= total:
                body["status"] |= {"phase": "Succeeded", "exportUri": f"s3://models/{name}/export"}


def drive(search: SweepJob, trials: Trials, status: dict[str, Any], ticks: int, lose_creates_at: int = -1,
          failing: tuple[str, ...] = ()) -> dict[str, Any]:
    """Reconcile and advance the trials `ticks` times; at tick `lose_creates_at` the operator dies
    after writing status and before creating the jobs it decided on."""
    for tick in range(ticks):
        plan = plan_sweep(search, status, dict(trials.jobs), NOW, 1)
        status = plan.status.to_json()
        trials.apply([] if tick == lose_creates_at else plan.create, plan.delete)
        if status["phase"] in ("Succeeded", "Failed"):
            break
        trials.tick(failing)
    return status


def test_the_first_reconciliation_records_the_trials_then_creates_their_jobs_owned_by_the_sweep() -> None:
    search = sweep(parallelism=2)
    plan = plan_sweep(search, {}, {}, NOW, 1)
    assert [t.name for t in plan.status.trials] == ["review-sweep-t0", "review-sweep-t1"]
    assert all(t.state == "Running" for t in plan.status.trials)
    assert plan.status.phase == "Running" and plan.status.trials_progress == "0/6"
    job = plan.create[0]
    assert job["kind"] == "FinetuneJob" and job["metadata"]["namespace"] == "default"
    assert job["metadata"]["labels"][LABEL_SWEEP] == "review-sweep"
    assert job["metadata"]["ownerReferences"][0] | {} == {
        "apiVersion": "kubeforge.io/v1alpha1", "kind": "SweepJob", "name": "review-sweep", "uid": "0f4e-sweep",
        "controller": True, "blockOwnerDeletion": True}
    assert job["spec"]["training"]["learningRate"] == plan.status.trials[0].parameters["training.learningRate"]
    assert [e.reason for e in plan.events] == ["TrialStarted", "TrialStarted"]


def test_a_recorded_trial_whose_job_is_missing_is_created_again_and_no_other_is_asked() -> None:
    search = sweep(parallelism=2)
    status = plan_sweep(search, {}, {}, NOW, 1).status.to_json()
    again = plan_sweep(search, status, {}, NOW, 1)
    assert [j["metadata"]["name"] for j in again.create] == ["review-sweep-t0", "review-sweep-t1"]
    assert len(again.status.trials) == 2 and again.events == []


def test_a_sweep_runs_to_its_best_trial_pruning_the_slow_ones() -> None:
    trials = Trials()
    status = drive(sweep(), trials, {}, 40)
    assert status["phase"] == "Succeeded" and status["trialsDone"] == 6 and status["trialsProgress"] == "6/6"
    assert status["prunedTrials"] >= 1
    pruned = next(t for t in status["trials"] if t["state"] == "Pruned")
    assert pruned["reason"] == "Pruned" and pruned["name"] not in trials.jobs  # its job deleted
    succeeded = [t for t in status["trials"] if t["state"] == "Succeeded"]
    best = min(succeeded, key=lambda t: t["value"])
    assert status["bestTrial"] == {"name": best["name"], "number": best["number"], "parameters": best["parameters"],
                                   "value": best["value"], "exportUri": f"s3://models/{best['name']}/export"}
    assert status["bestValue"] == best["value"]
    assert {c["type"]: c["status"] for c in status["conditions"]} == {"Running": "False", "Succeeded": "True",
                                                                       "Failed": "False"}
    assert status["completionTime"] and status["startTime"]


def test_an_operator_killed_between_status_and_create_gives_the_same_sweep() -> None:
    undisturbed = drive(sweep(parallelism=2), Trials(), {}, 40)
    for moment in (0, 3, 7):
        trials = Trials()
        disturbed = drive(sweep(parallelism=2), trials, {}, 40, lose_creates_at=moment)
        assert len(trials.created) == len(set(trials.created)) == 6  # none created twice, none lost
        assert [t["parameters"] for t in disturbed["trials"]] == [t["parameters"] for t in undisturbed["trials"]]
        assert disturbed["bestTrial"] == undisturbed["bestTrial"]


def test_failed_trials_count_and_more_than_max_failed_trials_fail_the_sweep() -> None:
    status = drive(sweep(maxFailedTrials=1), Trials(), {}, 40, failing=("review-sweep-t1",))
    assert status["phase"] == "Succeeded" and status["failedTrials"] == 1
    assert status["trials"][1]["reason"] == "BackoffLimitExceeded"
    trials = Trials()
    status = drive(sweep(maxFailedTrials=0, parallelism=2), trials, {}, 40, failing=("review-sweep-t0",))
    assert status["phase"] == "Failed" and status["reason"] == "TooManyFailedTrials"
    assert status["trials"][1]["reason"] == "SweepFailed" and "review-sweep-t1" not in trials.jobs


def test_a_trial_that_never_reports_the_objective_fails() -> None:
    search = sweep()
    status = plan_sweep(search, {}, {}, NOW, 1).status.to_json()
    job = {"status": {"phase": "Succeeded", "step": 150, "evalMetrics": {"accuracy": 0.7}}}
    plan = plan_sweep(search, status, {"review-sweep-t0": job}, NOW, 1)
    assert plan.status.trials[0].state == "Failed" and plan.status.trials[0].reason == "NoObjective"
    assert [e.reason for e in plan.events] == ["TrialFailed", "TrialStarted"]


def test_a_deleted_sweep_leaves_no_series_behind() -> None:
    metrics = OperatorMetrics()
    sweeps = SweepReconciler(cast(Any, None), metrics)  # forgetting makes no API call
    metrics.record_phase("SweepJob", "default", "review-sweep", "Running")
    metrics.sweep_best_value.labels("default", "review-sweep").set(0.69)
    sweeps.forget({"kind": "SweepJob", "metadata": {"namespace": "default", "name": "review-sweep"}})
    exported = generate_latest(metrics.registry).decode()
    assert 'job_name="review-sweep"' not in exported
    assert 'kubeforge_operator_jobs{kind="SweepJob",phase="Running"} 0.0' in exported


class SweepServer:
    """The API server as the sweep reconciler calls it: the sweep as it is now, its trials' jobs, and
    what the reconciler created, deleted and wrote."""

    def __init__(self, sweep_body: dict[str, Any], jobs: dict[str, dict[str, Any]]):
        self.sweep_body, self.jobs = sweep_body, jobs
        self.created: list[str] = []
        self.deleted: list[str] = []
        self.written: list[dict[str, Any]] = []

    def job_body(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        assert kind == "SweepJob"
        return copy.deepcopy(self.sweep_body)

    def labelled_jobs(self, kind: str, namespace: str, selector: str) -> dict[str, dict[str, Any]]:
        return copy.deepcopy(self.jobs)

    def patch_status(self, kind: str, namespace: str, name: str, changed: dict[str, Any]) -> None:
        self.written.append(changed)

    def create_job(self, manifest: dict[str, Any]) -> bool:
        self.created.append(manifest["metadata"]["name"])
        return True

    def delete_named_job(self, kind: str, namespace: str, name: str) -> None:
        self.deleted.append(name)


def test_a_tick_on_a_stale_sweep_does_not_create_a_pruned_trials_job_again() -> None:
    """Kopf hands the timer the sweep as its watch last showed it: one event behind (the operator's own
    status write not seen yet), a pruned trial still reads Running, its job already deleted."""
    document = copy.deepcopy(EXAMPLE) | {"metadata": {**EXAMPLE["metadata"], "uid": "0f4e-sweep",
                                                      "namespace": "default", "resourceVersion": "7"}}
    document["spec"]["parallelism"] = 2
    search = parse_sweep(document)
    running = plan_sweep(search, {}, {}, NOW, 1).status.to_json()  # t0 and t1 Running
    pruned = copy.deepcopy(running)
    pruned["trials"][1] |= {"state": "Pruned", "reason": "Pruned", "message": "stopped by the median pruner"}
    job = {"metadata": {"name": "review-sweep-t0"}, "status": {"phase": "Running", "step": 0}}
    server = SweepServer({**document, "metadata": {**document["metadata"], "resourceVersion": "8"},
                          "status": pruned}, {"review-sweep-t0": job})
    SweepReconciler(cast(Any, server), OperatorMetrics()).reconcile({**document, "status": running})
    assert server.created == [] and server.deleted == []
    assert all(w.get("trials", pruned["trials"])[1]["state"] == "Pruned" for w in server.written)
