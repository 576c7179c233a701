"""The operator's own Prometheus metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

KIND_PHASE = ("kind", "phase")


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.jobs = Gauge("kubeforge_operator_jobs", "Jobs by kind and phase", KIND_PHASE, registry=self.registry)
        self.created = Counter("kubeforge_operator_jobs_created", "Jobs seen for the first time", ("kind",),
                               registry=self.registry)
        self.succeeded = Counter("kubeforge_operator_jobs_succeeded", "Jobs that succeeded", ("kind",),
                                 registry=self.registry)
        self.failed = Counter("kubeforge_operator_jobs_failed", "Jobs that failed", ("kind", "reason"),
                              registry=self.registry)
        self.restarted = Counter("kubeforge_operator_gang_restarts", "Gang restarts of jobs' workers", ("kind",),
                                 registry=self.registry)
        self.reconcile_seconds = Histogram(
            "kubeforge_operator_reconcile_duration_seconds", "Time to reconcile one job", ("kind",),
            registry=self.registry, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.pods_created_seconds = Histogram(
            "kubeforge_operator_job_pods_created_seconds",
            "Time from a job's creation to all its pods created", ("kind",),
            registry=self.registry, buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
        self._phases: dict[tuple[str, str, str], tuple[str, str]] = {}

    def record_phase(self, kind: str, namespace: str, name: str, phase: str) -> None:
        """Keep the per-phase gauge equal to the number of known jobs in each phase."""
        key = (kind, namespace, name)
        previous = self._phases.get(key)
        if previous == (kind, phase):
            return
        if previous is None:
            self.created.labels(kind).inc()
        else:
            self.jobs.labels(*previous).dec()
        self._phases[key] = (kind, phase)
        self.jobs.labels(kind, phase).inc()

    def forget(self, kind: str, namespace: str, name: str) -> None:
        previous = self._phases.pop((kind, namespace, name), None)
        if previous:
            self.jobs.labels(*previous).dec()
