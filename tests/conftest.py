"""Shared fixtures: a real S3 endpoint (moto_server), job manifests, and the kubeforge CLI as users run it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest_plugins = ["k8s.cluster"]  # the cluster (emulator or real) and kubelet fixtures


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fault-size", choices=["ci", "full"], default="ci",
                     help="fault-injection counts: ci (a few of each, minutes) or full (docs/reliability.md's)")


#: One row per fault test (fault, injected, what held, figures), printed as a table at the end.
FAULT_RESULTS: list[tuple[str, str, str, str]] = []


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

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
KUBEFORGE = [sys.executable, "-m", "kubeforge"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll until predicate() is truthy; fail the test with `what` after timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 with fake credentials in the environment (boto3 reads them)."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return urllib.request.urlopen(endpoint, timeout=1).status == 200
        except OSError:
            return False

    try:
        wait_until(up, 30, "moto_server to listen")
        yield endpoint
    finally:
        process.terminate()
        process.wait(timeout=10)


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

    import boto3

    name = f"kf-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


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


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KUBEFORGE, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=cwd or ROOT)
