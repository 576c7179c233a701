"""The reconciler: observe a job, ask the pure lifecycle what to do, do it idempotently, write status.

Every reconciliation may run twice or concurrently with another: what it does is decided again from
what is observed, and `Cluster` tolerates the replays.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, cast

import kopf

from kubeforge.basemodel import upstream_base_job, upstream_teacher_job
from kubeforge.operator import builders
from kubeforge.operator.cluster import CachedView, Cluster
from kubeforge.operator.lifecycle import Observed, Plan, parse_time, reconcile
from kubeforge.operator.metrics import OperatorMetrics
from kubeforge.operator.pods import PodView, of_attempt, owned
from kubeforge.operator.progress import scrape
from kubeforge.operator.settings import OperatorSettings
from kubeforge.spec import Job, SpecError, base_model_cache_uri, checkpoint_uri, corpus_cache_uri, parse_job
from kubeforge.status import FAILED, PENDING, RESTARTING, RUNNING, SUCCEEDED, JobStatus


def _rank0_ip(pods: list[PodView], attempt: int) -> str | None:
    """Where the rank-0 trainer of this attempt serves its metrics, while it runs."""
    return next((p.ip for p in of_attempt(pods, attempt) if p.rank == 0 and p.phase == RUNNING), None)


def _created(body: dict[str, Any]) -> datetime | None:
    created = body["metadata"].get("creationTimestamp")
    return parse_time(created) if created else None


def _age(body: dict[str, Any]) -> float | None:
    created = _created(body)
    return (datetime.now(UTC) - created).total_seconds() if created else None


class Operator:
    """Reconciles one job at a time: observe -> lifecycle.reconcile -> act -> patch what changed in status.

    The status is written here, inside the reconciliation, not handed to Kopf: Kopf applies a handler's
    patch after the handler returns, and a timer whose patch fails (a 5xx, a refused value) stops for
    good. Written here, a failed write is an error of this reconciliation, retried with a backoff."""

    def __init__(self, settings: OperatorSettings, cluster: Cluster, metrics: OperatorMetrics,
                 clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.cluster = cluster
        self.metrics = metrics
        self._clock = clock
        #: Consecutive failed reconciliations of each job: the retry backoff doubles with each.
        self._failures: dict[tuple[str, str, str], int] = {}
        self._last_success = clock()

    def reconcile(self, body: dict[str, Any], cached: CachedView | None = None) -> dict[str, Any]:
        """Reconcile one job; returns the status fields it wrote. Raises kopf.TemporaryError, with a
        delay that grows with each consecutive failure of this job, when anything went wrong."""
        kind, metadata = body["kind"], body["metadata"]
        key = (kind, metadata.get("namespace", ""), metadata["name"])
        self._failures.setdefault(key, 0)
        started = time.perf_counter()
        try:
            written = self._reconcile(body, cached)
        except Exception as exc:
            self.metrics.reconcile_errors.labels(kind).inc()
            self._failures[key] += 1
            delay = min(self.settings.error_backoff_seconds * 2 ** (self._failures[key] - 1),
                        self.settings.error_backoff_max_seconds)
            raise kopf.TemporaryError(f"{type(exc).__name__}: {exc}", delay=delay) from exc
        finally:
            self.metrics.reconcile_seconds.labels(kind).observe(time.perf_counter() - started)
        self._failures[key] = 0
        self._last_success = self._clock()
        return written

    def check_liveness(self) -> None:
        """Raise when jobs exist and none has been reconciled for settings.liveness_seconds: the
        operator is alive only if it still gets its work done (an API server it cannot write to, a
        stuck thread pool)."""
        idle = self._clock() - self._last_success
        if self._failures and idle > self.settings.liveness_seconds:
            raise RuntimeError(f"no reconciliation succeeded for {idle:.0f}s (KUBEFORGE_LIVENESS_SECONDS: "
                               f"{self.settings.liveness_seconds:.0f}s) while {len(self._failures)} job(s) exist")

    def _reconcile(self, body: dict[str, Any], cached: CachedView | None) -> dict[str, Any]:
        status = dict(body.get("status") or {})
        before = JobStatus.read(status)
        try:
            job = parse_job(body)
        except SpecError as exc:
            # The API server accepted it (an older CRD, or a check only the model makes): refuse here.
            return self._invalid(body, before, exc)
        pods, plan = self._plan(job, body, status, cached or self.cluster)
        if cached is not None and (plan.launch or plan.delete_pods or plan.delete_job or plan.events):
            # The cache may be an event behind (a pod just created, a phase just changed): whatever
            # creates, deletes or announces something is decided again on what the API server says now.
            pods, plan = self._plan(job, body, status, self.cluster)
        self._act(job, body, pods, plan)
        changed = {k: v for k, v in plan.status.items() if status.get(k) != v}
        if changed:
            self.cluster.patch_status(body["kind"], job.namespace, job.name, changed)
        self._count(job, before, plan.job_status)
        return changed

    def _plan(self, job: Job, body: dict[str, Any], status: dict[str, Any],
              source: Cluster | CachedView) -> tuple[list[PodView], Plan]:
        pods = source.pods(job)
        attempt = JobStatus.read(status).restarts
        upstream = upstream_base_job(job)
        base_job = source.job_body(upstream.kind, job.namespace, upstream.name) if upstream else None
        teacher = upstream_teacher_job(job)
        teacher_job = source.job_body("FinetuneJob", job.namespace, teacher) if teacher else None
        ip = _rank0_ip(owned(pods, job), attempt)
        progress = scrape(ip, job.spec.metrics.port) if ip and job.spec.metrics.port else None
        seen = Observed(job=job, status=status, pods=pods, gpu_nodes=self.cluster.gpu_nodes(),
                        checkpoint_uri=checkpoint_uri(job, self.settings.storage_root), base_job=base_job,
                        progress=progress, generation=body["metadata"].get("generation"),
                        cpu_fallback_allowed=self.settings.allow_cpu_fallback, created=_created(body),
                        uri_policy=self.settings.uri_policy(),
                        base_model_cache=base_model_cache_uri(self.settings.storage_root, job.namespace),
                        corpus_cache=corpus_cache_uri(self.settings.storage_root, job.namespace),
                        teacher_job=teacher_job)
        return pods, reconcile(seen, datetime.now(UTC))

    def _act(self, job: Job, body: dict[str, Any], pods: list[PodView], plan: Plan) -> None:
        for name in plan.delete_pods:
            self.cluster.delete_pod(job.namespace, name)
        if plan.launch is not None:
            existing = {p.name for p in pods}
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
        for event in plan.events:
            kopf.event(cast(kopf.Body, body), type=event.type, reason=event.reason, message=event.message)
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

    def _invalid(self, body: dict[str, Any], before: JobStatus, exc: SpecError) -> dict[str, Any]:
        message = "; ".join(exc.problems)
        generation = body["metadata"].get("generation")
        kind, metadata = body["kind"], body["metadata"]
        changed: dict[str, Any] = {}
        if before.phase != FAILED or before.message != message:
            changed |= {"phase": FAILED, "reason": "InvalidSpec", "message": message}
        if before.observed_generation != generation:
            changed["observedGeneration"] = generation
        if changed:
            self.cluster.patch_status(kind, metadata["namespace"], metadata["name"], changed)
        if "message" in changed:
            kopf.event(cast(kopf.Body, body), type="Warning", reason="InvalidSpec", message=message)
            if before.phase != FAILED:
                self.metrics.failed.labels(kind, "InvalidSpec").inc()
        self.metrics.record_phase(kind, metadata["namespace"], metadata["name"], FAILED)
        return changed

    def forget(self, body: dict[str, Any]) -> None:
        self._failures.pop((body["kind"], body["metadata"]["namespace"], body["metadata"]["name"]), None)
        self.metrics.forget(body["kind"], body["metadata"]["namespace"], body["metadata"]["name"])
