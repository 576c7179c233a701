"""Tenancy through the operator as the Helm chart deploys it (issue 12): its Deployment's command and
environment, run under the chart's ServiceAccount with the chart's roles and bindings applied.

With `--cluster=real` the API server's RBAC checks every request the operator makes with a token of
that ServiceAccount, so a job that succeeds shows the chart grants what the operator needs, and the
same token is refused what the chart does not grant. On the emulator, which authorizes nothing, the
operator's requests are checked against the rendered roles instead (support.e2e.chart_operator).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
from k8s.kubelet import ApiError
from support.chart import only
from support.e2e import PTJ, SECRET, chart_installed, chart_operator, no_job_pods, phase_is, pretrain

TENANT_LABEL = "kubeforge.io/tenant"
#: Which namespaces the chart lets the operator act in: every one (a ClusterRole), or the listed ones
#: (a Role in each).
WATCHED = pytest.mark.parametrize("listed", [False, True], ids=["every-namespace", "watch-namespaces"])


def chart_values(cluster: Any, bucket: str, s3_endpoint: str, *, listed: bool = False,
                 namespace_selector: str = "") -> dict[str, Any]:
    """Values for this test's S3 (moto, its shared corpora under data/) and quick resyncs."""
    return {"s3": {"bucket": bucket, "prefix": "kf", "endpoint": s3_endpoint, "credentialsSecret": SECRET},
            "tenancy": {"allowedUriPrefixes": [f"s3://{bucket}/data"], "namespaceSelector": namespace_selector},
            "operator": {"resyncSeconds": 0.5}, "watchNamespaces": [cluster.namespace] if listed else []}


def forbidden_lines(log: str) -> list[str]:
    """The operator's log lines that report a request RBAC refused: the API server's message names the
    user and what it `cannot` do. Other 403s are not the chart's: watching every namespace, the operator
    also sees jobs of namespaces that earlier tests are deleting, and an event posted there is refused
    with "because it is being terminated"."""
    return [line for line in log.splitlines() if re.search(r"forbidden: User .* cannot ", line)]


@WATCHED
async def test_the_chart_grants_what_the_operator_needs_to_run_a_job(
        world: Any, kubelet: Any, s3_data: dict[str, str], bucket: str, s3_endpoint: str, tmp_path: Path,
        listed: bool) -> None:
    cluster = world
    async with chart_operator(cluster, chart_values(cluster, bucket, s3_endpoint, listed=listed), tmp_path) as chart:
        await cluster.apply(pretrain(s3_data, "chartered", 20, resources={"gpusPerWorker": 0}))
        done = await cluster.wait_for(lambda: phase_is(cluster, PTJ, "chartered", "Succeeded", "Failed"), 90,
                                      "the job to finish")
        # cleanPodPolicy All: the operator deletes the finished pod.
        await cluster.wait_for(lambda: no_job_pods(cluster, "chartered"), 30, "the finished pod's deletion")
    assert done["phase"] == "Succeeded", done
    assert done["stepProgress"] == "20/20"
    # Events are the operator's too, and a refused one would not stop the job.
    assert {"PodsCreated", "Completed"} <= {e["reason"] for e in await cluster.events("chartered")}
    assert forbidden_lines(chart.log()) == []


async def outcome(request: Any) -> str | int:
    """What became of a request: "allowed", or the status code the API server refused it with."""
    try:
        await request
    except ApiError as exc:
        return exc.status
    return "allowed"


@pytest.mark.real_only("the emulator authenticates and authorizes nobody: only a real API server can refuse")
@WATCHED
async def test_the_chart_service_account_is_refused_what_the_chart_does_not_grant(
        cluster: Any, tmp_path: Path, listed: bool) -> None:
    values = chart_values(cluster, "kubeforge", "", listed=listed)  # no job runs: any bucket will do
    probe = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "probe"},
             "spec": {"containers": [{"name": "probe", "image": "busybox"}]}}
    escalation = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                  "metadata": {"name": f"{cluster.namespace}-escalation"},
                  "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
                  "subjects": [{"kind": "ServiceAccount", "namespace": cluster.namespace}]}
    dry_run = {"dryRun": "All"}  # authorized as a real request would be, and then nothing is stored
    async with chart_installed(cluster, values, tmp_path) as chart:
        sa = chart.client
        escalation["subjects"][0]["name"] = only(chart.objects, "ServiceAccount")["metadata"]["name"]

        def create_pod(namespace: str) -> Any:
            return sa.request("POST", f"/api/v1/namespaces/{namespace}/pods", params=dry_run, body=probe)

        outcomes = {
            "create a pod in its namespace": await outcome(create_pod(cluster.namespace)),
            "create a pod in namespace default": await outcome(create_pod("default")),
            "list the jobs of namespace default": await outcome(sa.list(PTJ, "default")),
            "read its namespace's Secrets": await outcome(sa.list("Secret", cluster.namespace)),
            "delete a Node": await outcome(sa.delete("Node", "any-node")),
            "make itself cluster-admin": await outcome(
                sa.request("POST", "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", params=dry_run,
                           body=escalation)),
        }
    beyond_the_list = 403 if listed else "allowed"
    assert outcomes == {
        "create a pod in its namespace": "allowed",  # the token works: what follows is RBAC's refusal
        "create a pod in namespace default": beyond_the_list,
        "list the jobs of namespace default": beyond_the_list,
        "read its namespace's Secrets": 403,
        "delete a Node": 403,
        "make itself cluster-admin": 403,
    }


async def test_the_operator_acts_only_in_namespaces_its_selector_matches(
        world: Any, kubelet: Any, s3_data: dict[str, str], bucket: str, s3_endpoint: str, tmp_path: Path) -> None:
    """tenancy.namespaceSelector: the operator watches every namespace and acts in the labelled ones."""
    cluster = world
    other = f"{cluster.namespace}-unlabelled"
    await cluster.client.patch("Namespace", cluster.namespace, {"metadata": {"labels": {TENANT_LABEL: "enabled"}}})
    await cluster.client.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": other}})
    ours = pretrain(s3_data, "tenant", 20, resources={"gpusPerWorker": 0})
    theirs = copy.deepcopy(ours)
    theirs["metadata"].update(name="outsider", namespace=other)
    values = chart_values(cluster, bucket, s3_endpoint, namespace_selector=f"{TENANT_LABEL}=enabled")
    try:
        async with chart_operator(cluster, values, tmp_path):
            await cluster.apply([theirs, ours])
            done = await cluster.wait_for(lambda: phase_is(cluster, PTJ, "tenant", "Succeeded", "Failed"), 90,
                                          "the labelled namespace's job to finish")
            # The unlabelled namespace's job existed for the whole run: a resync every 0.5 s passed it by.
            outsider = await cluster.client.get(PTJ, "outsider", other)
            outsider_pods = await cluster.client.list("Pod", other)
            # Labelling its namespace makes it the operator's: the selector, not the job, kept it idle.
            await cluster.client.patch("Namespace", other, {"metadata": {"labels": {TENANT_LABEL: "enabled"}}})
            adopted = await cluster.wait_for(lambda: cluster.client.list("Pod", other), 30,
                                             "the job's pods once its namespace is labelled")
            # Deleted while the operator runs, which lets go of it (its finalizer): the namespace can go.
            await cluster.client.delete(PTJ, "outsider", other)
            await cluster.wait_for(lambda: _job_gone(cluster, "outsider", other), 30, "the outsider job's deletion")
    finally:
        for pod in await cluster.client.list("Pod", other):  # bound to no kubelet that would finish them
            await cluster.client.delete("Pod", pod["metadata"]["name"], other, grace_period_seconds=0)
        await cluster.client.delete("Namespace", other)
    assert done["phase"] == "Succeeded", done
    # Kopf's finalizer on it: the operator watched the job, and its timer ran for it.
    assert outsider["metadata"].get("finalizers") == ["kubeforge.io/operator"]
    assert outsider_pods == [] and not outsider.get("status"), outsider
    assert [p["metadata"]["labels"]["kubeforge.io/job-name"] for p in adopted] == ["outsider"]


async def _job_gone(cluster: Any, name: str, namespace: str) -> bool:
    return await cluster.client.get(PTJ, name, namespace) is None
