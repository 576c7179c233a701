"""The trainer's Prometheus endpoint: progress, loss, throughput and checkpoints, per job and rank."""

from __future__ import annotations

import logging
import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

LABELS = ("job", "namespace", "kind", "rank")


class TrainerMetrics:
    def __init__(self, job: str, namespace: str, kind: str, rank: int):
        self.registry = CollectorRegistry()
        labels = {"job": job, "namespace": namespace, "kind": kind, "rank": str(rank)}

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, LABELS, registry=self.registry).labels(**labels)

        self.step = gauge("kubeforge_trainer_step", "Optimizer steps completed")
        self.total_steps = gauge("kubeforge_trainer_total_steps", "Optimizer steps the job will run")
        self.loss = gauge("kubeforge_trainer_loss", "Training loss, mean over the last logging interval")
        self.learning_rate = gauge("kubeforge_trainer_learning_rate", "Current learning rate")
        self.tokens_per_second = gauge("kubeforge_trainer_tokens_per_second",
                                       "Training tokens per second on this rank")
        self.samples_per_second = gauge("kubeforge_trainer_samples_per_second",
                                        "Training sequences per second on this rank")
        self.eval_loss = gauge("kubeforge_trainer_eval_loss", "Loss on the eval split")
        self._eval = Gauge("kubeforge_trainer_eval_metric", "Eval metrics (perplexity, accuracy, f1)",
                           (*LABELS, "metric"), registry=self.registry)
        self._labels = labels
        self.last_checkpoint_step = gauge("kubeforge_trainer_last_checkpoint_step",
                                          "Step of the newest committed checkpoint")
        self.resumed_from_step = gauge("kubeforge_trainer_resumed_from_step",
                                       "Step this run resumed from (0 for a fresh start)")
        self.checkpoint_blocked = Histogram(
            "kubeforge_trainer_checkpoint_blocked_seconds",
            "Time the training loop waited per checkpoint (snapshot only; upload is asynchronous)",
            LABELS, registry=self.registry,
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30)).labels(**labels)
        self.checkpoint_duration = Histogram(
            "kubeforge_trainer_checkpoint_duration_seconds",
            "Time to write and commit one checkpoint to storage",
            LABELS, registry=self.registry,
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 15, 60, 300, 1200)).labels(**labels)
        self.checkpoint_bytes = Counter("kubeforge_trainer_checkpoint_written_bytes",
                                        "Bytes written to checkpoint storage", LABELS,
                                        registry=self.registry).labels(**labels)
        self.checkpoint_failures = Counter("kubeforge_trainer_checkpoint_failures",
                                           "Checkpoint uploads that failed", LABELS,
                                           registry=self.registry).labels(**labels)

    def eval_metric(self, name: str, value: float) -> None:
        self._eval.labels(**self._labels, metric=name).set(value)

    def serve(self, port: int) -> None:
        """Serve /metrics on the pod's IP (POD_IP, from the downward API) or on every address."""
        if port:
            address = os.environ.get("POD_IP") or "0.0.0.0"
            start_http_server(port, addr=address, registry=self.registry)
            log.info("metrics on %s:%d/metrics", address, port)
