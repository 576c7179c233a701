"""Fixtures of the operator's end-to-end tests: the example data on S3, the operator's settings, and a
cluster holding the Secret of S3 credentials that the jobs' pods read."""

from __future__ import annotations

from typing import Any

import boto3
import pytest
from support.e2e import SECRET
from support.jobs import ROOT

from kubeforge.operator.settings import OperatorSettings


@pytest.fixture
def s3_data(bucket: str, s3_endpoint: str) -> dict[str, str]:
    """The example data, uploaded where pods can read it."""
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    uris = {}
    for name in ("shakespeare/train.txt", "shakespeare/eval.txt", "reviews/train.jsonl", "reviews/eval.jsonl"):
        client.upload_file(str(ROOT / "examples/data" / name), bucket, f"data/{name}")
        uris[name] = f"s3://{bucket}/data/{name}"
    return uris


@pytest.fixture
def settings(bucket: str, s3_endpoint: str) -> OperatorSettings:
    return OperatorSettings(trainer_image="kubeforge-trainer:test", trainer_cpu_image="kubeforge-trainer-cpu:test",
                            storage_root=f"s3://{bucket}/kf", s3_endpoint=s3_endpoint,
                            s3_credentials_secret=SECRET, resync_seconds=0.5,
                            allowed_uri_prefixes=(f"s3://{bucket}/data",))  # the shared corpora


@pytest.fixture
async def world(cluster: Any, kubelet: Any, s3_env: dict[str, str], settings: OperatorSettings) -> Any:
    await cluster.create_secret(SECRET, {k: s3_env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")})
    return cluster
