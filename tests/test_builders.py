"""Every field that reaches a pod, from pure builders: no cluster involved."""

from __future__ import annotations

import re
from typing import Any

import yaml
from conftest import example
from test_spec import with_change

from kubeforge.operator.builders import (
    LaunchPlan,
    get_pod,
    get_pods,
    get_service,
    label_selector,
    pod_shape,
)
from kubeforge.operator.settings import OperatorSettings
from kubeforge.spec import parse_job

UID = "6c1f0e2a-58d4-4f7e-9d7a-0b5e2c1d9f33"
SETTINGS = OperatorSettings(trainer_image="reg/trainer:1", trainer_cpu_image="reg/trainer-cpu:1",
                            storage_root="s3://models/kf", s3_endpoint="http://minio.storage:9000",
                            s3_credentials_secret="kubeforge-s3")
GPU_PLAN = LaunchPlan("s3://models/kf/default/pretrainjob/tiny-6c1f0e2a", None, cpu_fallback=False)


def job(document: dict[str, Any] | None = None, **spec: Any):  # type: ignore[no-untyped-def]
    document = document or example("pretrain-tiny.yaml")[0]
    document = with_change(document, "metadata.uid", UID)
    for key, value in spec.items():
        document = with_change(document, f"spec.{key}", value)
    return parse_job(document)


def env_of(pod: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in pod["spec"]["containers"][0]["env"]}


def test_one_pod_per_worker_with_its_rank_and_rendezvous() -> None:
    distributed = job(resources={"workers": 3, "gpusPerWorker": 2})
    pods = get_pods(distributed, attempt=1, plan=GPU_PLAN, settings=SETTINGS)
    assert [p["metadata"]["name"] for p in pods] == [f"tiny-shakespeare-ptj-w{r}-a1" for r in range(3)]
    for rank, pod in enumerate(pods):
        env = env_of(pod)
        assert env["RANK"] == str(rank) and env["WORLD_SIZE"] == "3" and env["LOCAL_RANK"] == "0"
        assert env["MASTER_ADDR"] == "w0.tiny-shakespeare-ptj" and env["MASTER_PORT"] == "29500"
        assert pod["spec"]["hostname"] == f"w{rank}" and pod["spec"]["subdomain"] == "tiny-shakespeare-ptj"
        assert pod["metadata"]["labels"]["kubeforge.io/rank"] == str(rank)
        assert pod["metadata"]["labels"]["kubeforge.io/attempt"] == "1"
        assert pod["spec"]["restartPolicy"] == "Never"
    service = get_service(distributed)
    assert service["metadata"]["name"] == "tiny-shakespeare-ptj"
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {"kubeforge.io/job-name": "tiny-shakespeare", "kubeforge.io/job-kind": "ptj"}
    assert label_selector(distributed) == "kubeforge.io/job-name=tiny-shakespeare,kubeforge.io/job-kind=ptj"


def test_gpu_pods_request_gpus_and_the_gpu_image() -> None:
    pod = get_pod(job(resources={"gpusPerWorker": 4, "cpu": "8", "memory": "32Gi"}), 0, 0, GPU_PLAN, SETTINGS)
    container = pod["spec"]["containers"][0]
    assert container["image"] == "reg/trainer:1"
    assert container["resources"] == {"requests": {"cpu": "8", "memory": "32Gi"},
                                      "limits": {"memory": "32Gi", "nvidia.com/gpu": "4"}}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["spec"]["tolerations"]


def test_cpu_fallback_pods_have_no_gpu_and_the_cpu_image() -> None:
    plan = LaunchPlan(GPU_PLAN.checkpoint_uri, None, cpu_fallback=True)
    pod = get_pod(job(), 0, 0, plan, SETTINGS)
    container = pod["spec"]["containers"][0]
    assert container["image"] == "reg/trainer-cpu:1"
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert "tolerations" not in pod["spec"]
    assert pod["metadata"]["annotations"]["kubeforge.io/cpu-fallback"] == "true"


def test_the_trainer_command_carries_the_job_and_its_uris() -> None:
    finetune = job(example("finetune-lora-classify.yaml")[0])
    plan = LaunchPlan("s3://models/kf/default/finetunejob/review-sentiment-6c1f0e2a",
                      "s3://models/kf/default/pretrainjob/tiny-shakespeare-11111111/export", False)
    pod = get_pod(finetune, 0, 0, plan, SETTINGS)
    container = pod["spec"]["containers"][0]
    assert container["command"] == [
        "kubeforge", "train", "--spec-env", "KUBEFORGE_JOB", "--checkpoint-uri", plan.checkpoint_uri,
        "--base-model-uri", plan.base_model_uri, "--termination-log", "/dev/termination-log"]
    assert container["terminationMessagePath"] == "/dev/termination-log"
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    carried = parse_job(yaml.safe_load(env_of(pod)["KUBEFORGE_JOB"]))
    assert carried == finetune


def test_s3_credentials_travel_only_by_reference() -> None:
    pod = get_pod(job(s3={"endpointUrl": "http://ceph:7480", "credentialsSecret": "team-s3"}), 0, 0, GPU_PLAN,
                  SETTINGS)
    container = pod["spec"]["containers"][0]
    assert container["envFrom"] == [{"secretRef": {"name": "team-s3"}}]
    env = env_of(pod)
    assert env["AWS_ENDPOINT_URL"] == "http://ceph:7480"
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env)
    default = get_pod(job(), 0, 0, GPU_PLAN, SETTINGS)
    assert default["spec"]["containers"][0]["envFrom"] == [{"secretRef": {"name": "kubeforge-s3"}}]
    assert env_of(default)["AWS_ENDPOINT_URL"] == "http://minio.storage:9000"


def test_metrics_port_and_scrape_annotations() -> None:
    pod = get_pod(job(metrics={"port": 9400}), 0, 0, GPU_PLAN, SETTINGS)
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "9400"
    assert {"name": "metrics", "containerPort": 9400} in pod["spec"]["containers"][0]["ports"]
    assert env_of(pod)["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    quiet = get_pod(job(metrics={"port": 0}), 0, 0, GPU_PLAN, SETTINGS)
    assert "prometheus.io/scrape" not in quiet["metadata"]["annotations"]


def test_pods_are_owned_by_the_job_and_run_as_non_root() -> None:
    pod = get_pod(job(), 0, 0, GPU_PLAN, SETTINGS)
    assert pod["metadata"]["ownerReferences"] == [{
        "apiVersion": "kubeforge.io/v1alpha1", "kind": "PretrainJob", "name": "tiny-shakespeare", "uid": UID,
        "controller": True, "blockOwnerDeletion": True}]
    assert get_service(job())["metadata"]["ownerReferences"] == pod["metadata"]["ownerReferences"]
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
    assert pod["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["spec"]["automountServiceAccountToken"] is False


def test_pod_shape_changes_with_resources_but_not_with_training() -> None:
    base = pod_shape(job())
    assert pod_shape(job(resources={"workers": 2})) != base
    assert pod_shape(job(suspend=True)) == base
    assert pod_shape(job(training={"maxSteps": 900})) == base


def test_every_accepted_name_makes_valid_object_names() -> None:
    """The longest name the CRD accepts still yields a Service that is a DNS-1035 label and label
    values of at most 63 characters (`7b-pretrain` and 60 characters are refused: test_spec)."""
    dns_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
    for name in ("a" * 59, "x", "a-1"):
        named = job(with_change(example("pretrain-tiny.yaml")[0], "metadata.name", name))
        service = get_service(named)["metadata"]["name"]
        assert dns_1035.match(service) and len(service) <= 63, service
        for pod in get_pods(named, 12, LaunchPlan("s3://b/c", None, False), SETTINGS):
            assert all(len(value) <= 63 for value in pod["metadata"]["labels"].values())
            assert len(pod["metadata"]["name"]) <= 253 and dns_1035.match(pod["spec"]["subdomain"])
