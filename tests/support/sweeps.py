"""A SweepJob's expected outcome, for the tests that disturb one: the pure plan run over trials that
report tests/support/fake_trainer.py's evaluations one by one, as an undisturbed operator sees them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from kubeforge.operator.sweeplife import plan_sweep
from kubeforge.spec import parse_sweep
from support.fake_trainer import eval_loss


def same_search(trials: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """What two runs of one sweep must agree on, whatever the sweep's name."""
    return [(t["number"], t["parameters"], t["state"], t.get("value")) for t in trials]


def undisturbed(manifest: dict[str, Any]) -> dict[str, Any]:
    """The sweep's status as an undisturbed operator ends it: the pure plan over trials that report
    the fake trainer's evaluations one by one."""
    sweep = parse_sweep({**manifest, "metadata": {**manifest["metadata"], "uid": "expected"}})
    jobs: dict[str, dict[str, Any]] = {}
    status: dict[str, Any] = {}
    for _ in range(100):
        plan = plan_sweep(sweep, status, dict(jobs), datetime.now(UTC))
        status = plan.status.to_json()
        for job in plan.create:
            jobs.setdefault(job["metadata"]["name"], {**job, "status": {}})
        for name in plan.delete:
            jobs.pop(name)
        if status["phase"] in ("Succeeded", "Failed"):
            return status
        for job in jobs.values():
            training, reported = job["spec"]["training"], job["status"]
            step = min(reported.get("step", 0) + training["evalInterval"], training["maxSteps"])
            job["status"] = {"phase": "Succeeded" if step == training["maxSteps"] else "Running", "step": step,
                             "evalStep": step, "evalMetrics": {"loss": eval_loss(training, step, training["maxSteps"])},
                             "exportUri": "export"}
    raise AssertionError("the simulated sweep did not end")
