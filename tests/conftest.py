"""Shared fixtures: a real S3 endpoint (moto_server), and the world of the operator's end-to-end tests.

Fixtures only: what tests import lives in support/ (jobs, processes, e2e, ...)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from support.e2e import SECRET
from support.jobs import ROOT
from support.processes import moto_server

from kubeforge.operator.settings import OperatorSettings

pytest_plugins = ["k8s.cluster"]  # the cluster (emulator or real) and kubelet fixtures


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 with fake credentials in the environment (boto3 reads them)."""
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Fake credentials for this process and for trainer subprocesses started with `env`."""
    values = {
        "AWS_ACCESS_KEY_ID": "testing-key-id",
        "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_endpoint,
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return {**os.environ, **values}


@pytest.fixture
def bucket(s3_env: dict[str, str], s3_endpoint: str) -> str:
    import uuid

    name = f"kf-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


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
