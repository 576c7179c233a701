"""The reconciler: observe a job, ask the pure lifecycle what to do, do it idempotently, write status.

Every reconciliation may run twice or concurrently with another: what it does is decided again from
what is observed, and `Cluster` tolerates the replays.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any, cast

import kopf

from kubeforge.operator import builders
from kubeforge.operator.cluster import CachedView, Cluster
from kubeforge.operator.lifecycle import Observed, Plan, parse_time, reconcile
from kubeforge.operator.metrics import OperatorMetrics
from kubeforge.operator.progress import scrape
from kubeforge.operator.settings import OperatorSettings
from kubeforge.spec import Job, SpecError, checkpoint_uri, parse_job
from kubeforge.status import FAILED, PENDING, RESTARTING, SUCCEEDED, JobStatus


def _rank0_ip(pods: list[dict[str, Any]], attempt: int) -> str | None:
    for pod in pods:
        labels = pod["metadata"].get("labels", {})
        if labels.get(builders.LABEL_RANK) == "0" and labels.get(builders.LABEL_ATTEMPT) == str(attempt) \
                and pod.get("status", {}).get("phase") == "Running":
            return pod["status"].get("podIP")
    return None


def _age(body: dict[str, Any]) -> float | None:
    created = body["metadata"].get("creationTimestamp")
    if not created:
        return None
    return (datetime.now(UTC) - parse_time(created)).total_seconds()


class Operator:
    """Reconciles one job at a time: observe -> lifecycle.reconcile -> act -> patch what changed in status."""

    def __init__(self, settings: OperatorSettings, cluster: Cluster, metrics: OperatorMetrics):
        self.settings = settings
        self.cluster = cluster
        self.metrics = metrics

    def reconcile(self, body: dict[str, Any], patch: kopf.Patch, cached: CachedView | None = None) -> None:
        kind = body["kind"]
        started = time.perf_counter()
        try:
            self._reconcile(body, patch, cached)
        except Exception:
            self.metrics.reconcile_errors.labels(kind).inc()
            raise
        finally:
            self.metrics.reconcile_seconds.labels(kind).observe(time.perf_counter() - started)

    def _reconcile(self, body: dict[str, Any], patch: kopf.Patch, cached: CachedView | None) -> None:
        status = dict(body.get("status") or {})
        before = JobStatus.read(status)
        try:
            job = parse_job(body)
        except SpecError as exc:
            # The API server accepted it (an older CRD, or a check only the model makes): refuse here.
            self._invalid(body, patch, before, exc)
            return
        pods, plan = self._plan(job, body, status, cached or self.cluster)
        if cached is not None and (plan.launch or plan.delete_pods or plan.delete_job or plan.events):
            # The cache may be an event behind (a pod just created, a phase just changed): whatever
            # creates, deletes or announces something is decided again on what the API server says now.
            pods, plan = self._plan(job, body, status, self.cluster)
        self._act(job, body, pods, plan)
        changed = {k: v for k, v in plan.status.items() if status.get(k) != v}
        for key, value in changed.items():
            patch.status[key] = value
        self._count(job, before, plan.job_status)

    def _plan(self, job: Job, body: dict[str, Any], status: dict[str, Any],
              source: Cluster | CachedView) -> tuple[list[dict[str, Any]], Plan]:
        pods = source.pods(job)
        attempt = JobStatus.read(status).restarts
        base_job = None
        if job.kind == "FinetuneJob" and job.spec.base_model.from_pretrain_job:  # type: ignore[union-attr]
            base_job = source.pretrain_job(job.namespace, job.spec.base_model.from_pretrain_job)  # type: ignore[union-attr]
        ip = _rank0_ip(pods, attempt)
        progress = scrape(ip, job.spec.metrics.port) if ip and job.spec.metrics.port else None
        seen = Observed(job=job, status=status, pods=pods, gpu_nodes=self.cluster.gpu_nodes(),
                        checkpoint_uri=checkpoint_uri(job, self.settings.storage_root), base_job=base_job,
                        progress=progress, generation=body["metadata"].get("generation"),
                        cpu_fallback_allowed=self.settings.allow_cpu_fallback,
                        uri_policy=self.settings.uri_policy())
        return pods, reconcile(seen, datetime.now(UTC))

    def _act(self, job: Job, body: dict[str, Any], pods: list[dict[str, Any]], plan: Plan) -> None:
        for name in plan.delete_pods:
            self.cluster.delete_pod(job.namespace, name)
        if plan.launch is not None:
            existing = {p["metadata"]["name"] for p in pods}
            self.cluster.create(builders.build_service(job))
            pod_group = builders.build_pod_group(job, self.settings)
            if pod_group is not None:  # before the pods: the gang scheduler admits them only as a group
                self.cluster.create(pod_group)
            attempt = plan.job_status.restarts
            created = [self.cluster.create(pod)
                       for pod in builders.build_pods(job, attempt, plan.launch, self.settings)
                       if pod["metadata"]["name"] not in existing]
            age = _age(body)
            if attempt == 0 and any(created) and age is not None:
                self.metrics.pods_created_seconds.labels(job.kind).observe(age)
        for kind, reason, message in plan.events:
            kopf.event(cast(kopf.Body, body), type=kind, reason=reason, message=message)
        if plan.delete_job:
            self.cluster.delete_job(job)

    def _count(self, job: Job, before: JobStatus, after: JobStatus) -> None:
        phase = after.phase or PENDING
        self.metrics.record_phase(job.kind, job.namespace, job.name, phase)
        if phase == before.phase:
            return
        if phase == SUCCEEDED:
            self.metrics.succeeded.labels(job.kind).inc()
        elif phase == FAILED:
            self.metrics.failed.labels(job.kind, after.reason or "").inc()
        elif phase == RESTARTING and after.restarts > before.restarts:
            self.metrics.restarted.labels(job.kind).inc()

    def _invalid(self, body: dict[str, Any], patch: kopf.Patch, before: JobStatus, exc: SpecError) -> None:
        message = "; ".join(exc.problems)
        generation = body["metadata"].get("generation")
        kind, metadata = body["kind"], body["metadata"]
        if before.phase != FAILED or before.message != message:
            patch.status["phase"] = FAILED
            patch.status["reason"] = "InvalidSpec"
            patch.status["message"] = message
            kopf.event(cast(kopf.Body, body), type="Warning", reason="InvalidSpec", message=message)
            if before.phase != FAILED:
                self.metrics.failed.labels(kind, "InvalidSpec").inc()
        if before.observed_generation != generation:
            patch.status["observedGeneration"] = generation
        self.metrics.record_phase(kind, metadata["namespace"], metadata["name"], FAILED)

    def forget(self, body: dict[str, Any]) -> None:
        self.metrics.forget(body["kind"], body["metadata"]["namespace"], body["metadata"]["name"])
