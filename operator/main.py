"""Kopf handlers: observe, ask the pure lifecycle what to do, do it idempotently, write status.

Every reconciliation may run twice or concurrently with another: children are created only if
missing (409 is success), deletions tolerate 404, and status is recomputed from what is observed.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, cast

import kopf
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubeforge.operator import builders
from kubeforge.operator.lifecycle import FAILED, RESTARTING, SUCCEEDED, Observed, Plan, parse_time, reconcile
from kubeforge.operator.metrics import OperatorMetrics
from kubeforge.operator.progress import scrape
from kubeforge.operator.settings import OperatorSettings
from kubeforge.spec import API_GROUP, Job, SpecError, checkpoint_uri, parse_job

VERSION = "v1alpha1"
PLURALS = {"PretrainJob": "pretrainjobs", "FinetuneJob": "finetunejobs"}
GPU = "nvidia.com/gpu"
#: Threads that run the (sync) handlers; the API client keeps as many connections alive.
WORKERS = 16
log = logging.getLogger(__name__)


class Cluster:
    """The few API calls the operator makes, each tolerant of replays.

    Bodies go out and come back as plain JSON (`_preload_content=False`): the client's model classes
    would only be converted back to dicts, and cost more than the request itself."""

    def __init__(self, api: client.ApiClient, node_cache_seconds: float):
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self._gpu_nodes: tuple[float, bool] | None = None
        self._node_cache_seconds = node_cache_seconds

    def pods(self, job: Job) -> list[dict[str, Any]]:
        found = self.core.list_namespaced_pod(job.namespace, label_selector=builders.label_selector(job),
                                              _preload_content=False)
        return list(_json(found)["items"])

    def gpu_nodes(self) -> bool:
        """Whether any node has allocatable GPUs (cached briefly: every job asks)."""
        now = time.monotonic()
        if self._gpu_nodes is None or now - self._gpu_nodes[0] > self._node_cache_seconds:
            nodes = _json(self.core.list_node(_preload_content=False))["items"]
            allocatable = [(node.get("status") or {}).get("allocatable") or {} for node in nodes]
            available = any(int(resources.get(GPU, "0")) > 0 for resources in allocatable)
            self._gpu_nodes = (now, available)
        return self._gpu_nodes[1]

    def pretrain_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            found = self.custom.get_namespaced_custom_object(API_GROUP, VERSION, namespace, "pretrainjobs", name,
                                                             _preload_content=False)
            return dict(_json(found))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def create(self, body: dict[str, Any]) -> bool:
        """Create if missing; False when it already existed."""
        namespace = body["metadata"]["namespace"]
        manifest: Any = body  # the client sends a dict as it is; its stubs only know its model classes
        try:
            if body["kind"] == "Pod":
                self.core.create_namespaced_pod(namespace, manifest, _preload_content=False)
            else:
                self.core.create_namespaced_service(namespace, manifest, _preload_content=False)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def delete_pod(self, namespace: str, name: str) -> None:
        try:
            self.core.delete_namespaced_pod(name, namespace, _preload_content=False)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def delete_job(self, job: Job) -> None:
        try:
            self.custom.delete_namespaced_custom_object(API_GROUP, VERSION, job.namespace, PLURALS[job.kind],
                                                        job.name, propagation_policy="Background",
                                                        _preload_content=False)
        except ApiException as exc:
            if exc.status != 404:
                raise


def _json(response: Any) -> Any:
    """The body of a `_preload_content=False` response (typed by the client as its model class)."""
    return json.loads(response.data)


class CachedView:
    """What the operator's watches have seen (Kopf indexes): pods by job, PretrainJobs by name.

    Answers the questions `Cluster` answers, without a request. It may lag the API server by a watch
    event, so the operator reads status from it but acts only on a fresh `Cluster` read."""

    def __init__(self, job_pods: kopf.Index[tuple[str, str, str], dict[str, Any]],
                 pretrain_jobs: kopf.Index[tuple[str, str], dict[str, Any]]):
        self.job_pods = job_pods
        self.pretrain_jobs = pretrain_jobs

    def pods(self, job: Job) -> list[dict[str, Any]]:
        return list(self.job_pods.get((job.namespace, builders.KIND_SHORT[job.kind], job.name), []))

    def pretrain_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return next(iter(self.pretrain_jobs.get((namespace, name), [])), None)


def _pod_entry(body: kopf.Body) -> dict[str, Any]:
    """The parts of a pod the lifecycle reads (the index keeps one per pod, not its whole body)."""
    metadata = body["metadata"]
    return {"metadata": {"name": metadata["name"], "labels": dict(metadata.get("labels") or {}),
                         "annotations": dict(metadata.get("annotations") or {}),
                         "deletionTimestamp": metadata.get("deletionTimestamp")},
            "status": copy.deepcopy(dict(body.get("status") or {}))}


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
        try:
            job = parse_job(body)
        except SpecError as exc:
            # The API server accepted it (an older CRD, or a check only the model makes): refuse here.
            self._invalid(body, patch, status, exc)
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
        self._count(job, status, plan)

    def _plan(self, job: Job, body: dict[str, Any], status: dict[str, Any],
              source: Cluster | CachedView) -> tuple[list[dict[str, Any]], Plan]:
        pods = source.pods(job)
        attempt = int(status.get("restarts", 0))
        base_job = None
        if job.kind == "FinetuneJob" and job.spec.base_model.from_pretrain_job:  # type: ignore[union-attr]
            base_job = source.pretrain_job(job.namespace, job.spec.base_model.from_pretrain_job)  # type: ignore[union-attr]
        ip = _rank0_ip(pods, attempt)
        progress = scrape(ip, job.spec.metrics.port) if ip and job.spec.metrics.port else None
        seen = Observed(job=job, status=status, pods=pods, gpu_nodes=self.cluster.gpu_nodes(),
                        checkpoint_uri=checkpoint_uri(job, self.settings.storage_root), base_job=base_job,
                        progress=progress, generation=body["metadata"].get("generation"),
                        cpu_fallback_allowed=self.settings.allow_cpu_fallback)
        return pods, reconcile(seen, datetime.now(UTC))

    def _act(self, job: Job, body: dict[str, Any], pods: list[dict[str, Any]], plan: Plan) -> None:
        for name in plan.delete_pods:
            self.cluster.delete_pod(job.namespace, name)
        if plan.launch is not None:
            existing = {p["metadata"]["name"] for p in pods}
            self.cluster.create(builders.get_service(job))
            attempt = int(plan.status.get("restarts", 0))
            created = [self.cluster.create(pod) for pod in builders.get_pods(job, attempt, plan.launch,
                                                                            self.settings)
                       if pod["metadata"]["name"] not in existing]
            age = _age(body)
            if attempt == 0 and any(created) and age is not None:
                self.metrics.pods_created_seconds.labels(job.kind).observe(age)
        for kind, reason, message in plan.events:
            kopf.event(cast(kopf.Body, body), type=kind, reason=reason, message=message)
        if plan.delete_job:
            self.cluster.delete_job(job)

    def _count(self, job: Job, before: dict[str, Any], plan: Plan) -> None:
        phase = plan.status.get("phase", "Pending")
        self.metrics.record_phase(job.kind, job.namespace, job.name, phase)
        if phase == before.get("phase"):
            return
        if phase == SUCCEEDED:
            self.metrics.succeeded.labels(job.kind).inc()
        elif phase == FAILED:
            self.metrics.failed.labels(job.kind, plan.status.get("reason", "")).inc()
        elif phase == RESTARTING and plan.status.get("restarts", 0) > before.get("restarts", 0):
            self.metrics.restarted.labels(job.kind).inc()

    def _invalid(self, body: dict[str, Any], patch: kopf.Patch, status: dict[str, Any], exc: SpecError) -> None:
        message = "; ".join(exc.problems)
        generation = body["metadata"].get("generation")
        kind, metadata = body["kind"], body["metadata"]
        if status.get("phase") != FAILED or status.get("message") != message:
            patch.status["phase"] = FAILED
            patch.status["reason"] = "InvalidSpec"
            patch.status["message"] = message
            kopf.event(cast(kopf.Body, body), type="Warning", reason="InvalidSpec", message=message)
            if status.get("phase") != FAILED:
                self.metrics.failed.labels(kind, "InvalidSpec").inc()
        if status.get("observedGeneration") != generation:
            patch.status["observedGeneration"] = generation
        self.metrics.record_phase(kind, metadata["namespace"], metadata["name"], FAILED)

    def forget(self, body: dict[str, Any]) -> None:
        self.metrics.forget(body["kind"], body["metadata"]["namespace"], body["metadata"]["name"])


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

    @kopf.on.startup(registry=registry)
    def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure(settings)

    # Every pod of every job, and every PretrainJob (for FinetuneJobs that name one), as the watches
    # report them: a resync that finds nothing to do makes no request.
    @kopf.index("pods", labels={builders.LABEL_JOB: kopf.PRESENT, builders.LABEL_KIND: kopf.PRESENT},
                id="job_pods", registry=registry)
    def job_pods(namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Any, Any]:
        return {(namespace, labels[builders.LABEL_KIND], labels[builders.LABEL_JOB]): _pod_entry(body)}

    @kopf.index(API_GROUP, VERSION, "pretrainjobs", id="pretrain_jobs", registry=registry)
    def pretrain_jobs(namespace: str | None, name: str, status: kopf.Status, **_: Any) -> dict[Any, Any]:
        return {(namespace, name): {"status": copy.deepcopy(dict(status))}}

    for plural in PLURALS.values():
        # One timer per job, and nothing else, reconciles it: its first tick comes as soon as the job
        # appears and its ticks never overlap, so no two reconciliations of a job race on a status the
        # other has not written yet. A spec change (suspend, say) takes effect within a resync interval.
        @kopf.timer(API_GROUP, VERSION, plural, interval=settings.resync_seconds, registry=registry)
        def reconcile_job(body: kopf.Body, patch: kopf.Patch, **indexes: Any) -> None:
            cached = CachedView(indexes["job_pods"], indexes["pretrain_jobs"])  # Kopf passes indexes by id
            operator.reconcile(copy.deepcopy(dict(body)), patch, cached)

        @kopf.on.delete(API_GROUP, VERSION, plural, optional=True, registry=registry)
        def deleted(body: kopf.Body, **_: Any) -> None:
            operator.forget(copy.deepcopy(dict(body)))

    return registry


def configure(settings: kopf.OperatorSettings) -> None:
    """Kopf settings: progress in annotations (status is ours), events for warnings and up."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kubeforge.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="kubeforge.io")
    settings.persistence.finalizer = "kubeforge.io/operator"
    settings.posting.level = logging.WARNING
    settings.execution.max_workers = WORKERS
