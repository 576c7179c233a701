"""The operator's configuration, from its environment (the Helm chart sets these variables)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


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
    namespaces: tuple[str, ...] = ()
    image_pull_policy: str = "IfNotPresent"
    #: The cluster's CPU fallback policy: False makes jobs wait for GPUs even when their spec allows
    #: fallback (a job's own allowCpuFallback: false always wins).
    allow_cpu_fallback: bool = True
    #: A failed reconciliation of a job is retried after this many seconds, doubled at each
    #: consecutive failure up to error_backoff_max_seconds.
    error_backoff_seconds: float = 1.0
    error_backoff_max_seconds: float = 60.0
    #: Liveness (/healthz) fails when jobs exist and none was reconciled for this long.
    liveness_seconds: float = 300.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> OperatorSettings:
        defaults = cls()
        namespaces = tuple(n.strip() for n in env.get("KUBEFORGE_NAMESPACES", "").split(",") if n.strip())
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
            allow_cpu_fallback=_flag(env.get("KUBEFORGE_ALLOW_CPU_FALLBACK"), defaults.allow_cpu_fallback),
            error_backoff_seconds=float(env.get("KUBEFORGE_ERROR_BACKOFF_SECONDS", defaults.error_backoff_seconds)),
            error_backoff_max_seconds=float(env.get("KUBEFORGE_ERROR_BACKOFF_MAX_SECONDS",
                                                    defaults.error_backoff_max_seconds)),
            liveness_seconds=float(env.get("KUBEFORGE_LIVENESS_SECONDS", defaults.liveness_seconds)),
        )


def _flag(value: str | None, default: bool) -> bool:
    if value is None or not value.strip():
        return default
    if value.strip().lower() in ("true", "1", "yes"):
        return True
    if value.strip().lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")
