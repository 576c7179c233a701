"""The Helm chart, rendered by the real Helm engine (helm-python-sdk: Helm's Go SDK, no helm binary)."""

from __future__ import annotations

from typing import Any

import helm_python as helm
import yaml

from support.jobs import ROOT

CHART = ROOT / "charts" / "kubeforge"
RELEASE, NAMESPACE = "kubeforge", "kubeforge-system"

helm.disable_logging()  # the loader logs every symlinked CRD at INFO


def render(chart: helm.Chart, values: dict[str, Any] | None = None, *, release: str = RELEASE,
           namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    """Every object an install would create from templates/, as `helm template` prints them."""
    manifests = chart.render(values or {}, name=release, namespace=namespace, is_install=True)
    return [document for path, text in sorted(manifests.items()) if path.endswith(".yaml")
            for document in yaml.safe_load_all(text) if document]


def rendered(values: dict[str, Any] | None = None, *, release: str = RELEASE,
             namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    """`render` with the chart loaded for this once."""
    with helm.Chart.load(CHART) as chart:
        return render(chart, values, release=release, namespace=namespace)


def crds() -> list[dict[str, Any]]:
    """The CRDs of the chart's crds/ (ours, and Kopf's peering resources), as Helm installs them."""
    with helm.Chart.load(CHART) as chart:
        return [document for crd in chart.crds for document in yaml.safe_load_all(crd["data"]) if document]


def only(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container_env(objects: list[dict[str, Any]]) -> dict[str, str]:
    """The operator container's environment variables that have a value (not a valueFrom)."""
    container = only(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}
