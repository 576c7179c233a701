"""Quantized exports against the model they compress: eval accuracy, size on disk, CPU latency per batch.

A llama (hidden 128, 4 layers of MLP width 512: 1.2M parameters, most of them in its Linear layers as
in a served model's) is pretrained (--pretrain-steps on examples/data/shakespeare)
by kubeforge, then fully finetuned to classify examples/data/reviews (batch 16, sequenceLength 64,
--steps steps, one CPU process) by the same FinetuneJob twice, once with `export.quantize: int8`
and once with `int4`: each job reports both its exports' accuracy and size (result.compression).
The runs are deterministic, so both full models are the same one (checked). Then all three exports
are loaded with from_pretrained, as a user would, and timed on the eval set's batches, rounds
interleaved so that each sees the machine alike; latency is the median per batch over --rounds rounds.

    .venv/bin/python bench/compression.py [--steps 150] [--pretrain-steps 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from kubeforge.spec import FinetuneJob, PretrainJob, parse_job
from kubeforge.status import CompressionReport, TrainerResult
from kubeforge.trainer import data
from kubeforge.trainer.loop import train

ROOT = Path(__file__).resolve().parent.parent
REVIEWS = ROOT / "examples" / "data" / "reviews"
BATCH, SEQUENCE_LENGTH = 16, 64


def pretrained_base(steps: int, scratch: Path) -> Path:
    document = next(d for d in yaml.safe_load_all((ROOT / "examples" / "pretrain-tiny.yaml").read_text()) if d)
    for split in ("train", "eval"):
        document["spec"]["data"][split]["uri"] = str(ROOT / document["spec"]["data"][split]["uri"])
    document["spec"]["model"] = {"architecture": "llama", "size": "small", "hiddenSize": 128, "numHeads": 4,
                                 "intermediateSize": 512}
    document["spec"]["training"].update(maxSteps=steps, warmupSteps=min(20, steps - 1), learningRate=1e-3)
    document["spec"]["resources"]["gpusPerWorker"] = 0
    document["spec"]["metrics"] = {"port": 0}
    job = parse_job(document)
    assert isinstance(job, PretrainJob)
    train(job, checkpoint_root=str(scratch / "pretrain"))
    return scratch / "pretrain" / "export"


def finetune(base: Path, export: dict[str, Any], steps: int, root: Path) -> TrainerResult:
    """The bench's full finetune of the review classifier, exported as `export` asks."""
    job = parse_job({
        "apiVersion": "kubeforge.io/v1alpha1", "kind": "FinetuneJob", "metadata": {"name": "bench-compression"},
        "spec": {
            "baseModel": {"uri": str(base)}, "task": "sequence-classification", "method": "full",
            "data": {"train": {"uri": str(REVIEWS / "train.jsonl")}, "eval": {"uri": str(REVIEWS / "eval.jsonl")}},
            "training": {"maxSteps": steps, "batchSize": BATCH, "sequenceLength": SEQUENCE_LENGTH,
                         "learningRate": 1e-3, "warmupSteps": min(10, steps - 1), "evalInterval": 100_000,
                         "evalBatches": 1000, "logInterval": 50},
            "checkpoint": {"uri": str(root), "intervalSteps": 100_000},
            "resources": {"gpusPerWorker": 0}, "metrics": {"port": 0},
            "export": export,
        },
    })
    assert isinstance(job, FinetuneJob)
    return train(job, checkpoint_root=str(root), base_model_uri=str(base))


def eval_inputs(model_dir: Path) -> list[dict[str, torch.Tensor]]:
    """The eval split as the job batched it (inputs only)."""
    from transformers import AutoTokenizer

    from kubeforge.spec import FinetuneData

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    spec = FinetuneData.model_validate({"train": {"uri": str(REVIEWS / "train.jsonl")},
                                        "eval": {"uri": str(REVIEWS / "eval.jsonl")}})
    _, eval_set, _ = data.classification_sets(spec, None, tokenizer, SEQUENCE_LENGTH)
    batches = data.eval_batches(eval_set, BATCH, 1000, 0, 1)
    return [{k: v for k, v in batch.items() if k != "labels"} for batch in batches]


def latencies(models: dict[str, Path], rounds: int) -> dict[str, float]:
    """Median seconds per eval batch of each model, loaded with from_pretrained, rounds interleaved."""
    from transformers import AutoModelForSequenceClassification

    loaded = {name: AutoModelForSequenceClassification.from_pretrained(path).eval() for name, path in models.items()}
    batches = eval_inputs(next(iter(models.values())))
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in loaded.values():  # warm-up
            model(**batches[0])
        for _ in range(rounds):
            for name, model in loaded.items():
                for batch in batches:
                    started = time.perf_counter()
                    model(**batch)
                    times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--pretrain-steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-compression-") as directory:
        scratch = Path(directory)
        base = pretrained_base(args.pretrain_steps, scratch)
        reports: dict[str, CompressionReport] = {}
        for quantize in ("int8", "int4"):
            report = finetune(base, {"quantize": quantize}, args.steps, scratch / quantize).compression
            assert report is not None
            reports[quantize] = report
        assert reports["int8"].full.eval == reports["int4"].full.eval, "the two full models differ"
        seconds = latencies({"full": scratch / "int8" / "export", "int8": scratch / "int8" / "export" / "int8",
                             "int4": scratch / "int4" / "export" / "int4"}, args.rounds)
    full = reports["int8"].full
    rows: list[tuple[str, Any, str, float]] = [("full precision (fp32)", full, "1.00", seconds["full"])]
    rows += [(f"{q}: {r.scheme}", r.quantized, f"{r.size_ratio:.2f}", seconds[q]) for q, r in reports.items()]
    print("| model | accuracy | F1 | size (MB) | size ratio | CPU latency per batch (ms) | latency ratio |")
    print("|---|---|---|---|---|---|---|")
    for label, model, ratio, latency in rows:
        print(f"| {label} | {model.eval['accuracy']:.3f} | {model.eval['f1']:.3f} | {model.size_bytes / 1e6:.2f} | "
              f"{ratio} | {latency * 1e3:.2f} | {latency / seconds['full']:.2f} |")


if __name__ == "__main__":
    main()
