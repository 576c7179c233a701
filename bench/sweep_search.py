"""TPE with median pruning against random search without it, for the same budget of trials.

Runs examples/sweep-lora-classify.yaml's sweep twice, one variant after the other in this one process,
under a fresh storage root (its PretrainJob first, once): as written (algorithm tpe, earlyStopping
median) and as random search (algorithm random, earlyStopping none), same seed and trials. Prints the
best objective each reached and the trial-steps each trained against maxTrials x maxSteps.

    .venv/bin/python bench/sweep_search.py [--seeds 7 8]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from kubeforge.cli import base_model_uri
from kubeforge.localsweep import run_sweep
from kubeforge.spec import Job, SweepJob, base_model_cache_uri, checkpoint_uri, load_manifest_file
from kubeforge.status import EvalObserver, SweepStatus, TrainerResult
from kubeforge.trainer.loop import train

EXAMPLE = Path("examples/sweep-lora-classify.yaml")


def variant(sweep: SweepJob, algorithm: str, early_stopping: str, seed: int) -> SweepJob:
    spec = sweep.spec.model_copy(update={"algorithm": algorithm, "early_stopping": early_stopping, "seed": seed})
    return sweep.model_copy(update={"spec": spec, "metadata": sweep.metadata.model_copy(
        update={"name": f"{algorithm}-{early_stopping}-{seed}"})})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[7])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    manifests = load_manifest_file(str(EXAMPLE))
    jobs = [m for m in manifests if not isinstance(m, SweepJob)]
    sweep = next(m for m in manifests if isinstance(m, SweepJob))
    with tempfile.TemporaryDirectory(prefix="kubeforge-sweep-bench-") as root:
        for job in jobs:
            train(job, checkpoint_root=checkpoint_uri(job, root))

        def train_trial(job: Job, on_eval: EvalObserver) -> TrainerResult:
            return train(job, checkpoint_root=checkpoint_uri(job, root), base_model_uri=base_model_uri(job, jobs, root),
                         base_model_cache=base_model_cache_uri(root, job.namespace), on_eval=on_eval)

        rows = []
        for seed in args.seeds:
            for algorithm, early_stopping in (("tpe", "median"), ("random", "none")):
                searched = variant(sweep, algorithm, early_stopping, seed)
                rows.append((searched, run_sweep(searched, root, train_trial)))
    budget = sweep.spec.max_trials * (sweep.spec.template.spec["training"]["maxSteps"])
    print(f"\n| search | seed | best {sweep.spec.objective.metric} | pruned | trial-steps of {budget} |")
    print("|---|---|---|---|---|")
    for searched, status in rows:
        print(f"| {searched.spec.algorithm} + {searched.spec.early_stopping} | {searched.spec.seed} | "
              f"{_best(status)} | {status.pruned_trials} | {sum(t.step or 0 for t in status.trials)} |")


def _best(status: SweepStatus) -> str:
    return f"{status.best_value:.4f}" if status.best_value is not None else "-"


if __name__ == "__main__":
    main()
