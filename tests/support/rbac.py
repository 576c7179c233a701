"""What the operator may do: the permissions the Helm chart grants it, and the requests that exceeded them."""

from __future__ import annotations

from typing import Any

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
    ("namespace", "kubeforge.io", "pretrainjobs"): {"list", "watch", "patch", "delete", "get"},
    ("namespace", "kubeforge.io", "finetunejobs"): {"list", "watch", "patch", "delete"},
    # operator/cluster.py Cluster.pretrain_job (get above): a FinetuneJob's baseModel.fromPretrainJob.
    # Kopf writes the status the handlers return through the status subresource.
    ("namespace", "kubeforge.io", "pretrainjobs/status"): {"patch"},
    ("namespace", "kubeforge.io", "finetunejobs/status"): {"patch"},
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


# The operator's two clients: Kopf's own, and the kubernetes client of operator/cluster.py.
OPERATOR_AGENTS = ("kopf/", "OpenAPI-Generator/")
VERBS = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}


def not_granted(emulator: Any) -> set[str]:
    """Requests the operator made that the chart's RBAC (test_chart.OPERATOR_PERMISSIONS) would refuse."""
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
        if resource in {"pods", "services", "events", "pretrainjobs", "finetunejobs"}:
            scope = "namespace"  # a namespaced resource listed or watched across all namespaces
        if request.method.value.upper() == "GET":
            verb = "get" if name else "watch" if request.params.get("watch") in ("true", "1") else "list"
        else:
            verb = VERBS[request.method.value.upper()]
        key = (scope, group, "/".join([resource, *subresource]))
        if verb not in OPERATOR_PERMISSIONS.get(key, set()):
            refused.add(f"{verb} {key}")
    return refused
