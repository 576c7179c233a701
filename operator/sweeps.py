"""The SweepJob reconciler: read the sweep and its trials' jobs, ask sweeplife.plan_sweep, act.

The order makes a restart at any point safe: the status (new trials, prunings) is written first,
then trials' jobs are created (409: already there) and pruned ones deleted (404: already gone).
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from typing import Any, cast

import kopf

from kubeforge.operator.cluster import Cluster
from kubeforge.operator.metrics import OperatorMetrics
from kubeforge.operator.sweeplife import LABEL_SWEEP, SweepPlan, plan_sweep
from kubeforge.spec import SpecError, SweepJob, parse_sweep
from kubeforge.status import FAILED, SweepStatus


class SweepReconciler:
    def __init__(self, cluster: Cluster, metrics: OperatorMetrics):
        self.cluster = cluster
        self.metrics = metrics

    def reconcile(self, body: dict[str, Any], fresh: bool = False) -> dict[str, Any]:
        """Reconcile one SweepJob; returns the status fields it wrote.

        Kopf's body is the sweep as the watch last showed it, which may be a write behind (this
        operator's own status write not seen yet: a pruned trial still Running, its job gone). A tick
        that would write, create or delete anything decides again on the sweep the API server has now."""
        status = dict(body.get("status") or {})
        try:
            sweep = parse_sweep(body)
        except SpecError as exc:
            return self._invalid(body, status, exc)
        plan, changed = self._plan(sweep, body)
        if not fresh and (changed or plan.create or plan.delete or plan.events):
            current = self.cluster.job_body("SweepJob", sweep.namespace, sweep.name)
            if current is None:
                return {}  # deleted meanwhile: its trials go with it
            if current["metadata"].get("resourceVersion") != body["metadata"].get("resourceVersion"):
                return self.reconcile(current, fresh=True)
        if changed:
            self.cluster.patch_status(sweep.kind, sweep.namespace, sweep.name, changed)
        for manifest in plan.create:
            self.cluster.create_job(manifest)
        for name in plan.delete:
            self.cluster.delete_named_job(sweep.spec.template.kind, sweep.namespace, name)
        for event in plan.events:
            kopf.event(cast(kopf.Body, body), type=event.type, reason=event.reason, message=event.message)
        self._count(sweep, plan.outcomes, plan.status)
        return changed

    def _plan(self, sweep: SweepJob, body: dict[str, Any]) -> tuple[SweepPlan, dict[str, Any]]:
        """What to do on this body and the trials' jobs as they are now, and the status fields it changes."""
        status = dict(body.get("status") or {})
        kind = sweep.spec.template.kind
        jobs = self.cluster.labelled_jobs(kind, sweep.namespace, f"{LABEL_SWEEP}={sweep.name}")
        plan = plan_sweep(sweep, status, dict(jobs), datetime.now(UTC), body["metadata"].get("generation"))
        written = plan.status.to_json()
        return plan, {k: v for k, v in written.items() if status.get(k) != v}

    def _count(self, sweep: SweepJob, outcomes: list[tuple[str, str]], status: SweepStatus) -> None:
        for outcome, _ in outcomes:
            self.metrics.sweep_trials.labels(outcome).inc()
        if status.best_value is not None:
            self.metrics.sweep_best_value.labels(sweep.namespace, sweep.name).set(status.best_value)
        self.metrics.record_phase(sweep.kind, sweep.namespace, sweep.name, status.phase or "Pending")

    def forget(self, body: dict[str, Any]) -> None:
        """A deleted sweep leaves no series behind (its trials go with it: they are its children)."""
        metadata = body["metadata"]
        self.metrics.forget(body["kind"], metadata["namespace"], metadata["name"])
        with contextlib.suppress(KeyError):
            self.metrics.sweep_best_value.remove(metadata["namespace"], metadata["name"])

    def _invalid(self, body: dict[str, Any], status: dict[str, Any], exc: SpecError) -> dict[str, Any]:
        """A sweep the API server took but the models refuse (a template value, a parameter's path)."""
        message = "; ".join(exc.problems)
        metadata = body["metadata"]
        if status.get("phase") == FAILED and status.get("message") == message:
            return {}
        changed = {"phase": FAILED, "reason": "InvalidSpec", "message": message,
                   "observedGeneration": metadata.get("generation")}
        self.cluster.patch_status(body["kind"], metadata["namespace"], metadata["name"], changed)
        kopf.event(cast(kopf.Body, body), type="Warning", reason="InvalidSpec", message=message)
        self.metrics.record_phase(body["kind"], metadata["namespace"], metadata["name"], FAILED)
        return changed
