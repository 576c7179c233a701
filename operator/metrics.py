"""The operator's own Prometheus metrics (documented in docs/metrics.md).

Per-job series carry `job_namespace`, `job_name` and `kind`. Not `namespace`: service discovery sets
that to the operator pod's own namespace, and without honor_labels (which annotation-based scraping
cannot set) the job's would be renamed `exported_namespace`. Not `job`: Prometheus sets it on every target.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from kubeforge.spec import KINDS

KIND_PHASE = ("kind", "phase")
JOB_PHASE = ("job_namespace", "job_name", "kind", "phase")

# The `_created` timestamp series prometheus_client adds to every counter are not part of our
# documented metrics, and nothing reads them.
disable_created_metrics()


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.jobs = Gauge("kubeforge_operator_jobs", "Jobs this operator tracks, by kind and phase", KIND_PHASE,
                          registry=self.registry)
        self.job_phase = Gauge("kubeforge_operator_job_phase", "1 for each job, labelled with its current phase",
                               JOB_PHASE, registry=self.registry)
        self.seen = Counter("kubeforge_operator_jobs_seen_total",
                            "Jobs this operator process started tracking (after a restart, every existing job again)",
                            ("kind",), registry=self.registry)
        self.succeeded = Counter("kubeforge_operator_jobs_succeeded_total", "Jobs that succeeded", ("kind",),
                                 registry=self.registry)
        self.failed = Counter("kubeforge_operator_jobs_failed_total", "Jobs that failed", ("kind", "reason"),
                              registry=self.registry)
        self.restarted = Counter("kubeforge_operator_gang_restarts_total", "Gang restarts of jobs' workers", ("kind",),
                                 registry=self.registry)
        self.reconcile_errors = Counter("kubeforge_operator_reconcile_errors_total",
                                        "Reconciliations that raised an error (Kopf retries them)", ("kind",),
                                        registry=self.registry)
        self.reconcile_seconds = Histogram(
            "kubeforge_operator_reconcile_duration_seconds", "Time to reconcile one job", ("kind",),
            registry=self.registry, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.pods_created_seconds = Histogram(
            "kubeforge_operator_job_pods_created_seconds",
            "Time from a job's creation to all its pods created", ("kind",),
            registry=self.registry, buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
        self.sweep_trials = Counter("kubeforge_operator_sweep_trials_total",
                                    "SweepJobs' trials, by outcome: started, succeeded, pruned, failed",
                                    ("outcome",), registry=self.registry)
        self.sweep_best_value = Gauge("kubeforge_operator_sweep_best_value",
                                      "The best objective value of each SweepJob so far",
                                      ("job_namespace", "job_name"), registry=self.registry)
        for outcome in ("started", "succeeded", "pruned", "failed"):
            self.sweep_trials.labels(outcome)
        for kind in KINDS:
            # Exported at 0 from the start, so that increase() sees the first event.
            for counter in (self.seen, self.succeeded, self.restarted, self.reconcile_errors):
                counter.labels(kind)
        self._phases: dict[tuple[str, str, str], str] = {}

    def record_phase(self, kind: str, namespace: str, name: str, phase: str) -> None:
        """Keep the per-phase gauge equal to the number of known jobs in each phase, and the job's
        own phase series on its current phase only."""
        key = (kind, namespace, name)
        previous = self._phases.get(key)
        if previous == phase:
            return
        if previous is None:
            self.seen.labels(kind).inc()
        else:
            self.jobs.labels(kind, previous).dec()
            self.job_phase.remove(namespace, name, kind, previous)
        self._phases[key] = phase
        self.jobs.labels(kind, phase).inc()
        self.job_phase.labels(namespace, name, kind, phase).set(1)

    def forget(self, kind: str, namespace: str, name: str) -> None:
        previous = self._phases.pop((kind, namespace, name), None)
        if previous:
            self.jobs.labels(kind, previous).dec()
            self.job_phase.remove(namespace, name, kind, previous)
