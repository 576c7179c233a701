"""examples/kubectl/: what a user applies to a cluster. The API server would admit each (CRD schema,
defaults and CEL rules, as tests/unit/test_crds.py checks them), and they fit together as their comments say."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from k8s.admission import admit
from support.jobs import EXAMPLES

from kubeforge.spec import FinetuneJob, PretrainJob, export_uri, parse_job

KUBECTL = EXAMPLES / "kubectl"
MANIFESTS = sorted(KUBECTL.glob("*.yaml"))


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def jobs() -> dict[str, PretrainJob | FinetuneJob]:
    return {d["metadata"]["name"]: parse_job(d) for path in MANIFESTS for d in documents(path)
            if d["apiVersion"].startswith("kubeforge.io/")}


def test_the_examples_are_all_there() -> None:
    assert {p.name for p in MANIFESTS} == {"s3-secret.yaml", "pretrain.yaml", "finetune-lora.yaml",
                                           "finetune-full-s3.yaml", "distributed-pretrain.yaml"}


@pytest.mark.parametrize("manifest", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_the_api_server_would_admit_it(manifest: Path) -> None:
    for document in documents(manifest):
        if document["apiVersion"].startswith("kubeforge.io/"):
            assert admit(document) == []
            parse_job(document)  # and the operator reads it as the same job
        else:
            kubernetes_validate.validate(document, "1.30.0", strict=True)


def test_admission_refuses_a_broken_example() -> None:
    broken = documents(KUBECTL / "finetune-full-s3.yaml")[0]
    broken["spec"]["lora"] = {"r": 8}  # LoRA settings on a full finetune
    assert ".spec: lora is only valid with method: lora" in admit(broken)


def test_the_examples_fit_together() -> None:
    found = jobs()
    pretrain, lora, full, ddp = (found[n] for n in ("shakespeare-gpt2", "shakespeare-instruct", "review-classifier",
                                                    "shakespeare-llama-ddp"))
    assert isinstance(lora, FinetuneJob) and isinstance(full, FinetuneJob)
    assert (lora.spec.method, lora.spec.base_model.from_pretrain_job) == ("lora", pretrain.name)
    # The full finetune starts from an s3:// model: the one the pretrain example exports.
    assert full.spec.method == "full"
    assert pretrain.spec.checkpoint.uri and full.spec.base_model.uri == export_uri(pretrain.spec.checkpoint.uri)
    assert full.spec.base_model.uri.startswith("s3://")
    assert ddp.spec.resources.workers == 2
    secret = documents(KUBECTL / "s3-secret.yaml")[0]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secret["stringData"])
    for job in found.values():
        assert job.spec.s3 and job.spec.s3.credentials_secret == secret["metadata"]["name"]

