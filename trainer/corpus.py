"""Pretraining corpora: tokenized once into token shards in storage, then memory-mapped by every rank.

A corpus (files of .txt, .jsonl, .jsonl.gz, .jsonl.zst or .parquet, local or under s3://) becomes
flat token shards (uint16 while the vocabulary fits, else uint32; each document followed by the
end-of-text token, as in nanoGPT's train.bin), committed by a manifest under a key derived from
the source listing, the text field and the tokenizer. A restart, a resumed job and another job
on the same corpus with the same tokenizer find the manifest and tokenize nothing; a changed file
(another size, S3 ETag or local mtime) changes the key. A preparation without its manifest is
never used: a killed one is redone.

The gang prepares together: file i is tokenized by rank i % world size, each rank writes its shards
and a part manifest, and rank 0 commits the whole once every rank has written its part. Memory
stays bounded by a batch of documents, whatever the corpus's size.

Training reads fixed-length sequences from the shards, memory-mapped: from the store itself when
it is a local directory, else from a local copy of each shard fetched when first read. Every shard
is checked against its sha256 when first read; one that fails it quarantines the preparation (its
manifest is set aside, so the next start prepares the corpus again) and stops the run.
"""

from __future__ import annotations

import bisect
import gzip
import hashlib
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from kubeforge.spec import DataSource, PretrainSpec, S3Spec
from kubeforge.storage import LocalStorage, NotFound, Storage, StorageError, join, local_path, open_storage
from kubeforge.trainer.data import DataError, file_format, jsonl_records, source_storage

log = logging.getLogger(__name__)

#: Bumped when the shard layout changes: an older preparation is then prepared anew, not misread.
LAYOUT_VERSION = 1
MANIFEST = "manifest.json"
#: Tokens per shard file: 32 MiB at uint16, large enough that listing and opening them costs nothing
#: (KUBEFORGE_CORPUS_SHARD_TOKENS sets another size; the shards' size is no part of a corpus's key).
SHARD_TOKENS = int(os.environ.get("KUBEFORGE_CORPUS_SHARD_TOKENS", 1 << 24))
#: An epoch visits the shards in a random order, this many at a time, its sequences shuffled within
#: each such block (as MosaicML Streaming's block shuffle): a rank then reads from this many shards at
#: a time, and a store in S3 needs local copies of at most LOCAL_SHARDS of them.
SHUFFLE_BLOCK_SHARDS = 8
LOCAL_SHARDS = 2 * SHUFFLE_BLOCK_SHARDS
#: Documents are tokenized in batches of about this many characters: the bound on preparation memory.
BATCH_CHARACTERS = 8 << 20
#: A .txt file is read in pieces of this many characters, cut at a line end.
TEXT_PIECE = 1 << 20

Split = Literal["train", "eval"]


# ---------------------------------------------------------------------------------------------
# The source files


@dataclass(frozen=True)
class SourceFile:
    """One file of a corpus, and what identifies its content."""

    split: Split
    uri: str  # for messages: the file's own URI
    key: str  # in `storage`
    version: str  # size and S3 ETag or local mtime: changes when the content does
    storage: Storage

    @property
    def name(self) -> str:
        return PurePosixPath(self.key).name


def list_source(source: DataSource, s3: S3Spec | None, split: Split, field: str) -> list[SourceFile]:
    storage, prefix = source_storage(source, s3)
    versions = storage.versions(prefix)
    files = [SourceFile(split, f"{storage.uri}/{key}", key, versions[key], storage)
             for key in sorted(versions) if file_format(key, source)]
    if not files:
        raise DataError(f"data.{split}.uri: {source.uri}: no .txt, .jsonl(.gz/.zst) or .parquet files found")
    return files


# ---------------------------------------------------------------------------------------------
# Reading documents


def _open_text(path: Path) -> IO[str]:
    """A text stream of a file, decompressed; only \\n ends a line (JSON allows U+2028 raw in strings)."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="\n")
    if path.suffix == ".zst":
        import zstandard

        return io.TextIOWrapper(zstandard.open(path, "rb"), encoding="utf-8", newline="\n")
    return path.open(encoding="utf-8", newline="\n")


def _text_pieces(path: Path) -> Iterator[tuple[str, bool]]:
    """A .txt file as one document, in pieces cut at line ends (an empty file: none)."""
    with _open_text(path) as stream:
        carry, empty = "", True
        while chunk := stream.read(TEXT_PIECE):
            chunk, empty = carry + chunk, False
            cut = chunk.rfind("\n") + 1 or len(chunk)
            piece, carry = chunk[:cut], chunk[cut:]
            yield piece, False
        if not empty:
            yield carry, True


def _jsonl_documents(path: Path, field: str, what: str) -> Iterator[tuple[str, bool]]:
    with _open_text(path) as stream:
        for number, record in jsonl_records(stream, what):
            if record.get(field) is None:
                raise DataError(f"{what} line {number}: has no field {field!r} (data.textField)")
            if record[field] != "":
                yield str(record[field]), True


def _parquet_documents(path: Path, field: str, what: str) -> Iterator[tuple[str, bool]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow's ArrowInvalid and friends: not a Parquet file
        raise DataError(f"{what}: not a readable Parquet file ({exc})") from None
    if field not in parquet.schema_arrow.names:
        raise DataError(f"{what}: has no column {field!r} (data.textField); its columns: "
                        f"{', '.join(parquet.schema_arrow.names)}")
    for batch in parquet.iter_batches(columns=[field], batch_size=4096):
        for value in batch.column(0).to_pylist():
            if value is None:
                raise DataError(f"{what}: a null {field!r} (data.textField)")
            if value != "":
                yield str(value), True


def documents(path: Path, source: DataSource, field: str, what: str) -> Iterator[tuple[str, bool]]:
    """A local file's text as pieces, each with whether it ends a document."""
    fmt = file_format(path.name, source)
    try:
        if fmt == "parquet":
            yield from _parquet_documents(path, field, what)
        elif fmt == "jsonl":
            yield from _jsonl_documents(path, field, what)
        else:
            yield from _text_pieces(path)
    except UnicodeDecodeError:
        raise DataError(f"{what}: not UTF-8 text") from None
    except (OSError, EOFError) as exc:  # a truncated or corrupt .gz/.zst
        raise DataError(f"{what}: cannot be read ({exc})") from None


class LocalCopy:
    """A source file on local disk for the time it is read: the file itself, or a download."""

    def __init__(self, file: SourceFile, scratch: Path):
        self.file, self.scratch = file, scratch

    def __enter__(self) -> Path:
        if isinstance(self.file.storage, LocalStorage):
            self.path = self.file.storage.root / self.file.key
            self.downloaded = False
        else:
            self.scratch.mkdir(parents=True, exist_ok=True)
            self.path = self.scratch / f"source-{hashlib.sha256(self.file.uri.encode()).hexdigest()[:16]}" \
                                       f"-{self.file.name}"
            self.file.storage.get_file(self.file.key, self.path)
            self.downloaded = True
        return self.path

    def __exit__(self, *_: object) -> None:
        if self.downloaded:
            self.path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# The manifest


class Shard(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str  # relative to the corpus's prefix
    tokens: int
    bytes: int
    sha256: str


class SourceEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    split: Split
    uri: str
    version: str


class Part(BaseModel):
    """One rank's share of a preparation: the shards of the files it tokenized."""

    model_config = ConfigDict(extra="forbid")

    shards: dict[Split, list[Shard]]
    documents: int
    seconds: float


class CorpusManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    layout_version: int
    key: str
    dtype: Literal["uint16", "uint32"]
    text_field: str
    tokenizer_sha256: str
    sources: list[SourceEntry]
    shards: dict[Split, list[Shard]]
    documents: int
    workers: int
    seconds: float  # the slowest worker's

    def tokens(self, split: Split) -> int:
        return sum(shard.tokens for shard in self.shards.get(split, []))


def token_dtype(vocabulary: int) -> Literal["uint16", "uint32"]:
    return "uint16" if vocabulary <= 1 << 16 else "uint32"


def corpus_key(files: list[SourceFile], text_field: str, tokenizer_json: str) -> str:
    """What a preparation is addressed by: the listing, the field read and the tokenizer."""
    identity = {"layout": LAYOUT_VERSION, "field": text_field,
                "tokenizer": hashlib.sha256(tokenizer_json.encode()).hexdigest(),
                "files": [(f.split, f.uri, f.version) for f in files]}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


# ---------------------------------------------------------------------------------------------
# Preparing


class ShardWriter:
    """Token ids appended into shard files of SHARD_TOKENS each, uploaded as each fills."""

    def __init__(self, storage: Storage, prefix: str, dtype: str, scratch: Path):
        self.storage, self.prefix, self.dtype, self.scratch = storage, prefix, np.dtype(dtype), scratch
        self.shards: list[Shard] = []
        self._file: IO[bytes] | None = None

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self._file is None:
                self._open()
            room = SHARD_TOKENS - self._tokens
            head, tokens = tokens[:room], tokens[room:]
            raw = head.astype(self.dtype, copy=False).tobytes()
            assert self._file is not None
            self._file.write(raw)
            self._hash.update(raw)
            self._tokens += len(head)
            if self._tokens == SHARD_TOKENS:
                self._close()

    def finish(self) -> list[Shard]:
        if self._file is not None and self._tokens:
            self._close()
        return self.shards

    def _open(self) -> None:
        self.scratch.mkdir(parents=True, exist_ok=True)
        self._path = self.scratch / f"shard-{len(self.shards):05d}.bin"
        self._file = self._path.open("wb")
        self._hash, self._tokens = hashlib.sha256(), 0

    def _close(self) -> None:
        assert self._file is not None
        self._file.close()
        self._file = None
        name = f"{self.prefix}-{len(self.shards):05d}.bin"
        self.storage.put_file(name, self._path)
        self.shards.append(Shard(name=name, tokens=self._tokens, bytes=self._path.stat().st_size,
                                 sha256=self._hash.hexdigest()))
        self._path.unlink()


@dataclass
class Preparation:
    """One rank's share of preparing a corpus under `storage` (the corpus's own prefix)."""

    storage: Storage
    tokenizer: Any
    dtype: str
    sources: dict[str, DataSource]  # data.train and data.eval, by split
    text_field: str
    scratch: Path
    #: Called with the tokens of each batch prepared: the metric and the progress bar.
    on_tokens: Callable[[int], None]

    def run(self, files: list[SourceFile], rank: int) -> Part:
        started = time.perf_counter()
        shards: dict[Split, list[Shard]] = {}
        documents = 0
        for split in ("train", "eval"):
            mine = [f for f in files if f.split == split]
            if not mine:
                continue
            writer = ShardWriter(self.storage, f"{split}/r{rank:04d}", self.dtype, self.scratch / split)
            for file in mine:
                documents += self._tokenize(file, writer)
            shards[split] = writer.finish()
        return Part(shards=shards, documents=documents, seconds=time.perf_counter() - started)

    def _tokenize(self, file: SourceFile, writer: ShardWriter) -> int:
        """Tokenize one file into `writer`; its count of documents."""
        backend, eos = self.tokenizer.backend_tokenizer, self.tokenizer.eos_token_id
        batch: list[tuple[str, bool]] = []
        characters = documents = 0

        def flush() -> None:
            encodings = backend.encode_batch_fast([text for text, _ in batch], add_special_tokens=False)
            pieces = []
            for encoding, (_, ends) in zip(encodings, batch, strict=True):
                pieces.append(np.asarray(encoding.ids, dtype=np.uint32))
                if ends:
                    pieces.append(np.array([eos], dtype=np.uint32))
            tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.uint32)
            writer.write(tokens)
            self.on_tokens(len(tokens))

        with LocalCopy(file, self.scratch / "download") as path:
            for text, ends in documents_of(path, file, self.sources[file.split], self.text_field):
                batch.append((text, ends))
                characters += len(text)
                documents += ends
                if characters >= BATCH_CHARACTERS:
                    flush()
                    batch, characters = [], 0
            if batch:
                flush()
        return documents


def documents_of(path: Path, file: SourceFile, source: DataSource, field: str) -> Iterator[tuple[str, bool]]:
    return documents(path, source, field, f"data.{file.split}: {file.uri}")


def sample_texts(files: list[SourceFile], source: DataSource, field: str, budget: int, scratch: Path
                 ) -> Iterator[str]:
    """At most `budget` characters of the training files' text, an even share from the beginning of
    each (files in listing order, until the budget is spent): what a new tokenizer learns from."""
    share = max(TEXT_PIECE, math.ceil(budget / len(files)))
    for file in files:
        if budget <= 0:
            return
        taken = 0
        with LocalCopy(file, scratch / "sample") as path:
            for text, _ in documents_of(path, file, source, field):
                piece = text[: min(share - taken, budget)]
                yield piece
                taken += len(piece)
                budget -= len(piece)
                if taken >= share or budget <= 0:
                    break


# ---------------------------------------------------------------------------------------------
# Reading prepared shards


class ShardFiles:
    """A prepared corpus's shards as local files, each checked against its sha256 when opened. From
    S3, at most LOCAL_SHARDS local copies are kept: opening another deletes the least recently read."""

    def __init__(self, storage: Storage, manifest: CorpusManifest, cache: Path):
        self.storage, self.manifest, self.cache = storage, manifest, cache
        self._maps: dict[str, np.memmap] = {}  # open shards, the most recently read last

    def tokens(self, shard: Shard) -> np.memmap:
        mapped = self._maps.pop(shard.name, None)
        if mapped is None:
            path = self._local(shard)
            self._verify(shard, path)
            mapped = np.memmap(path, dtype=self.manifest.dtype, mode="r")
        self._maps[shard.name] = mapped
        return mapped

    def _evict(self) -> None:
        """Delete the least recently read local copy while LOCAL_SHARDS are kept."""
        while len(self._maps) >= LOCAL_SHARDS:
            name = next(iter(self._maps))
            del self._maps[name]  # unmapped once the last view of it goes
            local_path(self.cache, name, "the corpus's manifest").unlink(missing_ok=True)

    def _local(self, shard: Shard) -> Path:
        if isinstance(self.storage, LocalStorage):
            return local_path(self.storage.root, shard.name, "the corpus's manifest")
        path = local_path(self.cache, shard.name, "the corpus's manifest")
        if not path.exists():
            self._evict()
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(path.name + ".partial")
            self.storage.get_file(shard.name, partial)
            partial.replace(path)
        return path

    def _verify(self, shard: Shard, path: Path) -> None:
        digest = hashlib.sha256()
        try:
            with path.open("rb") as stream:
                while block := stream.read(1 << 22):
                    digest.update(block)
        except FileNotFoundError:
            digest = hashlib.sha256(b"missing")
        if digest.hexdigest() != shard.sha256:
            quarantine(self.storage)
            raise StorageError(f"the prepared corpus at {self.storage.uri}: shard {shard.name} fails its sha256 "
                               "(damaged in storage); it is quarantined and the next start prepares the corpus again")


def quarantine(storage: Storage) -> None:
    """Set a damaged preparation's manifest aside: it is no longer found, and kept for a look."""
    try:
        storage.put_bytes(f"quarantined-{int(time.time())}.json", storage.get_bytes(MANIFEST))
        storage.delete([MANIFEST])
    except StorageError as exc:
        log.error("could not quarantine the prepared corpus at %s: %s", storage.uri, exc)


class TokenSequences:
    """Rows [start, start + rows) of the fixed-length sequences of a split's shards (no sequence spans
    two shards; each shard's tail shorter than one is not trained on), indexed like a tensor's rows."""

    def __init__(self, files: ShardFiles, shards: list[Shard], sequence_length: int, start: int = 0,
                 rows: int | None = None):
        self.files, self.shards, self.sequence_length, self.start = files, shards, sequence_length, start
        self.first_rows = [0]
        for shard in shards:
            self.first_rows.append(self.first_rows[-1] + shard.tokens // sequence_length)
        self.rows = self.first_rows[-1] - start if rows is None else rows

    def __len__(self) -> int:
        return self.rows

    def shuffle(self, generator: torch.Generator) -> torch.Tensor:
        """An epoch's order of these rows: the shards in a random order, SHUFFLE_BLOCK_SHARDS at a
        time, the rows of each block in a random order (a function of the generator alone)."""
        shards = torch.randperm(len(self.shards), generator=generator).tolist()
        blocks = []
        for first in range(0, len(shards), SHUFFLE_BLOCK_SHARDS):
            ranges = []
            for shard in shards[first : first + SHUFFLE_BLOCK_SHARDS]:  # its rows inside this window
                low = max(self.first_rows[shard], self.start)
                high = min(self.first_rows[shard + 1], self.start + self.rows)
                if low < high:
                    ranges.append(torch.arange(low - self.start, high - self.start))
            if ranges:
                block = torch.cat(ranges)
                blocks.append(block[torch.randperm(len(block), generator=generator)])
        return torch.cat(blocks)

    def window(self, start: int, rows: int) -> TokenSequences:
        return TokenSequences(self.files, self.shards, self.sequence_length, self.start + start, rows)

    def __getitem__(self, rows: torch.Tensor | slice) -> torch.Tensor:
        numbers = range(self.rows)[rows] if isinstance(rows, slice) else rows.tolist()
        length = self.sequence_length
        out = np.empty((len(numbers), length), dtype=np.int64)
        for i, number in enumerate(numbers):
            row = self.start + number
            shard = bisect.bisect_right(self.first_rows, row) - 1
            offset = (row - self.first_rows[shard]) * length
            out[i] = self.files.tokens(self.shards[shard])[offset : offset + length]
        return torch.from_numpy(out)


# ---------------------------------------------------------------------------------------------
# A job's corpus


def read_manifest(storage: Storage) -> CorpusManifest | None:
    try:
        raw = storage.get_bytes(MANIFEST)
    except NotFound:
        return None
    return CorpusManifest.model_validate_json(raw)


def commit(storage: Storage, key: str, parts: list[Part], files: list[SourceFile], dtype: str, spec: PretrainSpec,
           tokenizer_json: str) -> CorpusManifest:
    shards: dict[Split, list[Shard]] = {}
    for part in parts:  # in rank order, so the sequence numbering is the same on every start
        for split, entries in part.shards.items():
            shards.setdefault(split, []).extend(entries)
    manifest = CorpusManifest(
        layout_version=LAYOUT_VERSION, key=key, dtype=dtype,  # type: ignore[arg-type]
        text_field=spec.data.text_field, tokenizer_sha256=hashlib.sha256(tokenizer_json.encode()).hexdigest(),
        sources=[SourceEntry(split=f.split, uri=f.uri, version=f.version) for f in files], shards=shards,
        documents=sum(p.documents for p in parts), workers=len(parts), seconds=max(p.seconds for p in parts))
    if manifest.tokens("train") == 0:
        raise DataError("data.train: the corpus holds no text to train on")
    storage.put_bytes(MANIFEST, manifest.model_dump_json(indent=1).encode())  # the commit
    return manifest


def part_key(rank: int, world_size: int) -> str:
    return join("parts", f"{rank:04d}-of-{world_size:04d}.json")


def corpus_storage(cache_uri: str, key: str, s3: S3Spec | None) -> Storage:
    return open_storage(f"{cache_uri.rstrip('/')}/{key}", s3)


@dataclass
class PreparedCorpus:
    """A committed preparation, read through `files`."""

    manifest: CorpusManifest
    files: ShardFiles
    #: Whether this start tokenized it (False: an earlier start's or another job's, reused).
    prepared_now: bool

    def splits(self, sequence_length: int, eval_fraction: float) -> tuple[TokenSequences, TokenSequences]:
        """The train and eval sequences: data.eval's shards, else the last evalFraction of train's."""
        train = TokenSequences(self.files, self.manifest.shards["train"], sequence_length)
        if "eval" in self.manifest.shards:
            held_out = TokenSequences(self.files, self.manifest.shards["eval"], sequence_length)
        else:
            count = max(1, math.ceil(len(train) * eval_fraction)) if len(train) > 1 else 0
            train, held_out = train.window(0, len(train) - count), train.window(len(train) - count, count)
        splits: tuple[tuple[Split, TokenSequences], ...] = (("train", train), ("eval", held_out))
        for split, sequences in splits:
            if len(sequences) == 0:
                raise DataError(f"data.{split}: {self.manifest.tokens(split)} tokens, fewer than one sequence "
                                f"of training.sequenceLength={sequence_length}")
        return train, held_out


def source_files(spec: PretrainSpec) -> list[SourceFile]:
    data = spec.data
    files = list_source(data.train, spec.s3, "train", data.text_field)
    if data.eval is not None:
        files += list_source(data.eval, spec.s3, "eval", data.text_field)
    return files


def barrier(world_size: int) -> None:
    if world_size > 1:
        torch.distributed.barrier()


def agreed(decision: bool, world_size: int) -> bool:
    """Rank 0's decision, on every rank."""
    if world_size == 1:
        return decision
    shared = [decision]
    torch.distributed.broadcast_object_list(shared, src=0)
    return bool(shared[0])


def trained_tokenizer(spec: PretrainSpec, files: list[SourceFile], cache_uri: str, rank: int, world_size: int,
                      scratch: Path) -> Any:
    """The tokenizer trained on a sample of the corpus (tokenizer.sampleBytes), once: rank 0 trains
    it and keeps it beside the corpora, where every other rank, later start and job finds it."""
    from kubeforge.trainer.tokenization import from_json, train_tokenizer

    train_files = [f for f in files if f.split == "train"]
    identity = {"layout": LAYOUT_VERSION, "field": spec.data.text_field,
                "tokenizer": spec.tokenizer.model_dump(mode="json"),
                "files": [(f.uri, f.version) for f in train_files]}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]
    storage, name = open_storage(cache_uri, spec.s3), f"tokenizers/{key}.json"
    if rank == 0 and name not in storage.list("tokenizers"):
        started = time.perf_counter()
        sample = sample_texts(train_files, spec.data.train, spec.data.text_field, spec.tokenizer.sample_bytes,
                              scratch)
        storage.put_bytes(name, train_tokenizer(sample, spec.tokenizer).backend_tokenizer.to_str().encode())
        log.info("trained the tokenizer on a sample of the corpus in %.1fs", time.perf_counter() - started)
    barrier(world_size)
    return from_json(storage.get_bytes(name).decode())


def prepare(spec: PretrainSpec, tokenizer: Any, files: list[SourceFile], cache_uri: str, rank: int,
            world_size: int, scratch: Path, on_tokens: Callable[[int], None]) -> PreparedCorpus:
    """The corpus's committed preparation for this tokenizer: found, or made now by every rank."""
    tokenizer_json = tokenizer.backend_tokenizer.to_str()
    key = corpus_key(files, spec.data.text_field, tokenizer_json)
    storage = corpus_storage(cache_uri, key, spec.s3)
    manifest = read_manifest(storage) if rank == 0 else None
    prepared_now = agreed(manifest is None, world_size)  # rank 0's look decides: all prepare, or none
    if prepared_now:
        dtype = token_dtype(len(tokenizer))
        sources = {"train": spec.data.train, **({"eval": spec.data.eval} if spec.data.eval else {})}
        preparation = Preparation(storage, tokenizer, dtype, sources, spec.data.text_field, scratch / "prepare",
                                  on_tokens)
        part = preparation.run([f for i, f in enumerate(files) if i % world_size == rank], rank)
        if world_size > 1:
            storage.put_bytes(part_key(rank, world_size), part.model_dump_json().encode())
            barrier(world_size)
        if rank == 0:
            parts = [part] if world_size == 1 else [
                Part.model_validate_json(storage.get_bytes(part_key(r, world_size))) for r in range(world_size)]
            manifest = commit(storage, key, parts, files, dtype, spec, tokenizer_json)
            log.info("prepared the corpus: %d documents, %d train and %d eval tokens in %.1fs on %d worker(s), "
                     "at %s", manifest.documents, manifest.tokens("train"), manifest.tokens("eval"),
                     manifest.seconds, world_size, storage.uri)
        barrier(world_size)
        manifest = read_manifest(storage)
        if manifest is None:
            raise StorageError(f"{storage.uri}: the corpus's manifest was not committed")
    else:
        manifest = manifest or read_manifest(storage)
        if manifest is None:
            raise StorageError(f"{storage.uri}: the corpus's manifest is gone")
        if rank == 0:
            log.info("reusing the prepared corpus at %s (%d train tokens)", storage.uri, manifest.tokens("train"))
    return PreparedCorpus(manifest, ShardFiles(storage, manifest, scratch / "shards"), prepared_now)
