"""kill -9 a trainer after a checkpoint: the rerun resumes at that step, exactly, and finishes."""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from support.corruption import committed_steps
from support.jobs import ROOT, tiny_pretrain, write_manifest
from support.processes import KUBEFORGE, free_port, run_cli, wait_until

STEPS = 400
INTERVAL = 20


def scrape(port: int, name: str) -> float | None:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1).read().decode()
    except OSError:
        return None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    return None


def test_killed_trainer_resumes_from_its_last_checkpoint(tmp_path: Path) -> None:
    job = tiny_pretrain("resumable", maxSteps=STEPS, evalInterval=1000, logInterval=10)
    job["spec"]["checkpoint"] = {"intervalSteps": INTERVAL, "keep": 3}
    port = free_port()
    job["spec"]["metrics"] = {"port": port}
    manifest = write_manifest(tmp_path / "job.yaml", job)
    checkpoints = tmp_path / "checkpoints"
    command = [*KUBEFORGE, "train", "--spec", str(manifest), "--checkpoint-uri", str(checkpoints)]

    first = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: committed_steps(checkpoints), 180, "the first committed checkpoint")
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=30)
    assert first.returncode == -signal.SIGKILL
    steps = committed_steps(checkpoints)
    newest = steps[-1]
    assert 0 < newest < STEPS

    # What a writer killed mid-upload leaves behind: files, no manifest. It must not be trusted.
    torn = checkpoints / "checkpoints" / f"step-{STEPS - 1:08d}"
    torn.mkdir()
    (torn / "model.pt").write_bytes(b"half a tensor")

    second = subprocess.Popen([*command, "--result", str(tmp_path / "result.json")], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        resumed_gauge = wait_until(lambda: scrape(port, "kubeforge_trainer_resumed_from_step"), 120,
                                   "the resumed trainer's metrics")
        tokens_prepared = scrape(port, "kubeforge_trainer_corpus_tokens_prepared_total")  # final once resumed
        _, log = second.communicate(timeout=300)
    finally:
        second.kill()
    assert second.returncode == 0, log[-3000:]
    assert resumed_gauge == newest
    assert f"resuming from checkpoint step {newest} " in log
    # The corpus the killed run prepared is reused as it is: nothing is tokenized again.
    assert "reusing the prepared corpus" in log and "prepared the corpus" not in log
    assert tokens_prepared == 0.0
    assert f"ignoring {checkpoints}/checkpoints/step-{STEPS - 1:08d}: no complete manifest" in log
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["resumedFromStep"] == newest and result["step"] == STEPS
    assert result["evalHistory"][0]["step"] == 0  # history carried across the kill

    # Exact resume: the same loss as a run that was never interrupted.
    clean = run_cli("train", "--spec", str(manifest), "--checkpoint-uri", str(tmp_path / "clean"),
                    "--result", str(tmp_path / "clean.json"))
    assert clean.returncode == 0, clean.stderr[-3000:]
    uninterrupted = json.loads((tmp_path / "clean.json").read_text())
    assert abs(uninterrupted["finalEval"]["loss"] - result["finalEval"]["loss"]) < 1e-4
