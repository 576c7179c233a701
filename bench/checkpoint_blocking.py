"""How long a checkpoint blocks the training loop: kubeforge's background upload against synchronous saves.

A GPT-2 (built by kubeforge.trainer.models) trains with AdamW on the packed Shakespeare text, and
every --steps-between optimizer steps saves the state our loop saves (model, AdamW moments, trainer
state with RNG states, tokenizer) in one of three ways:

  async  kubeforge `Checkpointer.save`: the loop waits for any previous upload still running and a
         CPU copy of the state; torch.save, sha256, upload, manifest and retention run in a thread.
  sync   `Checkpointer(background=False).save`: the same work, all of it in the loop.
  plain  torch.save of each file to a temporary directory, then `storage.put_file`: a loop with no
         checkpointer (no snapshot copy, no checksums, no manifest, no retention).

Blocked time is what `Checkpointer.save` returns (async, sync) or the wall time of the plain save.
Loop wall time runs from the first training step to the end of the last upload, so it counts what
the background upload costs the training steps it overlaps (the CPU is shared). Storages: a real
S3 endpoint (a moto server subprocess, fake credentials) and a local directory.

    .venv/bin/python bench/checkpoint_blocking.py [--sizes small,125m] [--saves 3] [--storages s3,local]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kubeforge.spec import ModelSpec, S3Spec, TokenizerSpec
from kubeforge.storage import Storage, join, open_storage
from kubeforge.trainer import data
from kubeforge.trainer.checkpoint import Checkpointer, UploadReport
from kubeforge.trainer.loop import param_groups
from kubeforge.trainer.models import build_pretrain_model
from kubeforge.trainer.tokenization import train_tokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support.processes import moto_server  # noqa: E402

TRAIN_TEXT = ROOT / "examples" / "data" / "shakespeare" / "train.txt"
BUCKET = "bench-checkpoints"
MODES = ("async", "sync", "plain")


@contextmanager
def s3_bucket() -> Iterator[S3Spec]:
    """A moto S3 server (tests/support) with a fresh bucket, and fake credentials."""
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench-key-id", "AWS_SECRET_ACCESS_KEY": "bench-secret",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    with moto_server() as endpoint:
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
        yield S3Spec(endpoint_url=endpoint)


@dataclass
class Result:
    size: str
    storage: str
    mode: str
    blocked: list[float]  # per save
    training: float  # seconds in training steps
    final_wait: float  # for the last upload, after the last step
    wall: float
    megabytes: float


class Trainee:
    """A model, its AdamW and a batch source: enough to take real steps and to snapshot real state."""

    def __init__(self, size: str, batch_size: int, sequence_length: int):
        text = TRAIN_TEXT.read_text(encoding="utf-8")
        self.tokenizer = train_tokenizer([text], TokenizerSpec(vocab_size=2048))
        packed = data.pack_texts([text], self.tokenizer, sequence_length, "train.txt")
        self.batches = data.Batches(packed, batch_size, seed=0, rank=0, world_size=1)
        torch.manual_seed(0)
        self.model = build_pretrain_model(ModelSpec(size=size), self.tokenizer, sequence_length)
        self.model.config.use_cache = False
        self.parameters = sum(p.numel() for p in self.model.parameters())
        self.optimizer = torch.optim.AdamW(param_groups(self.model, 0.01), lr=1e-3, betas=(0.9, 0.95))
        self.step = 0
        self.train(1)  # the AdamW moments exist from the first step on

    def train(self, steps: int) -> None:
        for _ in range(steps):
            loss = self.model(**self.batches[self.step].inputs).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1

    def state(self) -> dict[str, Any]:
        """The files kubeforge's loop checkpoints (trainer/loop.py save_checkpoint)."""
        return {
            "model.pt": self.model.state_dict(),
            "optimizer.pt": self.optimizer.state_dict(),
            "state.pt": {"step": self.step, "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}},
            "tokenizer.json": self.tokenizer.backend_tokenizer.to_str().encode(),
        }


def plain_save(storage: Storage, step: int, state: dict[str, Any]) -> int:
    """torch.save every file, then upload it; returns the bytes written."""
    written = 0
    with tempfile.TemporaryDirectory(prefix="bench-plain-") as scratch:
        for name, payload in state.items():
            path = Path(scratch) / name
            if isinstance(payload, bytes):
                path.write_bytes(payload)
            else:
                torch.save(payload, path)
            written += path.stat().st_size
            storage.put_file(join(f"step-{step:08d}", name), path)
    return written


def measure(trainee: Trainee, storage: Storage, mode: str, saves: int, steps_between: int,
            size: str, kind: str) -> Result:
    reports: list[UploadReport] = []
    checkpointer = (None if mode == "plain" else
                    Checkpointer(storage, keep=2, spec_hash="bench", rank=0, on_uploaded=reports.append,
                                 background=mode == "async"))
    blocked = []
    written = 0
    started = time.perf_counter()
    try:
        for _ in range(saves):
            trainee.train(steps_between)
            if checkpointer is None:
                save_started = time.perf_counter()
                written = plain_save(storage, trainee.step, trainee.state())
                blocked.append(time.perf_counter() - save_started)
            else:
                blocked.append(checkpointer.save(trainee.step, trainee.state()))
        last_save_done = time.perf_counter()
    finally:
        if checkpointer is not None:
            checkpointer.close()  # waits for the last upload
    wall = time.perf_counter() - started
    final_wait = wall - (last_save_done - started)
    if checkpointer is not None:
        if checkpointer.last_error is not None:
            raise RuntimeError(f"{mode} checkpoint to {storage.uri} failed") from checkpointer.last_error
        written = reports[-1].bytes_written
    return Result(size, kind, mode, blocked, wall - final_wait - sum(blocked), final_wait, wall, written / 1e6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="small,125m", help="model size presets, comma-separated")
    parser.add_argument("--storages", default="s3,local", help="s3 (a moto server) and/or local")
    parser.add_argument("--saves", type=int, default=3, help="checkpoints per mode (default 3)")
    parser.add_argument("--steps-between", default="small=20,125m=4",
                        help="optimizer steps before each save, per size (default small=20,125m=4)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--sequence-length", type=int, default=128)
    args = parser.parse_args()
    sizes = args.sizes.split(",")
    storages = args.storages.split(",")
    between = {k: int(v) for k, v in (item.split("=") for item in args.steps_between.split(","))}
    if not set(sizes) <= {"tiny", "small", "125m"} or not set(storages) <= {"s3", "local"}:
        parser.error("--sizes takes tiny, small, 125m; --storages takes s3, local")
    if args.saves < 1 or not set(sizes) <= set(between):
        parser.error("--saves must be at least 1 and --steps-between must name every size")

    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="bench-local-") as local_root, \
            (s3_bucket() if "s3" in storages else nullcontext()) as s3:
        for size in sizes:
            trainee = Trainee(size, args.batch_size, args.sequence_length)
            started = time.perf_counter()
            trainee.train(2)
            step_seconds = (time.perf_counter() - started) / 2
            print(f"gpt2 size={size}: {trainee.parameters / 1e6:.1f}M parameters, "
                  f"{step_seconds:.2f}s per step (batch {args.batch_size} x {args.sequence_length}), "
                  f"{between[size]} steps between saves", flush=True)
            for kind in storages:
                for mode in MODES:
                    uri = (f"s3://{BUCKET}/{size}/{mode}" if kind == "s3"
                           else str(Path(local_root) / size / mode))
                    storage = open_storage(uri, s3)
                    r = measure(trainee, storage, mode, args.saves, between[size], size, kind)
                    results.append(r)
                    print(f"  {kind:5} {mode:5}: blocked {', '.join(f'{b:.2f}' for b in r.blocked)} s; "
                          f"loop {r.wall:.1f}s", flush=True)
            del trainee

    print()
    print("| size | storage | MB per checkpoint | mode | median blocked s per save | max blocked s "
          "| training steps s | final wait s | loop wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r.size} | {r.storage} | {r.megabytes:.0f} | {r.mode} | {statistics.median(r.blocked):.3f} "
              f"| {max(r.blocked):.3f} | {r.training:.1f} | {r.final_wait:.1f} | {r.wall:.1f} |")
    print()
    for size in sizes:
        for kind in storages:
            by_mode = {r.mode: r for r in results if r.size == size and r.storage == kind}
            median = {m: statistics.median(by_mode[m].blocked) for m in MODES}
            print(f"{size} on {kind}: blocked per save sync/async {median['sync'] / median['async']:.0f}x, "
                  f"plain/async {median['plain'] / median['async']:.0f}x; loop wall time async "
                  f"{by_mode['async'].wall:.1f}s, sync {by_mode['sync'].wall:.1f}s, "
                  f"plain {by_mode['plain'].wall:.1f}s")


if __name__ == "__main__":
    main()
