"""The operator's configuration, from its environment (the Helm chart sets these variables)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from kubeforge.operator.tenancy import SettingError, UriPolicy, namespace_allowed, parse_label_selector
from kubeforge.spec import GangSpec, PodTemplateSpec, field_problem

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class OperatorSettings:
    trainer_image: str = "ghcr.io/kubeforge/trainer:0.1.0"
    trainer_cpu_image: str = "ghcr.io/kubeforge/trainer-cpu:0.1.0"
    #: Where jobs without spec.checkpoint.uri keep checkpoints: s3://bucket/prefix.
    storage_root: str = "s3://kubeforge/jobs"
    s3_endpoint: str | None = None
    #: Secret with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, for jobs that name none themselves.
    s3_credentials_secret: str | None = None
    #: Seconds between reconciliations of each job (progress reaches status this often).
    resync_seconds: float = 5.0
    metrics_port: int = 8080
    #: The namespaces the operator watches and acts in; empty: every namespace.
    namespaces: tuple[str, ...] = ()
    #: A label selector (`kubeforge.io/tenant=enabled`): the operator acts only in namespaces whose
    #: labels match, even when it watches every namespace.
    namespace_selector: str = ""
    #: Jobs may use only URIs under <storage_root>/<namespace>/ (and the allowed prefixes).
    restrict_uris_to_namespace: bool = True
    #: URI prefixes every namespace may use as well; `{namespace}` stands for the job's namespace.
    allowed_uri_prefixes: tuple[str, ...] = ()
    image_pull_policy: str = "IfNotPresent"
    #: The cluster's CPU fallback policy: False makes jobs wait for GPUs even when their spec allows
    #: fallback (a job's own allowCpuFallback: false always wins).
    allow_cpu_fallback: bool = True
    #: Merged under every job's spec.podTemplate (the job wins): e.g. the GPU nodes' tolerations.
    pod_defaults: PodTemplateSpec = field(default_factory=PodTemplateSpec)
    #: Gang admission for jobs that set none themselves (spec.gang wins field by field).
    gang_defaults: GangSpec = field(default_factory=GangSpec)
    #: The schedulerName of pods in a coscheduling PodGroup: scheduler-plugins runs as a second scheduler.
    coscheduling_scheduler: str = "scheduler-plugins-scheduler"
    #: A failed reconciliation of a job is retried after this many seconds, doubled at each
    #: consecutive failure up to error_backoff_max_seconds.
    error_backoff_seconds: float = 1.0
    error_backoff_max_seconds: float = 60.0
    #: Liveness (/healthz) fails when jobs exist and none was reconciled for this long.
    liveness_seconds: float = 300.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> OperatorSettings:
        defaults = cls()
        namespaces = _list(env.get("KUBEFORGE_NAMESPACES"))
        selector = env.get("KUBEFORGE_NAMESPACE_SELECTOR", "").strip()
        parse_label_selector(selector, "KUBEFORGE_NAMESPACE_SELECTOR")  # refuse a bad one at startup
        return cls(
            trainer_image=env.get("KUBEFORGE_TRAINER_IMAGE", defaults.trainer_image),
            trainer_cpu_image=env.get("KUBEFORGE_TRAINER_CPU_IMAGE", defaults.trainer_cpu_image),
            storage_root=env.get("KUBEFORGE_STORAGE_ROOT", defaults.storage_root),
            s3_endpoint=env.get("KUBEFORGE_S3_ENDPOINT") or None,
            s3_credentials_secret=env.get("KUBEFORGE_S3_CREDENTIALS_SECRET") or None,
            resync_seconds=float(env.get("KUBEFORGE_RESYNC_SECONDS", defaults.resync_seconds)),
            metrics_port=int(env.get("KUBEFORGE_METRICS_PORT", defaults.metrics_port)),
            namespaces=namespaces,
            image_pull_policy=env.get("KUBEFORGE_IMAGE_PULL_POLICY", defaults.image_pull_policy),
            allow_cpu_fallback=_flag(env.get("KUBEFORGE_ALLOW_CPU_FALLBACK"), defaults.allow_cpu_fallback,
                                     "KUBEFORGE_ALLOW_CPU_FALLBACK"),
            namespace_selector=selector,
            restrict_uris_to_namespace=_flag(env.get("KUBEFORGE_RESTRICT_URIS_TO_NAMESPACE"),
                                             defaults.restrict_uris_to_namespace,
                                             "KUBEFORGE_RESTRICT_URIS_TO_NAMESPACE"),
            allowed_uri_prefixes=_list(env.get("KUBEFORGE_ALLOWED_URI_PREFIXES")),
            pod_defaults=_model(PodTemplateSpec, "KUBEFORGE_POD_DEFAULTS", env),
            gang_defaults=_model(GangSpec, "KUBEFORGE_GANG_DEFAULTS", env),
            coscheduling_scheduler=env.get("KUBEFORGE_COSCHEDULING_SCHEDULER") or defaults.coscheduling_scheduler,
            error_backoff_seconds=float(env.get("KUBEFORGE_ERROR_BACKOFF_SECONDS", defaults.error_backoff_seconds)),
            error_backoff_max_seconds=float(env.get("KUBEFORGE_ERROR_BACKOFF_MAX_SECONDS",
                                                    defaults.error_backoff_max_seconds)),
            liveness_seconds=float(env.get("KUBEFORGE_LIVENESS_SECONDS", defaults.liveness_seconds)),
        )

    def uri_policy(self) -> UriPolicy:
        return UriPolicy(self.storage_root, self.allowed_uri_prefixes, self.restrict_uris_to_namespace)

    def acts_in(self, namespace: str, labels: Mapping[str, str] | None) -> bool:
        """Whether jobs in this namespace (with these labels, None when unknown) are the operator's."""
        return namespace_allowed(namespace, labels, self.namespaces,
                                 parse_label_selector(self.namespace_selector, "KUBEFORGE_NAMESPACE_SELECTOR"))


def _list(value: str | None) -> tuple[str, ...]:
    return tuple(item.strip() for item in (value or "").split(",") if item.strip())


def _flag(value: str | None, default: bool, variable: str) -> bool:
    if value is None or not value.strip():
        return default
    if value.strip().lower() in ("true", "1", "yes"):
        return True
    if value.strip().lower() in ("false", "0", "no"):
        return False
    raise SettingError(f"{variable}: expected true or false, got {value!r}")


def _model(model: type[M], variable: str, env: Mapping[str, str]) -> M:
    """A spec model from a JSON environment variable (the chart writes values with toJson)."""
    text = env.get(variable, "").strip()
    try:
        return model.model_validate(json.loads(text) if text else {})
    except json.JSONDecodeError as exc:
        raise SettingError(f"{variable}: not valid JSON: {exc}") from None
    except ValidationError as exc:
        raise SettingError(f"{variable}: " + "; ".join(field_problem(e) for e in exc.errors())) from None
