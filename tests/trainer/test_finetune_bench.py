"""bench/finetune_throughput.py at smoke size: it runs end to end and prints one sane table."""

from __future__ import annotations

import math
import subprocess
import sys

from support.jobs import ROOT

TRAINERS = ["kubeforge", "HF (a) max-length padding", "HF (b) dynamic padding + group_by_length"]


def test_the_finetune_benchmark_prints_one_sane_table() -> None:
    run = subprocess.run(
        [sys.executable, "bench/finetune_throughput.py", "--size", "tiny", "--steps", "20", "--repeats", "1",
         "--batch-size", "4", "--sequence-length", "64"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("| task |")))
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[header + 2:] if line]
    expected = [(task, trainer) for task in ("classification", "sft") for trainer in TRAINERS]
    assert [(r[0], r[1]) for r in rows] == expected
    for task, trainer, _runs, median, ratio, computed, final, mean in rows:
        assert float(mean) == float(final)  # one repeat: the mean over seeds is its one value
        assert float(median.split()[0].replace(",", "")) > 0
        assert float(ratio) > 0 and (trainer != "kubeforge" or float(ratio) == 1.0)
        assert float(computed) >= 1.0
        if task == "classification":
            assert 0.0 <= float(final) <= 1.0
        else:
            assert math.isfinite(float(final)) and float(final) > 0
    by_trainer = {(r[0], r[1]): float(r[5]) for r in rows}
    for task in ("classification", "sft"):
        # Padding to sequenceLength computes far more than the real tokens; ours does not.
        assert by_trainer[(task, TRAINERS[1])] > 1.5 > by_trainer[(task, TRAINERS[0])]
