"""Pure functions from a job to the objects it needs: no API calls, unit-tested with no cluster.

The shapes are the pod contract in docs/pod-contract.md.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from kubeforge.operator.settings import OperatorSettings
from kubeforge.spec import HUB_SCHEME, KINDS, FinetuneJob, GangSpec, Job, PodTemplateSpec, merge_pod_templates

C10D_PORT = 29500
TERMINATION_LOG = "/dev/termination-log"
TRAINER_UID = 10001

LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_JOB = "kubeforge.io/job-name"
LABEL_KIND = "kubeforge.io/job-kind"
LABEL_RANK = "kubeforge.io/rank"
LABEL_ATTEMPT = "kubeforge.io/attempt"
ANNOTATION_POD_SHAPE = "kubeforge.io/pod-shape"
ANNOTATION_CPU_FALLBACK = "kubeforge.io/cpu-fallback"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}

# Gang admission. Kueue's plain-pod integration admits the pods sharing a pod-group name as one
# workload once the group's total count of pods exists.
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_POD_GROUP_LABEL = "kueue.x-k8s.io/pod-group-name"
KUEUE_TOTAL_COUNT_ANNOTATION = "kueue.x-k8s.io/pod-group-total-count"
# A failed pod ends its Kueue workload at once: the operator restarts the whole gang as a new group.
KUEUE_RETRIABLE_ANNOTATION = "kueue.x-k8s.io/retriable-in-group"
VOLCANO_GROUP_ANNOTATION = "scheduling.k8s.io/group-name"
VOLCANO_SCHEDULER = "volcano"
COSCHEDULING_GROUP_LABEL = "scheduling.x-k8s.io/pod-group"
POD_GROUP_API = {"volcano": "scheduling.volcano.sh/v1beta1", "coscheduling": "scheduling.x-k8s.io/v1alpha1"}


@dataclass(frozen=True)
class LaunchPlan:
    """What the operator decided for one gang of pods."""

    checkpoint_uri: str
    base_model_uri: str | None
    cpu_fallback: bool
    #: Where an hf:// base model is kept once fetched: shared by the namespace's jobs.
    base_model_cache: str | None = None


def group_name(job: Job) -> str:
    """The job's headless Service, and the stem of its pod names."""
    return f"{job.name}-{KINDS[job.kind].short_name}"


def pod_name(job: Job, rank: int, attempt: int) -> str:
    return f"{group_name(job)}-w{rank}-a{attempt}"


def selector(job: Job) -> dict[str, str]:
    return {LABEL_JOB: job.name, LABEL_KIND: KINDS[job.kind].short_name}


def label_selector(job: Job) -> str:
    return ",".join(f"{k}={v}" for k, v in selector(job).items())


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


def pod_shape(job: Job) -> str:
    """A digest of the spec fields that shape pods: pods of another shape belong to an older spec."""
    spec = job.spec
    shaping = {"resources": spec.resources.model_dump(), "metrics": spec.metrics.model_dump(),
               "s3": spec.s3.model_dump() if spec.s3 else None,
               "podTemplate": spec.pod_template.model_dump() if spec.pod_template else None,
               "gang": spec.gang.model_dump() if spec.gang else None}
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:12]


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


def _env(job: Job, rank: int, settings: OperatorSettings, extra: PodTemplateSpec) -> list[dict[str, Any]]:
    processes = processes_per_pod(job)
    ranks: list[dict[str, Any]] = [{"name": "NODE_RANK", "value": str(rank)},
                                   {"name": "WORLD_SIZE", "value": str(job.spec.resources.world_size())}]
    if processes == 1:
        # One process: it is the pod, and runs without the launcher that sets these per process.
        ranks += [{"name": "RANK", "value": str(rank)}, {"name": "LOCAL_RANK", "value": "0"}]
    env: list[dict[str, Any]] = [
        # JSON, which YAML readers read too: a YAML dump of the spec was a quarter of a reconcile's CPU.
        {"name": "KUBEFORGE_JOB", "value": json.dumps(job.to_manifest())},
        *ranks,
        {"name": "MASTER_ADDR", "value": f"w0.{group_name(job)}"},
        {"name": "MASTER_PORT", "value": str(C10D_PORT)},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "HF_HOME", "value": "/tmp/huggingface"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    endpoint = (job.spec.s3.endpoint_url if job.spec.s3 else None) or settings.s3_endpoint
    if endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": endpoint})
    token = job.spec.base_model.token_secret_ref if isinstance(job, FinetuneJob) else None
    if token is not None:
        # By reference, as the S3 credentials: the token itself is in no spec, status or log.
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": _dump(token)}})
    # The template's variables come last: a template may override HF_HOME or PYTHONUNBUFFERED, never
    # a rank (the spec refuses those names).
    extra_env = [_dump(e) for e in extra.env or []]
    overridden = {e["name"] for e in extra_env}
    return [e for e in env if e["name"] not in overridden] + extra_env


def _dump(model: Any) -> dict[str, Any]:
    """A spec model as the Kubernetes object it mirrors."""
    return dict(model.model_dump(mode="json", by_alias=True, exclude_none=True))


def credentials_secret(job: Job, settings: OperatorSettings) -> str | None:
    return (job.spec.s3.credentials_secret if job.spec.s3 else None) or settings.s3_credentials_secret


def _scheduling(job: Job, rank: int, attempt: int, settings: OperatorSettings
                ) -> tuple[dict[str, str], dict[str, str], str | None]:
    """The labels, annotations and schedulerName that put the pod in its gang."""
    admission = gang(job, settings)
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}
    scheduler = None
    if admission.queue_name:
        # One Kueue workload per attempt: a restarted gang is admitted afresh, as a whole.
        labels |= {KUEUE_QUEUE_LABEL: admission.queue_name,
                   KUEUE_POD_GROUP_LABEL: f"{group_name(job)}-a{attempt}"}
        annotations |= {KUEUE_TOTAL_COUNT_ANNOTATION: str(job.spec.resources.workers),
                        KUEUE_RETRIABLE_ANNOTATION: "false"}
    if admission.pod_group == "volcano":
        annotations[VOLCANO_GROUP_ANNOTATION] = group_name(job)
        scheduler = VOLCANO_SCHEDULER
    elif admission.pod_group == "coscheduling":
        labels[COSCHEDULING_GROUP_LABEL] = group_name(job)
        scheduler = settings.coscheduling_scheduler
    return labels, annotations, scheduler


def trainer_command(job: Job, plan: LaunchPlan) -> list[str]:
    command = ["kubeforge", "train", "--spec-env", "KUBEFORGE_JOB", "--checkpoint-uri", plan.checkpoint_uri]
    if plan.base_model_uri:
        command += ["--base-model-uri", plan.base_model_uri]
    if plan.base_model_cache and (plan.base_model_uri or "").startswith(HUB_SCHEME):
        command += ["--base-model-cache", plan.base_model_cache]
    processes = processes_per_pod(job)
    if processes > 1:
        command += ["--processes", str(processes)]
    return command + ["--termination-log", TERMINATION_LOG]


def build_pod(job: Job, rank: int, attempt: int, plan: LaunchPlan, settings: OperatorSettings) -> dict[str, Any]:
    resources = job.spec.resources
    template = pod_template(job, settings)
    gpus = 0 if plan.cpu_fallback else resources.gpus_per_worker
    limits: dict[str, str] = {"memory": resources.memory}
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    port = job.spec.metrics.port
    # Each process serves its metrics on the port plus its local rank.
    metrics_ports = [{"name": "metrics" if local == 0 else f"metrics-{local}", "containerPort": port + local}
                     for local in range(processes_per_pod(job))] if port else []
    container: dict[str, Any] = {
        "name": "trainer",
        "image": settings.trainer_image if gpus else settings.trainer_cpu_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": trainer_command(job, plan),
        "env": _env(job, rank, settings, template),
        "ports": [{"name": "c10d", "containerPort": C10D_PORT}, *metrics_ports],
        "resources": {"requests": {"cpu": resources.cpu, "memory": resources.memory}, "limits": limits},
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}, {"name": "tmp", "mountPath": "/tmp"},
                         *(_dump(m) for m in template.volume_mounts or [])],
    }
    secret = credentials_secret(job, settings)
    if secret:
        container["envFrom"] = [{"secretRef": {"name": secret}}]
    gang_labels, gang_annotations, gang_scheduler = _scheduling(job, rank, attempt, settings)
    annotations = {**(template.annotations or {}), **gang_annotations,
                   ANNOTATION_POD_SHAPE: pod_shape(job), ANNOTATION_CPU_FALLBACK: str(plan.cpu_fallback).lower()}
    if port:
        annotations |= {"prometheus.io/scrape": "true", "prometheus.io/port": str(port),
                        "prometheus.io/path": "/metrics"}
    shm: dict[str, Any] = {"medium": "Memory"}
    if template.shm_size:
        shm["sizeLimit"] = template.shm_size
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        # SIGTERM (suspend, eviction, preemption) gives the trainer this long to commit a checkpoint.
        "terminationGracePeriodSeconds": job.spec.termination_grace_period_seconds,
        "hostname": f"w{rank}",
        "subdomain": group_name(job),
        "automountServiceAccountToken": False,  # the trainer never talks to the API server
        "securityContext": {"runAsNonRoot": True, "runAsUser": TRAINER_UID, "runAsGroup": TRAINER_UID,
                            "fsGroup": TRAINER_UID, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": [{"name": "shm", "emptyDir": shm}, {"name": "tmp", "emptyDir": {}},
                    *(_dump(v) for v in template.volumes or [])],
    }
    tolerations = [GPU_TOLERATION] if gpus else []
    tolerations += [t for t in (_dump(t) for t in template.tolerations or []) if t not in tolerations]
    optional: dict[str, Any] = {
        "tolerations": tolerations,
        "nodeSelector": template.node_selector,
        "affinity": _dump(template.affinity) if template.affinity else None,
        "priorityClassName": template.priority_class_name,
        "schedulerName": template.scheduler_name or gang_scheduler,
        "runtimeClassName": template.runtime_class_name,
        "imagePullSecrets": [_dump(s) for s in template.image_pull_secrets or []],
    }
    pod_spec |= {key: value for key, value in optional.items() if value}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": _metadata(job, pod_name(job, rank, attempt),
                              {**(template.labels or {}), **gang_labels, LABEL_MANAGED_BY: "kubeforge",
                               **selector(job), LABEL_RANK: str(rank), LABEL_ATTEMPT: str(attempt)},
                              annotations),
        "spec": pod_spec,
    }


def build_pods(job: Job, attempt: int, plan: LaunchPlan, settings: OperatorSettings) -> list[dict[str, Any]]:
    return [build_pod(job, rank, attempt, plan, settings) for rank in range(job.spec.resources.workers)]

