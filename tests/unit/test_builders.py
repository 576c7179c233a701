"""Every field that reaches a pod, from pure builders: no cluster involved."""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

import yaml
from support.jobs import SETTINGS, UID, example, job, with_change

from kubeforge.operator.builders import build_pod, build_pod_group, build_pods, build_service
from kubeforge.operator.contract import LaunchPlan, label_selector, pod_shape
from kubeforge.spec import GangSpec, PodTemplateSpec, parse_job

GPU_PLAN = LaunchPlan("s3://models/kf/default/pretrainjob/tiny-6c1f0e2a", None, cpu_fallback=False)


def env_of(pod: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in pod["spec"]["containers"][0]["env"]}


def test_one_pod_per_worker_with_its_rank_and_rendezvous() -> None:
    distributed = job(resources={"workers": 3, "gpusPerWorker": 1})
    pods = build_pods(distributed, attempt=1, plan=GPU_PLAN, settings=SETTINGS)
    assert [p["metadata"]["name"] for p in pods] == [f"tiny-shakespeare-ptj-w{r}-a1" for r in range(3)]
    for rank, pod in enumerate(pods):
        env = env_of(pod)
        assert env["RANK"] == str(rank) and env["WORLD_SIZE"] == "3" and env["LOCAL_RANK"] == "0"
        assert env["MASTER_ADDR"] == "w0.tiny-shakespeare-ptj" and env["MASTER_PORT"] == "29500"
        assert pod["spec"]["hostname"] == f"w{rank}" and pod["spec"]["subdomain"] == "tiny-shakespeare-ptj"
        assert pod["metadata"]["labels"]["kubeforge.io/rank"] == str(rank)
        assert pod["metadata"]["labels"]["kubeforge.io/attempt"] == "1"
        assert pod["spec"]["restartPolicy"] == "Never"
    service = build_service(distributed)
    assert service["metadata"]["name"] == "tiny-shakespeare-ptj"
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {"kubeforge.io/job-name": "tiny-shakespeare", "kubeforge.io/job-kind": "ptj"}
    assert label_selector(distributed) == "kubeforge.io/job-name=tiny-shakespeare,kubeforge.io/job-kind=ptj"


def test_gpu_pods_request_gpus_and_the_gpu_image() -> None:
    pod = build_pod(job(resources={"gpusPerWorker": 4, "cpu": "8", "memory": "32Gi"}), 0, 0, GPU_PLAN, SETTINGS)
    container = pod["spec"]["containers"][0]
    assert container["image"] == "reg/trainer:1"
    assert container["resources"] == {"requests": {"cpu": "8", "memory": "32Gi"},
                                      "limits": {"memory": "32Gi", "nvidia.com/gpu": "4"}}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["spec"]["tolerations"]


def test_cpu_fallback_pods_have_no_gpu_and_the_cpu_image() -> None:
    plan = LaunchPlan(GPU_PLAN.checkpoint_uri, None, cpu_fallback=True)
    pod = build_pod(job(), 0, 0, plan, SETTINGS)
    container = pod["spec"]["containers"][0]
    assert container["image"] == "reg/trainer-cpu:1"
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert "tolerations" not in pod["spec"]
    assert pod["metadata"]["annotations"]["kubeforge.io/cpu-fallback"] == "true"


def test_a_hub_base_model_gets_its_token_by_reference_and_the_namespaces_cache() -> None:
    document = example("finetune-lora-classify.yaml")[0]
    document["spec"]["baseModel"] = {"uri": "hf://tiny-org/tiny-gpt2@v1",
                                     "tokenSecretRef": {"name": "hub-token", "key": "token"}}
    finetune = job(document)
    plan = LaunchPlan("s3://models/kf/default/finetunejob/review-sentiment-6c1f0e2a", "hf://tiny-org/tiny-gpt2@v1",
                      False, "s3://models/kf/default/base-models")
    container = build_pod(finetune, 0, 0, plan, SETTINGS)["spec"]["containers"][0]
    token = {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hub-token", "key": "token"}}}
    assert token in container["env"]  # by reference: the token is in no spec, status or log
    command = container["command"]
    assert command[command.index("--base-model-cache") + 1] == "s3://models/kf/default/base-models"


def test_the_trainer_command_carries_the_job_and_its_uris() -> None:
    finetune = job(example("finetune-lora-classify.yaml")[0])
    plan = LaunchPlan("s3://models/kf/default/finetunejob/review-sentiment-6c1f0e2a",
                      "s3://models/kf/default/pretrainjob/tiny-shakespeare-11111111/export", False)
    pod = build_pod(finetune, 0, 0, plan, SETTINGS)
    container = pod["spec"]["containers"][0]
    assert container["command"] == [
        "kubeforge", "train", "--spec-env", "KUBEFORGE_JOB", "--checkpoint-uri", plan.checkpoint_uri,
        "--base-model-uri", plan.base_model_uri, "--termination-log", "/dev/termination-log"]
    assert container["terminationMessagePath"] == "/dev/termination-log"
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    carried = parse_job(yaml.safe_load(env_of(pod)["KUBEFORGE_JOB"]))
    assert carried == finetune


def test_a_pretrain_job_prepares_its_corpus_in_the_namespaces_cache() -> None:
    pretrain = job()
    plan = LaunchPlan("s3://models/kf/default/pretrainjob/tiny-shakespeare-11111111", None, False,
                      "s3://models/kf/default/base-models", "s3://models/kf/default/corpora")
    command = build_pod(pretrain, 0, 0, plan, SETTINGS)["spec"]["containers"][0]["command"]
    assert command[command.index("--corpus-cache") + 1] == "s3://models/kf/default/corpora"
    finetune = job(example("finetune-lora-classify.yaml")[0])
    assert "--corpus-cache" not in build_pod(finetune, 0, 0, plan, SETTINGS)["spec"]["containers"][0]["command"]


def test_s3_credentials_travel_only_by_reference() -> None:
    pod = build_pod(job(s3={"endpointUrl": "http://ceph:7480", "credentialsSecret": "team-s3"}), 0, 0, GPU_PLAN,
                  SETTINGS)
    container = pod["spec"]["containers"][0]
    assert container["envFrom"] == [{"secretRef": {"name": "team-s3"}}]
    env = env_of(pod)
    assert env["AWS_ENDPOINT_URL"] == "http://ceph:7480"
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env)
    default = build_pod(job(), 0, 0, GPU_PLAN, SETTINGS)
    assert default["spec"]["containers"][0]["envFrom"] == [{"secretRef": {"name": "kubeforge-s3"}}]
    assert env_of(default)["AWS_ENDPOINT_URL"] == "http://minio.storage:9000"


def test_metrics_port_and_scrape_annotations() -> None:
    pod = build_pod(job(metrics={"port": 9400}), 0, 0, GPU_PLAN, SETTINGS)
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "9400"
    assert {"name": "metrics", "containerPort": 9400} in pod["spec"]["containers"][0]["ports"]
    assert env_of(pod)["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    quiet = build_pod(job(metrics={"port": 0}), 0, 0, GPU_PLAN, SETTINGS)
    assert "prometheus.io/scrape" not in quiet["metadata"]["annotations"]


def test_pods_are_owned_by_the_job_and_run_as_non_root() -> None:
    pod = build_pod(job(), 0, 0, GPU_PLAN, SETTINGS)
    assert pod["metadata"]["ownerReferences"] == [{
        "apiVersion": "kubeforge.io/v1alpha1", "kind": "PretrainJob", "name": "tiny-shakespeare", "uid": UID,
        "controller": True, "blockOwnerDeletion": True}]
    assert build_service(job())["metadata"]["ownerReferences"] == pod["metadata"]["ownerReferences"]
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
    assert pod["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["spec"]["automountServiceAccountToken"] is False


def test_pod_shape_changes_with_resources_but_not_with_training() -> None:
    base = pod_shape(job())
    assert pod_shape(job(resources={"workers": 2})) != base
    assert pod_shape(job(suspend=True)) == base
    assert pod_shape(job(training={"maxSteps": 900})) == base


def test_a_pod_runs_one_process_per_gpu_with_global_ranks() -> None:
    gpus = job(resources={"workers": 2, "gpusPerWorker": 4}, metrics={"port": 9090})
    for rank, pod in enumerate(build_pods(gpus, 0, GPU_PLAN, SETTINGS)):
        container = pod["spec"]["containers"][0]
        assert container["command"][container["command"].index("--processes") + 1] == "4"
        env = env_of(pod)
        assert env["NODE_RANK"] == str(rank) and env["WORLD_SIZE"] == "8"
        # The launcher sets RANK and LOCAL_RANK per process: the pod must not pin them.
        assert "RANK" not in env and "LOCAL_RANK" not in env
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
        assert [p["containerPort"] for p in container["ports"] if p["name"].startswith("metrics")] == \
            [9090, 9091, 9092, 9093]
    # On CPU fallback the world keeps its size (same data per step), and processesPerWorker says it on CPU.
    fallback = build_pod(gpus, 0, 0, LaunchPlan("s3://b/j", None, cpu_fallback=True), SETTINGS)
    assert "--processes" in fallback["spec"]["containers"][0]["command"]
    cpu = build_pod(job(resources={"workers": 2, "gpusPerWorker": 0, "processesPerWorker": 2}), 1, 0, GPU_PLAN,
                    SETTINGS)
    assert env_of(cpu)["WORLD_SIZE"] == "4" and env_of(cpu)["NODE_RANK"] == "1"
    single = build_pod(job(), 0, 0, GPU_PLAN, SETTINGS)
    assert "--processes" not in single["spec"]["containers"][0]["command"]


TEMPLATE: dict[str, Any] = {
    "labels": {"team": "nlp"}, "annotations": {"cost-center": "42"},
    "nodeSelector": {"pool": "h100"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}},
    "priorityClassName": "training", "runtimeClassName": "nvidia",
    "imagePullSecrets": [{"name": "registry"}],
    "volumes": [{"name": "cache", "persistentVolumeClaim": {"claimName": "datasets"}}],
    "volumeMounts": [{"name": "cache", "mountPath": "/data", "readOnly": True}],
    "shmSize": "16Gi", "env": [{"name": "NCCL_DEBUG", "value": "INFO"},
                               {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}],
}


def test_the_pod_template_reaches_the_pod() -> None:
    pod = build_pod(job(podTemplate=TEMPLATE), 0, 0, GPU_PLAN, SETTINGS)
    spec, container = pod["spec"], pod["spec"]["containers"][0]
    assert pod["metadata"]["labels"]["team"] == "nlp" and pod["metadata"]["annotations"]["cost-center"] == "42"
    assert spec["nodeSelector"] == {"pool": "h100"}
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                                   TEMPLATE["tolerations"][0]]
    assert spec["affinity"] == TEMPLATE["affinity"]
    assert (spec["priorityClassName"], spec["runtimeClassName"]) == ("training", "nvidia")
    assert spec["imagePullSecrets"] == [{"name": "registry"}]
    assert {"name": "cache", "persistentVolumeClaim": {"claimName": "datasets", "readOnly": False}} in spec["volumes"]
    assert {"name": "cache", "mountPath": "/data", "readOnly": True} in container["volumeMounts"]
    assert {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}} in spec["volumes"]
    env = env_of(pod)
    assert env["NCCL_DEBUG"] == "INFO" and env["HF_TOKEN"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    assert "schedulerName" not in spec  # the cluster's default scheduler


def test_operator_defaults_merge_under_the_job_template() -> None:
    defaults = PodTemplateSpec.model_validate({
        "labels": {"team": "platform", "billing": "gpu"}, "nodeSelector": {"pool": "a100"},
        "tolerations": [{"key": "gpu-pool", "operator": "Exists"}], "priorityClassName": "batch",
        "env": [{"name": "NCCL_DEBUG", "value": "WARN"}, {"name": "NCCL_IB_DISABLE", "value": "1"}],
        "imagePullSecrets": [{"name": "cluster-registry"}]})
    settings = replace(SETTINGS, pod_defaults=defaults)
    pod = build_pod(job(podTemplate=TEMPLATE), 0, 0, GPU_PLAN, settings)
    # Maps key by key and single values: the job wins where it speaks, the defaults fill the rest.
    assert pod["metadata"]["labels"]["team"] == "nlp" and pod["metadata"]["labels"]["billing"] == "gpu"
    assert pod["spec"]["nodeSelector"] == {"pool": "h100"} and pod["spec"]["priorityClassName"] == "training"
    # Lists: tolerations and pull secrets add up; env merges by name.
    assert {"key": "gpu-pool", "operator": "Exists"} in pod["spec"]["tolerations"]
    assert TEMPLATE["tolerations"][0] in pod["spec"]["tolerations"]
    assert pod["spec"]["imagePullSecrets"] == [{"name": "cluster-registry"}, {"name": "registry"}]
    env = env_of(pod)
    assert env["NCCL_DEBUG"] == "INFO" and env["NCCL_IB_DISABLE"] == "1"
    # A job without a template gets the defaults as they are.
    plain = build_pod(job(), 0, 0, GPU_PLAN, settings)
    assert plain["spec"]["priorityClassName"] == "batch" and plain["spec"]["nodeSelector"] == {"pool": "a100"}


def test_kueue_admits_each_attempt_as_one_pod_group() -> None:
    queued = job(resources={"workers": 3}, gang={"queueName": "team-a"})
    for attempt in (0, 1):
        for pod in build_pods(queued, attempt, GPU_PLAN, SETTINGS):
            labels, annotations = pod["metadata"]["labels"], pod["metadata"]["annotations"]
            assert labels["kueue.x-k8s.io/queue-name"] == "team-a"
            assert labels["kueue.x-k8s.io/pod-group-name"] == f"tiny-shakespeare-ptj-a{attempt}"
            assert annotations["kueue.x-k8s.io/pod-group-total-count"] == "3"
    assert build_pod_group(queued, SETTINGS) is None  # Kueue needs no PodGroup object
    plain = build_pod(job(), 0, 0, GPU_PLAN, SETTINGS)
    assert not any(k.startswith("kueue.x-k8s.io/") for k in plain["metadata"]["labels"])


def test_volcano_and_coscheduling_get_a_pod_group_of_all_workers() -> None:
    volcano = job(resources={"workers": 4}, gang={"podGroup": "volcano"}, podTemplate={"priorityClassName": "high"})
    group = build_pod_group(volcano, SETTINGS)
    assert group is not None
    assert (group["apiVersion"], group["kind"], group["metadata"]["name"]) == (
        "scheduling.volcano.sh/v1beta1", "PodGroup", "tiny-shakespeare-ptj")
    assert group["spec"] == {"minMember": 4, "priorityClassName": "high"}
    assert group["metadata"]["ownerReferences"][0]["uid"] == UID
    pod = build_pod(volcano, 2, 0, GPU_PLAN, SETTINGS)
    assert pod["spec"]["schedulerName"] == "volcano"
    assert pod["metadata"]["annotations"]["scheduling.k8s.io/group-name"] == "tiny-shakespeare-ptj"

    cosched = job(resources={"workers": 2}, gang={"podGroup": "coscheduling"})
    group = build_pod_group(cosched, SETTINGS)
    assert group is not None and group["apiVersion"] == "scheduling.x-k8s.io/v1alpha1"
    assert group["spec"] == {"minMember": 2}
    pod = build_pod(cosched, 0, 0, GPU_PLAN, SETTINGS)
    assert pod["spec"]["schedulerName"] == "scheduler-plugins-scheduler"
    assert pod["metadata"]["labels"]["scheduling.x-k8s.io/pod-group"] == "tiny-shakespeare-ptj"
    # The operator's default gang applies to jobs that name none; a job's own wins.
    settings = replace(SETTINGS, gang_defaults=GangSpec(pod_group="coscheduling", queue_name="default"))
    assert build_pod_group(job(), settings)["apiVersion"] == "scheduling.x-k8s.io/v1alpha1"  # type: ignore[index]
    assert build_pod_group(volcano, settings)["apiVersion"] == "scheduling.volcano.sh/v1beta1"  # type: ignore[index]
    assert build_pod(job(), 0, 0, GPU_PLAN, settings)["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "default"
def test_every_accepted_name_makes_valid_object_names() -> None:
    """The longest name the CRD accepts still yields a Service that is a DNS-1035 label and label
    values of at most 63 characters (`7b-pretrain` and 60 characters are refused: test_spec)."""
    dns_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
    for name in ("a" * 59, "x", "a-1"):
        named = job(with_change(example("pretrain-tiny.yaml")[0], "metadata.name", name))
        service = build_service(named)["metadata"]["name"]
        assert dns_1035.match(service) and len(service) <= 63, service
        for pod in build_pods(named, 12, LaunchPlan("s3://b/c", None, False), SETTINGS):
            assert all(len(value) <= 63 for value in pod["metadata"]["labels"].values())
            assert len(pod["metadata"]["name"]) <= 253 and dns_1035.match(pod["spec"]["subdomain"])
