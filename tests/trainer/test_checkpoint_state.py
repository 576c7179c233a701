"""What a checkpoint holds (trainer/checkpoint/state.py): every component saved and restored exactly,
through a real Checkpointer on a local directory; and a checkpoint of the earlier layout resumes."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from kubeforge.storage import LocalStorage
from kubeforge.trainer.checkpoint import Checkpointer, CheckpointMismatch, JobIdentity, Restored
from kubeforge.trainer.checkpoint.state import (
    Progress,
    Rng,
    TrainingState,
    TrainState,
    Weights,
    saved_micro_batches_per_step,
)
from kubeforge.trainer.data import Batches

JOB = JobIdentity(namespace="default", kind="PretrainJob", name="tiny")


class Run:
    """The state a Trainer registers, for a small model one AdamW step in."""

    def __init__(self, seed: int, world_size: int = 1, hidden: int = 8):
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.Linear(hidden, 2))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 1.0 / (step + 1))
        self.model(torch.randn(3, 4)).sum().backward()
        self.optimizer.step()
        self.scheduler.step()
        self.state = TrainState(step=seed, micro_batch=seed * 2, tokens_seen=seed * 100,
                                eval_history=[{"step": 0, "loss": float(seed)}])
        batches = Batches({"input_ids": torch.zeros(16, 4, dtype=torch.long)}, 2, 0, 0, world_size)
        self.registry = TrainingState(
            Weights(self.model, self.optimizer, sharded=False),
            {"scheduler": self.scheduler, "progress": Progress(self.state, batches, world_size, 2),
             "rng": Rng(torch.device("cpu"))},
            tokenizer=None)

    def save(self, root: Path, step: int) -> None:
        checkpointer = Checkpointer(LocalStorage(root), keep=2, spec_hash="abc", rank=0, job=JOB, background=False)
        checkpointer.save(step, self.registry.files(), model_shape=self.registry.weights.shape)
        checkpointer.close()


def resume(root: Path) -> Restored:
    restored = Checkpointer(LocalStorage(root), keep=2, spec_hash="abc", rank=0, job=JOB).resume(root / "restore")
    assert restored is not None
    return restored


def test_every_component_is_restored_exactly(tmp_path: Path) -> None:
    saved = Run(seed=5)
    saved.save(tmp_path, 5)
    after_save = (torch.rand(3), random.random())

    fresh = Run(seed=9)
    fresh.registry.restore(resume(tmp_path))
    for before, after in zip(saved.model.parameters(), fresh.model.parameters(), strict=True):
        assert torch.equal(before, after)
        assert torch.equal(saved.optimizer.state[before]["exp_avg"], fresh.optimizer.state[after]["exp_avg"])
    assert fresh.scheduler.state_dict() == saved.scheduler.state_dict()
    assert fresh.state == saved.state
    assert torch.equal(torch.rand(3), after_save[0]) and random.random() == after_save[1]  # as they would have


def test_a_resume_on_other_ranks_keeps_a_steps_batch_and_the_data_position(tmp_path: Path) -> None:
    Run(seed=4, world_size=2).save(tmp_path, 4)  # 2 ranks x 2 micro-batches a step, at global micro-batch 8
    restored = resume(tmp_path)
    assert saved_micro_batches_per_step(restored) == 4
    alone = Run(seed=9, world_size=1)
    alone.registry.restore(restored)
    assert alone.state.micro_batch == 16  # the rows two ranks trained, counted in one rank's micro-batches


def test_weights_of_another_shape_are_refused_before_anything_loads(tmp_path: Path) -> None:
    Run(seed=5).save(tmp_path, 5)
    wider = Run(seed=9, hidden=16)
    with pytest.raises(CheckpointMismatch, match="another shape"):
        wider.registry.restore(resume(tmp_path))
    assert wider.state.step == 9


def test_a_checkpoint_of_the_earlier_flat_layout_resumes(tmp_path: Path) -> None:
    """state.pt once held progress at its top level, beside scheduler and rng."""
    old = Run(seed=3)
    files = old.registry.files()
    nested = files["state.pt"]
    files["state.pt"] = {"scheduler": nested["scheduler"], "rng": nested["rng"], **nested["progress"]}
    checkpointer = Checkpointer(LocalStorage(tmp_path), keep=2, spec_hash="abc", rank=0, job=JOB, background=False)
    checkpointer.save(3, files)
    checkpointer.close()

    restored = resume(tmp_path)
    assert saved_micro_batches_per_step(restored) == 2
    fresh = Run(seed=9)
    fresh.registry.restore(restored)
    assert fresh.state == old.state
