"""Tiny base models for finetuning tests, built from config (no download): GPT-2 with a BPE tokenizer
trained on the example data, saved as a Hugging Face model directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from kubeforge.spec import ModelSpec, TokenizerSpec
from kubeforge.trainer.models import build_pretrain_model
from kubeforge.trainer.tokenization import train_tokenizer
from support.jobs import EXAMPLES

INSTRUCTIONS = EXAMPLES / "data" / "instructions"
REVIEWS = EXAMPLES / "data" / "reviews"
CHAT = EXAMPLES / "data" / "chat"

#: A chat template as the Hub's tokenizers carry one (Jinja, rendered by apply_chat_template): tiny
#: bases have none of their own. An assistant turn is its content and the end-of-text token.
TEST_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|assistant|>\n{{ message['content'] }}{{ eos_token }}"
    "{% else %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tiny_tokenizer() -> Any:
    """A byte-level BPE trained on the example reviews and instructions: every example text tokenizes."""
    texts = [r["text"] for r in records(REVIEWS / "train.jsonl")]
    texts += [r["prompt"] + " " + r["response"] for r in records(INSTRUCTIONS / "train.jsonl")]
    return train_tokenizer(texts, TokenizerSpec(vocab_size=512))


def tiny_base(directory: Path, *, positions: int = 128, chat_template: str | None = None,
              tokenizer: Any = None, architecture: str = "gpt2", layers: int | None = None) -> Path:
    """A tiny GPT-2 (or llama; 2 layers, or `layers`) with `positions` position embeddings, saved with
    its tokenizer (and chat template)."""
    tokenizer = tokenizer or tiny_tokenizer()
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    torch.manual_seed(0)
    spec = ModelSpec(architecture=architecture, size="tiny", num_layers=layers)  # type: ignore[arg-type]
    build_pretrain_model(spec, tokenizer, positions).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def finetune_manifest(base_uri: str, checkpoints: Path, *, task: str = "causal-lm", method: str = "full",
                      sequence_length: int = 64, max_steps: int = 2, learning_rate: float = 1e-3,
                      **data: Any) -> dict[str, Any]:
    """A FinetuneJob on the example data (instructions, or reviews for classification); `data`
    overrides spec.data fields."""
    source = INSTRUCTIONS if task == "causal-lm" else REVIEWS
    return {
        "apiVersion": "kubeforge.io/v1alpha1", "kind": "FinetuneJob", "metadata": {"name": "tiny-finetune"},
        "spec": {
            "baseModel": {"uri": base_uri}, "task": task, "method": method,
            "data": {"train": {"uri": str(source / "train.jsonl")}, "eval": {"uri": str(source / "eval.jsonl")},
                     **data},
            "training": {"maxSteps": max_steps, "batchSize": 8, "sequenceLength": sequence_length,
                         "learningRate": learning_rate, "evalInterval": 1000, "evalBatches": 1, "logInterval": 1},
            "checkpoint": {"uri": str(checkpoints), "intervalSteps": 1000},
            "resources": {"gpusPerWorker": 0}, "metrics": {"port": 0},
        },
    }
