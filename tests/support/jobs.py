"""Jobs for tests: the repository's examples, shrunk or changed one field at a time, and parsed for builders."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from kubeforge.operator.settings import OperatorSettings
from kubeforge.spec import Job, parse_job

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def example(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((EXAMPLES / name).read_text()) if d]


def tiny_pretrain(name: str = "tiny", **training: Any) -> dict[str, Any]:
    """The pretrain example shrunk for tests; `training` overrides spec.training fields."""
    job = example("pretrain-tiny.yaml")[0]
    job["metadata"]["name"] = name
    data = job["spec"]["data"]
    for split in ("train", "eval"):
        data[split]["uri"] = str(ROOT / data[split]["uri"])
    job["spec"]["training"].update(training)
    return job


def write_manifest(path: Path, *jobs: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump_all(jobs, sort_keys=False))
    return path


class _Delete:
    """with_change's marker: remove the field (named in test ids)."""

    def __repr__(self) -> str:
        return "DELETE"


DELETE = _Delete()


def with_change(job: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of job with the dotted path set to value (or removed, for the marker DELETE)."""
    changed = copy.deepcopy(job)
    *parents, leaf = path.split(".")
    node = changed
    for key in parents:
        node = node.setdefault(key, {})
    if value is DELETE:
        node.pop(leaf)
    else:
        node[leaf] = value
    return changed


# A job as the operator's builders and lifecycle see it: parsed, with a uid, under these settings.
UID = "6c1f0e2a-58d4-4f7e-9d7a-0b5e2c1d9f33"
SETTINGS = OperatorSettings(trainer_image="reg/trainer:1", trainer_cpu_image="reg/trainer-cpu:1",
                            storage_root="s3://models/kf", s3_endpoint="http://minio.storage:9000",
                            s3_credentials_secret="kubeforge-s3")


def job(document: dict[str, Any] | None = None, **spec: Any) -> Job:
    """The pretrain example (or document) with uid UID and the dotted `spec` fields changed, parsed."""
    document = document or example("pretrain-tiny.yaml")[0]
    document = with_change(document, "metadata.uid", UID)
    for key, value in spec.items():
        document = with_change(document, f"spec.{key}", value)
    return parse_job(document)
