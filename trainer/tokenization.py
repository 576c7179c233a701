"""A byte-level BPE tokenizer trained on the pretraining corpus (no download, deterministic)."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast

from kubeforge.spec import TokenizerSpec

END_OF_TEXT = "<|endoftext|>"
PAD = "<|pad|>"


def train_tokenizer(texts: Iterable[str], spec: TokenizerSpec) -> PreTrainedTokenizerFast:
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts, vocab_size=spec.vocab_size, min_frequency=spec.min_frequency,
        special_tokens=[END_OF_TEXT, PAD], show_progress=False,
    )
    return wrap(bpe._tokenizer)


def wrap(tokenizer_object) -> PreTrainedTokenizerFast:  # type: ignore[no-untyped-def]
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer_object,
        bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, unk_token=END_OF_TEXT, pad_token=PAD,
        model_max_length=1_000_000,
    )


def from_json(serialized: str) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer

    return wrap(Tokenizer.from_str(serialized))


def ensure_pad_token(tokenizer) -> None:  # type: ignore[no-untyped-def]
    """Base models such as GPT-2 ship without a pad token; batching needs one."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
