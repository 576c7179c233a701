"""The API server as the operator sees it: fresh reads and replay-tolerant writes (`Cluster`), and
what the watches have already seen (`CachedView`).

Every reconciliation may run twice or concurrently with another: children are created only if
missing (409 is success), deletions tolerate 404, and a missing object reads as None.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from typing import Any

import kopf
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubeforge.operator.contract import label_selector
from kubeforge.operator.pods import PodView
from kubeforge.spec import ALL_KINDS, KINDS, Job

GPU = "nvidia.com/gpu"
NOT_FOUND, CONFLICT = 404, 409


def call_kubeapi(method: Callable[..., Any], *args: Any, tolerate: int | None = None, **kwargs: Any) -> Any:
    """`method(*args, **kwargs)`'s body as JSON, or None when the API server answered `tolerate`.

    A replayed reconciliation expects them: 404 for a read or a delete (nothing there), 409 for a
    create (already there). Bodies come back as plain JSON (`_preload_content=False`): the client's
    model classes would only be converted back to dicts, and cost more than the request itself."""
    # The client validates every argument with pydantic (`validate_call`), turning each body into its
    # model classes and back, which costs more than the request; the API server validates it anyway.
    unvalidated = getattr(method, "raw_function", None)
    call = functools.partial(unvalidated, method.__self__) if unvalidated else method  # type: ignore[attr-defined]
    try:
        response = call(*args, _preload_content=False, **kwargs)
    except ApiException as exc:
        if tolerate is not None and exc.status == tolerate:
            return None
        raise
    return json.loads(response.data)


class Cluster:
    """The few API calls the operator makes, each tolerant of replays."""

    def __init__(self, api: client.ApiClient, node_cache_seconds: float):
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self._gpu_nodes: tuple[float, bool] | None = None
        self._node_cache_seconds = node_cache_seconds

    def pods(self, job: Job) -> list[PodView]:
        found = call_kubeapi(self.core.list_namespaced_pod, job.namespace,
                             label_selector=label_selector(job))
        return [PodView.parse(item) for item in found["items"]]

    def gpu_nodes(self) -> bool:
        """Whether any node has allocatable GPUs (cached briefly: every job asks)."""
        now = time.monotonic()
        if self._gpu_nodes is None or now - self._gpu_nodes[0] > self._node_cache_seconds:
            nodes = call_kubeapi(self.core.list_node)["items"]
            allocatable = [(node.get("status") or {}).get("allocatable") or {} for node in nodes]
            available = any(int(resources.get(GPU, "0")) > 0 for resources in allocatable)
            self._gpu_nodes = (now, available)
        return self._gpu_nodes[1]

    def job_body(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """A PretrainJob, FinetuneJob or SweepJob as the API server has it now; None when there is none."""
        names = ALL_KINDS[kind]
        found = call_kubeapi(self.custom.get_namespaced_custom_object, names.group, names.version, namespace,
                             names.plural, name, tolerate=NOT_FOUND)
        return dict(found) if found is not None else None

    def create(self, body: dict[str, Any]) -> bool:
        """Create a Pod, Service or PodGroup if missing; False when it already existed."""
        namespace = body["metadata"]["namespace"]
        if body["kind"] == "PodGroup":
            group, version = body["apiVersion"].split("/")
            created = call_kubeapi(self.custom.create_namespaced_custom_object, group, version, namespace,
                                   "podgroups", body, tolerate=CONFLICT)
            return created is not None
        create = self.core.create_namespaced_pod if body["kind"] == "Pod" else self.core.create_namespaced_service
        # The client sends a dict as it is; its stubs only know its model classes.
        return call_kubeapi(create, namespace, body, tolerate=CONFLICT) is not None

    def delete_pod(self, namespace: str, name: str) -> None:
        call_kubeapi(self.core.delete_namespaced_pod, name, namespace, tolerate=NOT_FOUND)

    def patch_status(self, kind: str, namespace: str, name: str, changed: dict[str, Any]) -> None:
        """Merge `changed` into the job's (or sweep's) status (the status subresource)."""
        names = ALL_KINDS[kind]
        call_kubeapi(self.custom.patch_namespaced_custom_object_status, names.group, names.version, namespace,
                     names.plural, name, {"status": changed})

    def create_job(self, body: dict[str, Any]) -> bool:
        """Create a job (a sweep's trial) if missing; False when it already existed."""
        names = KINDS[body["kind"]]
        created = call_kubeapi(self.custom.create_namespaced_custom_object, names.group, names.version,
                               body["metadata"]["namespace"], names.plural, body, tolerate=CONFLICT)
        return created is not None

    def labelled_jobs(self, kind: str, namespace: str, selector: str) -> dict[str, dict[str, Any]]:
        """The jobs of a kind in a namespace with these labels, by name."""
        names = KINDS[kind]
        found = call_kubeapi(self.custom.list_namespaced_custom_object, names.group, names.version, namespace,
                             names.plural, label_selector=selector)
        return {item["metadata"]["name"]: item for item in found["items"]}

    def delete_named_job(self, kind: str, namespace: str, name: str) -> None:
        names = KINDS[kind]
        call_kubeapi(self.custom.delete_namespaced_custom_object, names.group, names.version, namespace,
                     names.plural, name, propagation_policy="Background", tolerate=NOT_FOUND)

    def delete_job(self, job: Job) -> None:
        kind = KINDS[job.kind]
        call_kubeapi(self.custom.delete_namespaced_custom_object, kind.group, kind.version, job.namespace,
                     kind.plural, job.name, propagation_policy="Background", tolerate=NOT_FOUND)


class CachedView:
    """What the operator's watches have seen (Kopf indexes): pods by job; PretrainJobs, FinetuneJobs and
    SweepJobs by name.

    Answers the questions `Cluster` answers, without a request. It may lag the API server by a watch
    event, so the operator reads status from it but acts only on a fresh `Cluster` read."""

    def __init__(self, job_pods: kopf.Index[tuple[str, str, str], PodView],
                 pretrain_jobs: kopf.Index[tuple[str, str], dict[str, Any]],
                 finetune_jobs: kopf.Index[tuple[str, str], dict[str, Any]],
                 sweep_jobs: kopf.Index[tuple[str, str], dict[str, Any]]):
        self.job_pods = job_pods
        self.by_kind = {"PretrainJob": pretrain_jobs, "FinetuneJob": finetune_jobs, "SweepJob": sweep_jobs}

    def pods(self, job: Job) -> list[PodView]:
        return list(self.job_pods.get((job.namespace, KINDS[job.kind].short_name, job.name), []))

    def job_body(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The job's status (all the index keeps of it) as last watched; None when there is none."""
        return next(iter(self.by_kind[kind].get((namespace, name), [])), None)
