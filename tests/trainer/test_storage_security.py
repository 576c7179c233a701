"""Nothing read from storage runs code or lands outside its directory (issue 12, reproductions 1, 2, 4).

Storage is not trusted: anyone who can write a job's prefix can also write a matching manifest."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import boto3
import pytest
import torch
from support.jobs import tiny_pretrain, write_manifest
from support.processes import run_cli

from kubeforge.spec import S3Spec
from kubeforge.storage import LocalStorage, StorageError, download_tree, local_path, open_storage
from kubeforge.trainer.checkpoint import Checkpointer, read_manifest, step_prefix, write_committed
from kubeforge.trainer.models import BaseModelError, fetch_model_dir


class PlantedCode:
    """A pickle that, when unpickled, creates a file: proof that loading ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.write_text, (self.marker, "code ran"))


def test_a_planted_pickle_with_a_recomputed_manifest_never_runs(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "bucket")
    honest = Checkpointer(storage, keep=3, spec_hash="abc", rank=0, background=False)
    honest.save(10, {"model.pt": {"weight": torch.ones(2)}, "state.pt": {"step": 10}})
    # The attacker writes a newer step with a manifest computed over their own files.
    marker = tmp_path / "pwned"
    write_committed(storage, step_prefix(20), {"model.pt": {"weight": PlantedCode(marker)},
                                               "state.pt": {"step": 20}},
                    {"step": 20, "specHash": "abc", "rank": 0})
    latest = honest.latest()
    assert latest is not None and latest.step == 20  # the manifest proves integrity, not authorship
    with pytest.raises(StorageError, match=r"checkpoint\.uri: .*step-00000020/model\.pt: holds more than "
                                           r"tensors, refusing to load it"):
        honest.load(latest, tmp_path / "restore")
    assert not marker.exists()


def test_what_kubeforge_writes_still_loads_with_weights_only(tmp_path: Path) -> None:
    """Optimizer, scheduler and RNG states are all within what weights_only=True accepts."""
    model = torch.nn.Linear(3, 3)
    optimizer = torch.optim.AdamW(model.parameters(), betas=(0.9, 0.95))
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    import random
    state = {"scheduler": scheduler.state_dict(), "step": 1, "eval_history": [{"step": 0, "loss": 1.5}],
             "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "cuda": None}}
    checkpointer = Checkpointer(LocalStorage(tmp_path), keep=1, spec_hash="abc", rank=0, background=False)
    checkpointer.save(1, {"model.pt": model.state_dict(), "optimizer.pt": optimizer.state_dict(), "state.pt": state})
    latest = checkpointer.latest()
    assert latest is not None
    loaded = checkpointer.load(latest, tmp_path / "restore")
    assert loaded["state.pt"]["rng"]["python"] == random.getstate()
    assert loaded["optimizer.pt"]["param_groups"][0]["betas"] == (0.9, 0.95)


def test_read_manifest_checks_sizes_not_only_presence(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    write_committed(storage, "export", {"config.json": b'{"a": 1}'}, {"step": 1})
    assert read_manifest(storage, "export") is not None
    (tmp_path / "export" / "config.json").write_bytes(b'{"a": 12}')  # replaced after the commit
    assert read_manifest(storage, "export") is None


@pytest.mark.parametrize("key", ["x/../../escaped.txt", "../escaped.txt", "/etc/escaped.txt",
                                 "x\\..\\..\\escaped.txt", "C:/escaped.txt", "x//y", "./x", ""])
def test_a_key_that_is_not_a_plain_relative_path_is_refused(tmp_path: Path, key: str) -> None:
    with pytest.raises(StorageError, match=r"^baseModel\.uri: object key .* (not a plain relative path|outside)"):
        local_path(tmp_path / "target", key, "baseModel.uri")


def test_a_symlink_in_the_target_cannot_lead_a_download_out(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()
    (target / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(StorageError, match="leads outside the download directory"):
        local_path(target, "link/file", "checkpoint.uri")


def put(endpoint: str, bucket: str, key: str, body: bytes) -> None:
    boto3.client("s3", endpoint_url=endpoint).put_object(Bucket=bucket, Key=key, Body=body)


def test_an_s3_key_with_dot_dot_does_not_escape_the_scratch_directory(
        s3_endpoint: str, bucket: str, tmp_path: Path) -> None:
    put(s3_endpoint, bucket, "models/base/config.json", b"{}")
    put(s3_endpoint, bucket, "models/base/x/../../escaped.txt", b"written outside")
    scratch = tmp_path / "deep" / "scratch"
    scratch.mkdir(parents=True)
    with pytest.raises(StorageError, match=r"baseModel\.uri: object key 'x/\.\./\.\./escaped\.txt'"):
        fetch_model_dir(f"s3://{bucket}/models/base", None, scratch)
    assert [p for p in tmp_path.rglob("escaped.txt")] == []


def test_with_a_manifest_only_the_files_it_lists_are_fetched(
        s3_endpoint: str, bucket: str, tmp_path: Path) -> None:
    storage = open_storage(f"s3://{bucket}/models/base")
    source = tmp_path / "weights.safetensors"
    source.write_bytes(b"not really weights")
    write_committed(storage, "", {"config.json": b"{}", "model.safetensors": source}, {"step": 1})
    put(s3_endpoint, bucket, "models/base/pytorch_model.bin", b"planted, unlisted")
    model_dir = fetch_model_dir(f"s3://{bucket}/models/base", None, tmp_path / "scratch")
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", "model.safetensors"]


def test_a_base_model_whose_files_do_not_match_its_manifest_is_refused(
        s3_endpoint: str, bucket: str, tmp_path: Path) -> None:
    storage = open_storage(f"s3://{bucket}/models/base")
    write_committed(storage, "", {"config.json": b"{}", "model.safetensors": b"weights"}, {"step": 1})
    put(s3_endpoint, bucket, "models/base/model.safetensors", b"WEIGHTS")  # same size, other content
    with pytest.raises(StorageError, match=r"baseModel\.uri: .*model\.safetensors does not match its manifest"):
        fetch_model_dir(f"s3://{bucket}/models/base", None, tmp_path / "scratch")


def test_a_base_model_with_only_pickled_weights_is_refused(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    torch.save({"weight": torch.ones(1)}, base / "pytorch_model.bin")
    with pytest.raises(BaseModelError, match=r"baseModel: .* has no \.safetensors weights"):
        fetch_model_dir(str(base), None, tmp_path / "scratch")


def test_download_tree_without_a_manifest_writes_every_key_in_place(tmp_path: Path) -> None:
    source = LocalStorage(tmp_path / "source")
    source.put_bytes("m/a.json", b"a")
    source.put_bytes("m/sub/b.json", b"bb")
    files = download_tree(source, "m", tmp_path / "target", field="baseModel.uri")
    assert sorted(p.relative_to(tmp_path / "target").as_posix() for p in files) == ["a.json", "sub/b.json"]
    assert (tmp_path / "target" / "sub" / "b.json").read_bytes() == b"bb"


# ---------------------------------------------------------------------------------------------
# Encryption at rest


def encryption_of_every_object(endpoint: str, bucket: str, prefix: str) -> dict[str, tuple[Any, Any]]:
    """{key: (ServerSideEncryption, SSEKMSKeyId)} as the S3 server recorded them from the write requests."""
    client = boto3.client("s3", endpoint_url=endpoint)
    seen = {}
    for entry in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []):
        head = client.head_object(Bucket=bucket, Key=entry["Key"])
        seen[entry["Key"]] = (head.get("ServerSideEncryption"), head.get("SSEKMSKeyId"))
    return seen


@pytest.mark.parametrize(("algorithm", "key_id"), [("AES256", None), ("aws:kms", "alias/kubeforge")])
def test_both_write_paths_send_server_side_encryption(
        s3_endpoint: str, bucket: str, tmp_path: Path, algorithm: str, key_id: str | None) -> None:
    spec = S3Spec.model_validate({"serverSideEncryption": algorithm, "kmsKeyId": key_id})
    storage = open_storage(f"s3://{bucket}/jobs/a", spec)
    storage.put_bytes("manifest.json", b"{}")
    (tmp_path / "big").write_bytes(os.urandom(1024))
    storage.put_file("model.safetensors", tmp_path / "big")
    assert encryption_of_every_object(s3_endpoint, bucket, "jobs/a/") == {
        "jobs/a/manifest.json": (algorithm, key_id), "jobs/a/model.safetensors": (algorithm, key_id)}


def test_kms_key_without_kms_is_refused_naming_the_field() -> None:
    from kubeforge.spec import SpecError, parse_job
    job = tiny_pretrain("x", maxSteps=2)
    job["spec"]["s3"] = {"serverSideEncryption": "AES256", "kmsKeyId": "alias/k"}
    with pytest.raises(SpecError, match=r"spec\.s3: kmsKeyId is only valid with serverSideEncryption: aws:kms"):
        parse_job(job)


def test_a_job_with_encryption_writes_every_checkpoint_and_export_object_encrypted(
        s3_endpoint: str, s3_env: dict[str, str], bucket: str, tmp_path: Path) -> None:
    job = tiny_pretrain("encrypted", maxSteps=4, warmupSteps=1, batchSize=2, sequenceLength=16, evalInterval=4,
                        evalBatches=1, logInterval=2)
    job["spec"]["checkpoint"] = {"intervalSteps": 2, "keep": 1}
    job["spec"]["s3"] = {"serverSideEncryption": "aws:kms", "kmsKeyId": "alias/kubeforge"}
    manifest = write_manifest(tmp_path / "job.yaml", job)
    process = run_cli("train", "--spec", str(manifest), "--checkpoint-uri", f"s3://{bucket}/jobs/enc",
                      "--result", str(tmp_path / "result.json"), env={**s3_env, "OMP_NUM_THREADS": "1"},
                      timeout=300)
    assert process.returncode == 0, process.stderr
    seen = encryption_of_every_object(s3_endpoint, bucket, "jobs/enc/")
    assert any(k.startswith("jobs/enc/export/") for k in seen) and any("checkpoints/" in k for k in seen)
    assert {k: v for k, v in seen.items() if v != ("aws:kms", "alias/kubeforge")} == {}
    exported = json.loads((tmp_path / "result.json").read_text())
    assert exported["exportUri"] == f"s3://{bucket}/jobs/enc/export"

