"""What the operator may do: the permissions the Helm chart grants it, and the requests that exceeded them."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import yaml

from support.chart import NAMESPACE

# Every permission the chart grants, and what uses it. Amend this when the operator's API calls
# change (and the chart's templates/rbac.yaml with it): test_chart.py fails on anything granted but not
# listed here, and on anything listed but not granted. Scope "namespace" is granted cluster-wide
# when the operator watches every namespace, and by a Role in each watched namespace otherwise.
#   (scope, apiGroup, resource): verbs
OPERATOR_PERMISSIONS: dict[tuple[str, str, str], set[str]] = {
    # operator/cluster.py Cluster.gpu_nodes: list_node, whether any node has allocatable nvidia.com/gpu.
    ("cluster", "", "nodes"): {"list"},
    # Kopf's resource observer (kopf/_core/reactor/observation.py): lists and watches the CRDs to
    # notice when the resources it serves are installed or removed.
    ("cluster", "apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
    # Kopf: lists and watches the jobs; patches them (finalizer kubeforge.io/operator, progress
    # annotations). operator/cluster.py Cluster.delete_job: ttlSecondsAfterFinished.
    # operator/cluster.py Cluster.job_body (get): a FinetuneJob's baseModel.fromPretrainJob or
    # fromSweepJob, its teacher.fromFinetuneJob, and a SweepJob read fresh before a tick acts.
    # operator/sweeps.py: a SweepJob's trials, created, listed by label and deleted when pruned.
    ("namespace", "kubeforge.io", "pretrainjobs"): {"list", "watch", "patch", "delete", "get", "create"},
    ("namespace", "kubeforge.io", "finetunejobs"): {"list", "watch", "patch", "delete", "get", "create"},
    ("namespace", "kubeforge.io", "sweepjobs"): {"list", "watch", "patch", "get"},
    # The reconcilers write status through the status subresource.
    ("namespace", "kubeforge.io", "pretrainjobs/status"): {"patch"},
    ("namespace", "kubeforge.io", "finetunejobs/status"): {"patch"},
    ("namespace", "kubeforge.io", "sweepjobs/status"): {"patch"},
    # operator/handlers.py: the job_pods index (Kopf lists and watches pods); operator/cluster.py:
    # Cluster.pods (a fresh list by label selector before acting), Cluster.create (pods), Cluster.delete_pod.
    ("namespace", "", "pods"): {"list", "watch", "create", "delete"},
    # operator/cluster.py Cluster.create: each job's headless Service (the c10d rendezvous).
    ("namespace", "", "services"): {"create"},
    # kopf.event in operator/reconciler.py, and Kopf's own warnings posted as events.
    ("namespace", "", "events"): {"create"},
    # operator/cluster.py Cluster.create: the PodGroup of a gang (spec.gang.podGroup: volcano or coscheduling).
    ("namespace", "scheduling.volcano.sh", "podgroups"): {"create"},
    ("namespace", "scheduling.x-k8s.io", "podgroups"): {"create"},
}

Permissions = dict[tuple[str, str, str], set[str]]
#: What the chart installs for the operator to act as: its identity, and what that identity may do.
RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
CLUSTER_SCOPED = {"nodes", "customresourcedefinitions", "namespaces", "clusterkopfpeerings"}


def granted(objects: list[dict[str, Any]], namespace: str = NAMESPACE) -> dict[str, Permissions]:
    """What the rendered chart's roles grant its ServiceAccount (of the release `namespace`):
    {where: {(scope, group, resource): verbs}}, `where` being "cluster" or a namespace; scope is
    "cluster" for cluster-scoped resources and "namespace" for namespaced ones."""
    out: dict[str, Permissions] = {}
    bound = {(b["roleRef"]["kind"], b["roleRef"]["name"], b["metadata"].get("namespace", "cluster"))
             for b in objects if b["kind"] in ("ClusterRoleBinding", "RoleBinding")
             and any(s["kind"] == "ServiceAccount" and s["namespace"] == namespace for s in b["subjects"])}
    for role in objects:
        if role["kind"] not in ("ClusterRole", "Role"):
            continue
        where = role["metadata"].get("namespace", "cluster")
        assert (role["kind"], role["metadata"]["name"], where) in bound, f"{role['kind']} is bound to nobody"
        for rule in role["rules"]:
            assert set(rule) == {"apiGroups", "resources", "verbs"}, f"no resourceNames/nonResourceURLs: {rule}"
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    scope = "cluster" if resource in CLUSTER_SCOPED else "namespace"
                    out.setdefault(where, {}).setdefault((scope, group, resource), set()).update(rule["verbs"])
    return out


# The operator's two clients: Kopf's own, and the kubernetes client of operator/cluster.py.
OPERATOR_AGENTS = ("kopf/", "OpenAPI-Generator/")
VERBS = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}


def not_granted(emulator: Any, permissions: Permissions = OPERATOR_PERMISSIONS) -> set[str]:
    """Requests the operator made to the emulator that `permissions` (by default the chart's, without
    peering or a namespace selector) would refuse. The emulator authorizes nothing itself."""
    refused = set()
    for request in emulator:
        if not request.headers.get("User-Agent", "").startswith(OPERATOR_AGENTS):
            continue
        parts = request.url.path.strip("/").split("/")
        group, rest = ("", parts[2:]) if parts[0] == "api" else (parts[1], parts[3:]) if len(parts) > 3 else ("", [])
        if not rest:
            continue  # discovery (/api/v1, /apis/GROUP/VERSION): open to every authenticated user
        scope = "cluster"
        if rest[0] == "namespaces" and len(rest) > 2:
            scope, rest = "namespace", rest[2:]
        resource, name, subresource = rest[0], rest[1] if len(rest) > 1 else None, rest[2:]
        if resource in {"pods", "services", "events", "pretrainjobs", "finetunejobs", "sweepjobs"}:
            scope = "namespace"  # a namespaced resource listed or watched across all namespaces
        if request.method.value.upper() == "GET":
            verb = "get" if name else "watch" if request.params.get("watch") in ("true", "1") else "list"
        else:
            verb = VERBS[request.method.value.upper()]
        key = (scope, group, "/".join([resource, *subresource]))
        if verb not in permissions.get(key, set()):
            refused.add(f"{verb} {key}")
    return refused


def write_kubeconfig(path: Path, cluster: dict[str, Any], user: dict[str, Any], namespace: str | None = None) -> Path:
    """A kubeconfig of one context: `cluster` (server, CA) and `user` (credentials) as kubeconfig spells them."""
    context = {"cluster": "kubeforge", "user": "kubeforge", **({"namespace": namespace} if namespace else {})}
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kubeforge",
        "clusters": [{"name": "kubeforge", "cluster": cluster}], "users": [{"name": "kubeforge", "user": user}],
        "contexts": [{"name": "kubeforge", "context": context}]}))
    return path


async def service_account_kubeconfig(cluster: Any, name: str, path: Path) -> Path:
    """A kubeconfig that authenticates as the ServiceAccount `name` of the test namespace of a real
    cluster: a token from the TokenRequest API (as the kubelet mounts one in the operator's pod), and
    the server and CA of the admin kubeconfig."""
    from kubernetes import client

    request = client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[],
                                                                                  expiration_seconds=3600))
    api = client.CoreV1Api(cluster.api_client())
    issued = await asyncio.to_thread(api.create_namespaced_service_account_token, name, cluster.namespace, request)
    admin = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    context = next(c["context"] for c in admin["contexts"] if c["name"] == admin["current-context"])
    server = next(c["cluster"] for c in admin["clusters"] if c["name"] == context["cluster"])
    return write_kubeconfig(path, server, {"token": issued.status.token}, cluster.namespace)
