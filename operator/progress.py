"""Training progress, read from the rank-0 trainer's Prometheus endpoint.

Scraping keeps the trainer's permissions minimal: it needs no API access at all, and the operator
needs only to reach the pod's IP.
"""

from __future__ import annotations

import logging
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from kubeforge.operator.lifecycle import Progress

log = logging.getLogger(__name__)


def parse(text: str) -> Progress | None:
    values: dict[str, float] = {}
    evals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "kubeforge_trainer_eval_metric":
                evals[sample.labels["metric"]] = sample.value
            elif sample.name.startswith("kubeforge_trainer_"):
                values[sample.name.removeprefix("kubeforge_trainer_")] = sample.value
    if "step" not in values or "total_steps" not in values:
        return None
    return Progress(
        step=int(values["step"]),
        total_steps=int(values["total_steps"]),
        loss=values.get("loss") or None,  # 0 until the first logging interval
        eval_metrics=evals,
        eval_step=int(values["eval_step"]) if "eval_step" in values else None,
        last_checkpoint_step=int(values["last_checkpoint_step"]) if values.get("last_checkpoint_step") else None,
        preparing=bool(values.get("corpus_preparing")),
        tokens_prepared=int(values.get("corpus_tokens_prepared_total", 0)),
        trainable_parameters=int(values["trainable_parameters"]) if values.get("trainable_parameters") else None,
    )


def scrape(pod_ip: str, port: int, timeout: float = 2.0) -> Progress | None:
    """Progress from http://POD_IP:PORT/metrics, or None when the trainer is not answering (yet)."""
    url = f"http://{pod_ip}:{port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return parse(response.read().decode())
    except (OSError, ValueError) as exc:
        log.debug("no progress from %s: %s", url, exc)
        return None
