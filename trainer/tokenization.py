"""Tokenizers: a byte-level BPE one trained on a sample of the pretraining corpus (no download,
deterministic), or an existing Hugging Face one (tokenizer.uri)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast

from kubeforge.spec import JobError, S3Spec, TokenizerSpec
from kubeforge.storage import NotFound, download_tree, open_storage

#: What a Hugging Face tokenizer is made of: JSON only (a tokenizer.model or other pickled vocabulary is not read).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

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


def load_tokenizer(uri: str, s3: S3Spec | None, scratch: Path) -> Any:
    """tokenizer.uri's tokenizer: a Hugging Face tokenizer.json (with its config, where there is one)."""
    from transformers import AutoTokenizer

    storage = open_storage(uri, s3)
    present = [name for name in TOKENIZER_FILES if name in storage.list(name)]
    if "tokenizer.json" not in present:
        raise JobError(f"tokenizer.uri: {uri} holds no tokenizer.json")
    target = Path(tempfile.mkdtemp(prefix="tokenizer-", dir=scratch))
    try:
        download_tree(storage, "", target, field="tokenizer.uri", only=present)
    except NotFound as exc:
        raise JobError(f"tokenizer.uri: {exc}") from None
    tokenizer: Any = (AutoTokenizer.from_pretrained(target, trust_remote_code=False)
                      if "tokenizer_config.json" in present
                      else PreTrainedTokenizerFast(tokenizer_file=str(target / "tokenizer.json")))
    if tokenizer.eos_token_id is None:
        raise JobError(f"tokenizer.uri: the tokenizer at {uri} has no end-of-text (eos) token to separate "
                       "documents with")
    ensure_pad_token(tokenizer)
    return tokenizer
