"""Finetune throughput: kubeforge's loop against Hugging Face `transformers.Trainer` configured two ways.

Two tasks, each on the shipped example data or on a JSONL given with --data:
- sequence classification (examples/data/reviews: text, label), measured in samples/s;
- causal-LM SFT (examples/data/instructions: prompt, response), measured in real tokens/s (tokens of
  data, padding excluded), ours with data.packing on.
Three trainers per task, alternating in one process (ours, HF (a), HF (b), ours, ...):
- ours: `kubeforge.trainer.loop.train` on a FinetuneJob (method full, training.groupByLength on);
- HF (a): every example padded to sequenceLength, the default collator, as most scripts do;
- HF (b): unpadded examples, DataCollatorWithPadding (for SFT DataCollatorForSeq2Seq, which pads the
  labels too) and train_sampling_strategy="group_by_length" (transformers 4's group_by_length=True).
All three start from the same base model, a GPT-2 built by kubeforge.trainer.models from the --size
preset with a byte-level BPE trained on the task's texts and saved as a Hugging Face directory, and
use the same hyperparameters (batch, AdamW with betas 0.9/0.95, warmup then cosine, clipping, fp32).

Timing as in bench/throughput.py: a clock stamp after the optimizer step that ends each logging
interval, the window from the first interval's end to the last step. Real tokens in that window are
counted from the very micro-batches trained (ours: the loop's own Batches, rebuilt; HF: its collator's
output). Each run's final eval metric (accuracy, or eval loss for SFT) is kubeforge's `eval_metrics` on
the same eval examples, so the columns are comparable. Repeat k trains all three with seed k (batch
order, the new head's initialisation): the final metrics' spread over seeds is the noise that a
difference between trainers has to stand out from.

    .venv/bin/python bench/finetune_throughput.py [--task both] [--steps 60] [--repeats 3] [--size small]
    .venv/bin/python bench/finetune_throughput.py --task classification --data my.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from hf import StepClock, hf_training_arguments
from throughput import LOG_INTERVAL, stamped_steps

from kubeforge.spec import FinetuneJob, ModelSpec, TokenizerSpec, parse_job
from kubeforge.trainer import data as trainer_data
from kubeforge.trainer import distributed
from kubeforge.trainer.loop import eval_metrics, train
from kubeforge.trainer.models import build_pretrain_model, load_finetune_model
from kubeforge.trainer.tokenization import train_tokenizer

ROOT = Path(__file__).resolve().parent.parent
DATA = {"classification": ROOT / "examples" / "data" / "reviews" / "train.jsonl",
        "sft": ROOT / "examples" / "data" / "instructions" / "train.jsonl"}
TASKS = {"classification": "sequence-classification", "sft": "causal-lm"}
EVAL_ROWS = 256  # at most, held out of the task's data for every trainer's final evaluation


@dataclass
class Run:
    rate: float  # samples/s (classification) or real tokens/s (SFT) in the timed window
    computed_per_real: float  # tokens computed per real token in the window
    final_metric: float  # eval accuracy (classification) or eval loss (SFT)


@dataclass
class Task:
    name: str
    job: FinetuneJob
    base: Path
    tokenizer: Any
    labels: list[str] | None
    train_set: dict[str, torch.Tensor]  # one example per row, padded to sequenceLength, with lengths
    eval_batches: list[dict[str, torch.Tensor]]

    @property
    def classify(self) -> bool:
        return self.labels is not None


def make_task(name: str, data: Path, args: argparse.Namespace, scratch: Path) -> Task:
    records = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
    held = min(EVAL_ROWS, len(records) // 5)
    train_records, eval_records = records[: len(records) - held], records[len(records) - held :]
    if name == "classification":
        texts = [str(r["text"]) for r in records]
    else:
        texts = [str(r["prompt"]) + "\n" + str(r["response"]) for r in records]
    for split, rows in (("train", train_records), ("eval", eval_records)):
        (scratch / f"{name}-{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = train_tokenizer(texts, TokenizerSpec(vocab_size=4096))
    base = scratch / f"{name}-base"
    torch.manual_seed(0)
    build_pretrain_model(ModelSpec(size=args.size), tokenizer, args.sequence_length).save_pretrained(base)
    tokenizer.save_pretrained(base)

    never = args.steps + 1  # no evaluation or checkpoint before the final step
    job = parse_job({
        "apiVersion": "kubeforge.io/v1alpha1", "kind": "FinetuneJob", "metadata": {"name": f"bench-{name}"},
        "spec": {
            "baseModel": {"uri": str(base)}, "task": TASKS[name], "method": "full",
            "data": {"train": {"uri": str(scratch / f"{name}-train.jsonl")},
                     "eval": {"uri": str(scratch / f"{name}-eval.jsonl")},
                     **({"packing": True} if name == "sft" else {})},
            "training": {"maxSteps": args.steps, "batchSize": args.batch_size,
                         "sequenceLength": args.sequence_length, "learningRate": args.learning_rate,
                         "warmupSteps": LOG_INTERVAL, "lrSchedule": "cosine", "minLrRatio": 0.1,
                         "weightDecay": 0.01, "maxGradNorm": 1.0, "seed": 0, "precision": "fp32",
                         "groupByLength": True, "evalInterval": never,
                         "evalBatches": -(-held // args.batch_size), "logInterval": LOG_INTERVAL},
            "checkpoint": {"intervalSteps": never, "keep": 1},
            "resources": {"gpusPerWorker": 0},
            "metrics": {"port": 0},
        },
    })
    assert isinstance(job, FinetuneJob)
    L = args.sequence_length
    labels = None
    if name == "classification":
        labels = trainer_data.label_names([r["label"] for r in train_records])

        def encode(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
            assert labels is not None
            return trainer_data.classification_examples([str(r["text"]) for r in rows],
                                                    [labels.index(str(r["label"])) for r in rows], tokenizer, L)
    else:
        def encode(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
            return trainer_data.sft_examples([str(r["prompt"]) for r in rows], [str(r["response"]) for r in rows],
                                         tokenizer, L)
    eval_set = encode(eval_records)
    return Task(name, job, base, tokenizer, labels, encode(train_records),
                trainer_data.eval_batches(eval_set, args.batch_size, len(eval_records), 0, 1))


def with_seed(job: FinetuneJob, seed: int) -> FinetuneJob:
    manifest = job.to_manifest()
    manifest["spec"]["training"]["seed"] = seed
    seeded = parse_job(manifest)
    assert isinstance(seeded, FinetuneJob)
    return seeded


def final_metric(task: Task, model: torch.nn.Module) -> float:
    runtime = distributed.Runtime(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    result = eval_metrics(model, task.eval_batches, task.classify, len(task.labels or []), runtime, None)
    return result["accuracy"] if task.classify else result["loss"]


def window(stamps: dict[int, float], steps: int) -> float:
    assert LOG_INTERVAL in stamps and steps in stamps, sorted(stamps)
    return stamps[steps] - stamps[LOG_INTERVAL]


def run_ours(task: Task) -> Run:
    training = task.job.spec.training
    steps = training.max_steps
    assert steps is not None
    with stamped_steps() as handler, tempfile.TemporaryDirectory(prefix="bench-ours-") as root:
        result = train(task.job, checkpoint_root=root, base_model_uri=str(task.base))
    # The micro-batches of the window, as the loop served them (a pure function of seed and index).
    if task.classify:
        train_set = task.train_set
    else:
        train_records = [json.loads(line) for line in Path(task.job.spec.data.train.uri).read_text().splitlines()]
        train_set = trainer_data.packed_sft_examples([r["prompt"] for r in train_records],
                                                 [r["response"] for r in train_records], task.tokenizer,
                                                 training.sequence_length)
    batches = trainer_data.Batches(train_set, training.batch_size, training.seed, 0, 1, group_by_length=True,
                               pad_multiple=trainer_data.pad_multiple(torch.device("cpu")))
    served = [batches[i] for i in range(LOG_INTERVAL, steps)]
    seconds = window(handler.stamps, steps)
    real = sum(m.real_tokens for m in served)
    rate = (steps - LOG_INTERVAL) * training.batch_size / seconds if task.classify else real / seconds
    final = result.final_eval["accuracy" if task.classify else "loss"]
    return Run(rate, sum(m.computed_tokens for m in served) / real, final)


class Examples(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self, rows: list[dict[str, Any]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.rows[index]


def run_hf(task: Task, padded: bool) -> Run:
    """HF Trainer: (a) padded to sequenceLength when `padded`, else (b) dynamic padding + grouping."""
    from transformers import (
        AutoModelForCausalLM,
        DataCollatorForSeq2Seq,
        DataCollatorWithPadding,
        PrinterCallback,
        Trainer,
        default_data_collator,
    )

    training = task.job.spec.training
    steps = training.max_steps
    assert steps is not None
    rows = []
    for i, length in enumerate(task.train_set[trainer_data.LENGTHS].tolist()):
        keep = slice(None) if padded else slice(0, length)
        row = {k: t[i][keep] if t.dim() == 2 else t[i] for k, t in task.train_set.items() if k != trainer_data.LENGTHS}
        rows.append({k: v if padded else v.tolist() for k, v in row.items()})
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]
    if padded:
        collate = default_data_collator
    elif task.classify:
        collate = DataCollatorWithPadding(task.tokenizer)
    else:
        collate = DataCollatorForSeq2Seq(task.tokenizer, label_pad_token_id=trainer_data.IGNORE_INDEX)
    collated: list[tuple[int, int]] = []  # (real, computed) tokens of each batch, in training order

    def counting(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = collate(features)
        collated.append((int(batch["attention_mask"].sum()), batch["input_ids"].numel()))
        return batch

    torch.manual_seed(training.seed)  # as our loop does before loading: the same new head
    if task.classify:
        model = load_finetune_model(task.job.spec, task.base, task.tokenizer, task.labels, training.max_steps or 1)
    else:
        model = AutoModelForCausalLM.from_pretrained(task.base)
    with tempfile.TemporaryDirectory(prefix="bench-hf-") as output:
        arguments = hf_training_arguments(
            training, output, remove_unused_columns=False,
            train_sampling_strategy="random" if padded else "group_by_length")
        clock = StepClock()
        trainer = Trainer(model=model, args=arguments, train_dataset=Examples(rows), data_collator=counting,
                          callbacks=[clock])
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    in_window = collated[LOG_INTERVAL:steps]  # batch k trains step k + 1
    real, computed = sum(r for r, _ in in_window), sum(c for _, c in in_window)
    seconds = window(clock.stamps, steps)
    rate = (steps - LOG_INTERVAL) * training.batch_size / seconds if task.classify else real / seconds
    return Run(rate, computed / real, final_metric(task, model))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=("classification", "sft", "both"), default="both")
    parser.add_argument("--data", type=Path, help="a JSONL for --task: text/label or prompt/response records")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run (default 60)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each trainer, alternating (default 3)")
    parser.add_argument("--size", choices=("tiny", "small", "125m"), default="small")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sequence-length", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    args = parser.parse_args()
    if args.steps < 2 * LOG_INTERVAL or args.repeats < 1:
        parser.error(f"--steps must be at least {2 * LOG_INTERVAL} and --repeats at least 1")
    if args.data is not None and args.task == "both":
        parser.error("--data needs --task classification or --task sft")
    names = ["classification", "sft"] if args.task == "both" else [args.task]

    print(f"gpt2 size={args.size}, batch {args.batch_size}, sequenceLength {args.sequence_length}, "
          f"{args.steps} steps/run, {args.repeats} runs each, {torch.get_num_threads()} torch threads", flush=True)
    table = []
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as scratch:
        for name in names:
            task = make_task(name, args.data or DATA[name], args, Path(scratch))
            runs: dict[str, list[Run]] = {}
            for repeat in range(args.repeats):
                # Repeat k trains with seed k, all three trainers alike: the seed orders the batches and
                # initialises the new head, so the final metrics' spread over seeds is the noise a
                # difference between trainers must stand out from.
                seeded = replace(task, job=with_seed(task.job, repeat))
                trainers: dict[str, Callable[[], Run]] = {
                    "kubeforge": partial(run_ours, seeded),
                    "HF (a) max-length padding": partial(run_hf, seeded, padded=True),
                    "HF (b) dynamic padding + group_by_length": partial(run_hf, seeded, padded=False),
                }
                for label, run in trainers.items():
                    result = run()
                    runs.setdefault(label, []).append(result)
                    print(f"{name} repeat {repeat + 1}/{args.repeats} {label}: {result.rate:,.1f} "
                          f"{'samples' if task.classify else 'real tokens'}/s, computed/real "
                          f"{result.computed_per_real:.2f}, final eval {result.final_metric:.4f}", flush=True)
            ours = statistics.median(r.rate for r in runs["kubeforge"])
            for label, results in runs.items():
                median = statistics.median(r.rate for r in results)
                finals = [r.final_metric for r in results]
                table.append((name, label, ", ".join(f"{r.rate:,.1f}" for r in results), median, ours / median,
                              statistics.median(r.computed_per_real for r in results),
                              ", ".join(f"{f:.4f}" for f in finals), statistics.mean(finals)))
    print()
    print("| task | trainer | runs (samples/s or real tokens/s) | median | kubeforge / this | computed / real tokens "
          "| final eval by seed (accuracy or loss) | mean final eval |")
    print("|---|---|---|---|---|---|---|---|")
    for name, label, rates, median, ratio, padding, finals, mean in table:
        unit = "samples/s" if name == "classification" else "real tokens/s"
        print(f"| {name} | {label} | {rates} | {median:,.1f} {unit} | {ratio:.2f} | {padding:.2f} | {finals} "
              f"| {mean:.4f} |")


if __name__ == "__main__":
    main()
