"""The Helm chart, rendered by the real Helm engine (helm-python-sdk: Helm's Go SDK, no helm binary).

Every rendered object is checked against the Kubernetes OpenAPI schemas (kubernetes-validate, strict:
an unknown or misspelled field fails), the chart's CRDs are the very files of crds/, the values
schema refuses typos, and the RBAC grants exactly what the operator calls.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from jsonschema import Draft4Validator
from support.chart import CHART, NAMESPACE, RELEASE, container_env, only, render
from support.jobs import ROOT, example
from support.rbac import OPERATOR_PERMISSIONS, granted

from kubeforge.cli import PEERING_NAME, build_parser
from kubeforge.operator import builders
from kubeforge.operator.contract import LaunchPlan
from kubeforge.operator.lifecycle import Observed, reconcile
from kubeforge.operator.settings import OperatorSettings
from kubeforge.spec import GangSpec, PodTemplateSpec, parse_job

KUBERNETES_VERSION = "1.30.0"  # the oldest version the README's install section is tried on
VALUE_SETS = {
    "default": {},
    "gpu-cluster": yaml.safe_load((CHART / "ci" / "gpu-cluster-values.yaml").read_text()),
    "kind-cpu": yaml.safe_load((CHART / "ci" / "kind-cpu-values.yaml").read_text()),
}


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


# ---------------------------------------------------------------------------------------------
# Lint, CRDs, schema


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_lint_is_clean(value_set: str) -> None:
    report = helm.lint(CHART, VALUE_SETS[value_set], strict=True, namespace=NAMESPACE,
                       kube_version=f"v{KUBERNETES_VERSION}")
    assert report["errors"] == []
    # Severity 1 is "info" (an icon is recommended); warnings and errors would fail `helm lint --strict`.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_the_chart_installs_the_crds_files_themselves(chart: helm.Chart) -> None:
    loaded = {Path(c["filename"]).name: c["data"] for c in chart.crds}
    for crd in sorted((ROOT / "crds").glob("*.yaml")):
        link = CHART / "crds" / crd.name
        assert link.is_symlink() and link.resolve() == crd.resolve(), f"{link} must be a link to {crd}"
        assert loaded[crd.name] == crd.read_text(), f"Helm would install another {crd.name}"
    # Kopf's peering CRDs: the operator pauses until the peering object it is told to use exists.
    peering_crds = {d["metadata"]["name"] for d in yaml.safe_load_all(loaded["kopf.dev-peerings.yaml"])}
    assert peering_crds == {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}


BAD_VALUES = [
    "operator.replica=2",  # replicas
    "operator.replicas=two",
    "operator.logLevel=verbose",
    "trainer.cpuFallback=maybe",
    "trainer.cpuImage.repo=x",
    "watchNamespaces={Team_A}",
    "watchNamespace={team-a}",
    "s3.endpoint=minio:9000",
    "s3.bucket=UPPER",
    "s3.credentialSecret=s3",
    "metrics.port=0",
    "metrics.serviceMonitor.enable=true",
    "metrics.podMonitor.interval=soon",
    "tenancy.allowedUriPrefixes={ftp://host/x}",
    "tenancy.restrictUrisToNamespace=sometimes",
    "networkPolicy.enable=true",
    "networkPolicy.storage.ports={0}",
]


@pytest.mark.parametrize("expression", BAD_VALUES)
def test_the_values_schema_refuses_typos_and_bad_values(chart: helm.Chart, expression: str) -> None:
    values = helm.parse_set_string(expression)
    key = expression.split("=")[0].split(".")[-1]
    with pytest.raises(helm.HelmValuesError, match=key):  # the message names the offending key
        chart.validate_schema(values)
    with pytest.raises(helm.HelmError):  # the install would fail before creating anything
        chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def test_the_value_sets_pass_the_schema(chart: helm.Chart) -> None:
    for values in VALUE_SETS.values():
        chart.validate_schema(values)


def test_two_replicas_without_peering_are_refused(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmRenderError, match="needs peering.enabled"):
        render(chart, {"operator": {"replicas": 2}, "peering": {"enabled": False}})


# ---------------------------------------------------------------------------------------------
# Every rendered object is a valid object of its kind

# Kinds that are not part of Kubernetes itself: the schema of their CRD. The Prometheus Operator's
# CRDs are not shipped anywhere installable, so these are the upstream fields the chart uses, strict.
_STRICT = {"additionalProperties": False}
_LABEL_SELECTOR = {"type": "object", **_STRICT, "properties": {
    "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}}}
_NAMESPACE_SELECTOR = {"type": "object", **_STRICT, "properties": {
    "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}}
_ENDPOINT = {"type": "object", **_STRICT, "required": ["port"], "properties": {
    "port": {"type": "string"}, "path": {"type": "string"},
    "interval": {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?"
                                              "(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}}}
_METADATA = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}
PROMETHEUS_OPERATOR_SCHEMAS = {
    "ServiceMonitor": {"type": "object", "required": ["spec"], "properties": {
        "apiVersion": {"enum": ["monitoring.coreos.com/v1"]}, "kind": {}, "metadata": _METADATA,
        "spec": {"type": "object", **_STRICT, "required": ["selector", "endpoints"], "properties": {
            "selector": _LABEL_SELECTOR, "namespaceSelector": _NAMESPACE_SELECTOR,
            "endpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT}}}}},
    "PodMonitor": {"type": "object", "required": ["spec"], "properties": {
        "apiVersion": {"enum": ["monitoring.coreos.com/v1"]}, "kind": {}, "metadata": _METADATA,
        "spec": {"type": "object", **_STRICT, "required": ["selector", "podMetricsEndpoints"], "properties": {
            "selector": _LABEL_SELECTOR, "namespaceSelector": _NAMESPACE_SELECTOR,
            "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT}}}}},
}


def chart_crd_schemas() -> dict[str, dict[str, Any]]:
    schemas = {}
    for path in (CHART / "crds").glob("*.yaml"):
        for crd in yaml.safe_load_all(path.read_text()):
            version = crd["spec"]["versions"][0]
            schemas[f"{crd['spec']['group']}/{version['name']}/{crd['spec']['names']['kind']}"] = \
                version["schema"]["openAPIV3Schema"]
    return schemas


def problems_of(obj: dict[str, Any]) -> list[str]:
    """Why the API server would refuse obj (empty when it is valid)."""
    custom = chart_crd_schemas().get(f"{obj['apiVersion']}/{obj['kind']}")
    if custom is not None:
        return [e.message for e in Draft4Validator(custom).iter_errors(obj)]
    if obj["kind"] in PROMETHEUS_OPERATOR_SCHEMAS:
        return [e.message for e in Draft4Validator(PROMETHEUS_OPERATOR_SCHEMAS[obj["kind"]]).iter_errors(obj)]
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(map(str, exc.path))}: {exc.message}"]
    return []


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_rendered_object_is_valid(chart: helm.Chart, value_set: str) -> None:
    objects = render(chart, VALUE_SETS[value_set])
    assert {"Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Service"} <= {
        o["kind"] for o in objects}
    for obj in objects:
        assert problems_of(obj) == [], f"{obj['kind']} {obj['metadata']['name']}"
        if obj["kind"] not in ("ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering"):
            assert obj["metadata"].get("namespace"), f"{obj['kind']} {obj['metadata']['name']} has no namespace"


def test_the_validation_catches_a_misspelled_field(chart: helm.Chart) -> None:
    """Without this, the test above could pass on anything."""
    objects = render(chart, VALUE_SETS["gpu-cluster"])
    deployment = copy.deepcopy(only(objects, "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPorts"] = 8080
    assert problems_of(deployment)
    monitor = copy.deepcopy(only(objects, "PodMonitor"))
    monitor["spec"]["podMetricEndpoints"] = monitor["spec"].pop("podMetricsEndpoints")
    assert problems_of(monitor)
    # A kind with no schema at all is an error, never a pass.
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        problems_of({"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule", "metadata": {"name": "x"}})


# ---------------------------------------------------------------------------------------------
# What the operator is told, and what it may do

# The operator's own permissions: support/rbac.py OPERATOR_PERMISSIONS, with what uses each.
# Kopf peering (kubeforge/cli.py PEERING_NAME): keep-alives are patches of the peering object's status.
PEERING_PERMISSIONS = {
    "cluster-wide": {("cluster", "kopf.dev", "clusterkopfpeerings"): {"list", "watch", "patch"}},
    "namespaced": {("namespace", "kopf.dev", "kopfpeerings"): {"list", "watch", "patch"},
                   # Kopf's namespace observer: which of the watched namespaces exist.
                   ("cluster", "", "namespaces"): {"list", "watch"}},
}


def test_rbac_cluster_wide_grants_exactly_what_the_operator_uses(chart: helm.Chart) -> None:
    assert granted(render(chart)) == {"cluster": OPERATOR_PERMISSIONS | PEERING_PERMISSIONS["cluster-wide"]}


def test_rbac_namespaced_grants_jobs_only_in_the_watched_namespaces(chart: helm.Chart) -> None:
    expected = OPERATOR_PERMISSIONS | PEERING_PERMISSIONS["namespaced"]
    in_namespaces = {k: v for k, v in expected.items() if k[0] == "namespace"}
    assert granted(render(chart, VALUE_SETS["gpu-cluster"])) == {
        "cluster": {k: v for k, v in expected.items() if k[0] == "cluster"},
        "ml-research": in_namespaces,
        "ml-prod": in_namespaces,
    }


def test_rbac_with_a_namespace_selector_may_read_namespace_labels(chart: helm.Chart) -> None:
    # The operator's namespace index (tenancy.namespaceSelector): which namespaces carry the labels.
    selector = {("cluster", "", "namespaces"): {"list", "watch"}}
    assert granted(render(chart, {"tenancy": {"namespaceSelector": "kubeforge.io/tenant=enabled"}})) == {
        "cluster": OPERATOR_PERMISSIONS | PEERING_PERMISSIONS["cluster-wide"] | selector}


def test_rbac_without_peering_grants_no_peering(chart: helm.Chart) -> None:
    permissions = granted(render(chart, {"peering": {"enabled": False}}))["cluster"]
    assert permissions == OPERATOR_PERMISSIONS


def test_the_values_reach_the_operator_settings(chart: helm.Chart) -> None:
    """What the operator reads from the rendered Deployment's environment is what the values say."""
    settings = OperatorSettings.from_env(container_env(render(chart, VALUE_SETS["gpu-cluster"])))
    assert settings == OperatorSettings(
        trainer_image="registry.example.com/kubeforge/trainer:0.1.0",
        trainer_cpu_image="registry.example.com/kubeforge/trainer-cpu:0.1.0",
        storage_root="s3://ml-models/kubeforge", s3_endpoint=None, s3_credentials_secret="kubeforge-s3",
        resync_seconds=5.0, metrics_port=8080, namespaces=("ml-research", "ml-prod"),
        image_pull_policy="IfNotPresent", allow_cpu_fallback=False,
        pod_defaults=PodTemplateSpec.model_validate({
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}],
            "nodeSelector": {"node-pool": "gpu"}}),
        gang_defaults=GangSpec(queue_name="default"),
        allowed_uri_prefixes=("s3://ml-corpora/shared",))
    kind = OperatorSettings.from_env(container_env(render(chart, VALUE_SETS["kind-cpu"])))
    assert (kind.trainer_cpu_image, kind.image_pull_policy, kind.allow_cpu_fallback, kind.namespaces) == (
        "kubeforge-trainer-cpu:dev", "Never", True, ())
    assert kind.s3_endpoint == "http://minio.default.svc.cluster.local:9000"
    assert kind.allowed_uri_prefixes == ("s3://kubeforge/data", "s3://kubeforge/models")
    default = OperatorSettings.from_env(container_env(render(chart)))
    assert default.trainer_image == f"ghcr.io/kubeforge/trainer:{chart.metadata['appVersion']}"
    assert (default.restrict_uris_to_namespace, default.allowed_uri_prefixes, default.namespace_selector) == (
        True, (), "")
    tenants = OperatorSettings.from_env(container_env(render(chart, {"tenancy": {
        "restrictUrisToNamespace": False, "namespaceSelector": "kubeforge.io/tenant=enabled"}})))
    assert (tenants.restrict_uris_to_namespace, tenants.namespace_selector) == (False, "kubeforge.io/tenant=enabled")
    assert default.storage_root == "s3://kubeforge/jobs"
    assert OperatorSettings.from_env(container_env(render(chart, {"s3": {"prefix": ""}}))).storage_root == \
        "s3://kubeforge"


@pytest.mark.parametrize(("cpu_fallback", "phase_reason"), [(True, "PodsCreated"), (False, "WaitingForGPU")])
def test_the_cpu_fallback_value_decides_what_a_job_does_with_no_gpu_node(
        chart: helm.Chart, cpu_fallback: bool, phase_reason: str) -> None:
    settings = OperatorSettings.from_env(container_env(render(chart, {"trainer": {"cpuFallback": cpu_fallback}})))
    manifest = copy.deepcopy(example("pretrain-tiny.yaml")[0])
    manifest["metadata"]["uid"] = "0123456789abcdef"
    job = parse_job(manifest)
    assert job.spec.resources.allow_cpu_fallback and job.spec.resources.gpus_per_worker
    plan = reconcile(Observed(job=job, status={}, pods=[], gpu_nodes=False, checkpoint_uri="s3://b/j",
                              cpu_fallback_allowed=settings.allow_cpu_fallback), datetime.now(UTC))
    assert plan.status["reason"] == phase_reason
    assert (plan.launch is not None) == cpu_fallback


def test_the_container_runs_the_operator_command(chart: helm.Chart) -> None:
    def args_of(values: dict[str, Any]) -> list[str]:
        return list(only(render(chart, values), "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"])

    # The image's entrypoint is `kubeforge`: the args are its command line.
    peered = build_parser().parse_args(args_of({}))
    assert (peered.command, peered.standalone, peered.log_level, peered.health_port) == (
        "operator", False, "info", 8081)
    # Replicas draw their own priority: Kopf pauses all operators sharing the highest one.
    assert len({build_parser().parse_args(args_of({})).peering_priority for _ in range(5)}) == 5
    alone = build_parser().parse_args(args_of({"peering": {"enabled": False}, "operator": {"logLevel": "debug"}}))
    assert (alone.standalone, alone.log_level) == (True, "debug")



@pytest.mark.parametrize(("peering", "expected"), [
    (True, {"standalone": False, "peering_name": PEERING_NAME}),
    # A peering name makes peering mandatory in Kopf: with --standalone it would pause for good.
    (False, {"standalone": True, "peering_name": None}),
])
def test_the_operator_starts_kopf_as_the_chart_asks(chart: helm.Chart, monkeypatch: pytest.MonkeyPatch,
                                                    peering: bool, expected: dict[str, Any]) -> None:
    import kopf
    import prometheus_client
    from kubernetes import config

    import kubeforge.operator.handlers
    import kubeforge.operator.peering

    started: dict[str, Any] = {}
    monkeypatch.setattr(kopf, "run", lambda **kwargs: started.update(kwargs))
    monkeypatch.setattr(config, "load_incluster_config", lambda: None)
    monkeypatch.setattr(prometheus_client, "start_http_server", lambda *args, **kwargs: None)
    monkeypatch.setattr(kubeforge.operator.handlers, "create_registry", lambda *args: "registry")
    monkeypatch.setattr(kubeforge.operator.peering, "missing_peerings", lambda *args: [])  # the chart creates them
    deployment = only(render(chart, {"peering": {"enabled": peering}, "watchNamespaces": ["team-a"]}), "Deployment")
    for name, value in container_env([deployment]).items():
        monkeypatch.setenv(name, value)
    args = build_parser().parse_args(deployment["spec"]["template"]["spec"]["containers"][0]["args"])
    assert args.handler(args) == 0
    assert {k: started[k] for k in expected} == expected
    assert (started["clusterwide"], started["namespaces"]) == (False, ["team-a"])
    assert started["liveness_endpoint"] == "http://0.0.0.0:8081/healthz"

def test_the_probes_and_ports_match_the_operator(chart: helm.Chart) -> None:
    objects = render(chart)
    container = only(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": OperatorSettings().metrics_port, "health": 8081}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}  # Kopf's liveness endpoint
    service = only(objects, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    pod_labels = only(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert pod_labels["app.kubernetes.io/managed-by"] != "kubeforge", "the trainer pods' label: the Service " \
        "and PodMonitor must never mistake the operator for a trainer"


def test_peering_objects_are_where_kopf_looks_for_them(chart: helm.Chart) -> None:
    cluster = only(render(chart), "ClusterKopfPeering")
    assert cluster["metadata"]["name"] == PEERING_NAME
    namespaced = [o for o in render(chart, VALUE_SETS["gpu-cluster"]) if o["kind"].endswith("KopfPeering")]
    assert {(o["kind"], o["metadata"]["namespace"], o["metadata"]["name"]) for o in namespaced} == {
        ("KopfPeering", "ml-research", PEERING_NAME), ("KopfPeering", "ml-prod", PEERING_NAME)}
    assert not [o for o in render(chart, {"peering": {"enabled": False}}) if o["kind"].endswith("KopfPeering")]


def test_monitors_scrape_the_operator_and_the_trainer_pods(chart: helm.Chart) -> None:
    objects = render(chart, VALUE_SETS["gpu-cluster"])
    service = only(objects, "Service")
    service_monitor = only(objects, "ServiceMonitor")
    assert service_monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert service_monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert service_monitor["metadata"]["labels"]["release"] == "prometheus"
    # The PodMonitor selects what the operator's builders put on a trainer pod.
    manifest = copy.deepcopy(example("pretrain-tiny.yaml")[0])
    manifest["metadata"]["uid"] = "0123456789abcdef"
    manifest["spec"]["metrics"] = {"port": 9090}
    pod = builders.build_pod(parse_job(manifest), 0, 0, LaunchPlan("s3://b/j", None, True), OperatorSettings())
    pod_monitor = only(objects, "PodMonitor")
    assert pod_monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] in {
        p["name"] for p in pod["spec"]["containers"][0]["ports"]}
    assert pod_monitor["spec"]["namespaceSelector"] == {"matchNames": ["ml-research", "ml-prod"]}
    # With monitors, no scrape annotations (Prometheus would scrape twice); without, annotations.
    assert "prometheus.io/scrape" not in only(objects, "Deployment")["spec"]["template"]["metadata"].get(
        "annotations", {})
    plain = render(chart)
    assert not {"ServiceMonitor", "PodMonitor"} & {o["kind"] for o in plain}
    assert only(plain, "Service")["metadata"]["annotations"]["prometheus.io/port"] == "8080"
    assert only(plain, "Deployment")["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"


def test_notes_tell_how_to_submit_and_watch_a_first_job(chart: helm.Chart) -> None:
    notes = chart.render(VALUE_SETS["kind-cpu"], name=RELEASE, namespace=NAMESPACE)["kubeforge/templates/NOTES.txt"]
    assert "kubectl apply -f examples/pipeline.yaml" in notes
    assert "kubectl get kubeforge --watch" in notes
    assert f"kubectl -n {NAMESPACE} rollout status deployment/{RELEASE}" in notes
    assert "kubectl create secret generic kubeforge-s3" in notes
    assert "s3://kubeforge/jobs at http://minio.default.svc.cluster.local:9000" in notes


# ---------------------------------------------------------------------------------------------
# The trainers' NetworkPolicy


def test_no_network_policy_unless_enabled(chart: helm.Chart) -> None:
    assert "NetworkPolicy" not in {o["kind"] for o in render(chart, VALUE_SETS["kind-cpu"])}


def test_the_network_policy_admits_only_peers_the_operator_dns_and_storage(chart: helm.Chart) -> None:
    objects = render(chart, VALUE_SETS["gpu-cluster"])
    policies = {o["metadata"]["namespace"]: o for o in objects if o["kind"] == "NetworkPolicy"}
    assert set(policies) == {"ml-research", "ml-prod"}
    policy = policies["ml-research"]["spec"]
    manifest = copy.deepcopy(example("pretrain-tiny.yaml")[0])
    manifest["metadata"].update(uid="0123456789abcdef", namespace="ml-research")
    pod = builders.build_pod(parse_job(manifest), 0, 0, LaunchPlan("s3://b/j", None, True), OperatorSettings())
    trainer_labels = pod["metadata"]["labels"]
    operator_labels = only(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]

    def selects(peer: dict[str, Any], labels: dict[str, str]) -> bool:
        return peer["podSelector"]["matchLabels"].items() <= labels.items()

    assert selects(policy, trainer_labels) and not selects(policy, operator_labels)
    assert policy["policyTypes"] == ["Ingress", "Egress"]  # everything not listed is denied both ways
    ingress = [rule["from"] for rule in policy["ingress"]]
    assert ingress[0] == [{"podSelector": policy["podSelector"]}]  # the job's peers, any port
    [operator] = ingress[1]
    assert selects(operator, operator_labels)
    assert operator["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": NAMESPACE}
    assert ingress[2] == VALUE_SETS["gpu-cluster"]["networkPolicy"]["metricsFrom"]
    peers, dns, storage = policy["egress"]
    assert peers == {"to": [{"podSelector": policy["podSelector"]}]}
    assert dns["to"][0]["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    assert {(p["protocol"], p["port"]) for p in dns["ports"]} == {("UDP", 53), ("TCP", 53)}
    assert storage == {"to": VALUE_SETS["gpu-cluster"]["networkPolicy"]["storage"]["to"],
                       "ports": [{"protocol": "TCP", "port": 443}]}


@pytest.mark.parametrize(("values", "message"), [
    ({"networkPolicy": {"enabled": True, "storage": {"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}}},
     "needs watchNamespaces"),
    ({"networkPolicy": {"enabled": True}, "watchNamespaces": ["team-a"]}, "networkPolicy.storage.to"),
])
def test_a_network_policy_that_would_cut_training_off_is_refused(
        chart: helm.Chart, values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmRenderError, match=message):
        render(chart, values)
