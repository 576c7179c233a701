"""bench/gpu.py --smoke: the GPU benchmark's code runs end to end on CPU and prints its one table."""

from __future__ import annotations

import math
import subprocess
import sys

from support.jobs import ROOT

HEADER = "| run | model | parameters | processes | tokens/s | MFU | checkpoint blocks the loop (s) |"


def test_the_gpu_benchmark_smoke_prints_every_run_in_one_table() -> None:
    run = subprocess.run([sys.executable, "bench/gpu.py", "--smoke"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    table = lines[lines.index(HEADER) + 2:]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table if line.startswith("|")]
    assert [r[0] for r in rows[:2]] == ["kubeforge `train()`", "HF `transformers.Trainer`"]
    assert rows[2][0] == "kubeforge `train()`, fsdp"
    assert [r[3] for r in rows] == ["1 x CPU", "1 x CPU", "2 x CPU"]  # the 1B run: one process per device
    for _run, model, parameters, _processes, tokens_per_second, mfu, _blocked in rows:
        assert model.startswith(("gpt2 tiny", "llama tiny"))
        assert float(parameters.removesuffix("M")) > 0
        assert float(tokens_per_second.replace(",", "")) > 0
        assert mfu == "n/a"  # no peak FLOP/s for a CPU
    # Only the multi-process run takes a checkpoint inside its timed steps.
    assert [r[6] for r in rows[:2]] == ["-", "-"]
    assert math.isfinite(float(rows[2][6])) and abs(float(rows[2][6])) < 10
    assert lines[-1].startswith("ratio kubeforge/HF on tiny: ")
