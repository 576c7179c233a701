"""Pruned exports against the model they prune: eval accuracy and loss at each sparsity, and the size.

The llama of bench/compression.py (pretrained by kubeforge for --pretrain-steps on Shakespeare) is
fully finetuned to classify examples/data/reviews by the same FinetuneJob once per sparsity, with
`export.prune: {sparsity: S}`: each job reports its full and its pruned export (result.pruning),
each loaded back with from_pretrained and evaluated on all 300 eval examples. The runs are
deterministic, so every full model is the same one (checked).

    .venv/bin/python bench/pruning.py [--steps 150] [--pretrain-steps 200] [--sparsity 0.3 0.5 0.7]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from compression import finetune, pretrained_base

from kubeforge.status import PruningReport


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--pretrain-steps", type=int, default=200)
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    reports: dict[float, PruningReport] = {}
    with tempfile.TemporaryDirectory(prefix="bench-pruning-") as directory:
        scratch = Path(directory)
        base = pretrained_base(args.pretrain_steps, scratch)
        for sparsity in args.sparsity:
            report = finetune(base, {"prune": {"sparsity": sparsity}}, args.steps, scratch / str(sparsity)).pruning
            assert report is not None
            reports[sparsity] = report
    fulls = [r.full.eval for r in reports.values()]
    assert all(f == fulls[0] for f in fulls), "the full models differ"
    full = next(iter(reports.values())).full
    print("| model | sparsity of its linear layers | accuracy | F1 | eval loss | size (MB) |")
    print("|---|---|---|---|---|---|")
    print(f"| full | 0.00 | {full.eval['accuracy']:.3f} | {full.eval['f1']:.3f} | {full.eval['loss']:.4f} | "
          f"{full.size_bytes / 1e6:.2f} |")
    for sparsity, report in reports.items():
        pruned = report.pruned
        print(f"| `prune: {{sparsity: {sparsity}}}` | {report.sparsity:.2f} | {pruned.eval['accuracy']:.3f} | "
              f"{pruned.eval['f1']:.3f} | {pruned.eval['loss']:.4f} | {pruned.size_bytes / 1e6:.2f} |")


if __name__ == "__main__":
    main()
