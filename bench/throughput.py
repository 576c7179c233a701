"""Training throughput: kubeforge's loop against Hugging Face `transformers.Trainer`, side by side.

Both train the same GPT-2 (built by kubeforge.trainer.models from the same spec and seed) on the same
packed tensors (examples/data/shakespeare/train.txt, the tokenizer trained by
kubeforge.trainer.tokenization) with the same hyperparameters: batch size, sequence length, AdamW
(betas 0.9/0.95, weight decay), warmup then cosine decay to 10% of the peak, gradient clipping, fp32
on CPU, no evaluation and no checkpoint inside the measured window.

Timing: each trainer stamps time.perf_counter() after every optimizer step that ends a logging
interval (ours through its "step N/M" log record, caught by a logging handler; HF through a
TrainerCallback.on_step_end). Tokens/s is counted from the end of the first logging interval to the
end of the last step, so setup (tokenizer training, packing, model build, the step-0 evaluation),
the first steps' warm-up and the teardown (final evaluation, checkpoint and export) are all outside
the window, identically for both.

    .venv/bin/python bench/throughput.py [--steps 60] [--repeats 3] [--size small]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from hf import StepClock, hf_training_arguments

from kubeforge.spec import PretrainJob, parse_job
from kubeforge.trainer import data
from kubeforge.trainer.loop import train
from kubeforge.trainer.models import build_pretrain_model
from kubeforge.trainer.tokenization import train_tokenizer

ROOT = Path(__file__).resolve().parent.parent
SHAKESPEARE = ROOT / "examples" / "data" / "shakespeare"
LOG_INTERVAL = 10


def make_job(*, size: str, steps: int, batch_size: int, sequence_length: int,
             **sections: dict[str, Any]) -> PretrainJob:
    """The benchmark's hyperparameters, as a PretrainJob: they are read from it for HF as well.
    `sections` change spec sections field by field (bench/gpu.py: another corpus, bf16, a llama)."""
    never = steps + 1  # no evaluation or checkpoint before the final step
    spec: dict[str, dict[str, Any]] = {
        "model": {"architecture": "gpt2", "size": size},
        "tokenizer": {"vocabSize": 2048},
        "data": {"train": {"uri": str(SHAKESPEARE / "train.txt")}, "eval": {"uri": str(SHAKESPEARE / "eval.txt")}},
        "training": {"maxSteps": steps, "batchSize": batch_size, "sequenceLength": sequence_length,
                     "learningRate": 1e-3, "warmupSteps": LOG_INTERVAL, "lrSchedule": "cosine", "minLrRatio": 0.1,
                     "weightDecay": 0.01, "maxGradNorm": 1.0, "seed": 0, "precision": "fp32",
                     "evalInterval": never, "evalBatches": 1, "logInterval": LOG_INTERVAL},
        "checkpoint": {"intervalSteps": never, "keep": 1},
        "resources": {"gpusPerWorker": 0},
        "metrics": {"port": 0},
    }
    for section, fields in sections.items():
        spec[section] = {**spec[section], **fields}
    job = parse_job({"apiVersion": "kubeforge.io/v1alpha1", "kind": "PretrainJob",
                     "metadata": {"name": "bench-throughput"}, "spec": spec})
    assert isinstance(job, PretrainJob)
    return job


def tokens_per_second(stamps: dict[int, float], job: PretrainJob) -> float:
    """Tokens trained per second between the first logging step and the last step."""
    training = job.spec.training
    first, last = LOG_INTERVAL, training.max_steps
    assert last is not None and first in stamps and last in stamps, sorted(stamps)
    tokens = (last - first) * training.batch_size * training.sequence_length
    return tokens / (stamps[last] - stamps[first])


class StepStamps(logging.Handler):
    """Catches the trainer's "step N/M loss ..." records: the step, its time and its loss."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.stamps: dict[int, float] = {}
        self.loss = float("nan")

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("step ") and isinstance(record.args, tuple):
            self.stamps[int(record.args[0])] = time.perf_counter()
            self.loss = float(record.args[2])


@contextlib.contextmanager
def stamped_steps() -> Iterator[StepStamps]:
    """The trainer's step records, stamped as they are logged, while the block runs."""
    logger = logging.getLogger("kubeforge.trainer.loop")
    handler = StepStamps()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def run_ours(job: PretrainJob) -> tuple[float, float]:
    with stamped_steps() as handler, tempfile.TemporaryDirectory(prefix="bench-ours-") as root:
        train(job, checkpoint_root=root)
    return tokens_per_second(handler.stamps, job), handler.loss


def tokenized(job: PretrainJob) -> tuple[Any, dict[str, torch.Tensor]]:
    """The tokenizer our loop trains for the job and the packed training tensors: what HF's run gets."""
    texts, _ = data.pretrain_texts(job.spec.data, None)
    tokenizer = train_tokenizer(texts, job.spec.tokenizer)
    return tokenizer, data.pack_texts(texts, tokenizer, job.spec.training.sequence_length, "data.train")


class Packed(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors["input_ids"])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: tensor[index] for name, tensor in self.tensors.items()}


def run_hf(job: PretrainJob, tokenizer: Any, packed: dict[str, torch.Tensor]) -> tuple[float, float]:
    from transformers import PrinterCallback, Trainer

    training = job.spec.training
    torch.manual_seed(training.seed)  # as our loop does before building: the same initial weights
    model = build_pretrain_model(job.spec.model, tokenizer, training.sequence_length)
    clock = StepClock()
    with tempfile.TemporaryDirectory(prefix="bench-hf-") as output:
        trainer = Trainer(model=model, args=hf_training_arguments(training, output), train_dataset=Packed(packed),
                          callbacks=[clock])
        trainer.remove_callback(PrinterCallback)  # it prints every log line
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return tokens_per_second(clock.stamps, job), losses[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run (default 60)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each trainer, alternating (default 3)")
    parser.add_argument("--size", choices=("tiny", "small", "125m"), default="small")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sequence-length", type=int, default=128)
    args = parser.parse_args()
    if args.steps < 2 * LOG_INTERVAL or args.repeats < 1:
        parser.error(f"--steps must be at least {2 * LOG_INTERVAL} and --repeats at least 1")

    job = make_job(size=args.size, steps=args.steps, batch_size=args.batch_size,
                   sequence_length=args.sequence_length)
    training = job.spec.training
    tokenizer, packed = tokenized(job)
    model = build_pretrain_model(job.spec.model, tokenizer, training.sequence_length)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"gpt2 size={args.size}: {parameters / 1e6:.2f}M parameters, {len(packed['input_ids'])} "
          f"sequences of {training.sequence_length} tokens, batch {training.batch_size}, "
          f"{args.steps} steps/run, {torch.get_num_threads()} torch threads", flush=True)

    results: dict[str, list[float]] = {"ours": [], "hf": []}
    losses: dict[str, list[float]] = {"ours": [], "hf": []}
    for repeat in range(args.repeats):
        for name, run in (("ours", lambda: run_ours(job)), ("hf", lambda: run_hf(job, tokenizer, packed))):
            rate, loss = run()
            results[name].append(rate)
            losses[name].append(loss)
            print(f"repeat {repeat + 1}/{args.repeats} {name}: {rate:,.0f} tokens/s "
                  f"(train loss at step {args.steps}: {loss:.3f})", flush=True)

    ours, hf = statistics.median(results["ours"]), statistics.median(results["hf"])
    print()
    print("| trainer | runs (tokens/s) | median tokens/s | final train loss |")
    print("|---|---|---|---|")
    for label, name, median in (("kubeforge `train()`", "ours", ours),
                                ("HF `transformers.Trainer`", "hf", hf)):
        runs = ", ".join(f"{r:,.0f}" for r in results[name])
        print(f"| {label} | {runs} | {median:,.0f} | {statistics.median(losses[name]):.3f} |")
    print()
    print(f"ratio ours/HF: {ours / hf:.2f}")


if __name__ == "__main__":
    main()
