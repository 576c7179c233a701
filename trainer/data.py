"""Training data: read sources (local or S3, .txt or .jsonl), tokenize, and serve batches.

Every dataset ends as a dict of equal-length tensors, padded to sequenceLength, with the real length
of each row under LENGTHS where rows are padded. A micro-batch is cut to its longest row (rounded up
to a multiple of 8 on GPUs), so no compute is spent on padding beyond that. Batches are addressed by a global
micro-batch index, so the data position in a checkpoint is one integer and resuming is exact.
"""

from __future__ import annotations

import gzip
import io
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlparse

import jinja2
import torch

from kubeforge.spec import DataSource, FinetuneData, JobError, PretrainData, S3Spec
from kubeforge.storage import LocalStorage, Storage, open_storage

SFT_TEMPLATE = "### Instruction:\n{prompt}\n### Response:\n"
IGNORE_INDEX = -100
#: The real (unpadded) tokens of each row: a dataset key that is not a model input.
LENGTHS = "lengths"
#: Micro-batch widths on a GPU are a multiple of this: tensor-core friendly shapes, few distinct
#: shapes. On a CPU rounding up buys nothing and only adds padding.
GPU_PAD_MULTIPLE = 8
#: Length grouping sorts rows by length within windows of this many optimizer steps' rows (as HF does).
GROUPING_WINDOW_STEPS = 50


class DataError(JobError):
    """Data that cannot be trained on; retrying will not help."""


class Rows(Protocol):
    """A data set's column: a tensor, or sequences read from token shards (corpus.TokenSequences)."""

    def __len__(self) -> int: ...
    def __getitem__(self, rows: torch.Tensor | slice, /) -> torch.Tensor: ...


@runtime_checkable
class ShuffledInBlocks(Protocol):
    """Rows that give their own epoch order: sequences read from token shards, shuffled within
    blocks of shards so that a rank reads from few shards at a time (corpus.TokenSequences)."""

    def shuffle(self, generator: torch.Generator) -> torch.Tensor: ...


#: A data set: equal-length columns by name (input_ids, labels, attention_mask, LENGTHS...).
DataSet = Mapping[str, Rows]


# ---------------------------------------------------------------------------------------------
# Reading


#: The formats by file extension; .gz and .zst compress a .txt or .jsonl file.
SUFFIXES = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}
COMPRESSIONS = (".gz", ".zst")


def file_format(name: str, source: DataSource) -> str | None:
    """txt, jsonl or parquet (by source.format, else by extension, compression aside); None to skip."""
    if source.format != "auto":
        return source.format
    path = PurePosixPath(name)
    suffix = path.suffix
    if suffix in COMPRESSIONS:
        suffix = PurePosixPath(path.stem).suffix
        if suffix not in (".txt", ".jsonl"):
            return None
    return SUFFIXES.get(suffix)


def source_storage(source: DataSource, s3: S3Spec | None) -> tuple[Storage, str]:
    """The storage a source's files are listed in, and the prefix (a file or "directory") to list."""
    local = Path(source.uri.removeprefix("file://"))
    if not source.uri.startswith("s3://") and local.is_file():
        return LocalStorage(local.parent), local.name
    # List the last path segment under its parent: it may name one object or a "directory".
    parent, leaf = source.uri.rstrip("/"), ""
    if source.uri.startswith("s3://") and urlparse(source.uri).path.strip("/"):
        parent, _, leaf = source.uri.rstrip("/").rpartition("/")
    return open_storage(parent, s3), leaf


def read_source(source: DataSource, s3: S3Spec | None, field: str) -> list[dict[str, Any]]:
    """Every record of a source as dicts; a .txt file is one record {field: its text}."""
    storage, prefix = source_storage(source, s3)
    keys = [k for k in storage.list(prefix) if file_format(k, source)]
    if not keys:
        raise DataError(f"{source.uri}: no .txt, .jsonl(.gz/.zst) or .parquet files found")
    records: list[dict[str, Any]] = []
    for key in keys:
        records.extend(_parse(PurePosixPath(key).name, storage.get_bytes(key), source, field))
    return records


def _decompressed(name: str, raw: bytes) -> bytes:
    if name.endswith(".gz"):
        return gzip.decompress(raw)
    if name.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(raw)
    return raw


def _parse(name: str, raw: bytes, source: DataSource, field: str) -> list[dict[str, Any]]:
    fmt = file_format(name, source)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(io.BytesIO(raw)).to_pylist()
        except Exception as exc:  # pyarrow's ArrowInvalid and friends: not a Parquet file
            raise DataError(f"{source.uri}/{name}: not a readable Parquet file ({exc})") from None
    try:
        text = _decompressed(name, raw).decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{source.uri}/{name}: not UTF-8 text") from None
    except (OSError, EOFError, ValueError) as exc:  # a truncated or corrupt .gz/.zst
        raise DataError(f"{source.uri}/{name}: cannot be decompressed ({exc})") from None
    if fmt == "txt":
        return [{field: text}]
    # Only \n ends a JSONL line: str.splitlines would also cut at U+2028 and other separators that
    # JSON allows raw inside strings.
    return [record for _, record in jsonl_records(text.split("\n"), name)]


def jsonl_records(lines: Iterable[str], what: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """The JSON objects of a JSONL file's lines, each with its line number (blank lines skipped);
    `what` names the file in errors."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{what} line {number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{what} line {number}: expected a JSON object")
        yield number, record


def field_values(records: list[dict[str, Any]], field: str, spec_field: str, uri: str) -> list[Any]:
    for number, record in enumerate(records, start=1):
        if field not in record:
            raise DataError(f"{uri} record {number}: has no field {field!r} (data.{spec_field})")
        if record[field] is None:
            raise DataError(f"{uri} record {number}: field {field!r} is null (data.{spec_field})")
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


#: One training sequence: its token ids and their labels (IGNORE_INDEX where there is no loss).
TokenExample = tuple[list[int], list[int]]


def _sft_tokens(prompt: str, response: str, tokenizer: Any, sequence_length: int) -> TokenExample:
    """One instruction/response pair as token ids (truncated), the loss on the response."""
    head = tokenizer(SFT_TEMPLATE.format(prompt=prompt), add_special_tokens=False)["input_ids"]
    tail = tokenizer(str(response), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return (head + tail)[:sequence_length], ([IGNORE_INDEX] * len(head) + tail)[:sequence_length]


def padded_rows(examples: list[TokenExample], pad_token_id: int, sequence_length: int) -> dict[str, torch.Tensor]:
    """One example per row, padded on the right."""
    count = len(examples)
    input_ids = torch.full((count, sequence_length), pad_token_id, dtype=torch.long)
    labels = torch.full((count, sequence_length), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((count, sequence_length), dtype=torch.long)
    for row, (ids, targets) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(targets)
        attention[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels, LENGTHS: attention.sum(1)}


def packed_rows(examples: list[TokenExample], pad_token_id: int, sequence_length: int) -> dict[str, torch.Tensor]:
    """Examples packed several to a row, in order, each kept whole.

    Each example's position_ids restart at 0 and there is no attention_mask: transformers' mask
    utilities then read the examples' boundaries from position_ids and let each attend only to
    itself (a block-diagonal causal mask on eager and sdpa, varlen kernels on flash-attention).
    The unused tail of a row is one more such block, of padding, with no loss."""
    rows: list[list[TokenExample]] = [[]]
    used = 0
    for ids, targets in examples:
        if used + len(ids) > sequence_length:
            rows.append([])
            used = 0
        rows[-1].append((ids, targets))
        used += len(ids)
    count = len(rows)
    input_ids = torch.full((count, sequence_length), pad_token_id, dtype=torch.long)
    labels = torch.full((count, sequence_length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((count, sequence_length), dtype=torch.long)
    lengths = torch.zeros(count, dtype=torch.long)
    for row, packed in enumerate(rows):
        start = 0
        for ids, targets in packed:
            end = start + len(ids)
            input_ids[row, start:end] = torch.tensor(ids)
            labels[row, start:end] = torch.tensor(targets)
            position_ids[row, start:end] = torch.arange(len(ids))
            start = end
        position_ids[row, start:] = torch.arange(sequence_length - start)
        lengths[row] = start
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels, LENGTHS: lengths}


def _sft_pairs(prompts: list[str], responses: list[str], tokenizer: Any, sequence_length: int
               ) -> list[TokenExample]:
    return [_sft_tokens(p, r, tokenizer, sequence_length) for p, r in zip(prompts, responses, strict=True)]


def sft_examples(prompts: list[str], responses: list[str], tokenizer: Any, sequence_length: int
                 ) -> dict[str, torch.Tensor]:
    """Instruction/response pairs, one per row; the loss is on the response only."""
    return padded_rows(_sft_pairs(prompts, responses, tokenizer, sequence_length), tokenizer.pad_token_id,
                       sequence_length)


def packed_sft_examples(prompts: list[str], responses: list[str], tokenizer: Any, sequence_length: int
                        ) -> dict[str, torch.Tensor]:
    """Instruction/response pairs packed several to a row (see packed_rows)."""
    return packed_rows(_sft_pairs(prompts, responses, tokenizer, sequence_length), tokenizer.pad_token_id,
                       sequence_length)


def conversation(value: Any, what: str) -> list[dict[str, Any]]:
    """A record's data.messagesField: a conversation, with at least one assistant turn to learn."""
    if not isinstance(value, list) or not value or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in value):
        raise DataError(f"{what}: data.messagesField must hold a non-empty list of {{role, content}} messages")
    if not any(m["role"] == "assistant" for m in value):
        raise DataError(f"{what}: no assistant message in data.messagesField: nothing to learn from it")
    return value


def chat_tokens(messages: list[dict[str, Any]], tokenizer: Any, sequence_length: int, what: str) -> TokenExample:
    """One conversation rendered with the tokenizer's chat template (truncated), the loss on the
    assistant's turns only.

    An assistant turn is what rendering the conversation through it adds to rendering it up to
    that turn with the generation prompt (such as `<|assistant|>`), so the template needs no
    markers of its own; this holds for templates that render a conversation's beginning as a
    prefix of the whole, which is checked."""
    def render(turns: list[dict[str, Any]], generation_prompt: bool = False) -> str:
        try:
            return str(tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt))
        except jinja2.TemplateError as exc:
            raise DataError(f"{what}: the chat template cannot render it: {exc}") from None

    pieces: list[tuple[str, bool]] = []  # consecutive texts, and whether each is the assistant's
    rendered = ""
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:turn], generation_prompt=True), render(messages[: turn + 1])
        if not (before.startswith(rendered) and through.startswith(before)):
            raise DataError(f"{what}: the chat template renders the conversation's beginning differently "
                            f"from the whole (at message {turn + 1}): the assistant's tokens cannot be told apart")
        pieces += [(before[len(rendered):], False), (through[len(before):], True)]
        rendered = through
    pieces.append((render(messages).removeprefix(rendered), False))
    ids: list[int] = []
    labels: list[int] = []
    for text, learned in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        ids += piece
        labels += piece if learned else [IGNORE_INDEX] * len(piece)
    return ids[:sequence_length], labels[:sequence_length]


def classification_examples(texts: list[str], labels: list[int], tokenizer: Any, sequence_length: int
                            ) -> dict[str, torch.Tensor]:
    # Padding on the right, whatever the tokenizer's default: micro-batches are cut from the right.
    encoded = tokenizer([str(t) for t in texts], max_length=sequence_length, truncation=True,
                        padding="max_length", padding_side="right", return_tensors="pt")
    return {
        "input_ids": encoded["input_ids"],
        "attention_mask": encoded["attention_mask"],
        "labels": torch.tensor(labels, dtype=torch.long),
        LENGTHS: encoded["attention_mask"].sum(1),
    }


def label_names(values: list[Any]) -> list[str]:
    """The classes of a classification dataset, from its training labels: at least two."""
    names = sorted({str(v) for v in values})
    if len(names) < 2:
        raise DataError(f"data.labelField: data.train has {len(names)} distinct label(s) {names}: sequence "
                        "classification needs at least two (every prediction would be right)")
    return names


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
    """Train and eval tensors of a causal-lm finetuning job: prompt/response pairs or, with
    data.messagesField, conversations in the tokenizer's chat template; training examples packed
    several to a row with data.packing."""
    messages_field = data.messages_field
    if messages_field is not None and not tokenizer.chat_template:
        raise DataError(f"data.messagesField: the base model's tokenizer has no chat template to render "
                        f"{messages_field!r} with: set data.chatTemplate (a Jinja chat template) or use a base "
                        "model that has one")
    train_records, eval_records = load_splits(data, s3, messages_field or data.prompt_field)

    def tokens(records: list[dict[str, Any]], what: str) -> list[TokenExample]:
        if messages_field is not None:
            conversations = field_values(records, messages_field, "messagesField", what)
            return [chat_tokens(conversation(value, f"{what} record {number}"), tokenizer, sequence_length,
                                f"{what} record {number}") for number, value in enumerate(conversations, start=1)]
        prompts = [str(p) for p in field_values(records, data.prompt_field, "promptField", what)]
        answers = [str(a) for a in field_values(records, data.response_field, "responseField", what)]
        return _sft_pairs(prompts, answers, tokenizer, sequence_length)

    def encode(records: list[dict[str, Any]], what: str, pack: bool) -> dict[str, torch.Tensor]:
        return (packed_rows if pack else padded_rows)(tokens(records, what), tokenizer.pad_token_id, sequence_length)

    # Eval stays one example per row: its loss is comparable with and without packing.
    return encode(train_records, "data.train", data.packing), encode(eval_records, "data.eval", False)


# ---------------------------------------------------------------------------------------------
# Serving batches


@dataclass(frozen=True)
class MicroBatch:
    """Model inputs cut to the longest row, and the token counts known before the forward pass."""

    inputs: dict[str, torch.Tensor]
    real_tokens: int  # tokens of data: what throughput is counted in
    computed_tokens: int  # rows x width, padding included: what the forward pass computes


def pad_multiple(device: torch.device) -> int:
    return GPU_PAD_MULTIPLE if device.type == "cuda" else 1


def take(tensors: DataSet, rows: torch.Tensor | slice, multiple: int = 1) -> MicroBatch:
    """The chosen rows as model inputs, every sequence tensor cut to the batch's longest row
    (rounded up to `multiple`)."""
    inputs = {name: tensor[rows] for name, tensor in tensors.items() if name != LENGTHS}
    inputs.setdefault("labels", inputs["input_ids"])  # a pretraining sequence is its own labels
    count, width = inputs["input_ids"].shape
    if LENGTHS not in tensors:  # packed pretraining text: every row is full
        return MicroBatch(inputs, count * width, count * width)
    lengths = tensors[LENGTHS][rows]
    longest = int(lengths.max()) if count else 0
    width = min(width, -(-longest // multiple) * multiple)
    inputs = {name: tensor[:, :width] if tensor.dim() == 2 else tensor for name, tensor in inputs.items()}
    return MicroBatch(inputs, int(lengths.sum()), count * width)


@dataclass
class Batches:
    """Shuffled, sharded micro-batches, addressed by a global index so a run can resume exactly.

    With group_by_length, each epoch's shuffled rows are sorted by length within windows of
    GROUPING_WINDOW_STEPS optimizer steps and the resulting steps shuffled again: a micro-batch
    holds rows of similar length (little padding) and is still a function of (seed, epoch, index).
    All ranks compute the same order and take disjoint rows of the same step."""

    tensors: DataSet
    batch_size: int
    seed: int
    rank: int
    world_size: int
    group_by_length: bool = False
    pad_multiple: int = 1  # micro-batch widths are rounded up to a multiple of this

    _order: tuple[int, torch.Tensor] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        rows = len(self.tensors["input_ids"])
        self.per_epoch = rows // (self.batch_size * self.world_size)
        if self.per_epoch == 0:
            raise DataError(
                f"the training set has {rows} sequences, fewer than training.batchSize "
                f"({self.batch_size}) x resources.workers ({self.world_size})")

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        rows = self.tensors["input_ids"]
        order = rows.shuffle(generator) if isinstance(rows, ShuffledInBlocks) else torch.randperm(len(rows),
                                                                                                    generator=generator)
        if not self.group_by_length or LENGTHS not in self.tensors:
            return order
        step_rows = self.batch_size * self.world_size
        order = order[: self.per_epoch * step_rows]  # the rows this epoch serves, as without grouping
        window = step_rows * GROUPING_WINDOW_STEPS
        lengths = self.tensors[LENGTHS]
        grouped = []
        for start in range(0, len(order), window):
            chunk = order[start : start + window]
            grouped.append(chunk[torch.sort(lengths[chunk], descending=True, stable=True).indices])
        steps = torch.cat(grouped).view(self.per_epoch, step_rows)
        return steps[torch.randperm(self.per_epoch, generator=generator)].flatten()

    def __getitem__(self, index: int) -> MicroBatch:
        epoch, position = divmod(index, self.per_epoch)
        if self._order is None or self._order[0] != epoch:  # one shuffle per epoch, not per batch
            self._order = (epoch, self._epoch_order(epoch))
        start = (position * self.world_size + self.rank) * self.batch_size
        return take(self.tensors, self._order[1][start : start + self.batch_size], self.pad_multiple)

    def continue_from(self, index: int, world_size: int) -> int:
        """The index at which these ranks continue a run that stopped at `index` on `world_size`
        ranks: the same epoch, the rows of it trained so far not trained again (exactly when one
        world size divides the other; else the next step boundary below)."""
        if world_size == self.world_size:
            return index
        epoch, position = divmod(index, len(self.tensors["input_ids"]) // (self.batch_size * world_size))
        return epoch * self.per_epoch + min(self.per_epoch, position * world_size // self.world_size)


def eval_batches(tensors: DataSet, batch_size: int, limit: int, rank: int, world_size: int
                 ) -> list[dict[str, torch.Tensor]]:
    """This rank's share of the first `limit` eval batches, in order, as model inputs."""
    rows = len(tensors["input_ids"])
    if rows == 0:
        raise DataError("data.eval: no examples to evaluate on (an empty eval source, or data.evalFraction "
                        "leaving none): its loss would read as a perfect model")
    return [take(tensors, slice(index * batch_size, (index + 1) * batch_size)).inputs
            for index in range(rank, min(limit, math.ceil(rows / batch_size)), world_size)]
