"""Pretraining corpora at scale: preparation speed against the tokenizer's own floor, loader speed,
peak memory at growing corpus sizes, and a restart's time once the corpus is prepared.

The corpus is generated: Shakespeare's lines (examples/data/shakespeare) drawn at random into .txt
files of 4 MB, --sizes megabytes in all. Every figure is measured in this one run:

- preparation: corpus.prepare's tokens/s on the files (reading, tokenizing, writing and storing the
  shards) against the floor of `tokenizers` batch-encoding the same text already in memory
  (encode_batch_fast, batches of the same size), both on all cores, alternating --rounds times on the
  smallest corpus; for every size, the job's own preparation (its manifest's seconds) too;
- loader: training micro-batches (batch 16 x 1024 tokens, the 125m preset's shape) per second read
  from the prepared shards by data.Batches, in tokens/s, once every shard is open (its sha256 checked);
- peak RSS: a PretrainJob (the tiny preset, maxSteps 5, tokenizer.sampleBytes 8 MB) run by `kubeforge
  run` in a fresh process per size, its ru_maxrss; first on a cold corpus cache (it prepares), then
  again with the corpus prepared and the checkpoints gone: the restart's wall time to its end.

    .venv/bin/python bench/corpus.py [--sizes 20 200]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from kubeforge.spec import PretrainJob, parse_job
from kubeforge.trainer import corpus
from kubeforge.trainer.data import Batches

ROOT = Path(__file__).resolve().parent.parent
LINES = (ROOT / "examples" / "data" / "shakespeare" / "train.txt").read_text().splitlines()
FILE_BYTES = 4_000_000


def generate(directory: Path, megabytes: int) -> None:
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(max(1, megabytes * 1_000_000 // FILE_BYTES)):
        picks = rng.integers(len(LINES), size=FILE_BYTES // 30)
        text = "\n".join(LINES[i] for i in picks)[:FILE_BYTES]
        (directory / f"part-{index:04d}.txt").write_text(text + "\n")


def job_manifest(name: str, corpus_dir: Path) -> dict[str, Any]:
    return {
        "apiVersion": "kubeforge.io/v1alpha1", "kind": "PretrainJob", "metadata": {"name": name},
        "spec": {"model": {"size": "tiny"}, "tokenizer": {"vocabSize": 2048, "sampleBytes": 8 << 20},
                 "data": {"train": {"uri": str(corpus_dir)}, "evalFraction": 0.01},
                 "training": {"maxSteps": 5, "batchSize": 8, "sequenceLength": 128, "warmupSteps": 0,
                              "evalInterval": 5, "evalBatches": 2, "logInterval": 5},
                 "checkpoint": {"intervalSteps": 5}, "resources": {"allowCpuFallback": True}},
    }


#: Runs a command and prints its peak RSS in KB: a fresh, small parent, since a child's ru_maxrss
#: starts from its parent's size at the fork (this benchmark's process grows to GBs).
PEAK_RSS = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(code)")


def run_job(manifest: Path, output: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of `kubeforge run` in a fresh process."""
    started = time.perf_counter()
    process = subprocess.run([sys.executable, "-c", PEAK_RSS, sys.executable, "-m", "kubeforge", "run", str(manifest),
                              "--output", str(output), "--no-progress"], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(process.stderr[-3000:])
    return wall, int(process.stderr.strip().splitlines()[-1]) / 1024


def preparation_floor(spec: Any, tokenizer: Any) -> tuple[int, float]:
    """Tokens and seconds of batch-encoding the corpus's text, read into memory first (not timed)."""
    texts = [p.read_text() for p in sorted(Path(spec.data.train.uri).glob("*.txt"))]
    pieces = [text[i:i + corpus.TEXT_PIECE] for text in texts for i in range(0, len(text), corpus.TEXT_PIECE)]
    backend, tokens = tokenizer.backend_tokenizer, 0
    started = time.perf_counter()
    for start in range(0, len(pieces), 8):  # corpus.BATCH_CHARACTERS of text per batch, as prepare's
        tokens += sum(len(e.ids) for e in backend.encode_batch_fast(pieces[start:start + 8],
                                                                     add_special_tokens=False))
    return tokens, time.perf_counter() - started


def loader_rate(prepared: corpus.PreparedCorpus, micro_batches: int = 400) -> float:
    train, _ = prepared.splits(1024, 0.01)
    batches = Batches({"input_ids": train}, 16, seed=0, rank=0, world_size=1)
    for shard in prepared.manifest.shards["train"]:
        prepared.files.tokens(shard)  # each shard's sha256, checked once when first opened: not the loader's rate
    started = time.perf_counter()
    for index in range(micro_batches):
        batches[index]
    return micro_batches * 16 * 1024 / (time.perf_counter() - started)


def measure(megabytes: int, scratch: Path, rounds: int) -> dict[str, float]:
    corpus_dir = scratch / f"corpus-{megabytes}mb"
    generate(corpus_dir, megabytes)
    manifest = scratch / f"job-{megabytes}.yaml"
    document = job_manifest(f"corpus-{megabytes}mb", corpus_dir)
    manifest.write_text(yaml.safe_dump(document))
    output = scratch / f"out-{megabytes}"
    cold_wall, cold_rss = run_job(manifest, output)
    job = parse_job(document)
    assert isinstance(job, PretrainJob)
    cache = output / "default" / "corpora"
    files = corpus.source_files(job.spec)
    tokenizer = corpus.trained_tokenizer(job.spec, files, str(cache), 0, 1, scratch)
    # A restart: the checkpoints gone, the corpus prepared.
    subprocess.run(["rm", "-rf", str(output / "default" / "pretrainjob")], check=True)
    warm_wall, warm_rss = run_job(manifest, output)
    prepared = corpus.prepare(job.spec, tokenizer, files, str(cache), 0, 1, scratch, lambda _: None)
    assert not prepared.prepared_now
    tokens = prepared.manifest.tokens("train")
    loader = loader_rate(prepared)
    # The preparation against the floor, alternating, `rounds` times: on shared cores a load that
    # comes and goes falls on both alike.
    ratios, rates = [], []
    for round_ in range(rounds):
        started = time.perf_counter()
        corpus.prepare(job.spec, tokenizer, files, str(scratch / f"round-{megabytes}-{round_}"), 0, 1, scratch,
                       lambda _: None)
        rates.append(tokens / (time.perf_counter() - started))
        floor_tokens, floor_seconds = preparation_floor(job.spec, tokenizer)
        ratios.append(rates[-1] / (floor_tokens / floor_seconds))
        subprocess.run(["rm", "-rf", str(scratch / f"round-{megabytes}-{round_}")], check=True)
    return {"megabytes": megabytes, "tokens": tokens, "job_prepare_tokens_per_s": tokens / prepared.manifest.seconds,
            "prepare_tokens_per_s": statistics.median(rates) if rates else 0.0,
            "floor_ratio": statistics.median(ratios) if ratios else 0.0, "loader_tokens_per_s": loader,
            "cold_wall_s": cold_wall, "cold_peak_rss_mb": cold_rss, "restart_wall_s": warm_wall,
            "restart_peak_rss_mb": warm_rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20, 200], help="corpus sizes in MB, ascending")
    parser.add_argument("--rounds", type=int, default=5, help="preparation-against-floor rounds, on the smallest")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    rows = []
    with tempfile.TemporaryDirectory(prefix="kubeforge-bench-corpus-") as scratch:
        for megabytes in sorted(args.sizes):
            rows.append(measure(megabytes, Path(scratch), args.rounds if megabytes == min(args.sizes) else 0))
            print(json.dumps(rows[-1]), file=sys.stderr)
    smallest = rows[0]
    print(f"cores: {os.cpu_count()}")
    row = rows[0]
    print(f"preparation against the floor, {row['megabytes']} MB, median of {args.rounds} alternating rounds: "
          f"{row['prepare_tokens_per_s'] / 1e6:.2f}M tokens/s, {row['floor_ratio']:.2f}x the floor")
    print("| corpus | tokens | the job's preparation | loader | peak RSS, preparing | vs smallest | "
          "restart: wall | restart: peak RSS |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['megabytes']} MB | {row['tokens'] / 1e6:.1f}M | {row['job_prepare_tokens_per_s'] / 1e6:.2f}M "
              f"tokens/s | {row['loader_tokens_per_s'] / 1e6:.0f}M tokens/s | {row['cold_peak_rss_mb']:.0f} MB | "
              f"{row['cold_peak_rss_mb'] / smallest['cold_peak_rss_mb']:.2f}x | {row['restart_wall_s']:.1f}s | "
              f"{row['restart_peak_rss_mb']:.0f} MB |")


if __name__ == "__main__":
    main()
