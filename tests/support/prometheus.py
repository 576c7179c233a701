"""A real Prometheus server for tests (Debian's `prometheus` package, which `.ci/run` installs).

It listens on 127.0.0.1 with a generated config: a 1 s scrape and rule interval, the chart's alert
rules, and targets discovered from files the test writes (as a cluster's service discovery would
find pods), so targets can be added once a pod has its IP.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from support.jobs import ROOT
from support.processes import stop_process

RULES = ROOT / "charts/kubeforge/files/prometheus-rules.yaml"


def binary(name: str) -> str:
    """The path of `prometheus` or `promtool`; fails (never skips) when it is not installed."""
    found = shutil.which(name)
    if found is None:
        raise AssertionError(f"{name} is not installed: `apt-get install prometheus` (Debian's package; "
                             "`make test` installs it first) provides /usr/bin/prometheus and /usr/bin/promtool")
    return found


class PrometheusError(AssertionError):
    """Prometheus answered a query with an error."""


class Prometheus:
    """A running server: `discover` adds scrape targets, `query`/`query_range` run PromQL over HTTP."""

    def __init__(self, url: str, targets_dir: Path, log_path: Path):
        self.url = url
        self.targets_dir = targets_dir
        self.log_path = log_path

    def discover(self, scrape_job: str, targets: list[str], labels: dict[str, str] | None = None) -> None:
        """Set the targets of a scrape job (file-based discovery; Prometheus watches the file)."""
        path = self.targets_dir / f"{scrape_job}.json"
        scratch = path.with_suffix(".tmp")
        scratch.write_text(json.dumps([{"targets": targets, "labels": labels or {}}]))
        scratch.rename(path)  # atomic: Prometheus never reads half a file

    def api(self, path: str, **params: str) -> Any:
        """The `data` of a successful /api/v1 answer; a PrometheusError with Prometheus's message otherwise."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                answer = json.load(response)
        except urllib.error.HTTPError as exc:  # 400/422: a bad query, with Prometheus's error in the body
            answer = json.loads(exc.read() or b"{}")
        if answer.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {answer.get('errorType')}: {answer.get('error')}")
        return answer["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query: [{"metric": labels, "value": [time, "value"]}]."""
        return list(self.api("query", query=expr)["result"])

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict[str, Any]]:
        """A range query: [{"metric": labels, "values": [[time, "value"], ...]}]."""
        return list(self.api("query_range", query=expr, start=str(start), end=str(end), step=str(step))["result"])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


def config(targets_dir: Path, scrape_jobs: list[str]) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": job, "file_sd_configs": [{"files": [str(targets_dir / f"{job}.json")],
                                                   "refresh_interval": "1s"}]}
            for job in scrape_jobs
        ],
    }


def start(workdir: Path, port: int, scrape_jobs: list[str], ready_timeout: float = 60) -> tuple[
        subprocess.Popen[bytes], Prometheus]:
    """Start Prometheus and wait (bounded) until it is ready; the caller stops the process."""
    targets_dir = workdir / "targets"
    targets_dir.mkdir(parents=True)
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config(targets_dir, scrape_jobs)))
    log_path = workdir / "prometheus.log"
    with log_path.open("wb") as sink:
        process = subprocess.Popen(
            [binary("prometheus"), f"--config.file={config_path}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1d"],
            stdout=sink, stderr=subprocess.STDOUT)
    server = Prometheus(f"http://127.0.0.1:{port}", targets_dir, log_path)
    deadline = time.monotonic() + ready_timeout
    while True:
        if process.poll() is not None:
            raise AssertionError(f"prometheus exited with {process.returncode}:\n{server.log()}")
        try:
            with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as response:
                if response.status == 200:
                    return process, server
        except OSError:
            pass
        if time.monotonic() > deadline:
            stop_process(process)
            raise AssertionError(f"prometheus was not ready within {ready_timeout}s:\n{server.log()}")
        time.sleep(0.2)
