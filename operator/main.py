"""Kopf handlers: observe, ask the pure lifecycle what to do, do it idempotently, write status.

Every reconciliation may run twice or concurrently with another: children are created only if
missing (409 is success), deletions tolerate 404, and status is recomputed from what is observed.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

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
log = logging.getLogger(__name__)


class Cluster:
    """The few API calls the operator makes, each tolerant of replays."""

    def __init__(self, api: client.ApiClient, node_cache_seconds: float):
        self.api = api
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self._gpu_nodes: tuple[float, bool] | None = None
        self._node_cache_seconds = node_cache_seconds

    def pods(self, job: Job) -> list[dict[str, Any]]:
        found = self.core.list_namespaced_pod(job.namespace, label_selector=builders.label_selector(job))
        return [self.api.sanitize_for_serialization(p) for p in found.items]

    def gpu_nodes(self) -> bool:
        """Whether any node has allocatable GPUs (cached briefly: every job asks)."""
        now = time.monotonic()
        if self._gpu_nodes is None or now - self._gpu_nodes[0] > self._node_cache_seconds:
            nodes = self.core.list_node().items
            available = any(int((n.status.allocatable or {}).get(GPU, "0")) > 0 for n in nodes)
            self._gpu_nodes = (now, available)
        return self._gpu_nodes[1]

    def pretrain_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.custom.get_namespaced_custom_object(API_GROUP, VERSION, namespace, "pretrainjobs", name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def create(self, body: dict[str, Any]) -> bool:
        """Create if missing; False when it already existed."""
        namespace = body["metadata"]["namespace"]
        try:
            if body["kind"] == "Pod":
                self.core.create_namespaced_pod(namespace, body)
            else:
                self.core.create_namespaced_service(namespace, body)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def delete_pod(self, namespace: str, name: str) -> None:
        try:
            self.core.delete_namespaced_pod(name, namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def delete_job(self, job: Job) -> None:
        try:
            self.custom.delete_namespaced_custom_object(API_GROUP, VERSION, job.namespace, PLURALS[job.kind],
                                                        job.name, propagation_policy="Background")
        except ApiException as exc:
            if exc.status != 404:
                raise


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

    def reconcile(self, body: dict[str, Any], patch: kopf.Patch) -> None:
        kind = body["kind"]
        started = time.perf_counter()
        try:
            self._reconcile(body, patch)
        except Exception:
            self.metrics.reconcile_errors.labels(kind).inc()
            raise
        finally:
            self.metrics.reconcile_seconds.labels(kind).observe(time.perf_counter() - started)

    def _reconcile(self, body: dict[str, Any], patch: kopf.Patch) -> None:
        status = dict(body.get("status") or {})
        try:
            job = parse_job(body)
        except SpecError as exc:
            # The API server accepted it (an older CRD, or a check only the model makes): refuse here.
            self._invalid(body, patch, status, exc)
            return
        pods = self.cluster.pods(job)
        attempt = int(status.get("restarts", 0))
        base_job = None
        if job.kind == "FinetuneJob" and job.spec.base_model.from_pretrain_job:  # type: ignore[union-attr]
            base_job = self.cluster.pretrain_job(job.namespace, job.spec.base_model.from_pretrain_job)  # type: ignore[union-attr]
        ip = _rank0_ip(pods, attempt)
        progress = scrape(ip, job.spec.metrics.port) if ip and job.spec.metrics.port else None
        seen = Observed(job=job, status=status, pods=pods, gpu_nodes=self.cluster.gpu_nodes(),
                        checkpoint_uri=checkpoint_uri(job, self.settings.storage_root), base_job=base_job,
                        progress=progress, generation=body["metadata"].get("generation"),
                        cpu_fallback_allowed=self.settings.allow_cpu_fallback)
        plan = reconcile(seen, datetime.now(UTC))
        self._act(job, body, pods, plan)
        changed = {k: v for k, v in plan.status.items() if status.get(k) != v}
        for key, value in changed.items():
            patch.status[key] = value
        self._count(job, status, plan)

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
            kopf.event(body, type=kind, reason=reason, message=message)
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
        if status.get("phase") != FAILED or status.get("message") != message:
            patch.status["phase"] = FAILED
            patch.status["reason"] = "InvalidSpec"
            patch.status["message"] = message
            kopf.event(body, type="Warning", reason="InvalidSpec", message=message)

    def forget(self, body: dict[str, Any]) -> None:
        self.metrics.forget(body["kind"], body["metadata"]["namespace"], body["metadata"]["name"])


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

    for plural in PLURALS.values():
        # A timer per job: reconciles on appearance, then every resync interval, so progress and pod
        # failures reach status without watching every pod event.
        @kopf.timer(API_GROUP, VERSION, plural, interval=settings.resync_seconds, registry=registry)
        def reconcile_job(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
            operator.reconcile(copy.deepcopy(dict(body)), patch)

        @kopf.on.update(API_GROUP, VERSION, plural, field="spec", registry=registry)
        def spec_changed(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
            operator.reconcile(copy.deepcopy(dict(body)), patch)

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
    settings.execution.max_workers = 16
