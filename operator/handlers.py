"""The Kopf wiring: which events reach the reconciler, the watch indexes it reads, Kopf's settings."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import kopf
from kubernetes import client

from kubeforge.operator.cluster import CachedView, Cluster
from kubeforge.operator.contract import LABEL_JOB, LABEL_KIND
from kubeforge.operator.metrics import OperatorMetrics
from kubeforge.operator.pods import PodView
from kubeforge.operator.reconciler import Operator
from kubeforge.operator.settings import OperatorSettings
from kubeforge.operator.sweeps import SweepReconciler
from kubeforge.spec import ALL_KINDS, KINDS, SWEEP_KIND, JobKind

#: Threads that run the (sync) handlers; the API client keeps as many connections alive.
WORKERS = 16
#: Seconds between Kopf's retries of a failed API request: 594 s in all.
API_ERROR_BACKOFFS = (1, 1, 2, 3, 5, 8, 13, 21) + (30,) * 18


def api_client() -> client.ApiClient:
    """A client for the loaded kubeconfig or in-cluster config, with a connection for every handler
    thread (the default pool, 5 per CPU, makes busy threads open and drop a connection per request)."""
    configuration = client.Configuration.get_default_copy()
    configuration.connection_pool_maxsize = WORKERS
    return client.ApiClient(configuration)


def create_registry(settings: OperatorSettings, api: client.ApiClient, metrics: OperatorMetrics,
                    login: Callable[..., kopf.ConnectionInfo | None] = kopf.login_via_client
                    ) -> kopf.OperatorRegistry:
    """The handlers, bound to one settings/API/metrics set (tests build one per operator).

    `login` gives Kopf its credentials: by default the same in-cluster or kubeconfig ones as `api`."""
    registry = kopf.OperatorRegistry()
    operator = Operator(settings, Cluster(api, node_cache_seconds=settings.resync_seconds), metrics)
    kopf.on.login(registry=registry)(login)
    kopf.on.startup(registry=registry)(startup)
    _register_indexes(registry, settings)
    for kind in KINDS.values():
        _register_job_handlers(registry, kind, settings, operator)
    _register_sweep_handler(registry, settings, SweepReconciler(operator.cluster, metrics))
    _register_liveness_probe(registry, operator)
    return registry


def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    configure(settings)


# Every pod of every job, and every PretrainJob, FinetuneJob and SweepJob (for the FinetuneJobs that
# name one as base model or teacher), as the watches
# report them: a resync that finds nothing to do makes no request. The index keeps each pod's view
# (parsed once per watch event), not its body. The indexers are coroutines: Kopf runs a sync
# handler in a worker thread, and the hop cost more than the indexing.


async def job_pods(namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {(namespace, labels[LABEL_KIND], labels[LABEL_JOB]): PodView.parse(body)}


async def job_statuses(namespace: str | None, name: str, status: kopf.Status, **_: Any) -> dict[Any, Any]:
    return {(namespace, name): {"status": copy.deepcopy(dict(status))}}


async def namespace_labels(name: str, labels: kopf.Labels, **_: Any) -> dict[Any, Any]:
    return {name: dict(labels)}


def _register_indexes(registry: kopf.OperatorRegistry, settings: OperatorSettings) -> None:
    kopf.index("pods", labels={LABEL_JOB: kopf.PRESENT, LABEL_KIND: kopf.PRESENT},
               id="job_pods", registry=registry)(job_pods)
    for kind, index in (("PretrainJob", "pretrain_jobs"), ("FinetuneJob", "finetune_jobs"),
                        ("SweepJob", "sweep_jobs")):
        names = ALL_KINDS[kind]
        kopf.index(names.group, names.version, names.plural, id=index, registry=registry)(job_statuses)
    if settings.namespace_selector:
        # Namespaces' labels, for the selector that says which namespaces' jobs are ours.
        kopf.index("namespaces", id="namespace_labels", registry=registry)(namespace_labels)


def _acts_in(settings: OperatorSettings, namespace: str, indexes: dict[str, Any]) -> bool:
    """Whether the job's namespace is this operator's to act in (it may watch every namespace)."""
    labels = None
    if settings.namespace_selector:
        labels = next(iter(indexes["namespace_labels"].get(namespace, [])), None)
    return settings.acts_in(namespace, labels)


def _register_job_handlers(registry: kopf.OperatorRegistry, kind: JobKind, settings: OperatorSettings,
                           operator: Operator) -> None:
    # One timer per job, and nothing else, reconciles it: its first tick comes as soon as the job
    # appears and its ticks never overlap, so no two reconciliations of a job race on a status the
    # other has not written yet. A spec change (suspend, say) takes effect within a resync interval.
    @kopf.timer(kind.group, kind.version, kind.plural, interval=settings.resync_seconds, registry=registry)
    def reconcile_job(body: kopf.Body, **indexes: Any) -> None:
        if not _acts_in(settings, body["metadata"]["namespace"], indexes):
            return  # watched (the operator may watch every namespace) but not this operator's to act on
        # Kopf passes indexes by id.
        cached = CachedView(indexes["job_pods"], indexes["pretrain_jobs"], indexes["finetune_jobs"],
                            indexes["sweep_jobs"])
        operator.reconcile(copy.deepcopy(dict(body)), cached)

    # A raw event, not kopf.on.delete: any on-create/update/delete handler makes Kopf keep a copy of
    # each job's spec in an annotation, one more write and watch event per job for nothing we use.
    @kopf.on.event(kind.group, kind.version, kind.plural, when=lambda type, **_: type == "DELETED",
                   registry=registry)
    async def deleted(body: kopf.Body, **_: Any) -> None:
        operator.forget(dict(body))


def _register_sweep_handler(registry: kopf.OperatorRegistry, settings: OperatorSettings,
                            sweeps: SweepReconciler) -> None:
    # As for the jobs: one timer per sweep, ticks that never overlap, a status it writes itself.
    @kopf.timer(SWEEP_KIND.group, SWEEP_KIND.version, SWEEP_KIND.plural, interval=settings.resync_seconds,
                registry=registry)
    def reconcile_sweep(body: kopf.Body, **indexes: Any) -> None:
        if not _acts_in(settings, body["metadata"]["namespace"], indexes):
            return
        try:
            sweeps.reconcile(copy.deepcopy(dict(body)))
        except Exception as exc:
            raise kopf.TemporaryError(f"{type(exc).__name__}: {exc}", delay=settings.error_backoff_seconds) from exc

    @kopf.on.event(SWEEP_KIND.group, SWEEP_KIND.version, SWEEP_KIND.plural,
                   when=lambda type, **_: type == "DELETED", registry=registry)
    async def sweep_deleted(body: kopf.Body, **_: Any) -> None:
        sweeps.forget(dict(body))


def _register_liveness_probe(registry: kopf.OperatorRegistry, operator: Operator) -> None:
    @kopf.on.probe(id="reconciling", registry=registry)
    def reconciling(**_: Any) -> bool:
        # A probe that fails permanently makes /healthz answer 500 (Kubernetes restarts the operator);
        # any other exception Kopf retries, with /healthz hanging meanwhile.
        try:
            operator.check_liveness()
        except RuntimeError as exc:
            raise kopf.PermanentError(str(exc)) from exc
        return True


class NoChangeDetection(kopf.DiffBaseStorage):
    """Kopf's change detection, off. Kopf copies every object it watches (jobs, and pods for the
    index) on each event to diff it against the last one; only on-create/update/delete handlers and
    idle timers use that diff, and this operator has neither: a timer per job reconciles it."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        pass


def configure(settings: kopf.OperatorSettings) -> None:
    """Kopf settings: progress in annotations (status is ours), events for warnings and up."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kubeforge.io")
    settings.persistence.diffbase_storage = NoChangeDetection()
    settings.persistence.finalizer = "kubeforge.io/operator"
    settings.posting.level = logging.WARNING
    settings.execution.max_workers = WORKERS
    # A job deleted while its timer's tick runs (a reconcile mid-request) keeps Kopf's finalizer until
    # Kopf sees that tick end, and unless a change of the job wakes it, it looks again only after
    # cancellation_polling: a minute by default, for a `kubectl delete` that a tick outlasts by
    # milliseconds. A tick takes what its API requests take.
    settings.background.cancellation_polling = 1.0
    # Kopf retries an API request that fails (5xx, 429, no connection) after each of these delays,
    # then gives up, and a watch that gives up stops the whole operator. Its default (54 s in all)
    # makes a one-minute API server outage fatal; these ride out about 10 minutes, twice the
    # liveness limit (KUBEFORGE_LIVENESS_SECONDS), which restarts an operator that gets nothing done.
    settings.networking.error_backoffs = API_ERROR_BACKOFFS
