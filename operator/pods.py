"""A job's pod as the operator reads it: parsed once, where it is listed or watched, into `PodView`.

The lifecycle and the reconciler read these fields, never the pod's JSON: what a label, a condition
or a termination message means is decided here, once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kubeforge.operator.contract import ANNOTATION_POD_SHAPE, LABEL_ATTEMPT, LABEL_RANK, TRAINER_CONTAINER
from kubeforge.spec import Job
from kubeforge.status import PENDING, TrainerError, TrainerSummary, read_termination_message


@dataclass(frozen=True)
class Termination:
    """How the trainer container ended (its state.terminated)."""

    exit_code: int | None
    message: str
    reason: str | None


@dataclass(frozen=True)
class PodView:
    """The parts of one pod that the operator decides on."""

    name: str
    #: The worker rank and gang attempt of its labels: None on a pod that lacks them.
    rank: int | None
    attempt: int | None
    phase: str
    #: Being deleted (metadata.deletionTimestamp): already gone, as far as deciding goes.
    deleting: bool
    #: The uid of the object controlling it: which job of the name it belongs to.
    owner_uid: str | None
    #: The pod shape it was built with (contract.pod_shape): another one belongs to an older spec.
    shape: str | None
    #: Kubernetes stopped it on purpose (eviction, preemption, node drain): its DisruptionTarget condition.
    disrupted: bool
    ip: str | None
    #: status.reason: why the kubelet failed it (Evicted, ...), if it says.
    reason: str | None
    termination: Termination | None
    #: What the trainer left in its termination message, if it is a summary or an error.
    outcome: TrainerSummary | TrainerError | None

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> PodView:
        metadata, status = body["metadata"], body.get("status") or {}
        labels, annotations = metadata.get("labels") or {}, metadata.get("annotations") or {}
        termination = _termination(status)
        return cls(
            name=metadata["name"], rank=_number(labels.get(LABEL_RANK)), attempt=_number(labels.get(LABEL_ATTEMPT)),
            phase=status.get("phase") or PENDING, deleting=bool(metadata.get("deletionTimestamp")),
            owner_uid=next((ref.get("uid") for ref in metadata.get("ownerReferences") or [] if ref.get("controller")),
                           None),
            shape=annotations.get(ANNOTATION_POD_SHAPE),
            disrupted=any(c.get("type") == "DisruptionTarget" and c.get("status") == "True"
                          for c in status.get("conditions") or []),
            ip=status.get("podIP"), reason=status.get("reason"), termination=termination,
            outcome=read_termination_message(termination.message) if termination else None)

    def failure(self) -> tuple[int | None, str]:
        """The exit code and the best account of why it failed: the trainer's error, the tail of its
        message (its log, with FallbackToLogsOnError), or what Kubernetes says."""
        ended = self.termination or Termination(None, "", None)
        error = self.outcome.error if isinstance(self.outcome, TrainerError) else None
        detail = error or ended.message.strip()[-300:] or ended.reason
        return ended.exit_code, str(detail or self.reason or "no reason given")


def _number(label: str | None) -> int | None:
    return int(label) if label is not None and label.isdigit() else None


def _termination(status: Mapping[str, Any]) -> Termination | None:
    for container in status.get("containerStatuses") or []:
        terminated = (container.get("state") or {}).get("terminated")
        if container.get("name") == TRAINER_CONTAINER and terminated is not None:
            return Termination(terminated.get("exitCode"), terminated.get("message") or "", terminated.get("reason"))
    return None


def owned(pods: Iterable[PodView], job: Job) -> list[PodView]:
    """The job's own pods: a job deleted and created again under its name must not adopt its
    predecessor's pods, which carry the same labels (and names) but the old job's uid."""
    uid = job.metadata.uid
    return [p for p in pods if uid is None or p.owner_uid == uid]


def live(pods: Iterable[PodView]) -> list[PodView]:
    """The pods not being deleted: those still to act on."""
    return [p for p in pods if not p.deleting]


def of_attempt(pods: Iterable[PodView], attempt: int) -> list[PodView]:
    return [p for p in pods if p.attempt == attempt]
