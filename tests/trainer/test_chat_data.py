"""Chat data (data.messagesField): conversations in the chat template, the loss on the assistant's turns only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from support.models import CHAT, TEST_CHAT_TEMPLATE, finetune_manifest, records, tiny_base, tiny_tokenizer
from transformers import AutoTokenizer

from kubeforge.spec import FinetuneData, FinetuneJob, parse_job
from kubeforge.trainer.data import IGNORE_INDEX, DataError, instruction_sets
from kubeforge.trainer.loop import train

CHAT_DATA = {"train": {"uri": str(CHAT / "train.jsonl")}, "eval": {"uri": str(CHAT / "eval.jsonl")},
             "messagesField": "messages"}


@pytest.fixture(scope="module")
def chat_tokenizer() -> Any:
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = TEST_CHAT_TEMPLATE
    return tokenizer


def learned_spans(input_ids: torch.Tensor, labels: torch.Tensor) -> list[list[int]]:
    """The runs of consecutive tokens that carry a loss, as token ids."""
    spans: list[list[int]] = []
    previous = False
    for token, label in zip(input_ids.tolist(), labels.tolist(), strict=True):
        learned = label != IGNORE_INDEX
        if learned:
            assert label == token  # a label is the token itself (the model shifts it)
            if not previous:
                spans.append([])
            spans[-1].append(token)
        previous = learned
    return spans


def test_the_loss_covers_only_the_assistants_tokens(chat_tokenizer: Any) -> None:
    data = FinetuneData.model_validate(CHAT_DATA)
    train_set, _ = instruction_sets(data, None, chat_tokenizer, 256)  # every conversation whole
    conversations = [r["messages"] for r in records(CHAT / "train.jsonl")]
    for row in (0, 1, 7):
        replies = [m["content"] + chat_tokenizer.eos_token for m in conversations[row] if m["role"] == "assistant"]
        spans = learned_spans(train_set["input_ids"][row], train_set["labels"][row])
        # Exactly each assistant reply with its end-of-text token: no system, user or role-marker token.
        assert [chat_tokenizer.decode(span) for span in spans] == replies
    # What the loss sees is the chat template's rendering, token for token.
    whole = chat_tokenizer.apply_chat_template(conversations[0], tokenize=False)
    length = int(train_set["lengths"][0])
    assert train_set["input_ids"][0, :length].tolist() == chat_tokenizer(whole, add_special_tokens=False)["input_ids"]


def test_packed_conversations_keep_the_same_loss_and_restart_their_positions(chat_tokenizer: Any) -> None:
    data = FinetuneData.model_validate(CHAT_DATA)
    single, _ = instruction_sets(data, None, chat_tokenizer, 512)
    packed, _ = instruction_sets(data.model_copy(update={"packing": True}), None, chat_tokenizer, 512)
    assert len(packed["input_ids"]) <= len(single["input_ids"]) // 2  # several conversations per row
    assert sorted(packed["labels"][packed["labels"] != IGNORE_INDEX].tolist()) == sorted(
        single["labels"][single["labels"] != IGNORE_INDEX].tolist())
    first, second = int(single["lengths"][0]), int(single["lengths"][1])
    # Row 0 holds conversation 0, then conversation 1 from position 0, with its own loss mask.
    assert packed["position_ids"][0, first].item() == 0
    assert torch.equal(packed["labels"][0, first : first + second], single["labels"][1, :second])


def chat_job(base: Path, checkpoints: Path, **data: Any) -> FinetuneJob:
    job = parse_job(finetune_manifest(str(base), checkpoints, sequence_length=256, max_steps=20, learning_rate=3e-3,
                                      **CHAT_DATA, **data))
    assert isinstance(job, FinetuneJob)
    return job


def test_a_chat_dataset_finetunes_a_causal_lm_with_the_jobs_template(tmp_path: Path) -> None:
    base = tiny_base(tmp_path / "base", positions=256)  # no chat template of its own: the job gives one
    root = tmp_path / "out"
    result = train(chat_job(base, root, chatTemplate=TEST_CHAT_TEMPLATE, packing=True), checkpoint_root=str(root),
                   base_model_uri=str(base))
    start, end = result.eval_history[0]["loss"], result.final_eval["loss"]
    assert end < start - 1.0, result.eval_history
    # The exported model chats in the template it was trained in.
    assert AutoTokenizer.from_pretrained(root / "export").chat_template == TEST_CHAT_TEMPLATE


def test_a_base_without_a_chat_template_is_refused_naming_the_messages_field(tmp_path: Path) -> None:
    base = tiny_base(tmp_path / "base", positions=256)
    root = tmp_path / "out"
    with pytest.raises(DataError, match=r"^data\.messagesField: the base model's tokenizer has no chat template "
                                        r"to render 'messages' with: set data\.chatTemplate"):
        train(chat_job(base, root), checkpoint_root=str(root), base_model_uri=str(base))
