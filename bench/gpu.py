"""GPU throughput and MFU: kubeforge against Hugging Face `Trainer` on the 125m preset, then a 1B Llama on every GPU.

One command, one table, a few minutes on one GPU. Three runs, bf16 autocast (precision auto), TF32,
fused AdamW and pinned batches, all on the Shakespeare text repeated to fill the batches:

  1. kubeforge `train()`: the `125m` preset (GPT-2 small's shape), one process on GPU 0;
  2. HF `transformers.Trainer`: the same model, data and hyperparameters (bench/throughput.py's
     run_hf, its arguments from bench/hf.py);
  3. kubeforge `train()`: the `1b` preset as a Llama, one process per visible GPU, started by the
     launcher of `kubeforge train --processes N` (kubeforge.trainer.launcher); a checkpoint is taken
     mid-run and the time it blocks the training loop is recorded.

Tokens/s: runs 1 and 2 as in bench/throughput.py (a clock stamp after the steps that end a logging
interval, the window from the first interval to the last step). Run 3 logs every step: its tokens/s
are every process's tokens of one step over the median step time before the checkpoint, and the
checkpoint's blocking is the step it precedes, less that median. MFU = tokens/s x model FLOPs per
token / (the GPU's dense bf16 peak x GPUs), FLOPs per token as the trainer's own metric counts them
(kubeforge.trainer.flops: 6 x parameters + 12 x layers x hidden x sequence length, PaLM's, attention
included); n/a on CPU.

--smoke runs the same code at tiny size on CPU (run 3 with two gloo processes) in well under a minute:
what CI runs to keep this script working. It measures nothing about GPUs.

    .venv/bin/python bench/gpu.py [--compile]
    .venv/bin/python bench/gpu.py --smoke
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from throughput import LOG_INTERVAL, SHAKESPEARE, make_job, run_hf, run_ours, stamped_steps, tokenized

from kubeforge.spec import PretrainJob, parse_job
from kubeforge.trainer import data, distributed
from kubeforge.trainer.flops import model_flops_utilization, peak_flops, training_flops_per_token
from kubeforge.trainer.launcher import launch
from kubeforge.trainer.loop import train
from kubeforge.trainer.models import build_pretrain_model
from kubeforge.trainer.tokenization import train_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support.processes import free_port  # noqa: E402


@dataclass(frozen=True)
class Sizes:
    """What each run trains: presets, batch and length per process, steps, copies of the text per GPU."""

    small: str
    small_batch: int
    small_length: int
    small_steps: int
    large: str
    large_batch: int
    large_length: int
    large_steps: int  # the checkpoint is taken after large_checkpoint of them
    large_checkpoint: int
    large_first: int  # step times are counted from this step on: the first steps warm up
    vocabulary: int
    train_copies: int  # of train.txt per GPU: every process's batches full, a few steps per epoch
    eval_copies: int  # of eval.txt per GPU: an eval batch for every process of run 3


GPU = Sizes(small="125m", small_batch=16, small_length=1024, small_steps=60,
            large="1b", large_batch=8, large_length=2048, large_steps=30, large_checkpoint=20, large_first=5,
            vocabulary=8192, train_copies=2, eval_copies=8)
SMOKE = Sizes(small="tiny", small_batch=4, small_length=64, small_steps=2 * LOG_INTERVAL,
              large="tiny", large_batch=4, large_length=64, large_steps=12, large_checkpoint=8, large_first=3,
              vocabulary=512, train_copies=1, eval_copies=1)
SMOKE_PROCESSES = 2  # gloo on CPU: the launcher, the process group and the per-rank data as on GPUs


@dataclass(frozen=True)
class Row:
    run: str
    model: str
    parameters: int
    processes: int
    tokens_per_second: float
    mfu: float | None
    checkpoint_blocked: float | None  # seconds; None: no checkpoint in the timed window


def model_shape(job: PretrainJob, tokenizer: Any) -> tuple[int, float]:
    """Parameters and model FLOPs per token, from the model built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = build_pretrain_model(job.spec.model, tokenizer, job.spec.training.sequence_length)
    parameters = sum(p.numel() for p in model.parameters())
    config = model.config
    return parameters, training_flops_per_token(parameters, config.num_hidden_layers, config.hidden_size,
                                                job.spec.training.sequence_length)


def repeated(split: str, copies: int, scratch: Path) -> Path:
    """The Shakespeare split (train.txt, eval.txt) repeated: enough sequences for every GPU's batches."""
    path = scratch / split
    path.write_text((SHAKESPEARE / split).read_text(encoding="utf-8") * copies, encoding="utf-8")
    return path


def large_job(sizes: Sizes, processes: int, corpus: Path, training: dict[str, Any]) -> PretrainJob:
    """Run 3's job: a step logged (and timed) each step, a checkpoint inside the timed steps, and one eval
    batch for every process (with FSDP every process must take part in each forward pass)."""
    evaluation = repeated("eval.txt", sizes.eval_copies * processes, corpus.parent)
    return make_job(size=sizes.large, steps=sizes.large_steps, batch_size=sizes.large_batch,
                    sequence_length=sizes.large_length, model={"architecture": "llama"},
                    tokenizer={"vocabSize": sizes.vocabulary},
                    data={"train": {"uri": str(corpus)}, "eval": {"uri": str(evaluation)}},
                    training={**training, "parallelism": "fsdp", "warmupSteps": sizes.large_first, "logInterval": 1,
                              "evalBatches": processes},
                    checkpoint={"intervalSteps": sizes.large_checkpoint})


def small_worker(scratch: Path) -> None:
    """Runs 1 and 2, in a process that sees one GPU (HF's Trainer would spread over all with DataParallel)."""
    job = parse_job(json.loads((scratch / "job.json").read_text()))
    assert isinstance(job, PretrainJob)
    tokenizer, packed = tokenized(job)
    rates = {"ours": run_ours(job)[0]}
    gc.collect()
    torch.cuda.empty_cache()  # HF's run gets the GPU as ours did
    rates["hf"] = run_hf(job, tokenizer, packed)[0]
    (scratch / "rates.json").write_text(json.dumps(rates))


def large_worker(scratch: Path) -> None:
    """One process of run 3: train, and (rank 0) write the time of every step."""
    job = parse_job(json.loads((scratch / "job.json").read_text()))
    assert isinstance(job, PretrainJob)
    with stamped_steps() as handler:
        train(job, checkpoint_root=str(scratch / "checkpoints"))
    if os.environ.get("RANK") == "0":
        (scratch / "stamps.json").write_text(json.dumps(handler.stamps))


def run_small(job: PretrainJob, scratch: Path) -> dict[str, float]:
    """Runs 1 and 2 on the first visible GPU: tokens/s of ours and of HF."""
    scratch.mkdir()
    (scratch / "job.json").write_text(json.dumps(job.to_manifest()))
    first_gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    subprocess.run([sys.executable, __file__, "--small-worker", str(scratch)], check=True,
                   env={**os.environ, "CUDA_VISIBLE_DEVICES": first_gpu})
    return {name: float(rate) for name, rate in json.loads((scratch / "rates.json").read_text()).items()}


def run_large(job: PretrainJob, processes: int, first: int, scratch: Path) -> tuple[float, float]:
    """Run 3 on `processes` processes: (tokens/s of them all, seconds the checkpoint blocked the loop), step
    times counted from step `first` on."""
    scratch.mkdir()
    (scratch / "job.json").write_text(json.dumps(job.to_manifest()))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    if processes > 1:
        env.setdefault("OMP_NUM_THREADS", "1")  # as torchrun: processes sharing the cores do not oversubscribe them
    ended = launch(processes, lambda _: [sys.executable, __file__, "--large-worker", str(scratch)], env)
    if ended.code:
        raise SystemExit(f"the {processes} training processes of the {job.spec.model.size} run failed "
                         f"(exit {ended.code}, local rank {ended.local_rank})")
    stamps = {int(step): stamp for step, stamp in json.loads((scratch / "stamps.json").read_text()).items()}
    training, checkpoint = job.spec.training, job.spec.checkpoint.interval_steps
    median = statistics.median(stamps[k] - stamps[k - 1] for k in range(first + 1, checkpoint + 1))
    tokens_per_step = processes * training.batch_size * training.sequence_length
    return tokens_per_step / median, stamps[checkpoint + 1] - stamps[checkpoint] - median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: checks the script, measures nothing")
    parser.add_argument("--compile", action="store_true", help="training.compile (HF: torch_compile) in every run")
    parser.add_argument("--small-worker", type=Path, help=argparse.SUPPRESS)  # the process of runs 1 and 2
    parser.add_argument("--large-worker", type=Path, help=argparse.SUPPRESS)  # one process of run 3
    args = parser.parse_args()
    if args.small_worker:
        return small_worker(args.small_worker)
    if args.large_worker:
        return large_worker(args.large_worker)
    gpus = torch.cuda.device_count()
    if not gpus and not args.smoke:
        parser.error("no GPU is visible: run it with --smoke to check the script on CPU")
    sizes = SMOKE if args.smoke else GPU
    processes = SMOKE_PROCESSES if args.smoke else gpus
    bf16 = distributed.autocast_dtype("auto", torch.device("cuda" if gpus else "cpu")) == torch.bfloat16
    device_name = torch.cuda.get_device_name(0) if gpus else "CPU"
    peak = peak_flops(device_name, bf16) if gpus else None
    print(f"{device_name} x{gpus or 1}, torch {torch.__version__}, precision {'bf16' if bf16 else 'fp32'}, "
          f"compile {args.compile}, peak {f'{peak:.4g}' if peak else 'n/a'} FLOP/s per device", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as scratch_dir:
        scratch = Path(scratch_dir)
        corpus = repeated("train.txt", sizes.train_copies * processes, scratch)
        training = {"precision": "auto", "compile": args.compile}
        small = make_job(size=sizes.small, steps=sizes.small_steps, batch_size=sizes.small_batch,
                         sequence_length=sizes.small_length, tokenizer={"vocabSize": sizes.vocabulary},
                         data={"train": {"uri": str(corpus)}}, training=training)
        large = large_job(sizes, processes, corpus, training)
        # Both runs train this tokenizer from the same corpus: it sizes their models' embeddings.
        tokenizer = train_tokenizer(data.pretrain_texts(small.spec.data, None)[0], small.spec.tokenizer)
        rows: list[Row] = []
        rates = run_small(small, scratch / "small")
        parameters, flops = model_shape(small, tokenizer)
        model = f"gpt2 {sizes.small}, {sizes.small_batch} x {sizes.small_length} tokens"
        for run, rate in (("kubeforge `train()`", rates["ours"]), ("HF `transformers.Trainer`", rates["hf"])):
            mfu = model_flops_utilization(rate, flops, peak) if peak else None
            rows.append(Row(run, model, parameters, 1, rate, mfu, None))
            print(f"{run}: {rate:,.0f} tokens/s", flush=True)

        rate, blocked = run_large(large, processes, sizes.large_first, scratch / "large")
        parameters, flops = model_shape(large, tokenizer)
        mfu = model_flops_utilization(rate, flops, peak * processes) if peak else None
        rows.append(Row("kubeforge `train()`, fsdp", f"llama {sizes.large}, {sizes.large_batch} x "
                        f"{sizes.large_length} tokens per process", parameters, processes, rate, mfu, blocked))
        print(f"{rows[-1].run}: {rate:,.0f} tokens/s, checkpoint blocked {blocked:.3f}s", flush=True)

    print()
    print("| run | model | parameters | processes | tokens/s | MFU | checkpoint blocks the loop (s) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        mfu = f"{row.mfu:.1%}" if row.mfu is not None else "n/a"
        blocked = f"{row.checkpoint_blocked:.3f}" if row.checkpoint_blocked is not None else "-"
        print(f"| {row.run} | {row.model} | {row.parameters / 1e6:,.1f}M | {row.processes} x {device_name} "
              f"| {row.tokens_per_second:,.0f} | {mfu} | {blocked} |")
    print()
    print(f"ratio kubeforge/HF on {sizes.small}: {rows[0].tokens_per_second / rows[1].tokens_per_second:.2f}")


if __name__ == "__main__":
    main()
