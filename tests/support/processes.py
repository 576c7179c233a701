"""Child processes of tests and benchmarks: the kubeforge CLI, a moto S3 server, free ports, bounded waits."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from support.jobs import ROOT

KUBEFORGE = [sys.executable, "-m", "kubeforge"]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KUBEFORGE, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=cwd or ROOT)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
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


def stop_process(process: subprocess.Popen[Any], grace: float = 20) -> None:
    """SIGTERM, then SIGKILL if it is still running after `grace` seconds; returns once it has exited."""
    process.terminate()  # a no-op once it has exited
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@contextmanager
def moto_server(host: str = "127.0.0.1") -> Iterator[str]:
    """A moto S3 server on a free port of host (an address of this machine): its endpoint URL, while
    the block runs."""
    port = free_port(host)
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://{host}:{port}"

    def up() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"moto_server exited with {process.returncode} before listening on {endpoint}")
        try:
            with urllib.request.urlopen(endpoint, timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    try:
        wait_until(up, 30, "moto_server to listen")
        yield endpoint
    finally:
        stop_process(process)
