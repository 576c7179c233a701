"""Pure functions from a job to the objects it needs: no API calls, unit-tested with no cluster.

The shapes are the pod contract in docs/pod-contract.md.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubeforge.operator.contract import (
    ANNOTATION_CPU_FALLBACK,
    ANNOTATION_POD_SHAPE,
    COSCHEDULING_GROUP_LABEL,
    KUEUE_POD_GROUP_LABEL,
    KUEUE_QUEUE_LABEL,
    KUEUE_RETRIABLE_ANNOTATION,
    KUEUE_TOTAL_COUNT_ANNOTATION,
    LABEL_ATTEMPT,
    LABEL_MANAGED_BY,
    LABEL_RANK,
    TRAINER_CONTAINER,
    VOLCANO_GROUP_ANNOTATION,
    LaunchPlan,
    group_name,
    hostname,
    pod_name,
    pod_shape,
    selector,
)
from kubeforge.operator.settings import OperatorSettings
from kubeforge.spec import HUB_SCHEME, KINDS, FinetuneJob, GangSpec, Job, PodTemplateSpec, merge_pod_templates

C10D_PORT = 29500
TERMINATION_LOG = "/dev/termination-log"
TRAINER_UID = 10001

GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
VOLCANO_SCHEDULER = "volcano"
POD_GROUP_API = {"volcano": "scheduling.volcano.sh/v1beta1", "coscheduling": "scheduling.x-k8s.io/v1alpha1"}


def owner_references(job: Job) -> list[dict[str, Any]]:
    """The job owns its objects, so deleting it deletes them. A job read from the API server always
    has a uid; one read from a file (`kubeforge render`) has none, and its objects no owner yet."""
    if not job.metadata.uid:
        return []
    return [{"apiVersion": KINDS[job.kind].api_version, "kind": job.kind, "name": job.name, "uid": job.metadata.uid,
             "controller": True, "blockOwnerDeletion": True}]


def _metadata(job: Job, name: str, labels: dict[str, str], annotations: dict[str, str] | None = None
              ) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": job.namespace, "labels": labels}
    if annotations is not None:
        metadata["annotations"] = annotations
    owners = owner_references(job)
    if owners:
        metadata["ownerReferences"] = owners
    return metadata


def build_service(job: Job) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, group_name(job), {LABEL_MANAGED_BY: "kubeforge", **selector(job)}),
        "spec": {
            "clusterIP": "None",
            # Rendezvous must work before the pods are Ready: they become ready only by training.
            "publishNotReadyAddresses": True,
            "selector": selector(job),
            "ports": [{"name": "c10d", "port": C10D_PORT, "targetPort": C10D_PORT}],
        },
    }


def pod_template(job: Job, settings: OperatorSettings) -> PodTemplateSpec:
    """The job's pod template over the operator's defaults (the job wins)."""
    return merge_pod_templates(settings.pod_defaults, job.spec.pod_template or PodTemplateSpec())


def gang(job: Job, settings: OperatorSettings) -> GangSpec:
    """The job's gang admission over the operator's defaults (the job wins)."""
    return (job.spec.gang or GangSpec()).merged_under(settings.gang_defaults)


def build_pod_group(job: Job, settings: OperatorSettings) -> dict[str, Any] | None:
    """The PodGroup that gangs the job's pods for Volcano or the coscheduling plugin, or None.

    One per job, owned by it, created before the pods; restarted gangs join the same group."""
    kind = gang(job, settings).pod_group
    if kind is None:
        return None
    spec: dict[str, Any] = {"minMember": job.spec.resources.workers}
    priority = pod_template(job, settings).priority_class_name
    if kind == "volcano" and priority:
        spec["priorityClassName"] = priority
    return {
        "apiVersion": POD_GROUP_API[kind],
        "kind": "PodGroup",
        "metadata": _metadata(job, group_name(job), {LABEL_MANAGED_BY: "kubeforge", **selector(job)}),
        "spec": spec,
    }


def processes_per_pod(job: Job) -> int:
    return job.spec.resources.processes()


def _dump(model: Any) -> dict[str, Any]:
    """A spec model as the Kubernetes object it mirrors."""
    return dict(model.model_dump(mode="json", by_alias=True, exclude_none=True))


def credentials_secret(job: Job, settings: OperatorSettings) -> str | None:
    return (job.spec.s3.credentials_secret if job.spec.s3 else None) or settings.s3_credentials_secret


def trainer_command(job: Job, plan: LaunchPlan) -> list[str]:
    command = ["kubeforge", "train", "--spec-env", "KUBEFORGE_JOB", "--checkpoint-uri", plan.checkpoint_uri]
    if plan.base_model_uri:
        command += ["--base-model-uri", plan.base_model_uri]
    if plan.base_model_cache and (plan.base_model_uri or "").startswith(HUB_SCHEME):
        command += ["--base-model-cache", plan.base_model_cache]
    if plan.corpus_cache and job.kind == "PretrainJob":
        command += ["--corpus-cache", plan.corpus_cache]
    if plan.teacher_uri:
        command += ["--teacher-uri", plan.teacher_uri]
    processes = processes_per_pod(job)
    if processes > 1:
        command += ["--processes", str(processes)]
    return command + ["--termination-log", TERMINATION_LOG]


# ---------------------------------------------------------------------------------------------
# A pod is built by contributions, as Kubeflow Trainer's runtime plugins build theirs: each one adds
# one concern to the pod, and POD_CONTRIBUTIONS runs them in the order they must run.


@dataclass(frozen=True)
class PodInputs:
    """What one pod is built from, each part worked out once for all the contributions."""

    job: Job
    rank: int
    attempt: int
    plan: LaunchPlan
    settings: OperatorSettings
    #: The job's pod template over the operator's defaults.
    template: PodTemplateSpec
    #: The job's gang admission over the operator's defaults.
    admission: GangSpec
    #: The pod's GPUs: none on CPU fallback.
    gpus: int


Contribution = Callable[[dict[str, Any], PodInputs], None]


def _trainer(pod: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = pod["spec"]["containers"][0]
    return container


def _template_metadata(pod: dict[str, Any], inputs: PodInputs) -> None:
    """The template's labels and annotations, before any of the operator's: its own keys win."""
    pod["metadata"]["labels"] |= inputs.template.labels or {}
    pod["metadata"]["annotations"] |= inputs.template.annotations or {}


def _gang_admission(pod: dict[str, Any], inputs: PodInputs) -> None:
    """The labels, annotations and schedulerName that put the pod in its gang."""
    job, admission = inputs.job, inputs.admission
    labels, annotations = pod["metadata"]["labels"], pod["metadata"]["annotations"]
    if admission.queue_name:
        # One Kueue workload per attempt: a restarted gang is admitted afresh, as a whole.
        labels |= {KUEUE_QUEUE_LABEL: admission.queue_name,
                   KUEUE_POD_GROUP_LABEL: f"{group_name(job)}-a{inputs.attempt}"}
        annotations |= {KUEUE_TOTAL_COUNT_ANNOTATION: str(job.spec.resources.workers),
                        KUEUE_RETRIABLE_ANNOTATION: "false"}
    if admission.pod_group == "volcano":
        annotations[VOLCANO_GROUP_ANNOTATION] = group_name(job)
        pod["spec"]["schedulerName"] = VOLCANO_SCHEDULER
    elif admission.pod_group == "coscheduling":
        labels[COSCHEDULING_GROUP_LABEL] = group_name(job)
        pod["spec"]["schedulerName"] = inputs.settings.coscheduling_scheduler


def _identity(pod: dict[str, Any], inputs: PodInputs) -> None:
    """Which job, rank, attempt and spec the pod is (the lifecycle reads these back), and its DNS
    name under the job's Service, through which the workers meet."""
    job = inputs.job
    pod["metadata"]["labels"] |= {LABEL_MANAGED_BY: "kubeforge", **selector(job), LABEL_RANK: str(inputs.rank),
                                  LABEL_ATTEMPT: str(inputs.attempt)}
    pod["metadata"]["annotations"] |= {ANNOTATION_POD_SHAPE: pod_shape(job),
                                       ANNOTATION_CPU_FALLBACK: str(inputs.plan.cpu_fallback).lower()}
    pod["spec"] |= {
        "restartPolicy": "Never",  # a failed worker restarts the whole gang, as a new attempt
        # SIGTERM (suspend, eviction, preemption) gives the trainer this long to commit a checkpoint.
        "terminationGracePeriodSeconds": job.spec.termination_grace_period_seconds,
        "hostname": hostname(inputs.rank),
        "subdomain": group_name(job),
    }


def _trainer_container(pod: dict[str, Any], inputs: PodInputs) -> None:
    """The trainer's image, command and rendezvous variables, and where it leaves its outcome."""
    job, rank, settings = inputs.job, inputs.rank, inputs.settings
    ranks: list[dict[str, Any]] = [{"name": "NODE_RANK", "value": str(rank)},
                                   {"name": "WORLD_SIZE", "value": str(job.spec.resources.world_size())}]
    if processes_per_pod(job) == 1:
        # One process: it is the pod, and runs without the launcher that sets these per process.
        ranks += [{"name": "RANK", "value": str(rank)}, {"name": "LOCAL_RANK", "value": "0"}]
    _trainer(pod).update({
        "image": settings.trainer_image if inputs.gpus else settings.trainer_cpu_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": trainer_command(job, inputs.plan),
        "env": [
            # JSON, which YAML readers read too: a YAML dump of the spec was a quarter of a reconcile's CPU.
            {"name": "KUBEFORGE_JOB", "value": json.dumps(job.to_manifest())},
            *ranks,
            {"name": "MASTER_ADDR", "value": f"{hostname(0)}.{group_name(job)}"},
            {"name": "MASTER_PORT", "value": str(C10D_PORT)},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "HF_HOME", "value": "/tmp/huggingface"},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
        ],
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    })


def _resources(pod: dict[str, Any], inputs: PodInputs) -> None:
    resources = inputs.job.spec.resources
    limits: dict[str, str] = {"memory": resources.memory}
    if inputs.gpus:
        limits["nvidia.com/gpu"] = str(inputs.gpus)
    _trainer(pod)["resources"] = {"requests": {"cpu": resources.cpu, "memory": resources.memory}, "limits": limits}


def _ports(pod: dict[str, Any], inputs: PodInputs) -> None:
    """The rendezvous port and, with metrics.port, the metrics ports and Prometheus' annotations."""
    port = inputs.job.spec.metrics.port
    # Each process serves its metrics on the port plus its local rank.
    metrics_ports = [{"name": "metrics" if local == 0 else f"metrics-{local}", "containerPort": port + local}
                     for local in range(processes_per_pod(inputs.job))] if port else []
    _trainer(pod)["ports"] = [{"name": "c10d", "containerPort": C10D_PORT}, *metrics_ports]
    if port:
        pod["metadata"]["annotations"] |= {"prometheus.io/scrape": "true", "prometheus.io/port": str(port),
                                           "prometheus.io/path": "/metrics"}


def _storage(pod: dict[str, Any], inputs: PodInputs) -> None:
    """The S3 endpoint; the S3 credentials and an hf:// base model's token only as references to
    their Secrets, so neither is in any spec, status or log."""
    job, settings = inputs.job, inputs.settings
    container = _trainer(pod)
    endpoint = (job.spec.s3.endpoint_url if job.spec.s3 else None) or settings.s3_endpoint
    if endpoint:
        container["env"].append({"name": "AWS_ENDPOINT_URL", "value": endpoint})
    secret = credentials_secret(job, settings)
    if secret:
        container["envFrom"] = [{"secretRef": {"name": secret}}]
    token = job.spec.base_model.token_secret_ref if isinstance(job, FinetuneJob) else None
    if token is not None:
        container["env"].append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": _dump(token)}})


def _security(pod: dict[str, Any], inputs: PodInputs) -> None:
    """Non-root, no privilege escalation, no capabilities, no service account token: the trainer
    never talks to the API server, and tenants share the nodes."""
    pod["spec"]["automountServiceAccountToken"] = False
    pod["spec"]["securityContext"] = {"runAsNonRoot": True, "runAsUser": TRAINER_UID, "runAsGroup": TRAINER_UID,
                                      "fsGroup": TRAINER_UID, "seccompProfile": {"type": "RuntimeDefault"}}
    _trainer(pod)["securityContext"] = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def _volumes(pod: dict[str, Any], inputs: PodInputs) -> None:
    """Memory-backed /dev/shm (the data loader's workers) and a writable /tmp, then the template's."""
    template = inputs.template
    shm: dict[str, Any] = {"medium": "Memory"}
    if template.shm_size:
        shm["sizeLimit"] = template.shm_size
    pod["spec"]["volumes"] = [{"name": "shm", "emptyDir": shm}, {"name": "tmp", "emptyDir": {}},
                              *(_dump(v) for v in template.volumes or [])]
    _trainer(pod)["volumeMounts"] = [{"name": "shm", "mountPath": "/dev/shm"}, {"name": "tmp", "mountPath": "/tmp"},
                                     *(_dump(m) for m in template.volume_mounts or [])]


def _template_env(pod: dict[str, Any], inputs: PodInputs) -> None:
    """The template's variables, after every other: a template may override HF_HOME or
    PYTHONUNBUFFERED, never a rank (the spec refuses those names)."""
    container = _trainer(pod)
    extra_env = [_dump(e) for e in inputs.template.env or []]
    overridden = {e["name"] for e in extra_env}
    container["env"] = [e for e in container["env"] if e["name"] not in overridden] + extra_env


def _scheduling(pod: dict[str, Any], inputs: PodInputs) -> None:
    """Where the pod may run: the GPU nodes' taint tolerated, then the template's placement fields,
    each only when set (the template's schedulerName over the gang's)."""
    template = inputs.template
    tolerations = [GPU_TOLERATION] if inputs.gpus else []
    tolerations += [t for t in (_dump(t) for t in template.tolerations or []) if t not in tolerations]
    placement: dict[str, Any] = {
        "tolerations": tolerations,
        "nodeSelector": template.node_selector,
        "affinity": _dump(template.affinity) if template.affinity else None,
        "priorityClassName": template.priority_class_name,
        "schedulerName": template.scheduler_name,
        "runtimeClassName": template.runtime_class_name,
        "imagePullSecrets": [_dump(s) for s in template.image_pull_secrets or []],
    }
    pod["spec"] |= {key: value for key, value in placement.items() if value}


#: The order matters where two contributions set one field: the template's labels and annotations
#: come before the operator's (which win), the gang's schedulerName before the template's (which
#: wins), and the storage variables before the template's env (which may override them).
POD_CONTRIBUTIONS: tuple[Contribution, ...] = (
    _template_metadata,
    _gang_admission,
    _identity,
    _trainer_container,
    _resources,
    _ports,
    _storage,
    _security,
    _volumes,
    _template_env,
    _scheduling,
)


def build_pod(job: Job, rank: int, attempt: int, plan: LaunchPlan, settings: OperatorSettings) -> dict[str, Any]:
    inputs = PodInputs(job=job, rank=rank, attempt=attempt, plan=plan, settings=settings,
                       template=pod_template(job, settings), admission=gang(job, settings),
                       gpus=0 if plan.cpu_fallback else job.spec.resources.gpus_per_worker)
    pod: dict[str, Any] = {"apiVersion": "v1", "kind": "Pod",
                           "metadata": _metadata(job, pod_name(job, rank, attempt), {}, {}),
                           "spec": {"containers": [{"name": TRAINER_CONTAINER}]}}
    for contribute in POD_CONTRIBUTIONS:
        contribute(pod, inputs)
    return pod


def build_pods(job: Job, attempt: int, plan: LaunchPlan, settings: OperatorSettings) -> list[dict[str, Any]]:
    return [build_pod(job, rank, attempt, plan, settings) for rank in range(job.spec.resources.workers)]

