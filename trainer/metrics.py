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
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, start_http_server

from kubeforge.trainer.flops import model_flops_utilization, peak_flops

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
        # Longer than a screen because it is the table of every series, one declaration each.
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
        self.eval_step = reading("kubeforge_trainer_eval_step", "The step of the last evaluation")
        self._eval = Gauge("kubeforge_trainer_eval_metric", "Eval metrics (perplexity, accuracy, f1)",
                           (*LABELS, "metric"), registry=self.registry)
        self.trainable_parameters = gauge("kubeforge_trainer_trainable_parameters",
                                          "Parameters the optimizer trains (a peft method's adapters, else the model)")
        # -- data ------------------------------------------------------------------------------------
        self.corpus_preparing = gauge("kubeforge_trainer_corpus_preparing",
                                      "1 while this rank tokenizes its share of the corpus into shards")
        self.corpus_tokens_prepared = counter("kubeforge_trainer_corpus_tokens_prepared_total",
                                              "Corpus tokens this rank tokenized into shards")
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
        every address; outside a cluster (a laptop's `kubeforge run`) on 127.0.0.1 only, and not at
        all when something else holds the port there (a local Prometheus listens on 9090 too): the
        endpoint is what the operator reads progress from, and no operator reads a laptop's run."""
        if port:
            in_a_pod = "KUBERNETES_SERVICE_HOST" in os.environ
            address = os.environ.get("POD_IP") or ("0.0.0.0" if in_a_pod else "127.0.0.1")
            try:
                self._server, _ = start_http_server(port, addr=address, registry=self.registry)
            except OSError as exc:
                if in_a_pod or os.environ.get("POD_IP"):
                    raise
                log.warning("no metrics endpoint: %s:%d is taken (%s)", address, port, exc.strerror)
                return
            log.info("metrics on %s:%d/metrics", address, port)

    def close(self) -> None:
        """Stop serving, so the port is free for the next job of a `kubeforge run`."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

@dataclass(frozen=True)
class WindowReport:
    """The figures of one logging window."""

    mean_loss: float
    tokens: int
    tokens_per_second: float
    padding_ratio: float  # tokens computed per token of data


class ThroughputWindow:
    """The logging window: loss, tokens and samples summed between two logged steps, turned into
    the loss and throughput readings when it closes.

    Counting a micro-batch adds the loss on the device and integers on the host: the window reads
    the loss back (a host sync) only when it closes, once per logging interval."""

    def __init__(self, metrics: TrainerMetrics, device: torch.device, flops_per_token: float, bf16: bool):
        self._metrics = metrics
        self._device = device
        self._flops_per_token = flops_per_token
        self._peak: float | None = None  # MFU and GPU memory exist only on a GPU, MFU only on one we know
        if device.type == "cuda":
            self._peak = peak_flops(torch.cuda.get_device_name(device), bf16=bf16)
            metrics.gpu_memory_total.set(torch.cuda.get_device_properties(device).total_memory)
        self._loss = torch.zeros((), device=device)
        self._steps = self._tokens = self._computed = self._samples = 0
        self._started = time.perf_counter()

    def restart(self) -> None:
        """Begin a new window now: what was counted so far is dropped."""
        self._loss.zero_()
        self._steps = self._tokens = self._computed = self._samples = 0
        self._started = time.perf_counter()

    def count_micro_batch(self, loss: torch.Tensor, tokens: int, computed_tokens: int, samples: int) -> None:
        """`tokens` of data, `computed_tokens` with padding: both known on the host before the forward."""
        self._loss += loss.detach()
        self._tokens += tokens
        self._computed += computed_tokens
        self._metrics.tokens.inc(tokens)
        self._metrics.computed_tokens.inc(computed_tokens)
        self._samples += samples

    def count_step(self, step: int) -> None:
        self._steps += 1
        self._metrics.step.set(step)
        self._metrics.last_step_time.set(time.time())

    def close(self, learning_rate: float) -> WindowReport:
        """Publish the window's readings and start the next window."""
        elapsed = time.perf_counter() - self._started
        report = WindowReport(float(self._loss) / self._steps, self._tokens, self._tokens / elapsed,
                              self._computed / max(self._tokens, 1))
        metrics = self._metrics
        metrics.loss.set(report.mean_loss)
        metrics.learning_rate.set(learning_rate)
        metrics.tokens_per_second.set(report.tokens_per_second)
        metrics.samples_per_second.set(self._samples / elapsed)
        if self._peak:
            metrics.mfu.set(model_flops_utilization(report.tokens_per_second, self._flops_per_token, self._peak))
        if self._device.type == "cuda":
            metrics.gpu_memory_allocated.set(torch.cuda.memory_allocated(self._device))
            metrics.gpu_memory_reserved.set(torch.cuda.memory_reserved(self._device))
        self.restart()
        return report
