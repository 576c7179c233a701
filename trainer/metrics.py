"""The trainer's Prometheus endpoint: progress, loss, throughput and checkpoints, per job and rank.

Every series is labelled `job_name`, `namespace`, `kind` and `rank` (docs/metrics.md has the table).
The job's label is `job_name` because Prometheus sets `job` on every target itself; `namespace` is the
pod's own, so it agrees with the one service discovery adds.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, start_http_server

log = logging.getLogger(__name__)

LABELS = ("job_name", "namespace", "kind", "rank")

# The `_created` timestamp series prometheus_client adds to every counter are not part of our
# documented metrics, and nothing reads them.
disable_created_metrics()


class Reading:
    """A gauge exported from its first reading on: before that, a 0 would be a false value (a loss of
    0, a GPU with no memory in use), so the series is absent instead."""

    def __init__(self, gauge: Gauge, labels: dict[str, str]):
        self._gauge = gauge
        self._labels = labels

    def set(self, value: float) -> None:
        self._gauge.labels(**self._labels).set(value)


class TrainerMetrics:
    def __init__(self, job: str, namespace: str, kind: str, rank: int):
        self.registry = CollectorRegistry()
        self._server: WSGIServer | None = None
        labels = {"job_name": job, "namespace": namespace, "kind": kind, "rank": str(rank)}
        self._labels = labels

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, LABELS, registry=self.registry).labels(**labels)

        def reading(name: str, doc: str) -> Reading:
            return Reading(Gauge(name, doc, LABELS, registry=self.registry), labels)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, LABELS, registry=self.registry).labels(**labels)

        # -- progress --------------------------------------------------------------------------------
        self.step = gauge("kubeforge_trainer_step", "Optimizer steps completed")
        self.total_steps = gauge("kubeforge_trainer_total_steps", "Optimizer steps the job will run")
        self.last_step_time = gauge("kubeforge_trainer_last_step_timestamp_seconds",
                                    "Unix time of the last optimizer step (of the process start before the first)")
        self.last_step_time.set(time.time())
        self.loss = reading("kubeforge_trainer_loss", "Training loss, mean over the last logging interval")
        self.learning_rate = reading("kubeforge_trainer_learning_rate", "Learning rate after the last logged step")
        self.eval_loss = reading("kubeforge_trainer_eval_loss", "Loss on the eval split")
        self._eval = Gauge("kubeforge_trainer_eval_metric", "Eval metrics (perplexity, accuracy, f1)",
                           (*LABELS, "metric"), registry=self.registry)
        # -- throughput ------------------------------------------------------------------------------
        self.tokens = counter("kubeforge_trainer_tokens_total", "Training tokens (not padding) this rank processed")
        self.computed_tokens = counter("kubeforge_trainer_computed_tokens_total",
                                       "Tokens this rank's forward passes computed, padding included")
        self.tokens_per_second = reading("kubeforge_trainer_tokens_per_second",
                                         "Training tokens per second on this rank over the last logging interval")
        self.samples_per_second = reading("kubeforge_trainer_samples_per_second",
                                          "Training sequences per second on this rank over the last logging interval")
        self.data_wait = counter("kubeforge_trainer_data_wait_seconds_total",
                                 "Time the loop waited for the next batch (fetch and copy to the device)")
        self.mfu = reading("kubeforge_trainer_model_flops_utilization",
                           "Model FLOPs utilisation (0..1) of this rank's GPU over the last logging interval")
        self.gpu_memory_allocated = reading("kubeforge_trainer_gpu_memory_allocated_bytes",
                                            "GPU memory held by tensors")
        self.gpu_memory_reserved = reading("kubeforge_trainer_gpu_memory_reserved_bytes",
                                           "GPU memory reserved by torch's caching allocator")
        self.gpu_memory_total = reading("kubeforge_trainer_gpu_memory_total_bytes", "GPU memory of the device")
        # -- checkpoints -----------------------------------------------------------------------------
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
        self.checkpoint_bytes = counter("kubeforge_trainer_checkpoint_written_bytes_total",
                                        "Bytes written to checkpoint storage")
        self.checkpoint_failures = counter("kubeforge_trainer_checkpoint_failures_total",
                                           "Checkpoint uploads that failed")
        self._uploads_pending = gauge("kubeforge_trainer_checkpoint_uploads_pending",
                                      "Checkpoints snapshotted in memory whose upload has not finished")

    def eval_metric(self, name: str, value: float) -> None:
        self._eval.labels(**self._labels, metric=name).set(value)

    def count_uploads_pending(self, pending: Callable[[], int]) -> None:
        """Read the upload backlog from the checkpointer at each scrape (never stale, no race)."""
        self._uploads_pending.set_function(pending)

    def serve(self, port: int) -> None:
        """Serve /metrics on the pod's IP (POD_IP, from the downward API); in a pod without it on
        every address; outside a cluster (a laptop's `kubeforge run`) on 127.0.0.1 only."""
        if port:
            in_a_pod = "KUBERNETES_SERVICE_HOST" in os.environ
            address = os.environ.get("POD_IP") or ("0.0.0.0" if in_a_pod else "127.0.0.1")
            self._server, _ = start_http_server(port, addr=address, registry=self.registry)
            log.info("metrics on %s:%d/metrics", address, port)

    def close(self) -> None:
        """Stop serving, so the port is free for the next job of a `kubeforge run`."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
