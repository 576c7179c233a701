"""Shared fixtures: a real S3 endpoint (moto_server) with fake credentials, and a fresh bucket.

Fixtures only: what tests import lives in support/ (jobs, processes, e2e, ...); a folder's own
conftest.py adds the fixtures only its tests use (operator/conftest.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from support.faults import FAULT_RESULTS
from support.processes import moto_server

pytest_plugins = ["k8s.cluster"]  # the cluster (emulator or real) and kubelet fixtures


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fault-size", choices=["ci", "full"], default="ci",
                     help="fault-injection counts: ci (a few of each, minutes) or full (docs/reliability.md's)")


@pytest.fixture(scope="session")
def fault_size(request: pytest.FixtureRequest) -> str:
    return str(request.config.getoption("--fault-size"))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FAULT_RESULTS:
        terminalreporter.section("fault injection")
        terminalreporter.write_line("| fault | injected | held | figures |")
        terminalreporter.write_line("|---|---|---|---|")
        for row in FAULT_RESULTS:
            terminalreporter.write_line("| " + " | ".join(row) + " |")


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
