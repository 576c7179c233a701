"""Pretraining corpora: prepared once into token shards, in every format a corpus comes in, reused
by every later start, never used half-made, and refused or quarantined when it cannot be trained on."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from support.jobs import ROOT, tiny_pretrain, write_manifest
from support.processes import KUBEFORGE, free_port, wait_until

from kubeforge.spec import PretrainJob, parse_job
from kubeforge.storage import StorageError
from kubeforge.trainer import corpus
from kubeforge.trainer.data import DataError

SHAKESPEARE = (ROOT / "examples" / "data" / "shakespeare" / "train.txt").read_text()
BIN = Path(sys.executable).parent


def pretrain_spec(train_uri: str, eval_uri: str | None = None, **data: Any) -> Any:
    job = tiny_pretrain("corpus", maxSteps=2, batchSize=4, sequenceLength=32, warmupSteps=0)
    job["spec"]["data"] = {"train": {"uri": train_uri}, **({"eval": {"uri": eval_uri}} if eval_uri else {}), **data}
    job["spec"]["tokenizer"] = {"vocabSize": 512}
    parsed = parse_job(job)
    assert isinstance(parsed, PretrainJob)
    return parsed.spec


def prepared(spec: Any, cache: Path | str, scratch: Path) -> tuple[corpus.PreparedCorpus, Any]:
    files = corpus.source_files(spec)
    tokenizer = corpus.trained_tokenizer(spec, files, str(cache), 0, 1, scratch)
    return corpus.prepare(spec, tokenizer, files, str(cache), 0, 1, scratch, lambda _: None), tokenizer


def mixed_corpus(directory: Path) -> list[str]:
    """The same kind of text as .txt, .jsonl.gz, .jsonl.zst and .parquet; its documents in listing order."""
    directory.mkdir()
    lines = SHAKESPEARE.splitlines()
    plain = "\n".join(lines[:400]) + "\n"
    (directory / "a.txt").write_text(plain)
    gzipped = [f"gz document {i}: " + " ".join(lines[400 + 5 * i: 405 + 5 * i]) for i in range(30)]
    with gzip.open(directory / "b.jsonl.gz", "wt") as stream:
        stream.writelines(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(gzipped))
    zstd = [f"zst document {i}: " + " ".join(lines[600 + 5 * i: 605 + 5 * i]) for i in range(30)]
    (directory / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps({"text": t}) + "\n" for t in zstd).encode()))
    parquet = [f"parquet document {i}: " + " ".join(lines[800 + 5 * i: 805 + 5 * i]) for i in range(30)]
    pq.write_table(pa.table({"text": parquet, "url": [f"u{i}" for i in range(30)]}), directory / "d.parquet")
    (directory / "notes.md").write_text("not part of the corpus")
    return [plain, *gzipped, *zstd, *parquet]


def test_every_format_is_tokenized_once_each_document_ended(tmp_path: Path) -> None:
    texts = mixed_corpus(tmp_path / "corpus")
    spec = pretrain_spec(str(tmp_path / "corpus"))
    prepared_corpus, tokenizer = prepared(spec, tmp_path / "cache", tmp_path / "scratch")

    manifest = prepared_corpus.manifest
    assert prepared_corpus.prepared_now and manifest.dtype == "uint16"
    assert [Path(s.uri).name for s in manifest.sources] == ["a.txt", "b.jsonl.gz", "c.jsonl.zst", "d.parquet"]
    assert manifest.documents == len(texts)
    shard_tokens = np.concatenate([np.fromfile(tmp_path / "cache" / manifest.key / s.name, dtype=np.uint16)
                                   for s in manifest.shards["train"]])
    expected: list[int] = []
    for text in texts:
        expected += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert shard_tokens.tolist() == expected
    # Each shard's entry is what is stored.
    for shard in manifest.shards["train"]:
        body = (tmp_path / "cache" / manifest.key / shard.name).read_bytes()
        assert shard.bytes == len(body) and shard.tokens == len(body) // 2


def test_a_later_start_reuses_the_shards_and_a_changed_file_is_prepared_anew(tmp_path: Path) -> None:
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "plays.txt").write_text(SHAKESPEARE[:60_000])
    spec = pretrain_spec(str(tmp_path / "corpus"))
    first, _ = prepared(spec, tmp_path / "cache", tmp_path / "s1")
    again, _ = prepared(spec, tmp_path / "cache", tmp_path / "s2")
    assert first.prepared_now and not again.prepared_now
    assert again.manifest == first.manifest

    (tmp_path / "corpus" / "plays.txt").write_text(SHAKESPEARE[60_000:120_000])  # same size class, other text
    changed, _ = prepared(spec, tmp_path / "cache", tmp_path / "s3")
    assert changed.prepared_now and changed.manifest.key != first.manifest.key


def test_sequences_are_read_from_the_shards_and_eval_holds_out_the_tail(tmp_path: Path) -> None:
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "plays.txt").write_text(SHAKESPEARE[:60_000])
    spec = pretrain_spec(str(tmp_path / "corpus"))
    prepared_corpus, _ = prepared(spec, tmp_path / "cache", tmp_path / "scratch")
    train, held_out = prepared_corpus.splits(32, 0.1)
    tokens = np.fromfile(tmp_path / "cache" / prepared_corpus.manifest.key / "train" / "r0000-00000.bin", np.uint16)
    rows = len(tokens) // 32
    assert len(train) + len(held_out) == rows and len(held_out) == -(-rows // 10)
    import torch

    picked = train[torch.tensor([3, 0])]
    assert picked.tolist() == [tokens[96:128].tolist(), tokens[:32].tolist()]
    assert held_out[0:1].tolist() == [tokens[len(train) * 32: len(train) * 32 + 32].tolist()]


@pytest.mark.parametrize(("files", "message"), [
    ({"empty.txt": b""}, "data.train: the corpus holds no text"),
    ({"bad.txt": b"good text\n\xff\xfe broken"}, "bad.txt: not UTF-8 text"),
    ({"docs.jsonl": b'{"text": "one"}\n{"body": "two"}\n'}, "docs.jsonl line 2: has no field 'text' (data.textField)"),
    ({"broken.jsonl.gz": b"\x1f\x8b not really gzip"}, "broken.jsonl.gz: cannot be read"),
    ({"notes.md": b"# no corpus here"}, "data.train.uri: "),
], ids=["empty", "undecodable", "missing-field", "corrupt-gzip", "no-corpus-files"])
def test_bad_corpora_are_refused_naming_the_file_and_field(tmp_path: Path, files: dict[str, bytes],
                                                           message: str) -> None:
    (tmp_path / "corpus").mkdir()
    for name, body in files.items():
        (tmp_path / "corpus" / name).write_bytes(body)
    spec = pretrain_spec(str(tmp_path / "corpus"))
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        prepared(spec, tmp_path / "cache", tmp_path / "scratch")


def test_a_parquet_file_without_the_field_names_data_text_field(tmp_path: Path) -> None:
    (tmp_path / "corpus").mkdir()
    pq.write_table(pa.table({"content": ["a document"] * 10}), tmp_path / "corpus" / "part-0.parquet")
    spec = pretrain_spec(str(tmp_path / "corpus"))
    with pytest.raises(DataError, match=r"part-0.parquet: has no column 'text' \(data.textField\); its columns: "
                                        "content"):
        prepared(spec, tmp_path / "cache", tmp_path / "scratch")


def test_a_shard_failing_its_sha256_quarantines_the_preparation(tmp_path: Path) -> None:
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "plays.txt").write_text(SHAKESPEARE[:60_000])
    spec = pretrain_spec(str(tmp_path / "corpus"))
    first, _ = prepared(spec, tmp_path / "cache", tmp_path / "s1")
    shard = tmp_path / "cache" / first.manifest.key / first.manifest.shards["train"][0].name
    body = bytearray(shard.read_bytes())
    body[100] ^= 0xFF  # one flipped byte, the size unchanged
    shard.write_bytes(bytes(body))

    damaged, _ = prepared(spec, tmp_path / "cache", tmp_path / "s2")
    assert not damaged.prepared_now
    train, _ = damaged.splits(32, 0.1)
    with pytest.raises(StorageError, match="fails its sha256"):
        train[0:1]
    directory = tmp_path / "cache" / first.manifest.key
    assert not (directory / "manifest.json").exists() and list(directory.glob("quarantined-*.json"))
    again, _ = prepared(spec, tmp_path / "cache", tmp_path / "s3")  # the next start prepares it again
    assert again.prepared_now
    assert again.splits(32, 0.1)[0][0:1].shape == (1, 32)


def test_tokenizer_uri_uses_that_tokenizer_and_prepares_with_it(tmp_path: Path) -> None:
    from support.models import tiny_tokenizer

    tiny_tokenizer().save_pretrained(tmp_path / "tokenizer")
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "plays.txt").write_text(SHAKESPEARE[:20_000])
    spec = pretrain_spec(str(tmp_path / "corpus"))
    spec = spec.model_copy(update={"tokenizer": spec.tokenizer.model_copy(update={"uri": str(tmp_path / "tokenizer")})})
    from kubeforge.trainer.tokenization import load_tokenizer

    tokenizer = load_tokenizer(str(tmp_path / "tokenizer"), None, tmp_path)
    files = corpus.source_files(spec)
    result = corpus.prepare(spec, tokenizer, files, str(tmp_path / "cache"), 0, 1, tmp_path, lambda _: None)
    assert result.manifest.tokens("train") == len(tokenizer(SHAKESPEARE[:20_000])["input_ids"]) + 1
    assert not (tmp_path / "cache" / "tokenizers").exists()  # nothing was trained

    (tmp_path / "empty").mkdir()
    from kubeforge.spec import JobError

    with pytest.raises(JobError, match="tokenizer.uri: .* holds no tokenizer.json"):
        load_tokenizer(str(tmp_path / "empty"), None, tmp_path)


def generated_corpus(directory: Path, files: int, megabytes: float) -> None:
    """`files` .txt files of Shakespeare's lines reshuffled, `megabytes` in all."""
    directory.mkdir()
    lines = SHAKESPEARE.splitlines()
    rng = np.random.default_rng(0)
    per_file = int(megabytes * 1e6 / files)
    for index in range(files):
        chosen, size = [], 0
        while size < per_file:
            line = lines[int(rng.integers(len(lines)))]
            chosen.append(line)
            size += len(line) + 1
        (directory / f"part-{index:03d}.txt").write_text("\n".join(chosen) + "\n")


def test_two_workers_prepare_their_shares_and_rank_0_commits(tmp_path: Path) -> None:
    generated_corpus(tmp_path / "corpus", files=4, megabytes=0.4)
    job = tiny_pretrain("corpus-ddp", maxSteps=4, batchSize=4, sequenceLength=32, evalInterval=4, evalBatches=2,
                        warmupSteps=0)
    job["spec"]["data"] = {"train": {"uri": str(tmp_path / "corpus")}}
    job["spec"]["tokenizer"] = {"vocabSize": 512}
    job["spec"]["resources"]["workers"] = 2
    manifest_file = write_manifest(tmp_path / "job.yaml", job)
    command = [
        str(BIN / "torchrun"), "--nnodes", "1", "--nproc_per_node", "2", "--rdzv_backend", "static",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "--no-python", str(BIN / "kubeforge"), "train", "--spec", str(manifest_file),
        "--checkpoint-uri", str(tmp_path / "out"), "--corpus-cache", str(tmp_path / "corpora"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    process = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert process.returncode == 0, process.stdout + process.stderr

    [manifest_path] = (tmp_path / "corpora").glob("*/manifest.json")
    manifest = corpus.CorpusManifest.model_validate_json(manifest_path.read_text())
    assert manifest.workers == 2
    # Files 0 and 2 were rank 0's, 1 and 3 rank 1's: each wrote shards of its own.
    assert sorted({s.name.split("-")[0] for s in manifest.shards["train"]}) == ["train/r0000", "train/r0001"]
    assert (tmp_path / "out" / "export" / "manifest.json").is_file()


def test_a_preparation_killed_midway_is_never_used_and_is_redone(tmp_path: Path) -> None:
    generated_corpus(tmp_path / "corpus", files=6, megabytes=12)
    job = tiny_pretrain("corpus-kill", maxSteps=2, batchSize=4, sequenceLength=32, evalInterval=2, evalBatches=1,
                        warmupSteps=0)
    job["spec"]["data"] = {"train": {"uri": str(tmp_path / "corpus")}}
    job["spec"]["tokenizer"] = {"vocabSize": 512, "sampleBytes": 1 << 20}
    manifest_file = write_manifest(tmp_path / "job.yaml", job)
    cache = tmp_path / "corpora"
    command = [*KUBEFORGE, "train", "--spec", str(manifest_file), "--checkpoint-uri", str(tmp_path / "out"),
               "--corpus-cache", str(cache)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "KUBEFORGE_CORPUS_SHARD_TOKENS": "200000"})
    try:
        # Killed once its first shards are stored, before the preparation commits.
        wait_until(lambda: list(cache.glob("*/train/*.bin")) or process.poll() is not None, 120,
                   "the first shard of the preparation")
        assert process.poll() is None, "the preparation finished before it could be killed"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    stored_before = len(list(cache.glob("*/train/*.bin")))
    assert not list(cache.glob("*/manifest.json"))

    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "KUBEFORGE_CORPUS_SHARD_TOKENS": "200000"})
    assert again.returncode == 0, again.stderr
    assert "prepared the corpus" in again.stderr and "reusing the prepared corpus" not in again.stderr
    [manifest_path] = cache.glob("*/manifest.json")
    manifest = corpus.CorpusManifest.model_validate_json(manifest_path.read_text())
    print(f"\nkilled after {stored_before} of {len(manifest.shards['train'])} shards; redone whole "
          f"({manifest.tokens('train')} tokens in {manifest.seconds:.1f}s)")
    assert len(manifest.shards["train"]) > stored_before
    shutil.rmtree(tmp_path / "out")
    third = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0 and "reusing the prepared corpus" in third.stderr, third.stderr


def test_a_pretrain_job_trains_on_parquet_and_gzipped_jsonl(tmp_path: Path) -> None:
    mixed_corpus(tmp_path / "corpus")
    (tmp_path / "corpus" / "a.txt").unlink()
    (tmp_path / "corpus" / "c.jsonl.zst").unlink()
    job = tiny_pretrain("parquet-gz", maxSteps=4, batchSize=4, sequenceLength=32, evalInterval=4, evalBatches=2,
                        warmupSteps=0)
    job["spec"]["data"] = {"train": {"uri": str(tmp_path / "corpus")}, "evalFraction": 0.1}
    job["spec"]["tokenizer"] = {"vocabSize": 512}
    manifest_file = write_manifest(tmp_path / "job.yaml", job)
    process = subprocess.run([*KUBEFORGE, "train", "--spec", str(manifest_file), "--checkpoint-uri",
                              str(tmp_path / "out"), "--result", str(tmp_path / "result.json")],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]
    assert "prepared the corpus: 60 documents" in process.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["step"] == 4 and result["finalEval"]["loss"] < result["evalHistory"][0]["loss"]


def test_an_epoch_reads_the_shards_a_block_at_a_time_and_s3_copies_stay_bounded(
        tmp_path: Path, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from kubeforge.trainer.data import Batches

    monkeypatch.setattr(corpus, "SHARD_TOKENS", 4096)  # 128 sequences of 32 per shard
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "plays.txt").write_text(SHAKESPEARE[:400_000])
    spec = pretrain_spec(str(tmp_path / "corpus"))
    prepared_corpus, _ = prepared(spec, tmp_path / "cache", tmp_path / "s1")
    shards = len(prepared_corpus.manifest.shards["train"])
    assert shards > 3 * corpus.SHUFFLE_BLOCK_SHARDS
    train, _ = prepared_corpus.splits(32, 0.05)
    order = train.shuffle(torch.Generator().manual_seed(3))
    assert sorted(order.tolist()) == list(range(len(train)))  # every training row once, none of eval's
    assert torch.equal(order, train.shuffle(torch.Generator().manual_seed(3)))  # a function of the seed
    # The order falls into as many stretches as there are blocks, each reading from 8 shards at most.
    stretches: list[set[int]] = [set()]
    for row in order.tolist():
        shard = row // 128  # every shard but the last holds 128 sequences
        if shard not in stretches[-1] and len(stretches[-1]) == corpus.SHUFFLE_BLOCK_SHARDS:
            stretches.append(set())
        stretches[-1].add(shard)
    assert len(stretches) == -(-shards // corpus.SHUFFLE_BLOCK_SHARDS)
    first = [row // 128 for row in order[:256].tolist()]
    assert len(set(first)) > 1 and first != sorted(first)  # mixed within its block

    # The same corpus in S3: a whole epoch read on one rank keeps at most LOCAL_SHARDS local copies.
    spec_s3 = pretrain_spec(f"s3://{bucket}/corpus/plays.txt")
    import boto3

    boto3.client("s3").upload_file(str(tmp_path / "corpus" / "plays.txt"), bucket, "corpus/plays.txt")
    in_s3, _ = prepared(spec_s3, f"s3://{bucket}/corpora", tmp_path / "s2")
    assert in_s3.prepared_now and len(in_s3.manifest.shards["train"]) == shards
    copies = tmp_path / "s2" / "shards"
    batches = Batches({"input_ids": in_s3.splits(32, 0.05)[0]}, 8, seed=0, rank=0, world_size=1)
    most = 0
    for index in range(batches.per_epoch):
        batches[index]
        most = max(most, len(list(copies.rglob("*.bin"))))
    print(f"\n{shards} shards in S3, at most {most} local copies over an epoch")
    assert 0 < most <= corpus.LOCAL_SHARDS
