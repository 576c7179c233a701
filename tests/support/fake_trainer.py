"""A stand-in for `kubeforge train` in the operator's fault tests: the pod contract without torch.

The kubelet harness runs it as a pod's `kubeforge train ...` (see `fake_trainer_python`). It reads its
job from $KUBEFORGE_JOB as the real trainer does, serves the trainer's progress metrics on
$POD_IP:spec.metrics.port, steps at `faults.kubeforge.io/steps-per-second` (a job label, default 20)
to spec.training.maxSteps, and ends with the trainer's termination message. It starts in well under
a second, so a test can run dozens of jobs on a loaded machine. The label `faults.kubeforge.io/mode`:

- `train` (default): a healthy run;
- `nan`: the loss turns NaN at step 10 (a diverged run: the trainer keeps stepping);
- `stall`: no step after step 5, the process alive and answering metrics (a hung collective).

It evaluates every spec.training.evalInterval steps: an eval loss that falls the faster, the nearer
the learning rate is to 1e-2 (what a SweepJob's pruner judges). Without the rate label, the
environment's FAKE_STEPS_PER_SECOND (a pod template's env) sets the rate.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml

MODE_LABEL = "faults.kubeforge.io/mode"
RATE_LABEL = "faults.kubeforge.io/steps-per-second"


class Progress:
    def __init__(self, total: int) -> None:
        self.step, self.total, self.loss = 0, total, 0.0
        self.eval: tuple[int, float] | None = None  # the last evaluation: step, loss

    def metrics(self) -> bytes:
        lines = [f"kubeforge_trainer_step {self.step}", f"kubeforge_trainer_total_steps {self.total}",
                 f"kubeforge_trainer_loss {self.loss}"]
        if self.eval is not None:
            lines += [f"kubeforge_trainer_eval_step {self.eval[0]}",
                      f'kubeforge_trainer_eval_metric{{metric="loss"}} {self.eval[1]}']
        return ("\n".join(lines) + "\n").encode()


def eval_loss(training: dict[str, object], step: int, total: int) -> float:
    rate = float(str(training.get("learningRate", 3e-4)))
    quality = 1.0 / (1.0 + abs(math.log10(rate) + 2))
    return round(0.7 - 0.3 * quality * step / total, 4)


def serve(progress: Progress, host: str, port: int) -> None:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            body = progress.metrics()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec-env", default="KUBEFORGE_JOB")
    parser.add_argument("--checkpoint-uri", required=True)
    parser.add_argument("--termination-log", required=True)
    args, _ = parser.parse_known_args(argv)
    job = yaml.safe_load(os.environ[args.spec_env])
    labels = job["metadata"].get("labels") or {}
    mode = labels.get(MODE_LABEL, "train")
    rate = float(labels.get(RATE_LABEL, os.environ.get("FAKE_STEPS_PER_SECOND", "20")))
    spec = job["spec"]
    progress = Progress(int(spec["training"]["maxSteps"]))
    if spec.get("metrics", {}).get("port"):
        serve(progress, os.environ.get("POD_IP", "127.0.0.1"), int(spec["metrics"]["port"]))
    print(f"fake trainer: {mode}, {progress.total} steps at {rate}/s", flush=True)
    while progress.step < progress.total:
        time.sleep(1 / rate)
        if mode == "stall" and progress.step >= 5:
            continue
        progress.step += 1
        progress.loss = float("nan") if mode == "nan" and progress.step >= 10 else 4.0 - progress.step / progress.total
        if progress.step % int(spec["training"].get("evalInterval", 100)) == 0 or progress.step == progress.total:
            progress.eval = (progress.step, eval_loss(spec["training"], progress.step, progress.total))
    summary = {"step": progress.step, "totalSteps": progress.total, "resumedFromStep": 0, "trainLoss": progress.loss,
               "finalEval": {"loss": progress.eval[1]} if progress.eval else {},
               "exportUri": f"{args.checkpoint_uri}/export", "checkpointUri": args.checkpoint_uri}
    with open(args.termination_log, "w") as log:
        log.write(json.dumps(summary, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
