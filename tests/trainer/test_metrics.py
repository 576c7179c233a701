"""The trainer's Prometheus endpoint, scraped while a real trainer process runs; the operator's metrics and
the MFU arithmetic as units."""

from __future__ import annotations

import os
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import kopf
import pytest
import torch
from kubernetes.client.exceptions import ApiException
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from support.jobs import ROOT, tiny_pretrain, write_manifest
from support.processes import KUBEFORGE, free_port, stop_process, wait_until

from kubeforge.operator.metrics import OperatorMetrics
from kubeforge.operator.reconciler import Operator
from kubeforge.operator.settings import OperatorSettings
from kubeforge.storage import LocalStorage
from kubeforge.trainer.checkpoint import Checkpointer
from kubeforge.trainer.flops import model_flops_utilization, peak_flops, training_flops_per_token

Samples = dict[str, tuple[dict[str, str], float]]


def scrape(port: int) -> Samples | None:
    """{sample name: (labels, value)} of the trainer's metrics, or None while it is not listening."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return None
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("kubeforge_trainer_") and "metric" not in sample.labels:
                if "le" in sample.labels:
                    continue  # histogram buckets: _count and _sum say enough here
                samples[sample.name] = (sample.labels, sample.value)
    return samples


@pytest.fixture
def trainer(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    """A trainer with far more steps than the test waits for, serving metrics on a free port."""
    port = free_port()
    job = tiny_pretrain("tiny-metrics", maxSteps=100_000, batchSize=4, sequenceLength=32, warmupSteps=2,
                        evalInterval=100_000, evalBatches=2, logInterval=5)
    job["metadata"]["namespace"] = "team-a"
    job["spec"]["checkpoint"] = {"intervalSteps": 25, "keep": 1}
    job["spec"]["metrics"] = {"port": port}
    manifest = write_manifest(tmp_path / "job.yaml", job)
    log = tmp_path / "trainer.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [*KUBEFORGE, "train", "--spec", str(manifest), "--checkpoint-uri", str(tmp_path / "out")],
            stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        yield process, port, log
    finally:
        stop_process(process)


def test_metrics_follow_training_progress(trainer: tuple[subprocess.Popen[bytes], int, Path]) -> None:
    process, port, log = trainer

    def reading(condition) -> Samples | None:  # type: ignore[no-untyped-def]
        assert process.poll() is None, f"the trainer exited early:\n{log.read_text()}"
        samples = scrape(port)
        return samples if samples and condition(samples) else None

    def value(samples: Samples, name: str) -> float:
        return samples[name][1]

    started = wait_until(lambda: reading(lambda s: "kubeforge_trainer_step" in s), 90, "the metrics endpoint")
    # Readings that do not exist yet are absent, never a false 0 (a loss of 0 would look like a perfect model).
    assert "kubeforge_trainer_loss" not in started or value(started, "kubeforge_trainer_step") >= 5
    first = wait_until(lambda: reading(lambda s: "kubeforge_trainer_loss" in s), 90, "the first logged loss")
    assert value(first, "kubeforge_trainer_loss") > 0
    labels = first["kubeforge_trainer_step"][0]
    assert labels == {"job_name": "tiny-metrics", "namespace": "team-a", "kind": "PretrainJob", "rank": "0"}
    assert all(sample_labels == labels for sample_labels, _ in first.values()), first
    assert value(first, "kubeforge_trainer_total_steps") == 100_000
    assert value(first, "kubeforge_trainer_resumed_from_step") == 0
    # On a CPU there is no MFU and no GPU memory to report: the series do not exist.
    assert not [name for name in first if "gpu" in name or "flops" in name], first

    # A scrape is not a snapshot: the loop runs on while the endpoint reads one series after another, so
    # one reading can hold the step of one moment and the token count of a later one. What the trainer
    # guarantees is that training moves each of them forward: every micro-batch adds its tokens, every
    # step sets the step and its timestamp, every logInterval the loss. So a later reading shows each
    # of them past the first reading's value, and the loss changed.
    advanced = ("kubeforge_trainer_step", "kubeforge_trainer_tokens_total",
                "kubeforge_trainer_last_step_timestamp_seconds")
    later = wait_until(
        lambda: reading(lambda s: all(value(s, name) > value(first, name) for name in advanced)
                        and value(s, "kubeforge_trainer_loss") != value(first, "kubeforge_trainer_loss")),
        60, "the step, tokens and step timestamp to advance and the loss to change")
    assert value(first, "kubeforge_trainer_tokens_total") > 0
    assert value(first, "kubeforge_trainer_last_step_timestamp_seconds") > time.time() - 120
    assert value(later, "kubeforge_trainer_tokens_per_second") > 0
    assert value(later, "kubeforge_trainer_data_wait_seconds_total") > 0

    checkpointed = wait_until(
        lambda: reading(lambda s: value(s, "kubeforge_trainer_last_checkpoint_step") > 0), 60,
        "a checkpoint to be reported")
    step = value(checkpointed, "kubeforge_trainer_last_checkpoint_step")
    assert step % 25 == 0 and step <= value(checkpointed, "kubeforge_trainer_step")
    assert value(checkpointed, "kubeforge_trainer_checkpoint_duration_seconds_count") > 0
    assert value(checkpointed, "kubeforge_trainer_checkpoint_blocked_seconds_count") > 0
    assert value(checkpointed, "kubeforge_trainer_checkpoint_written_bytes_total") > 0
    assert value(checkpointed, "kubeforge_trainer_checkpoint_failures_total") == 0


def exposition(registry: CollectorRegistry) -> dict[str, list[tuple[dict[str, str], float]]]:
    """{sample name: [(labels, value)]} as Prometheus would scrape them."""
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def test_operator_metrics_follow_each_job_through_its_phases() -> None:
    metrics = OperatorMetrics()
    for phase in ("Pending", "Pending", "Running", "Succeeded"):
        metrics.record_phase("PretrainJob", "team-a", "base", phase)
    metrics.record_phase("FinetuneJob", "team-a", "tuned", "Pending")
    scraped = exposition(metrics.registry)
    # One series per job, on its current phase only: alerts on `phase="Pending"` name the job that waits.
    assert sorted((s["job_name"], s["phase"], v) for s, v in scraped["kubeforge_operator_job_phase"]) == [
        ("base", "Succeeded", 1), ("tuned", "Pending", 1)]
    by_phase = {(s["kind"], s["phase"]): v for s, v in scraped["kubeforge_operator_jobs"]}
    assert by_phase == {("PretrainJob", "Pending"): 0, ("PretrainJob", "Running"): 0,
                        ("PretrainJob", "Succeeded"): 1, ("FinetuneJob", "Pending"): 1}
    assert {s["kind"]: v for s, v in scraped["kubeforge_operator_jobs_seen_total"]} == {
        "PretrainJob": 1, "FinetuneJob": 1}
    # Counters exist at 0 before their first event (so increase() counts it), and carry no `_created` twin.
    assert {s["kind"]: v for s, v in scraped["kubeforge_operator_reconcile_errors_total"]} == {
        "PretrainJob": 0, "FinetuneJob": 0}
    assert not [name for name in scraped if name.endswith("_created")]

    metrics.forget("PretrainJob", "team-a", "base")
    scraped = exposition(metrics.registry)
    assert [s["job_name"] for s, _ in scraped["kubeforge_operator_job_phase"]] == ["tuned"]
    assert ({"kind": "PretrainJob", "phase": "Succeeded"}, 0) in scraped["kubeforge_operator_jobs"]


class UnreachableCluster:
    def pods(self, job: object) -> list[dict[str, object]]:
        raise ApiException(status=503, reason="Service Unavailable")


def test_a_failing_reconciliation_is_counted_and_retried_with_backoff() -> None:
    metrics = OperatorMetrics()
    settings = OperatorSettings(trainer_image="t", trainer_cpu_image="t-cpu", storage_root="s3://bucket/kf")
    operator = Operator(settings, UnreachableCluster(), metrics)  # type: ignore[arg-type]
    body = tiny_pretrain("unlucky")
    body["metadata"].update(namespace="team-a", uid="0123456789abcdef")
    delays = []
    for _ in range(2):
        with pytest.raises(kopf.TemporaryError) as raised:  # Kopf retries it: the job's timer never stops
            operator.reconcile(body)
        assert isinstance(raised.value.__cause__, ApiException)
        delays.append(raised.value.delay)
    assert delays == [settings.error_backoff_seconds, 2 * settings.error_backoff_seconds]
    errors = {s["kind"]: v for s, v in exposition(metrics.registry)["kubeforge_operator_reconcile_errors_total"]}
    assert errors == {"PretrainJob": 2, "FinetuneJob": 0}


def test_checkpoint_upload_backlog_counts_an_upload_until_it_commits(tmp_path: Path) -> None:
    release = threading.Event()

    class SlowStorage(LocalStorage):
        def put_bytes(self, key: str, data: bytes) -> None:
            assert release.wait(30), "the test never released the upload"
            super().put_bytes(key, data)

    checkpointer = Checkpointer(SlowStorage(tmp_path), keep=2, spec_hash="h", rank=0)
    assert checkpointer.uploads_pending() == 0
    checkpointer.save(10, {"model.pt": {"weight": torch.ones(2)}})
    assert checkpointer.uploads_pending() == 1  # the manifest (put_bytes) is held back
    release.set()
    checkpointer.close()
    assert checkpointer.uploads_pending() == 0 and checkpointer.latest() is not None


@pytest.mark.parametrize(("device", "bf16", "peak"), [
    ("NVIDIA H100 80GB HBM3", True, 989.4e12),
    ("NVIDIA H100 PCIe", True, 756e12),
    ("NVIDIA H100 NVL", False, 417.5e12),  # TF32: the loop turns it on
    ("NVIDIA A100-SXM4-80GB", True, 312e12),
    ("NVIDIA A100 80GB PCIe", False, 156e12),
    ("NVIDIA L40S", True, 362.05e12),
    ("NVIDIA L4", True, 121e12),
    ("NVIDIA A10", True, 125e12),
    ("Tesla T4", False, 8.1e12),
    ("Tesla T4", True, None),  # no bf16 on Turing
    ("NVIDIA A10G", True, None),  # not in the table: no MFU rather than a guessed one
    ("NVIDIA GeForce RTX 4090", True, None),
])
def test_peak_flops_are_looked_up_by_device_name(device: str, bf16: bool, peak: float | None) -> None:
    assert peak_flops(device, bf16) == peak


def test_mfu_is_model_flops_per_second_over_the_peak() -> None:
    # GPT-2 124M at sequence length 1024: 6N + 12·L·H·T FLOPs per token.
    per_token = training_flops_per_token(124_000_000, 12, 768, 1024)
    assert per_token == 6 * 124e6 + 12 * 12 * 768 * 1024
    # 400k tokens/s on an H100 in bf16: about 0.35 of its peak.
    mfu = model_flops_utilization(400_000, per_token, peak_flops("NVIDIA H100 80GB HBM3", True) or 0)
    assert mfu == pytest.approx(400_000 * per_token / 989.4e12) and 0.3 < mfu < 0.4


def test_a_laptop_run_goes_on_without_metrics_when_the_port_is_taken(monkeypatch: pytest.MonkeyPatch,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """`kubeforge run examples/pipeline.yaml` next to a local Prometheus (also 9090): the run trains on;
    in a pod the same clash is an error, since the operator reads progress from that endpoint."""
    import socket

    from kubeforge.trainer.metrics import TrainerMetrics

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("POD_IP", raising=False)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        metrics = TrainerMetrics("clash", "default", "PretrainJob", 0)
        metrics.serve(port)
        assert f"no metrics endpoint: 127.0.0.1:{port} is taken" in caplog.text
        metrics.close()
        monkeypatch.setenv("POD_IP", "127.0.0.1")
        with pytest.raises(OSError):
            TrainerMetrics("clash", "default", "PretrainJob", 0).serve(port)


def test_the_operator_reads_a_corpus_preparation_from_the_trainers_metrics() -> None:
    from kubeforge.operator.progress import parse
    from kubeforge.trainer.metrics import TrainerMetrics

    metrics = TrainerMetrics("tiny", "default", "PretrainJob", 0)
    metrics.corpus_preparing.set(1)
    metrics.corpus_tokens_prepared.inc(123_456)
    preparing = parse(generate_latest(metrics.registry).decode())
    assert preparing is not None and (preparing.preparing, preparing.tokens_prepared) == (True, 123_456)
    metrics.corpus_preparing.set(0)
    metrics.step.set(3)
    metrics.total_steps.set(10)
    metrics.trainable_parameters.set(16_512)
    training = parse(generate_latest(metrics.registry).decode())
    assert training is not None and not training.preparing and (training.step, training.total_steps) == (3, 10)
    assert training.trainable_parameters == 16_512
