"""Checkpoint commit, retention and verification, on a local directory (S3 is in test_s3.py)."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from support.corruption import flip_a_byte, garble_the_manifest, remove_a_file, truncate
from torch.distributed.checkpoint.state_dict import get_state_dict

from kubeforge.storage import LocalStorage, NotFound, S3Storage, StorageError
from kubeforge.trainer.checkpoint import (
    CHECKPOINTS,
    SHARDS,
    Checkpointer,
    CheckpointMismatch,
    CorruptCheckpoint,
    JobIdentity,
    check_model,
    load_sharded,
    model_shape,
    step_prefix,
)


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


def test_retention_keeps_the_newest_k_and_touches_only_committed_checkpoints(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    user = tmp_path / CHECKPOINTS / "checkpoint-5"  # a user's own directory, named like a checkpoint
    user.mkdir(parents=True)
    (user / "model.pt").write_bytes(b"mine")
    (tmp_path / step_prefix(1)).mkdir(parents=True)  # a crash leftover: no manifest, not ours to judge
    (tmp_path / step_prefix(1) / "model.pt").write_bytes(b"x")
    (tmp_path / step_prefix(999)).mkdir(parents=True)  # newer than every commit: maybe still uploading
    (tmp_path / step_prefix(999) / "model.pt").write_bytes(b"x")
    checkpointer = Checkpointer(storage, keep=2, spec_hash="abc", rank=0, background=False)
    checkpointer.save(10, state(10.0))
    (tmp_path / step_prefix(10) / "notes.txt").write_text("a file no manifest lists")
    for step in (20, 30, 40):
        checkpointer.save(step, state(float(step)))
    checkpointer.close()
    assert [c.step for c in checkpointer.committed()] == [30, 40]
    remaining = sorted(p.name for p in (tmp_path / CHECKPOINTS).iterdir())
    assert remaining == ["checkpoint-5", "step-00000001", "step-00000010", "step-00000030", "step-00000040",
                         "step-00000999"]
    assert [p.name for p in (tmp_path / step_prefix(10)).iterdir()] == ["notes.txt"]
    assert (user / "model.pt").read_bytes() == b"mine"


class FlakyStorage(LocalStorage):
    """A directory whose reads of one key fail, as an S3 endpoint answering 500 would."""

    def __init__(self, root: Path, failing: str):
        super().__init__(root)
        self.failing = failing

    def get_bytes(self, key: str) -> bytes:
        if key == self.failing:
            raise StorageError(f"read from {key}: 500 Internal Server Error")
        return super().get_bytes(key)


def test_a_failed_read_during_retention_deletes_nothing(tmp_path: Path) -> None:
    writer = Checkpointer(LocalStorage(tmp_path), keep=1, spec_hash="abc", rank=0, background=False)
    writer.save(10, state(10.0))
    flaky = Checkpointer(FlakyStorage(tmp_path, f"{step_prefix(10)}/manifest.json"), keep=1, spec_hash="abc",
                         rank=0, background=False)
    flaky.save(20, state(20.0))
    flaky.close()
    assert flaky.last_error is None  # the new checkpoint committed; only retention was skipped
    assert [c.step for c in writer.committed()] == [10, 20]


class RetiringStorage(LocalStorage):
    """A directory where another process's retention deletes a checkpoint's manifest right after each
    listing: the race of a reader (a warm start from a running job) with that job's writer."""

    def __init__(self, root: Path, retired: str):
        super().__init__(root)
        self.retired = retired

    def sizes(self, prefix: str = "") -> dict[str, int]:
        listed = super().sizes(prefix)
        LocalStorage(self.root).delete([self.retired])
        return listed


def test_a_checkpoint_retired_between_listing_and_reading_is_skipped_not_an_error(tmp_path: Path) -> None:
    writer = Checkpointer(LocalStorage(tmp_path), keep=3, spec_hash="abc", rank=0, background=False)
    for step in (10, 20):
        writer.save(step, state(float(step)))
    reader = Checkpointer(RetiringStorage(tmp_path, f"{step_prefix(10)}/manifest.json"), keep=3, spec_hash="abc",
                          rank=1)
    assert [c.step for c in reader.committed()] == [20]


def test_s3_says_not_found_only_for_a_missing_key(bucket: str) -> None:
    storage = S3Storage(f"s3://{bucket}/job")
    storage.put_bytes("here", b"x")
    assert storage.get_bytes("here") == b"x"
    with pytest.raises(NotFound, match="NoSuchKey"):
        storage.get_bytes("gone")
    with pytest.raises(NotFound, match="404"):
        storage.get_file("gone", Path("/nonexistent-dir/gone"))
    with pytest.raises(StorageError) as other:
        S3Storage("s3://no-such-bucket-kf/job").get_bytes("here")
    assert not isinstance(other.value, NotFound)  # a missing bucket is a misconfiguration, not a retired key


def test_a_quarantined_checkpoint_is_neither_counted_nor_deleted_by_retention(tmp_path: Path) -> None:
    checkpointer = Checkpointer(LocalStorage(tmp_path), keep=1, spec_hash="abc", rank=0, background=False)
    checkpointer.save(10, state(10.0))
    checkpointer.quarantine(step_prefix(10), "test")
    checkpointer.save(20, state(20.0))
    checkpointer.save(30, state(30.0))
    assert [c.step for c in checkpointer.committed()] == [30]
    assert sorted(p.name for p in (tmp_path / step_prefix(10)).iterdir()) == [
        "QUARANTINED", "manifest.json", "model.pt", "state.pt", "tokenizer.json"]


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


JOB = JobIdentity(namespace="default", kind="PretrainJob", name="tiny", uid="0123-4567")


CORRUPTIONS = {"byte flip": (flip_a_byte, "does not match its manifest"),
               "truncation": (truncate, "model.pt has 100 bytes"),
               "missing file": (remove_a_file, "optimizer.pt is missing"),
               "bad manifest": (garble_the_manifest, "not a kubeforge manifest")}


def full_state(value: float) -> dict[str, object]:
    return {**state(value), "optimizer.pt": {"exp_avg": torch.full((4, 4), value)}}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_resume_falls_back_past_a_corrupt_newest_and_quarantines_it(tmp_path: Path, corruption: str) -> None:
    corrupt, reason = CORRUPTIONS[corruption]
    checkpointer = Checkpointer(LocalStorage(tmp_path), keep=3, spec_hash="abc", rank=0, job=JOB, background=False)
    checkpointer.save(10, full_state(10.0))
    checkpointer.save(20, full_state(20.0))
    corrupt(tmp_path / step_prefix(20))

    restored = Checkpointer(LocalStorage(tmp_path), keep=3, spec_hash="abc", rank=0, job=JOB).resume(tmp_path / "r")
    assert restored is not None and restored.checkpoint.step == 10
    assert torch.equal(restored.files["model.pt"]["weight"], torch.full((4, 4), 10.0))
    marker = json.loads((tmp_path / step_prefix(20) / "QUARANTINED").read_text())
    assert reason in marker["reason"] and marker["by"] == JOB.model_dump()
    assert (tmp_path / step_prefix(20) / "manifest.json").exists()  # kept for whoever investigates
    again = Checkpointer(LocalStorage(tmp_path), keep=3, spec_hash="abc", rank=0, job=JOB).resume(tmp_path / "r2")
    assert again is not None and again.checkpoint.step == 10


def test_a_transient_read_error_on_resume_quarantines_nothing(tmp_path: Path) -> None:
    Checkpointer(LocalStorage(tmp_path), keep=3, spec_hash="abc", rank=0, job=JOB, background=False).save(
        10, full_state(10.0))
    flaky = Checkpointer(FlakyStorage(tmp_path, f"{step_prefix(10)}/manifest.json"), keep=3, spec_hash="abc",
                         rank=0, job=JOB)
    with pytest.raises(StorageError, match="500"):
        flaky.resume(tmp_path / "r")
    assert not (tmp_path / step_prefix(10) / "QUARANTINED").exists()


@pytest.mark.parametrize(("reader", "message"), [
    (JOB.model_copy(update={"name": "other"}),
     "belongs to PretrainJob default/tiny (uid 0123-4567), not to PretrainJob default/other"),
    (JOB.model_copy(update={"uid": "89ab"}), "belongs to PretrainJob default/tiny (uid 0123-4567), not to"),
])
def test_another_jobs_checkpoints_are_refused_permanently(tmp_path: Path, reader: JobIdentity,
                                                          message: str) -> None:
    Checkpointer(LocalStorage(tmp_path), keep=3, spec_hash="abc", rank=0, job=JOB, background=False).save(
        10, full_state(10.0))
    with pytest.raises(CheckpointMismatch, match="spec.checkpoint.uri") as refused:
        Checkpointer(LocalStorage(tmp_path), keep=3, spec_hash="abc", rank=0, job=reader).resume(tmp_path / "r")
    assert message in str(refused.value) and "warmStartFrom" in str(refused.value)
    assert not (tmp_path / step_prefix(10) / "QUARANTINED").exists()  # valid, only not ours


def test_the_same_job_without_a_uid_resumes(tmp_path: Path) -> None:
    """`kubeforge train` by hand on a cluster job's checkpoints: no uid to compare, the names agree."""
    Checkpointer(LocalStorage(tmp_path), keep=3, spec_hash="abc", rank=0, job=JOB, background=False).save(
        10, full_state(10.0))
    local = JOB.model_copy(update={"uid": None})
    restored = Checkpointer(LocalStorage(tmp_path), keep=3, spec_hash="abc", rank=0, job=local).resume(tmp_path / "r")
    assert restored is not None and restored.checkpoint.step == 10


def test_a_changed_spec_is_refused_permanently(tmp_path: Path) -> None:
    Checkpointer(LocalStorage(tmp_path), keep=3, spec_hash="abc", rank=0, job=JOB, background=False).save(
        10, full_state(10.0))
    with pytest.raises(CheckpointMismatch, match=r"spec.checkpoint.uri: .* another spec of this job \(spec hash abc, "
                                                 r"now def\)"):
        Checkpointer(LocalStorage(tmp_path), keep=3, spec_hash="def", rank=0, job=JOB).resume(tmp_path / "r")


def test_a_model_of_another_shape_is_refused_and_a_warm_start_names_its_field(tmp_path: Path) -> None:
    source = tmp_path / "other-job"
    Checkpointer(LocalStorage(source), keep=3, spec_hash="abc", rank=0, job=JOB, background=False).save(
        10, full_state(10.0), model_shape=model_shape(full_state(10.0)["model.pt"]))  # type: ignore[arg-type]
    mine = Checkpointer(LocalStorage(tmp_path / "mine"), keep=3, spec_hash="def", rank=0,
                        job=JOB.model_copy(update={"name": "other"}))
    warm = mine.warm_start(LocalStorage(source), tmp_path / "r")
    assert warm.warm_start and warm.checkpoint.step == 10
    check_model(warm, model_shape({"weight": torch.zeros(4, 4)}))  # same shape: fine
    with pytest.raises(CheckpointMismatch, match="spec.checkpoint.warmStartFrom: .* another shape"):
        check_model(warm, model_shape({"weight": torch.zeros(8, 4)}))
    with pytest.raises(CheckpointMismatch, match="spec.checkpoint.warmStartFrom: .* holds no verified checkpoint"):
        mine.warm_start(LocalStorage(tmp_path / "empty"), tmp_path / "r2")


def trained(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A small model one AdamW step in: its weights and optimizer state differ by seed."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> dict[str, object]:
    """What an fsdp Trainer saves (a single process writes the one shard there is)."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {SHARDS: {"model": model_state, "optimizer": optimizer_state}, "state.pt": {"step": step}}


def test_a_sharded_checkpoint_lists_every_shard_and_restores_model_and_optimizer_exactly(tmp_path: Path) -> None:
    model, optimizer = trained(seed=1)
    Checkpointer(LocalStorage(tmp_path), keep=3, spec_hash="abc", rank=0, job=JOB, background=False).save(
        10, sharded_state(model, optimizer, 10))
    manifest = json.loads((tmp_path / step_prefix(10) / "manifest.json").read_text())
    assert manifest["sharded"] is True and manifest["worldSize"] == 1
    assert {entry["name"] for entry in manifest["files"]} == {"shards/.metadata", "shards/__0_0.distcp", "state.pt"}

    restored = Checkpointer(LocalStorage(tmp_path), keep=3, spec_hash="abc", rank=0, job=JOB).resume(tmp_path / "r")
    assert restored is not None and restored.files["state.pt"] == {"step": 10}
    fresh, fresh_optimizer = trained(seed=2)
    load_sharded(restored.files[SHARDS], fresh, fresh_optimizer)
    for saved, loaded in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(saved, loaded)
        assert torch.equal(optimizer.state[saved]["exp_avg_sq"], fresh_optimizer.state[loaded]["exp_avg_sq"])


def test_a_sharded_checkpoint_with_a_tampered_shard_is_quarantined_and_the_previous_one_used(tmp_path: Path) -> None:
    checkpointer = Checkpointer(LocalStorage(tmp_path), keep=3, spec_hash="abc", rank=0, job=JOB, background=False)
    older, _ = trained(seed=1)
    checkpointer.save(10, sharded_state(older, torch.optim.AdamW(older.parameters()), 10))
    newer, _ = trained(seed=2)
    checkpointer.save(20, sharded_state(newer, torch.optim.AdamW(newer.parameters()), 20))
    flip_a_byte(tmp_path / step_prefix(20), "shards/__0_0.distcp")

    restored = Checkpointer(LocalStorage(tmp_path), keep=3, spec_hash="abc", rank=0, job=JOB).resume(tmp_path / "r")
    assert restored is not None and restored.checkpoint.step == 10
    marker = json.loads((tmp_path / step_prefix(20) / "QUARANTINED").read_text())
    assert "step-00000020/shards/__0_0.distcp does not match its manifest" in marker["reason"], marker
    fresh, _ = trained(seed=3)
    load_sharded(restored.files[SHARDS], fresh)
    assert all(torch.equal(a, b) for a, b in zip(older.parameters(), fresh.parameters(), strict=True))


class RunsCode:
    def __init__(self, witness: Path):
        self.witness = witness

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.witness}",)


def test_sharded_metadata_that_would_run_code_is_refused(tmp_path: Path) -> None:
    """The manifest proves integrity, not authorship: whoever can write the storage can write a
    .metadata pickle and a manifest to match. Loading it must not run what it holds."""
    model, _ = trained(seed=1)
    witness = tmp_path / "code-ran"
    (tmp_path / SHARDS).mkdir()
    (tmp_path / SHARDS / ".metadata").write_bytes(pickle.dumps(RunsCode(witness)))
    with pytest.raises(CorruptCheckpoint, match=r"not DCP metadata, refusing to load it \(GLOBAL posix.system"):
        load_sharded(tmp_path / SHARDS, model)
    assert not witness.exists()
