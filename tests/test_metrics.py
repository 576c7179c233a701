"""The trainer's Prometheus endpoint, scraped while a real trainer process runs."""

from __future__ import annotations

import os
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import KUBEFORGE, ROOT, free_port, tiny_pretrain, wait_until, write_manifest
from prometheus_client.parser import text_string_to_metric_families

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
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


def test_metrics_follow_training_progress(trainer: tuple[subprocess.Popen[bytes], int, Path]) -> None:
    process, port, log = trainer

    def reading(condition) -> Samples | None:  # type: ignore[no-untyped-def]
        assert process.poll() is None, f"the trainer exited early:\n{log.read_text()}"
        samples = scrape(port)
        return samples if samples and condition(samples) else None

    def value(samples: Samples, name: str) -> float:
        return samples[name][1]

    first = wait_until(lambda: reading(lambda s: value(s, "kubeforge_trainer_loss") > 0), 90,
                       "the first logged loss on /metrics")
    labels = first["kubeforge_trainer_step"][0]
    assert labels == {"job": "tiny-metrics", "namespace": "team-a", "kind": "PretrainJob", "rank": "0"}
    assert all(sample_labels == labels for sample_labels, _ in first.values()), first
    assert value(first, "kubeforge_trainer_total_steps") == 100_000
    assert value(first, "kubeforge_trainer_resumed_from_step") == 0

    later = wait_until(
        lambda: reading(lambda s: value(s, "kubeforge_trainer_step") > value(first, "kubeforge_trainer_step")
                        and value(s, "kubeforge_trainer_loss") != value(first, "kubeforge_trainer_loss")),
        60, "the step to advance and the loss to change")
    assert value(later, "kubeforge_trainer_tokens_per_second") > 0

    checkpointed = wait_until(
        lambda: reading(lambda s: value(s, "kubeforge_trainer_last_checkpoint_step") > 0), 60,
        "a checkpoint to be reported")
    step = value(checkpointed, "kubeforge_trainer_last_checkpoint_step")
    assert step % 25 == 0 and step <= value(checkpointed, "kubeforge_trainer_step")
    assert value(checkpointed, "kubeforge_trainer_checkpoint_duration_seconds_count") > 0
    assert value(checkpointed, "kubeforge_trainer_checkpoint_blocked_seconds_count") > 0
    assert value(checkpointed, "kubeforge_trainer_checkpoint_written_bytes_total") > 0
