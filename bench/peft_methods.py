"""Finetuning methods side by side: accuracy, trainable parameters, samples/s and export size.

The base is examples/pretrain-tiny.yaml's GPT-2 (pretrained on Shakespeare by kubeforge, --pretrain-steps
of them); each method then finetunes it to classify examples/data/reviews with the same FinetuneJob
(batch 16, sequenceLength 64, --steps steps, one process on CPU), changing only `method:` and its
settings block. prefix-tuning is causal-LM only (see the README), so it has no row here.

    .venv/bin/python bench/peft_methods.py [--steps 300] [--pretrain-steps 300]

samples/s is the median of the loop's own throughput windows (logInterval 25 steps, the first left
out), its real tokens/s converted to samples by the run's tokens per sample; export size is the
bytes of the exported model's weights (and adapter), tokenizer and metadata excluded.
"""

from __future__ import annotations

import argparse
import copy
import logging
import re
import statistics
import tempfile
from pathlib import Path
from typing import Any

import yaml

from kubeforge.spec import FinetuneJob, PretrainJob, parse_job
from kubeforge.trainer.loop import train

ROOT = Path(__file__).resolve().parent.parent
REVIEWS = ROOT / "examples" / "data" / "reviews"
#: The layers every LoRA-like method adapts: examples/finetune-lora-classify.yaml's.
LAYERS = ["c_attn", "c_proj", "c_fc"]
LEARNING_RATES = {"full": 1e-3, "prompt-tuning": 3e-2}  # the others: 3e-3, the LoRA example's
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "full": ("full", {}),
    "lora": ("lora", {"lora": {"r": 8, "alpha": 16, "targetModules": LAYERS}}),
    "lora (DoRA)": ("lora", {"lora": {"r": 8, "alpha": 16, "targetModules": LAYERS, "useDora": True}}),
    "lora (rsLoRA)": ("lora", {"lora": {"r": 8, "alpha": 16, "targetModules": LAYERS, "useRslora": True}}),
    "qlora (4-bit)": ("lora", {"lora": {"r": 8, "alpha": 16, "targetModules": LAYERS, "quantizeBase": "4bit"}}),
    "qlora (8-bit)": ("lora", {"lora": {"r": 8, "alpha": 16, "targetModules": LAYERS, "quantizeBase": "8bit"}}),
    "ia3": ("ia3", {"ia3": {"targetModules": LAYERS, "feedforwardModules": ["c_fc"]}}),
    "prompt-tuning": ("prompt-tuning", {"promptTuning": {"numVirtualTokens": 16}}),
    "adalora": ("adalora", {"adalora": {"initR": 12, "targetR": 8, "alpha": 16, "targetModules": LAYERS,
                                        "tinit": 30, "tfinal": 60, "deltaT": 10}}),
}
TRAINABLE = re.compile(r"(\d+) of (\d+) parameters trainable")
TOKENS_PER_SECOND = re.compile(r" ([0-9.]+) tokens/s")


def pretrained_base(steps: int, scratch: Path) -> Path:
    document = next(d for d in yaml.safe_load_all((ROOT / "examples" / "pretrain-tiny.yaml").read_text()) if d)
    for split in ("train", "eval"):
        document["spec"]["data"][split]["uri"] = str(ROOT / document["spec"]["data"][split]["uri"])
    # Positions for the classifier's 64 tokens and prompt tuning's 16 virtual ones before them.
    document["spec"]["training"].update(maxSteps=steps, warmupSteps=min(20, steps - 1), sequenceLength=96)
    document["spec"]["resources"]["gpusPerWorker"] = 0
    document["spec"]["metrics"] = {"port": 0}
    job = parse_job(document)
    assert isinstance(job, PretrainJob)
    train(job, checkpoint_root=str(scratch / "pretrain"))
    return scratch / "pretrain" / "export"


def finetune_job(label: str, steps: int, root: Path) -> FinetuneJob:
    method, settings = METHODS[label]
    job = parse_job({
        "apiVersion": "kubeforge.io/v1alpha1", "kind": "FinetuneJob", "metadata": {"name": "bench-peft"},
        "spec": {
            "baseModel": {"uri": "unused"}, "task": "sequence-classification", "method": method,
            **copy.deepcopy(settings),
            "data": {"train": {"uri": str(REVIEWS / "train.jsonl")}, "eval": {"uri": str(REVIEWS / "eval.jsonl")}},
            "training": {"maxSteps": steps, "batchSize": 16, "sequenceLength": 64,
                         "learningRate": LEARNING_RATES.get(method, 3e-3), "warmupSteps": min(10, steps - 1),
                         "evalInterval": 100_000, "logInterval": 25},
            "checkpoint": {"uri": str(root), "intervalSteps": 100_000},
            "resources": {"gpusPerWorker": 0}, "metrics": {"port": 0},
        },
    })
    assert isinstance(job, FinetuneJob)
    return job


class Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def measure(label: str, base: Path, steps: int, scratch: Path) -> dict[str, Any]:
    root = scratch / label.replace(" ", "-").replace("(", "").replace(")", "")
    job = finetune_job(label, steps, root)
    messages = Messages()
    logger = logging.getLogger("kubeforge.trainer")
    logger.addHandler(messages)
    logger.setLevel(logging.INFO)
    try:
        result = train(job, checkpoint_root=str(root), base_model_uri=str(base))
    finally:
        logger.removeHandler(messages)
    found = [m for m in map(TRAINABLE.search, messages.messages) if m]
    # The loop's own throughput windows (real tokens/s), the first (warming up) left out, in samples.
    rates = [float(m.group(1)) for m in map(TOKENS_PER_SECOND.search, messages.messages) if m][1:]
    samples_per_second = statistics.median(rates) * steps * 16 / result.tokens_seen
    export = root / "export"
    total = sum(p.stat().st_size for p in export.rglob("*.safetensors"))
    return {"method": label, "accuracy": result.final_eval["accuracy"], "f1": result.final_eval["f1"],
            "trainable": int(found[0].group(1)) if found else None, "samples_per_second": samples_per_second,
            "export_mb": total / 1e6, "format": result.export_format}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-peft-") as directory:
        scratch = Path(directory)
        base = pretrained_base(args.pretrain_steps, scratch)
        rows = [measure(label, base, args.steps, scratch) for label in METHODS]
    print("| method | accuracy | F1 | trainable parameters | samples/s | export (MB) | export |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        trainable = "all" if row["trainable"] is None else f"{row['trainable']:,}"
        print(f"| {row['method']} | {row['accuracy']:.3f} | {row['f1']:.3f} | {trainable} | "
              f"{row['samples_per_second']:.0f} | {row['export_mb']:.2f} | {row['format']} |")


if __name__ == "__main__":
    main()
