"""Checkpoints and exports through a real S3 endpoint (moto_server), as a trainer pod writes them."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import boto3
import pytest
from support.jobs import tiny_pretrain, write_manifest
from support.processes import run_cli

from kubeforge.storage import StorageError, open_storage

CHECKPOINT_FILES = {"model.pt", "optimizer.pt", "state.pt", "tokenizer.json"}


# ---------------------------------------------------------------------------------------------
# Helpers


def s3_client(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint)


def bucket_objects(endpoint: str, bucket: str, prefix: str = "") -> dict[str, bytes]:
    """Every object under prefix (keys relative to it) with its content, read with plain boto3."""
    client = s3_client(endpoint)
    strip = len(prefix.rstrip("/")) + 1 if prefix else 0
    objects = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for entry in page.get("Contents", []):
            body = client.get_object(Bucket=bucket, Key=entry["Key"])["Body"].read()
            objects[entry["Key"][strip:]] = body
    return objects


def checkpoint_dirs(objects: dict[str, bytes]) -> dict[str, dict[str, bytes]]:
    """{step-NNNNNNNN: {file name: content}} of the checkpoints/ objects."""
    dirs: dict[str, dict[str, bytes]] = {}
    for key, body in objects.items():
        parts = key.split("/")
        if parts[0] == "checkpoints":
            dirs.setdefault(parts[1], {})["/".join(parts[2:])] = body
    return dirs


def assert_manifest_matches(files: dict[str, bytes], where: str) -> dict[str, Any]:
    """The manifest lists every other object of the directory with its true size and sha256."""
    assert "manifest.json" in files, f"{where}: no manifest.json"
    manifest = json.loads(files["manifest.json"])
    listed = {entry["name"]: entry for entry in manifest["files"]}
    assert set(listed) == set(files) - {"manifest.json"}, where
    for name, entry in listed.items():
        body = files[name]
        assert entry["size"] == len(body), f"{where}/{name}: size"
        assert entry["sha256"] == hashlib.sha256(body).hexdigest(), f"{where}/{name}: sha256"
    return manifest


def pretrain_manifest(tmp_path: Path, max_steps: int, interval: int = 10, keep: int = 2) -> Path:
    job = tiny_pretrain("tiny-s3", maxSteps=max_steps, batchSize=4, sequenceLength=32, warmupSteps=2,
                        evalInterval=20, evalBatches=2, logInterval=5)
    job["spec"]["checkpoint"] = {"intervalSteps": interval, "keep": keep}
    return write_manifest(tmp_path / f"job-{max_steps}.yaml", job)


def train(manifest: Path, uri: str, result: Path, env: dict[str, str], *extra: str) -> Any:
    process = run_cli(*extra, "train", "--spec", str(manifest), "--checkpoint-uri", uri,
                      "--result", str(result), env={**env, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert process.returncode == 0, process.stderr
    return process


# ---------------------------------------------------------------------------------------------
# The storage interface on S3


def test_s3_storage_put_get_list_delete(s3_endpoint: str, bucket: str, tmp_path: Path) -> None:
    storage = open_storage(f"s3://{bucket}/jobs/a")
    storage.put_bytes("checkpoints/step-1/manifest.json", b"{}")
    storage.put_bytes("checkpoints/step-10/model.pt", b"ten")
    source = tmp_path / "weights.bin"
    source.write_bytes(b"\x00\x01binary" * 1000)
    storage.put_file("export/model.safetensors", source)

    # Keys land under the storage's prefix, and read back byte for byte.
    assert set(bucket_objects(s3_endpoint, bucket)) == {
        "jobs/a/checkpoints/step-1/manifest.json", "jobs/a/checkpoints/step-10/model.pt",
        "jobs/a/export/model.safetensors"}
    assert storage.get_bytes("checkpoints/step-10/model.pt") == b"ten"
    storage.get_file("export/model.safetensors", tmp_path / "copy.bin")
    assert (tmp_path / "copy.bin").read_bytes() == source.read_bytes()

    assert storage.list() == ["checkpoints/step-1/manifest.json", "checkpoints/step-10/model.pt",
                              "export/model.safetensors"]
    assert storage.list("checkpoints") == ["checkpoints/step-1/manifest.json", "checkpoints/step-10/model.pt"]
    # A prefix is a directory, never a stem: step-1 must not list step-10.
    assert storage.list("checkpoints/step-1") == ["checkpoints/step-1/manifest.json"]
    assert storage.list("checkpoints/step-1/") == ["checkpoints/step-1/manifest.json"]
    assert storage.list("checkpoints/step") == []

    storage.delete(["checkpoints/step-1/manifest.json", "export/model.safetensors"])
    assert storage.list() == ["checkpoints/step-10/model.pt"]
    assert set(bucket_objects(s3_endpoint, bucket)) == {"jobs/a/checkpoints/step-10/model.pt"}


def test_s3_storage_root_is_not_a_stem_of_its_neighbours(bucket: str) -> None:
    """Job `tiny` must never see (or resume from, or delete) the objects of job `tiny-2`."""
    open_storage(f"s3://{bucket}/runs/tiny-2").put_bytes("checkpoints/step-5/manifest.json", b"{}")
    tiny = open_storage(f"s3://{bucket}/runs/tiny")
    assert tiny.list() == []
    assert tiny.list("checkpoints") == []
    tiny.put_bytes("checkpoints/step-1/model.pt", b"x")
    assert tiny.list() == ["checkpoints/step-1/model.pt"]


@pytest.mark.parametrize("read", ["get_bytes", "get_file"])
def test_s3_missing_key_names_the_uri(bucket: str, tmp_path: Path, read: str) -> None:
    storage = open_storage(f"s3://{bucket}/jobs/a")
    args: tuple[Any, ...] = ("export/nothing.json",) if read == "get_bytes" else (
        "export/nothing.json", tmp_path / "out")
    with pytest.raises(StorageError, match=re.escape(f"s3://{bucket}/jobs/a/export/nothing.json")):
        getattr(storage, read)(*args)


def test_cli_reports_a_missing_bucket_as_retryable_without_leaking_the_secret(
        s3_env: dict[str, str], tmp_path: Path) -> None:
    manifest = pretrain_manifest(tmp_path, max_steps=10)
    process = run_cli("train", "--spec", str(manifest), "--checkpoint-uri", "s3://no-such-bucket-kf/jobs/x",
                      env={**s3_env, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert process.returncode == 1, process.stderr  # storage trouble may pass: not the permanent 2
    assert "s3://no-such-bucket-kf/jobs/x" in process.stderr
    assert "Traceback" not in process.stderr
    assert s3_env["AWS_SECRET_ACCESS_KEY"] not in process.stdout + process.stderr


# ---------------------------------------------------------------------------------------------
# A pretrain job checkpointing to S3


def test_pretrain_to_s3_keeps_the_newest_checkpoints_and_exports_a_loadable_model(
        s3_endpoint: str, s3_env: dict[str, str], bucket: str, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    uri = f"s3://{bucket}/jobs/tiny"
    # -v: even the debug log must not carry the credentials.
    process = train(pretrain_manifest(tmp_path, max_steps=50), uri, tmp_path / "result.json", s3_env, "-v")
    secret = s3_env["AWS_SECRET_ACCESS_KEY"]
    assert secret not in process.stdout and secret not in process.stderr

    result = json.loads((tmp_path / "result.json").read_text())
    assert (result["step"], result["resumedFromStep"], result["workers"]) == (50, 0, 1)
    assert result["exportUri"] == f"{uri}/export"

    objects = bucket_objects(s3_endpoint, bucket, "jobs/tiny/")
    # Beside the checkpoints and the export, the corpus prepared into shards (without --corpus-cache,
    # in the job's own storage): in S3, read back through a local copy of each shard.
    assert all(key.startswith(("checkpoints/", "export/", "corpora/")) for key in objects), sorted(objects)
    assert [k for k in objects if k.startswith("corpora/") and k.endswith("/manifest.json")], sorted(objects)

    # Retention: checkpoints were written at 10..50; only the newest two remain, each complete.
    dirs = checkpoint_dirs(objects)
    assert sorted(dirs) == ["step-00000040", "step-00000050"]
    for name, files in dirs.items():
        manifest = assert_manifest_matches(files, f"checkpoints/{name}")
        assert set(files) == CHECKPOINT_FILES | {"manifest.json"}
        assert manifest["step"] == int(name.removeprefix("step-"))
        assert manifest["rank"] == 0

    # The export: a Hugging Face model directory committed by its manifest.
    export = {key.removeprefix("export/"): body for key, body in objects.items() if key.startswith("export/")}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "manifest.json"} <= set(export)
    assert assert_manifest_matches(export, "export")["step"] == 50
    assert json.loads(export["result.json"])["step"] == 50

    target = tmp_path / "export"
    for name, body in export.items():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (target / name).write_bytes(body)
    model, info = AutoModelForCausalLM.from_pretrained(target, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    tokenizer = AutoTokenizer.from_pretrained(target)

    # The exported weights are the trained ones: those of the final checkpoint.
    (tmp_path / "final.pt").write_bytes(dirs["step-00000050"]["model.pt"])
    final = torch.load(tmp_path / "final.pt", map_location="cpu")
    for key, value in model.state_dict().items():
        assert torch.equal(value, final[key]), key

    prompt = tokenizer("ROMEO: my lord", return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                                   pad_token_id=tokenizer.eos_token_id)
    assert generated.shape == (1, prompt["input_ids"].shape[1] + 5)
    assert isinstance(tokenizer.decode(generated[0]), str)


def test_resume_from_s3_ignores_an_uncommitted_newer_checkpoint(
        s3_endpoint: str, s3_env: dict[str, str], bucket: str, tmp_path: Path) -> None:
    uri = f"s3://{bucket}/jobs/tiny"
    manifest = pretrain_manifest(tmp_path, max_steps=30)
    train(manifest, uri, tmp_path / "first.json", s3_env)
    first = json.loads((tmp_path / "first.json").read_text())
    assert first["step"] == 30

    # As if killed after committing step 20: step 30's checkpoint never happened...
    client = s3_client(s3_endpoint)
    step_30 = "jobs/tiny/checkpoints/step-00000030/"
    client.delete_objects(Bucket=bucket, Delete={"Objects": [
        {"Key": step_30 + name} for name in bucket_objects(s3_endpoint, bucket, step_30)]})
    # ...and a writer killed mid-upload left files of a newer step, but no manifest committing them.
    for name in ("model.pt", "optimizer.pt", "state.pt"):
        client.put_object(Bucket=bucket, Key=f"jobs/tiny/checkpoints/step-00000090/{name}", Body=b"half")

    process = train(manifest, uri, tmp_path / "second.json", s3_env)
    resumed = re.findall(r"resuming from checkpoint step (\d+)", process.stderr)
    assert resumed == ["20"], process.stderr
    assert "step-00000090: no complete manifest" in process.stderr

    second = json.loads((tmp_path / "second.json").read_text())
    assert (second["resumedFromStep"], second["step"], second["totalSteps"]) == (20, 30, 30)
    # The resumed run continued the first one's history instead of starting over, to the same end.
    assert [h["step"] for h in second["evalHistory"]] == [h["step"] for h in first["evalHistory"]] == [0, 20, 30]
    assert abs(second["finalEval"]["loss"] - first["finalEval"]["loss"]) < 1e-4
    logged = [int(s) for s in re.findall(r"step (\d+)/30 loss", process.stderr)]
    assert logged == [25, 30], process.stderr  # it trained steps 21..30 only

    dirs = checkpoint_dirs(bucket_objects(s3_endpoint, bucket, "jobs/tiny/"))
    complete = sorted(name for name, files in dirs.items() if "manifest.json" in files)
    assert complete == ["step-00000020", "step-00000030"]
    assert json.loads(dirs["step-00000030"]["manifest.json"])["step"] == 30
