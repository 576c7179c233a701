"""Distillation: a half-depth student against its teacher and against itself trained without one.

Runs examples/distill-pipeline.yaml as `kubeforge run` does (two GPT-2 bases pretrained on
Shakespeare, 4 and 2 layers; the 4-layer one finetuned fully to classify examples/data/reviews:
the teacher; the 2-layer one distilled from it: the student), plus the same 2-layer FinetuneJob
with `method: full` and no teacher, all in one run, on CPU. `--steps` sets every finetune's
maxSteps, `--pretrain-steps` the bases'.

    OMP_NUM_THREADS=1 .venv/bin/python bench/distill.py [--steps 300] [--pretrain-steps 300]

(one OpenMP thread per process: on cores shared with other work, torch's default of one thread per
core spends most of its time waiting for the others.)

Accuracy and F1 are each job's final eval on the whole eval split (300 reviews); size is the bytes
of the exported weights; latency is the median over 20 forward passes of one eval batch of 16
reviews through the exported model, the models timed one after the other in the same process.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from kubeforge import cli

ROOT = Path(__file__).resolve().parent.parent
PIPELINE = ROOT / "examples" / "distill-pipeline.yaml"
ALONE = "review-student-alone"


def pipeline(steps: int, pretrain_steps: int) -> list[dict[str, Any]]:
    """The example's jobs with absolute data paths and CPU resources, and the student without its teacher."""
    jobs = [d for d in yaml.safe_load_all(PIPELINE.read_text()) if d]
    for job in jobs:
        for split in ("train", "eval"):
            job["spec"]["data"][split]["uri"] = str(ROOT / job["spec"]["data"][split]["uri"])
        job["spec"]["training"]["maxSteps"] = pretrain_steps if job["kind"] == "PretrainJob" else steps
        job["spec"]["resources"]["gpusPerWorker"] = 0
        job["spec"]["metrics"] = {"port": 0}
    alone = copy.deepcopy(next(j for j in jobs if j["metadata"]["name"] == "review-student"))
    alone["metadata"]["name"] = ALONE
    alone["spec"]["method"] = "full"
    del alone["spec"]["teacher"], alone["spec"]["distill"]
    return [*jobs, alone]


def latency_ms(export: Path, reviews: list[str]) -> float:
    """Median milliseconds of one forward pass of 16 reviews through the exported classifier, on CPU."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(export).eval()
    tokenizer = AutoTokenizer.from_pretrained(export)
    batch = tokenizer(reviews[:16], padding=True, truncation=True, max_length=64, return_tensors="pt")
    timings = []
    with torch.no_grad():
        model(**batch)  # warm-up
        for _ in range(20):
            started = time.perf_counter()
            model(**batch)
            timings.append((time.perf_counter() - started) * 1000)
    return statistics.median(timings)


def row(result: dict[str, Any], reviews: list[str]) -> dict[str, Any]:
    export = Path(result["exportUri"])
    config = json.loads((export / "config.json").read_text())
    return {"job": result["job"], "layers": config["n_layer"], "accuracy": result["finalEval"]["accuracy"],
            "f1": result["finalEval"]["f1"], "teacher": result.get("teacherUri"),
            "size_mb": sum(p.stat().st_size for p in export.glob("*.safetensors")) / 1e6,
            "latency_ms": latency_ms(export, reviews)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    eval_lines = (ROOT / "examples/data/reviews/eval.jsonl").read_text().splitlines()
    reviews = [json.loads(line)["text"] for line in eval_lines]
    with tempfile.TemporaryDirectory(prefix="bench-distill-") as directory:
        manifest = Path(directory) / "pipeline.yaml"
        manifest.write_text(yaml.safe_dump_all(pipeline(args.steps, args.pretrain_steps), sort_keys=False))
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed), contextlib.suppress(SystemExit):
            cli.main(["--log-level", "warning", "run", str(manifest), "--output", f"{directory}/runs",
                      "--no-progress", "--json"])
        results = {r["job"]: r for r in json.loads(printed.getvalue()) if r["kind"] == "FinetuneJob"}
        rows = [row(results[name], reviews) for name in ("review-teacher", "review-student", ALONE)]
    teacher = rows[0]
    print("| model | layers | method | accuracy | F1 | vs teacher (points) | export (MB) "
          "| CPU latency, 16 reviews (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    methods = ("full (teacher)", "distill from the teacher", "full, no teacher")
    for found, method in zip(rows, methods, strict=True):
        gap = 100 * (found["accuracy"] - teacher["accuracy"])
        print(f"| {found['job']} | {found['layers']} | {method} | {found['accuracy']:.3f} | {found['f1']:.3f} | "
              f"{gap:+.1f} | {found['size_mb']:.2f} | {found['latency_ms']:.2f} |")
    assert rows[1]["teacher"] == results["review-teacher"]["exportUri"]  # the student's lineage


if __name__ == "__main__":
    main()
