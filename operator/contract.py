"""The pod contract's names (docs/pod-contract.md): what the operator puts on its pods and reads back.

Building pods (builders.py) and deciding about them (lifecycle.py, pods.py) both follow this
contract, and neither depends on the other: the keys, the names, the pod shape and the launch plan
that passes from one to the other live here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from kubeforge.spec import KINDS, Job

LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_JOB = "kubeforge.io/job-name"
LABEL_KIND = "kubeforge.io/job-kind"
LABEL_RANK = "kubeforge.io/rank"
LABEL_ATTEMPT = "kubeforge.io/attempt"
ANNOTATION_POD_SHAPE = "kubeforge.io/pod-shape"
ANNOTATION_CPU_FALLBACK = "kubeforge.io/cpu-fallback"

# Gang admission. Kueue's plain-pod integration admits the pods sharing a pod-group name as one
# workload once the group's total count of pods exists.
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_POD_GROUP_LABEL = "kueue.x-k8s.io/pod-group-name"
KUEUE_TOTAL_COUNT_ANNOTATION = "kueue.x-k8s.io/pod-group-total-count"
# A failed pod ends its Kueue workload at once: the operator restarts the whole gang as a new group.
KUEUE_RETRIABLE_ANNOTATION = "kueue.x-k8s.io/retriable-in-group"
VOLCANO_GROUP_ANNOTATION = "scheduling.k8s.io/group-name"
COSCHEDULING_GROUP_LABEL = "scheduling.x-k8s.io/pod-group"

#: The trainer container's name: the pod's outcome is that container's termination.
TRAINER_CONTAINER = "trainer"


@dataclass(frozen=True)
class LaunchPlan:
    """What the operator decided for one gang of pods."""

    checkpoint_uri: str
    base_model_uri: str | None
    cpu_fallback: bool
    #: Where an hf:// base model is kept once fetched: shared by the namespace's jobs.
    base_model_cache: str | None = None
    #: Where a PretrainJob's corpus is kept prepared: shared by the namespace's jobs.
    corpus_cache: str | None = None
    #: method distill: the teacher model's URI, resolved as the base model's is.
    teacher_uri: str | None = None


def group_name(job: Job) -> str:
    """The job's headless Service, and the stem of its pod names."""
    return f"{job.name}-{KINDS[job.kind].short_name}"


def hostname(rank: int) -> str:
    """The worker's hostname under the Service: worker 0 is `w0.<group_name>` to the others."""
    return f"w{rank}"


def pod_name(job: Job, rank: int, attempt: int) -> str:
    return f"{group_name(job)}-{hostname(rank)}-a{attempt}"


def selector(job: Job) -> dict[str, str]:
    return {LABEL_JOB: job.name, LABEL_KIND: KINDS[job.kind].short_name}


def label_selector(job: Job) -> str:
    return ",".join(f"{k}={v}" for k, v in selector(job).items())


def pod_shape(job: Job) -> str:
    """A digest of the spec fields that shape pods: pods of another shape belong to an older spec."""
    spec = job.spec
    shaping = {"resources": spec.resources.model_dump(), "metrics": spec.metrics.model_dump(),
               "s3": spec.s3.model_dump() if spec.s3 else None,
               "podTemplate": spec.pod_template.model_dump() if spec.pod_template else None,
               "gang": spec.gang.model_dump() if spec.gang else None}
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:12]
