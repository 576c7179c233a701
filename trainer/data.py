"""Training data: read sources (local or S3, .txt or .jsonl), tokenize, and serve batches.

Every dataset ends as a dict of equal-length tensors. Batches are addressed by a global micro-batch
index, so the data position in a checkpoint is one integer and resuming is exact.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import torch

from kubeforge.spec import DataSource, FinetuneData, JobError, PretrainData, S3Spec
from kubeforge.storage import open_storage

SFT_TEMPLATE = "### Instruction:\n{prompt}\n### Response:\n"
IGNORE_INDEX = -100


class DataError(JobError):
    """Data that cannot be trained on; retrying will not help."""


# ---------------------------------------------------------------------------------------------
# Reading


def _format_of(name: str, source: DataSource) -> str | None:
    if source.format != "auto":
        return source.format
    suffix = PurePosixPath(name).suffix
    return {".txt": "txt", ".jsonl": "jsonl"}.get(suffix)


def read_source(source: DataSource, s3: S3Spec | None, field: str) -> list[dict[str, Any]]:
    """Every record of a source as dicts; a .txt file is one record {field: its text}."""
    local = Path(source.uri.removeprefix("file://"))
    if not source.uri.startswith("s3://") and local.is_file():
        return _parse(local.name, local.read_bytes(), source, field)
    # List the last path segment under its parent: it may name one object or a "directory".
    parent, leaf = source.uri.rstrip("/"), ""
    if source.uri.startswith("s3://") and urlparse(source.uri).path.strip("/"):
        parent, _, leaf = source.uri.rstrip("/").rpartition("/")
    storage = open_storage(parent, s3)
    keys = [k for k in storage.list(leaf) if _format_of(k, source)]
    if not keys:
        raise DataError(f"{source.uri}: no .txt or .jsonl files found")
    records: list[dict[str, Any]] = []
    for key in keys:
        records.extend(_parse(key, storage.get_bytes(key), source, field))
    return records


def _parse(name: str, raw: bytes, source: DataSource, field: str) -> list[dict[str, Any]]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{source.uri}/{name}: not UTF-8 text") from None
    fmt = _format_of(name, source)
    if fmt == "txt":
        return [{field: text}]
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{name} line {number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{name} line {number}: expected a JSON object")
        records.append(record)
    return records


def field_values(records: list[dict[str, Any]], field: str, spec_field: str, uri: str) -> list[Any]:
    for number, record in enumerate(records, start=1):
        if field not in record:
            raise DataError(f"{uri} record {number}: has no field {field!r} (data.{spec_field})")
    return [r[field] for r in records]


def split_train_eval(records: list[dict[str, Any]], fraction: float, field: str
                     ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Hold out the last `fraction` of the records, or of the text when there are too few."""
    if len(records) >= 20:
        cut = len(records) - max(1, math.ceil(len(records) * fraction))
        return records[:cut], records[cut:]
    text = "\n".join(str(r[field]) for r in records)
    cut = text.rfind("\n", 0, int(len(text) * (1 - fraction)))
    cut = cut if cut > 0 else int(len(text) * (1 - fraction))
    return [{field: text[:cut]}], [{field: text[cut:]}]


def load_splits(data: PretrainData | FinetuneData, s3: S3Spec | None, field: str
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    train = read_source(data.train, s3, field)
    if data.eval is not None:
        return train, read_source(data.eval, s3, field)
    return split_train_eval(train, data.eval_fraction, field)


# ---------------------------------------------------------------------------------------------
# Tokenizing into tensors


def pack_texts(texts: list[str], tokenizer: Any, sequence_length: int, what: str) -> dict[str, torch.Tensor]:
    """Concatenate documents (separated by end-of-text) and cut fixed-length sequences."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    count = len(ids) // sequence_length
    if count == 0:
        raise DataError(f"{what}: {len(ids)} tokens, fewer than one sequence of "
                        f"training.sequenceLength={sequence_length}")
    blocks = torch.tensor(ids[: count * sequence_length], dtype=torch.long).view(count, sequence_length)
    return {"input_ids": blocks, "labels": blocks}


def sft_examples(prompts: list[str], responses: list[str], tokenizer: Any, sequence_length: int
                 ) -> dict[str, torch.Tensor]:
    """Instruction/response pairs; the loss is on the response only."""
    count = len(prompts)
    input_ids = torch.full((count, sequence_length), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((count, sequence_length), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((count, sequence_length), dtype=torch.long)
    for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        head = tokenizer(SFT_TEMPLATE.format(prompt=prompt), add_special_tokens=False)["input_ids"]
        tail = tokenizer(str(response), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (head + tail)[:sequence_length]
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        answer = slice(min(len(head), len(ids)), len(ids))
        labels[row, answer] = input_ids[row, answer]
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def classification_examples(texts: list[str], labels: list[int], tokenizer: Any, sequence_length: int
                            ) -> dict[str, torch.Tensor]:
    encoded = tokenizer([str(t) for t in texts], max_length=sequence_length, truncation=True,
                        padding="max_length", return_tensors="pt")
    return {
        "input_ids": encoded["input_ids"],
        "attention_mask": encoded["attention_mask"],
        "labels": torch.tensor(labels, dtype=torch.long),
    }


def label_names(values: list[Any]) -> list[str]:
    return sorted({str(v) for v in values})


# ---------------------------------------------------------------------------------------------
# A job's data sets


def pretrain_texts(data: PretrainData, s3: S3Spec | None) -> tuple[list[str], list[str]]:
    """The train and eval documents of a pretraining job."""
    train_records, eval_records = load_splits(data, s3, data.text_field)
    return ([str(t) for t in field_values(train_records, data.text_field, "textField", "data.train")],
            [str(t) for t in field_values(eval_records, data.text_field, "textField", "data.eval")])


def classification_sets(data: FinetuneData, s3: S3Spec | None, tokenizer: Any, sequence_length: int
                        ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
    """Train and eval tensors of a sequence-classification job, and its label names (those of data.train)."""
    train_records, eval_records = load_splits(data, s3, data.text_field)
    labels = label_names(field_values(train_records, data.label_field, "labelField", "data.train"))
    index = {name: i for i, name in enumerate(labels)}

    def encode(records: list[dict[str, Any]], what: str) -> dict[str, torch.Tensor]:
        texts = field_values(records, data.text_field, "textField", what)
        values = [str(v) for v in field_values(records, data.label_field, "labelField", what)]
        unknown = sorted(set(values) - set(index))
        if unknown:
            raise DataError(f"{what}: labels {unknown} never appear in data.train")
        return classification_examples(texts, [index[v] for v in values], tokenizer, sequence_length)

    return encode(train_records, "data.train"), encode(eval_records, "data.eval"), labels


def instruction_sets(data: FinetuneData, s3: S3Spec | None, tokenizer: Any, sequence_length: int
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Train and eval tensors of a causal-lm finetuning job (prompt/response pairs)."""
    train_records, eval_records = load_splits(data, s3, data.prompt_field)

    def encode(records: list[dict[str, Any]], what: str) -> dict[str, torch.Tensor]:
        prompts = field_values(records, data.prompt_field, "promptField", what)
        answers = field_values(records, data.response_field, "responseField", what)
        return sft_examples([str(p) for p in prompts], [str(a) for a in answers], tokenizer, sequence_length)

    return encode(train_records, "data.train"), encode(eval_records, "data.eval")


# ---------------------------------------------------------------------------------------------
# Serving batches


@dataclass
class Batches:
    """Shuffled, sharded micro-batches, addressed by a global index so a run can resume exactly."""

    tensors: dict[str, torch.Tensor]
    batch_size: int
    seed: int
    rank: int
    world_size: int

    _order: tuple[int, torch.Tensor] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        rows = len(next(iter(self.tensors.values())))
        self.per_epoch = rows // (self.batch_size * self.world_size)
        if self.per_epoch == 0:
            raise DataError(
                f"the training set has {rows} sequences, fewer than training.batchSize "
                f"({self.batch_size}) x resources.workers ({self.world_size})")

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        epoch, position = divmod(index, self.per_epoch)
        if self._order is None or self._order[0] != epoch:  # one shuffle per epoch, not per batch
            generator = torch.Generator().manual_seed(self.seed + epoch)
            rows = len(next(iter(self.tensors.values())))
            self._order = (epoch, torch.randperm(rows, generator=generator))
        order = self._order[1]
        start = (position * self.world_size + self.rank) * self.batch_size
        chosen = order[start : start + self.batch_size]
        return {name: tensor[chosen] for name, tensor in self.tensors.items()}


def eval_batches(tensors: dict[str, torch.Tensor], batch_size: int, limit: int, rank: int, world_size: int
                 ) -> list[dict[str, torch.Tensor]]:
    """This rank's share of the first `limit` eval batches, in order."""
    rows = len(next(iter(tensors.values())))
    batches = []
    for index in range(rank, min(limit, math.ceil(rows / batch_size)), world_size):
        chosen = slice(index * batch_size, (index + 1) * batch_size)
        batches.append({name: tensor[chosen] for name, tensor in tensors.items()})
    return batches
