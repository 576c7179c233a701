"""Whether the Kopf peering objects the operator would join exist.

Kopf with a peering name waits, silently and for good, until its peering object exists: a
`ClusterKopfPeering` when it watches the whole cluster, a `KopfPeering` in each namespace it watches.
Only the Helm chart creates them. `kubeforge operator` asks first (see kubeforge/cli.py), so that an
operator started next to a bare `kubectl apply -f crds/` runs standalone instead of doing nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kubernetes import client

GROUP, VERSION = "kopf.dev", "v1"


def missing_peerings(api: client.ApiClient, name: str, namespaces: Sequence[str]) -> list[str]:
    """The peering objects called `name` that Kopf would wait for and that do not exist, as
    `Kind[/namespace]/name`; [] when all exist. A cluster without Kopf's peering CRDs has none."""
    custom = client.CustomObjectsApi(api)
    selector = f"metadata.name={name}"
    wanted: list[tuple[str, str | None]] = [("KopfPeering", ns) for ns in namespaces] or [("ClusterKopfPeering", None)]
    missing = []
    for kind, namespace in wanted:
        found: Any  # the listing, as JSON
        try:
            if namespace is None:
                found = custom.list_cluster_custom_object(GROUP, VERSION, "clusterkopfpeerings",
                                                          field_selector=selector)
            else:
                found = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "kopfpeerings",
                                                             field_selector=selector)
        except client.ApiException as exc:
            if exc.status != 404:  # 404: the CRD itself is not installed
                raise
            found = {}
        if not found.get("items"):
            missing.append("/".join([kind, *([namespace] if namespace else []), name]))
    return missing
