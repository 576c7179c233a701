"""Checkpoint commit, retention and verification, on a local directory (S3 is in test_s3.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kubeforge.storage import LocalStorage, StorageError
from kubeforge.trainer.checkpoint import CHECKPOINTS, Checkpointer, step_prefix


def state(value: float) -> dict[str, object]:
    return {"model.pt": {"weight": torch.full((4, 4), value)}, "state.pt": {"step": int(value)},
            "tokenizer.json": b'{"vocab": {}}'}


def test_a_checkpoint_counts_only_once_its_manifest_is_written(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    checkpointer = Checkpointer(storage, keep=3, spec_hash="abc", rank=0)
    checkpointer.save(10, state(10.0))
    checkpointer.close()
    manifest = json.loads((tmp_path / step_prefix(10) / "manifest.json").read_text())
    assert manifest["step"] == 10 and manifest["specHash"] == "abc" and manifest["rank"] == 0
    assert {f["name"] for f in manifest["files"]} == {"model.pt", "state.pt", "tokenizer.json"}
    for entry in manifest["files"]:
        assert (tmp_path / step_prefix(10) / entry["name"]).stat().st_size == entry["size"]
    # A newer directory whose manifest never landed, and one whose manifest lists a missing file.
    (tmp_path / step_prefix(20)).mkdir(parents=True)
    (tmp_path / step_prefix(20) / "model.pt").write_bytes(b"partial")
    (tmp_path / step_prefix(30)).mkdir(parents=True)
    (tmp_path / step_prefix(30) / "manifest.json").write_text(json.dumps(
        {"step": 30, "files": [{"name": "model.pt", "size": 1, "sha256": "0"}]}))
    latest = Checkpointer(storage, keep=3, spec_hash="abc", rank=0).latest()
    assert latest is not None and latest.step == 10


def test_retention_keeps_the_newest_k_and_never_the_in_flight_one(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    (tmp_path / step_prefix(1)).mkdir(parents=True)  # a crash leftover, older than every commit
    (tmp_path / step_prefix(1) / "model.pt").write_bytes(b"x")
    (tmp_path / step_prefix(999)).mkdir(parents=True)  # newer than every commit: maybe still uploading
    (tmp_path / step_prefix(999) / "model.pt").write_bytes(b"x")
    checkpointer = Checkpointer(storage, keep=2, spec_hash="abc", rank=0)
    for step in (10, 20, 30, 40):
        checkpointer.save(step, state(float(step)))
    checkpointer.close()
    assert [c.step for c in checkpointer.committed()] == [30, 40]
    remaining = sorted(p.name for p in (tmp_path / CHECKPOINTS).iterdir())
    assert remaining == ["step-00000030", "step-00000040", "step-00000999"]


def test_keep_one_still_keeps_the_newest(tmp_path: Path) -> None:
    checkpointer = Checkpointer(LocalStorage(tmp_path), keep=1, spec_hash="abc", rank=0)
    for step in (5, 6):
        checkpointer.save(step, state(float(step)))
    checkpointer.close()
    latest = checkpointer.latest()
    assert latest is not None and latest.step == 6
    loaded = checkpointer.load(latest, tmp_path / "restore")
    assert torch.equal(loaded["model.pt"]["weight"], torch.full((4, 4), 6.0))
    assert loaded["tokenizer.json"] == b'{"vocab": {}}'


def test_the_snapshot_is_taken_when_save_returns(tmp_path: Path) -> None:
    """Training goes on mutating its tensors while the upload runs; the checkpoint holds the old values."""
    checkpointer = Checkpointer(LocalStorage(tmp_path), keep=2, spec_hash="abc", rank=0)
    live = {"weight": torch.zeros(256, 256)}
    blocked = checkpointer.save(1, {"model.pt": live})
    live["weight"].add_(1.0)
    checkpointer.close()
    assert blocked >= 0
    latest = checkpointer.latest()
    assert latest is not None
    assert torch.count_nonzero(checkpointer.load(latest, tmp_path / "r")["model.pt"]["weight"]) == 0


def test_tied_embeddings_are_saved_once_and_stay_tied(tmp_path: Path) -> None:
    checkpointer = Checkpointer(LocalStorage(tmp_path), keep=2, spec_hash="abc", rank=0, background=False)
    embedding = torch.nn.Embedding(1000, 64)
    head = torch.nn.Linear(64, 1000, bias=False)
    head.weight = embedding.weight  # as GPT-2 and Llama tie wte and lm_head
    model = torch.nn.ModuleDict({"wte": embedding, "lm_head": head})
    checkpointer.save(1, {"model.pt": model.state_dict()})
    one_copy = 1000 * 64 * 4
    assert one_copy < (tmp_path / step_prefix(1) / "model.pt").stat().st_size < 1.5 * one_copy
    latest = checkpointer.latest()
    assert latest is not None
    restored = checkpointer.load(latest, tmp_path / "r")["model.pt"]
    fresh = torch.nn.ModuleDict({"wte": torch.nn.Embedding(1000, 64), "lm_head": torch.nn.Linear(64, 1000, bias=False)})
    fresh["lm_head"].weight = fresh["wte"].weight
    fresh.load_state_dict(restored)
    assert torch.equal(fresh["lm_head"].weight, embedding.weight)


def test_a_corrupted_file_is_refused_on_load(tmp_path: Path) -> None:
    checkpointer = Checkpointer(LocalStorage(tmp_path), keep=2, spec_hash="abc", rank=0)
    checkpointer.save(7, state(7.0))
    checkpointer.close()
    model = tmp_path / step_prefix(7) / "model.pt"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))
    latest = checkpointer.latest()
    assert latest is not None
    with pytest.raises(StorageError, match="does not match its manifest"):
        checkpointer.load(latest, tmp_path / "restore")


def test_a_failed_upload_is_reported_and_training_can_go_on(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the checkpoint directory should go")
    checkpointer = Checkpointer(LocalStorage(blocker), keep=2, spec_hash="abc", rank=0)
    checkpointer.save(1, state(1.0))
    checkpointer.close()
    assert checkpointer.last_error is not None
