"""Operator.reconcile with a recorded fake API: what it asks the API server to do, given what its
watch cache and the API server each say. (The end-to-end tests cover the same code with Kopf.)"""

from __future__ import annotations

import copy
from typing import Any

import kopf
import pytest
from support.jobs import example, tiny_pretrain, with_change

from kubeforge.operator import builders
from kubeforge.operator.cluster import CachedView
from kubeforge.operator.contract import LaunchPlan
from kubeforge.operator.metrics import OperatorMetrics
from kubeforge.operator.pods import PodView
from kubeforge.operator.reconciler import Operator
from kubeforge.operator.settings import OperatorSettings
from kubeforge.spec import parse_job

# These tests are about which requests a reconcile makes; the jobs read local example data, which
# tenancy (tests/unit/test_tenancy.py) would refuse.
SETTINGS = OperatorSettings(storage_root="s3://bucket/kf", restrict_uris_to_namespace=False)


class RecordedCluster:
    """The API server as `Operator` sees it through `Cluster`: pods it lists, calls it records."""

    def __init__(self, pods: list[dict[str, Any]], jobs: dict[tuple[str, str], dict[str, Any]] | None = None):
        self.listed_pods = pods
        #: The other jobs and sweeps it has, by (kind, name).
        self.jobs = jobs or {}
        self.calls: list[tuple[str, str]] = []
        #: The status fields the operator wrote (the status subresource's merge patches).
        self.written_status: dict[str, Any] = {}

    def pods(self, job: Any) -> list[PodView]:
        self.calls.append(("list", "pods"))
        return [PodView.parse(pod) for pod in self.listed_pods]

    def gpu_nodes(self) -> bool:
        return False

    def job_body(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        self.calls.append(("get", f"{kind}/{name}"))
        return self.jobs.get((kind, name))

    def create(self, body: dict[str, Any]) -> bool:
        self.calls.append(("create", body["metadata"]["name"]))
        return True

    def delete_pod(self, namespace: str, name: str) -> None:
        self.calls.append(("delete", name))

    def delete_job(self, job: Any) -> None:
        self.calls.append(("delete-job", job.name))

    def patch_status(self, kind: str, namespace: str, name: str, changed: dict[str, Any]) -> None:
        self.written_status.update(changed)


class Patch:
    def __init__(self, status: dict[str, Any]) -> None:
        self.status = status


@pytest.fixture(autouse=True)
def no_events(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    posted: list[tuple[str, str]] = []
    monkeypatch.setattr(kopf, "event", lambda body, *, type, reason, message: posted.append((type, reason)))
    return posted


def body(**status: Any) -> dict[str, Any]:
    job = tiny_pretrain("watched")
    job["metadata"].update(namespace="team", uid="0b1c2d3e-0000-4000-8000-000000000001", generation=1,
                           creationTimestamp="2026-11-23T10:00:00Z")
    if status:
        job["status"] = status
    return job


def pods_of(job_body: dict[str, Any], phase: str, attempt: int = 0) -> list[dict[str, Any]]:
    job = parse_job(copy.deepcopy(job_body))
    pods = builders.build_pods(job, attempt, LaunchPlan("s3://bucket/kf/x", None, True), SETTINGS)
    for pod in pods:
        pod["status"] = {"phase": phase, "podIP": "10.0.0.7"}
    return pods


def view(job_body: dict[str, Any], pods: list[dict[str, Any]]) -> CachedView:
    key = (job_body["metadata"]["namespace"], "ptj", job_body["metadata"]["name"])
    return CachedView({key: [PodView.parse(pod) for pod in pods]} if pods else {}, {}, {}, {})  # type: ignore[arg-type]


def reconcile(cluster: RecordedCluster, job_body: dict[str, Any], cached: CachedView | None,
              metrics: OperatorMetrics | None = None) -> Patch:
    written = Operator(SETTINGS, cluster, metrics or OperatorMetrics()).reconcile(  # type: ignore[arg-type]
        copy.deepcopy(job_body), cached)
    assert written == cluster.written_status
    return Patch(written)


def test_a_new_job_is_launched_after_a_fresh_list() -> None:
    job = body()
    cluster = RecordedCluster(pods=[])
    patch = reconcile(cluster, job, view(job, []))
    assert cluster.calls == [("list", "pods"), ("create", "watched-ptj"), ("create", "watched-ptj-w0-a0")]
    assert patch.status["phase"] == "Pending"


def test_a_cache_that_has_not_seen_the_pods_yet_creates_nothing() -> None:
    """The pods exist and run; the watch cache has not caught up. Acting on the cache would create
    pods again (or, mid-restart, count a failure): the fresh list wins."""
    job = body(phase="Pending", restarts=0, observedGeneration=1, conditions=[])
    cluster = RecordedCluster(pods=pods_of(job, "Running"))
    patch = reconcile(cluster, job, view(job, []))
    assert [c for c in cluster.calls if c[0] != "list"] == []
    assert patch.status["phase"] == "Running"


def test_a_resync_with_nothing_to_do_makes_no_request() -> None:
    job = body()
    pods = pods_of(job, "Pending")
    first = reconcile(RecordedCluster(pods=pods), job, None)
    job["status"] = first.status
    cluster = RecordedCluster(pods=pods)
    patch = reconcile(cluster, job, view(job, pods))
    assert cluster.calls == []
    assert patch.status == {}


def test_a_failed_pod_in_the_cache_is_confirmed_before_the_gang_restarts() -> None:
    job = body(phase="Running", restarts=0, observedGeneration=1, conditions=[], startTime="2026-11-23T10:00:01Z")
    failed = pods_of(job, "Failed")
    cluster = RecordedCluster(pods=failed)
    patch = reconcile(cluster, job, view(job, failed))
    assert ("list", "pods") in cluster.calls
    assert ("delete", "watched-ptj-w0-a0") in cluster.calls
    assert patch.status["restarts"] == 1 and patch.status["phase"] == "Restarting"


def test_an_invalid_spec_fails_the_job_once_and_counts_it(no_events: list[tuple[str, str]]) -> None:
    job = body()
    job["spec"]["training"]["maxSteps"] = -1  # accepted by an older CRD, refused by the model
    metrics = OperatorMetrics()
    patch = reconcile(RecordedCluster(pods=[]), job, None, metrics)
    assert patch.status["phase"] == "Failed" and patch.status["reason"] == "InvalidSpec"
    assert "maxSteps" in patch.status["message"]
    job["status"] = patch.status
    assert reconcile(RecordedCluster(pods=[]), job, None, metrics).status == {}
    assert no_events == [("Warning", "InvalidSpec")]
    assert metrics.registry.get_sample_value(
        "kubeforge_operator_jobs_failed_total", {"kind": "PretrainJob", "reason": "InvalidSpec"}) == 1
    assert metrics.registry.get_sample_value(
        "kubeforge_operator_job_phase",
        {"kind": "PretrainJob", "job_namespace": "team", "job_name": "watched", "phase": "Failed"}) == 1


def test_a_finetune_from_a_sweep_reads_the_sweep_and_starts_from_its_best_trial() -> None:
    """The watch cache says the sweep succeeded; the launch is decided again on the SweepJob read fresh."""
    finetune = with_change(example("finetune-lora-classify.yaml")[0], "spec.baseModel", {"fromSweepJob": "lr-search"})
    finetune["metadata"].update(namespace="team", uid="0b1c2d3e-0000-4000-8000-000000000002", generation=1,
                                creationTimestamp="2026-11-23T10:00:00Z")
    best = "s3://bucket/kf/team/finetunejob/lr-search-t2/export"
    sweep = {"status": {"phase": "Succeeded", "bestTrial": {"name": "lr-search-t2", "number": 2, "parameters": {},
                                                           "value": 0.9, "exportUri": best}}}
    cluster = RecordedCluster(pods=[], jobs={("SweepJob", "lr-search"): sweep})
    cached = CachedView({}, {}, {}, {("team", "lr-search"): [sweep]})  # type: ignore[arg-type]
    patch = reconcile(cluster, finetune, cached)
    assert ("get", "SweepJob/lr-search") in cluster.calls
    assert patch.status["baseModelUri"] == best and patch.status["reason"] == "PodsCreated"
