"""A finetune that asks more of its base model than it has fails for good before training, naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.jobs import write_manifest
from support.models import finetune_manifest, tiny_base
from support.processes import run_cli

from kubeforge.status import EXIT_PERMANENT


@pytest.mark.parametrize(("task", "method"), [("causal-lm", "full"), ("sequence-classification", "lora")])
def test_a_sequence_length_beyond_the_base_models_positions_fails_for_good_naming_the_field(
        task: str, method: str, tmp_path: Path) -> None:
    base = tiny_base(tmp_path / "base", positions=32)  # pretrained at 32 positions, finetuned at 64
    job = finetune_manifest(str(base), tmp_path / "out", task=task, method=method, sequence_length=64)
    termination = tmp_path / "termination-log"
    result = run_cli("train", "--spec", str(write_manifest(tmp_path / "job.yaml", job)),
                     "--termination-log", str(termination), timeout=300)
    assert result.returncode == EXIT_PERMANENT, result.stderr[-3000:]  # the cluster must not retry it
    outcome = json.loads(termination.read_text())
    assert outcome["permanent"] is True
    assert outcome["error"].startswith("training.sequenceLength: 64 exceeds the 32 positions of the base model")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()  # refused before any step
