"""training.activationCheckpointing and training.compile: the same training, done another way."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from support.jobs import tiny_pretrain
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

from kubeforge.spec import JobError, parse_job
from kubeforge.trainer.loop import train
from kubeforge.trainer.models import enable_activation_checkpointing

STEPS = 12
LAYERS = 2  # of the tiny preset


@contextmanager
def mlp_forwards() -> Iterator[mock.MagicMock]:
    """Counts the forward passes of every GPT-2 block's MLP, recomputations included, while the block runs
    (module hooks would not see the recomputation: torch's checkpoint replays the forward without them)."""
    with mock.patch.object(GPT2MLP, "forward", autospec=True, side_effect=GPT2MLP.forward) as forward:
        yield forward


def run(tmp_path: Path, name: str, **training: Any) -> dict[str, Any]:
    job = parse_job(tiny_pretrain(name, maxSteps=STEPS, warmupSteps=2, evalInterval=STEPS, evalBatches=2,
                                  logInterval=STEPS, **training))
    return train(job, checkpoint_root=str(tmp_path / name))


def test_activation_checkpointing_recomputes_each_block_and_trains_to_the_same_loss(tmp_path: Path) -> None:
    with mlp_forwards() as plain_forwards:
        plain = run(tmp_path, "plain")
    with mlp_forwards() as checkpointed_forwards:
        checkpointed = run(tmp_path, "checkpointed", activationCheckpointing=True)
    # One more forward of every block per training step (the recomputation in backward), none in eval.
    assert checkpointed_forwards.call_count - plain_forwards.call_count == LAYERS * STEPS
    assert checkpointed.train_loss == pytest.approx(plain.train_loss, abs=1e-5)
    assert checkpointed.final_eval["loss"] == pytest.approx(plain.final_eval["loss"], abs=1e-5)


def test_a_model_without_activation_checkpointing_is_refused_naming_the_field() -> None:
    with pytest.raises(JobError, match=r"^training\.activationCheckpointing: Linear does not support"):
        enable_activation_checkpointing(torch.nn.Linear(2, 2))


def test_a_compiled_model_trains_as_the_plain_one(tmp_path: Path) -> None:
    # torch.compile on CPU generates and builds C++ kernels: about 30 s cold on 2 cores for the tiny model.
    plain = run(tmp_path, "plain")
    with mock.patch.object(torch, "compile", wraps=torch.compile) as compile_:
        compiled = run(tmp_path, "compiled", compile=True)
    [call] = compile_.call_args_list
    assert isinstance(call.args[0], torch.nn.Module)  # the training model, not a function of it
    assert compiled.train_loss == pytest.approx(plain.train_loss, abs=1e-4)
    assert compiled.final_eval["loss"] == pytest.approx(plain.final_eval["loss"], abs=1e-4)
    assert compiled.final_eval["loss"] < compiled.eval_history[0]["loss"] - 0.2
