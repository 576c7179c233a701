"""Pure functions from a job to the objects it needs: no API calls, unit-tested with no cluster.

The shapes are the pod contract in docs/pod-contract.md.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import yaml

from kubeforge.operator.settings import OperatorSettings
from kubeforge.spec import KINDS, Job

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


@dataclass(frozen=True)
class LaunchPlan:
    """What the operator decided for one gang of pods."""

    checkpoint_uri: str
    base_model_uri: str | None
    cpu_fallback: bool


def group_name(job: Job) -> str:
    """The job's headless Service, and the stem of its pod names."""
    return f"{job.name}-{KINDS[job.kind].short_name}"


def pod_name(job: Job, rank: int, attempt: int) -> str:
    return f"{group_name(job)}-w{rank}-a{attempt}"


def selector(job: Job) -> dict[str, str]:
    return {LABEL_JOB: job.name, LABEL_KIND: KINDS[job.kind].short_name}


def label_selector(job: Job) -> str:
    return ",".join(f"{k}={v}" for k, v in selector(job).items())


def owner_reference(job: Job) -> dict[str, Any]:
    if not job.metadata.uid:
        raise ValueError(f"{job.kind} {job.namespace}/{job.name} has no uid: read it from the API server")
    return {"apiVersion": KINDS[job.kind].api_version, "kind": job.kind, "name": job.name, "uid": job.metadata.uid,
            "controller": True, "blockOwnerDeletion": True}


def pod_shape(job: Job) -> str:
    """A digest of the spec fields that shape pods: pods of another shape belong to an older spec."""
    spec = job.spec
    shaping = {"resources": spec.resources.model_dump(), "metrics": spec.metrics.model_dump(),
               "s3": spec.s3.model_dump() if spec.s3 else None}
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:12]


def get_service(job: Job) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": group_name(job), "namespace": job.namespace,
                     "labels": {LABEL_MANAGED_BY: "kubeforge", **selector(job)},
                     "ownerReferences": [owner_reference(job)]},
        "spec": {
            "clusterIP": "None",
            # Rendezvous must work before the pods are Ready: they become ready only by training.
            "publishNotReadyAddresses": True,
            "selector": selector(job),
            "ports": [{"name": "c10d", "port": C10D_PORT, "targetPort": C10D_PORT}],
        },
    }


def _env(job: Job, rank: int, settings: OperatorSettings) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "KUBEFORGE_JOB", "value": yaml.safe_dump(job.to_manifest(), sort_keys=False)},
        {"name": "RANK", "value": str(rank)},
        {"name": "WORLD_SIZE", "value": str(job.spec.resources.workers)},
        {"name": "LOCAL_RANK", "value": "0"},
        {"name": "MASTER_ADDR", "value": f"w0.{group_name(job)}"},
        {"name": "MASTER_PORT", "value": str(C10D_PORT)},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "HF_HOME", "value": "/tmp/huggingface"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    endpoint = (job.spec.s3.endpoint_url if job.spec.s3 else None) or settings.s3_endpoint
    if endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": endpoint})
    return env


def credentials_secret(job: Job, settings: OperatorSettings) -> str | None:
    return (job.spec.s3.credentials_secret if job.spec.s3 else None) or settings.s3_credentials_secret


def get_pod(job: Job, rank: int, attempt: int, plan: LaunchPlan, settings: OperatorSettings) -> dict[str, Any]:
    resources = job.spec.resources
    gpus = 0 if plan.cpu_fallback else resources.gpus_per_worker
    command = ["kubeforge", "train", "--spec-env", "KUBEFORGE_JOB", "--checkpoint-uri", plan.checkpoint_uri]
    if plan.base_model_uri:
        command += ["--base-model-uri", plan.base_model_uri]
    command += ["--termination-log", TERMINATION_LOG]
    limits: dict[str, str] = {"memory": resources.memory}
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    port = job.spec.metrics.port
    container: dict[str, Any] = {
        "name": "trainer",
        "image": settings.trainer_image if gpus else settings.trainer_cpu_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": command,
        "env": _env(job, rank, settings),
        "ports": [{"name": "c10d", "containerPort": C10D_PORT}]
        + ([{"name": "metrics", "containerPort": port}] if port else []),
        "resources": {"requests": {"cpu": resources.cpu, "memory": resources.memory}, "limits": limits},
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}, {"name": "tmp", "mountPath": "/tmp"}],
    }
    secret = credentials_secret(job, settings)
    if secret:
        container["envFrom"] = [{"secretRef": {"name": secret}}]
    annotations = {ANNOTATION_POD_SHAPE: pod_shape(job), ANNOTATION_CPU_FALLBACK: str(plan.cpu_fallback).lower()}
    if port:
        annotations |= {"prometheus.io/scrape": "true", "prometheus.io/port": str(port),
                        "prometheus.io/path": "/metrics"}
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
        "volumes": [{"name": "shm", "emptyDir": {"medium": "Memory"}}, {"name": "tmp", "emptyDir": {}}],
    }
    if gpus:
        pod_spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(job, rank, attempt),
            "namespace": job.namespace,
            "labels": {LABEL_MANAGED_BY: "kubeforge", **selector(job), LABEL_RANK: str(rank),
                       LABEL_ATTEMPT: str(attempt)},
            "annotations": annotations,
            "ownerReferences": [owner_reference(job)],
        },
        "spec": pod_spec,
    }


def get_pods(job: Job, attempt: int, plan: LaunchPlan, settings: OperatorSettings) -> list[dict[str, Any]]:
    return [get_pod(job, rank, attempt, plan, settings) for rank in range(job.spec.resources.workers)]
