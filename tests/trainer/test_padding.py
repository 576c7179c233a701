"""No compute on padding: micro-batches cut to their longest row, length-grouped batches, packed SFT."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from support.jobs import EXAMPLES

from kubeforge.spec import FinetuneJob, ModelSpec, TokenizerSpec, parse_job
from kubeforge.trainer import data as trainer_data
from kubeforge.trainer.checkpoint import step_prefix
from kubeforge.trainer.loop import train
from kubeforge.trainer.models import build_pretrain_model
from kubeforge.trainer.tokenization import train_tokenizer

REVIEWS = EXAMPLES / "data" / "reviews" / "train.jsonl"
INSTRUCTIONS = EXAMPLES / "data" / "instructions" / "train.jsonl"


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    texts = [r["text"] for r in records(REVIEWS)] + [r["prompt"] + " " + r["response"] for r in records(INSTRUCTIONS)]
    return train_tokenizer(texts, TokenizerSpec(vocab_size=512))


def reviews(tokenizer: Any, sequence_length: int = 128) -> dict[str, torch.Tensor]:
    rows = records(REVIEWS)
    labels = [int(r["label"] == "positive") for r in rows]
    return trainer_data.classification_examples([r["text"] for r in rows], labels, tokenizer, sequence_length)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_a_micro_batch_is_cut_to_its_longest_row_rounded_up_to_eight_on_gpus(tokenizer: Any, device: str) -> None:
    tensors = reviews(tokenizer)
    lengths = tensors[trainer_data.LENGTHS]
    rows = torch.tensor([int(lengths.argmin()), int(lengths.argmax())])
    micro = trainer_data.take(tensors, rows, trainer_data.pad_multiple(torch.device(device)))
    longest = int(lengths.max())
    width = -(-longest // 8) * 8 if device == "cuda" else longest
    assert micro.inputs["input_ids"].shape == micro.inputs["attention_mask"].shape == (2, width)
    assert set(micro.inputs) == {"input_ids", "attention_mask", "labels"}  # lengths are no model input
    assert micro.real_tokens == int(lengths[rows].sum())
    assert micro.computed_tokens == 2 * width
    # Nothing real was cut off: every token the attention mask covers is still there.
    assert int(micro.inputs["attention_mask"].sum()) == micro.real_tokens


def test_length_grouping_is_exact_on_resume_and_cuts_padding(tokenizer: Any) -> None:
    tensors = reviews(tokenizer)
    grouped = trainer_data.Batches(tensors, batch_size=16, seed=3, rank=0, world_size=1, group_by_length=True)
    plain = trainer_data.Batches(tensors, batch_size=16, seed=3, rank=0, world_size=1)
    epoch = range(grouped.per_epoch)

    def ratio(batches: trainer_data.Batches) -> float:
        micro = [batches[i] for i in epoch]
        return sum(m.computed_tokens for m in micro) / sum(m.real_tokens for m in micro)

    assert ratio(grouped) <= 1.25 < ratio(plain)
    # The same rows as without grouping, each once per epoch: only their order into batches changed.
    served = sorted(int(r) for i in epoch for r in grouped._order[1][i * 16 : (i + 1) * 16])  # type: ignore[index]
    assert len(set(served)) == len(served) == grouped.per_epoch * 16
    # A fresh instance (a resumed run) serves the very same micro-batches, in a later epoch too.
    again = trainer_data.Batches(tensors, batch_size=16, seed=3, rank=0, world_size=1, group_by_length=True)
    for index in (grouped.per_epoch + 5, 7, 0):
        assert torch.equal(again[index].inputs["input_ids"], grouped[index].inputs["input_ids"])
    # ...and the next epoch is grouped anew rather than replayed.
    assert [grouped[i].real_tokens for i in epoch] != [grouped[grouped.per_epoch + i].real_tokens for i in epoch]


def test_packed_pairs_attend_only_to_themselves_and_keep_the_response_loss(tokenizer: Any) -> None:
    pairs = records(INSTRUCTIONS)[:12]
    prompts, responses = [p["prompt"] for p in pairs], [p["response"] for p in pairs]
    packed = trainer_data.packed_sft_examples(prompts, responses, tokenizer, 128)
    single = trainer_data.sft_examples(prompts, responses, tokenizer, 128)
    assert len(packed["input_ids"]) <= len(pairs) // 2  # several pairs per row
    assert int(packed[trainer_data.LENGTHS].sum()) == int(single[trainer_data.LENGTHS].sum())  # no pair lost
    # The loss covers the same response tokens, packed or not.
    assert sorted(packed["labels"][packed["labels"] != -100].tolist()) == sorted(
        single["labels"][single["labels"] != -100].tolist())

    torch.manual_seed(0)
    for attention in ("eager", "sdpa"):
        model = build_pretrain_model(ModelSpec(size="tiny"), tokenizer, 128)
        model.config.use_cache = False
        model.set_attn_implementation(attention)
        model.eval()
        row = trainer_data.take(packed, slice(0, 1)).inputs
        # The second pair of row 0: where it starts, and the logits it gets alone.
        first = int(single[trainer_data.LENGTHS][0])
        second = int(single[trainer_data.LENGTHS][1])
        with torch.no_grad():
            together = model(input_ids=row["input_ids"], position_ids=row["position_ids"]).logits
            alone = model(input_ids=single["input_ids"][1:2, :second]).logits
        assert torch.allclose(together[0, first : first + second], alone[0], atol=1e-4), attention


def make_base_model(tokenizer: Any, directory: Path) -> Path:
    torch.manual_seed(0)
    build_pretrain_model(ModelSpec(size="tiny"), tokenizer, 128).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def finetune(task: str, data: Path, base: Path, root: Path, **extra: Any) -> FinetuneJob:
    job = parse_job({
        "apiVersion": "kubeforge.io/v1alpha1", "kind": "FinetuneJob", "metadata": {"name": "short-texts"},
        "spec": {
            "baseModel": {"uri": str(base)}, "task": task, "method": "full",
            "data": {"train": {"uri": str(data)}, **extra},
            "training": {"maxSteps": 20, "batchSize": 16, "sequenceLength": 128, "learningRate": 1e-3,
                         "evalInterval": 1000, "evalBatches": 1, "logInterval": 5},
            "checkpoint": {"uri": str(root), "intervalSteps": 1000},
            "resources": {"gpusPerWorker": 0}, "metrics": {"port": 0},
        },
    })
    assert isinstance(job, FinetuneJob)
    return job


COMPUTED = re.compile(r"computed ([0-9.]+)x the real tokens")


@pytest.mark.parametrize(("task", "data", "extra"), [
    ("sequence-classification", REVIEWS, {}),
    ("causal-lm", INSTRUCTIONS, {"packing": True}),
], ids=["classification", "sft-packed"])
def test_a_finetune_on_short_texts_computes_at_most_1_25x_its_real_tokens(
        task: str, data: Path, extra: dict[str, Any], tokenizer: Any, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    base = make_base_model(tokenizer, tmp_path / "base")
    with caplog.at_level(logging.INFO, logger="kubeforge.trainer.loop"):
        result = train(finetune(task, data, base, tmp_path / "ckpt", **extra), checkpoint_root=str(tmp_path / "ckpt"),
                       base_model_uri=str(base))
    ratios = [float(m.group(1)) for m in map(COMPUTED.search, caplog.messages) if m]
    assert len(ratios) == 4, caplog.messages  # one per logging interval of 5 steps
    assert all(1.0 <= r <= 1.25 for r in ratios), ratios
    assert result.step == 20 and result.final_eval["loss"] < 50


def test_a_packed_length_grouped_finetune_resumes_exactly(tokenizer: Any, tmp_path: Path) -> None:
    """Grouped batches, packing, fused AdamW and the tied embeddings all survive a resume bit for bit."""
    base = make_base_model(tokenizer, tmp_path / "base")
    root = tmp_path / "ckpt"
    job = finetune("causal-lm", INSTRUCTIONS, base, root, packing=True)
    spec = job.spec.model_copy(update={
        "training": job.spec.training.model_copy(update={"max_steps": 12}),
        "checkpoint": job.spec.checkpoint.model_copy(update={"interval_steps": 6}),
    })
    job = job.model_copy(update={"spec": spec})
    uninterrupted = train(job, checkpoint_root=str(root), base_model_uri=str(base))
    shutil.rmtree(root / step_prefix(12))  # as if the run had died after its step-6 checkpoint
    resumed = train(job, checkpoint_root=str(root), base_model_uri=str(base))
    assert resumed.resumed_from_step == 6 and resumed.step == 12
    assert resumed.final_eval["loss"] == uninterrupted.final_eval["loss"]
    assert resumed.train_loss == uninterrupted.train_loss
