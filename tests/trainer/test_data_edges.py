"""Data a user can hand kubeforge that must fail with a named field, or be read correctly."""

from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path

import pytest
import torch
from support.jobs import tiny_pretrain, write_manifest
from support.processes import free_port, run_cli

from kubeforge.spec import DataSource
from kubeforge.trainer.data import DataError, eval_batches, field_values, label_names, read_source
from kubeforge.trainer.metrics import TrainerMetrics


def test_a_jsonl_line_with_a_raw_line_separator_is_one_record(tmp_path: Path) -> None:
    source = tmp_path / "train.jsonl"
    source.write_text(json.dumps({"text": "one\u2028two\u2029three\x85four"}, ensure_ascii=False) + "\r\n"
                      + json.dumps({"text": "five"}) + "\n")
    records = read_source(DataSource(uri=str(source)), None, "text")
    assert [r["text"] for r in records] == ["one\u2028two\u2029three\x85four", "five"]


def test_a_null_field_is_refused_with_its_record_and_spec_field() -> None:
    with pytest.raises(DataError, match=r"data.train record 2: field 'label' is null \(data.labelField\)"):
        field_values([{"label": "a"}, {"label": None}], "label", "labelField", "data.train")


def test_a_single_class_dataset_is_refused() -> None:
    with pytest.raises(DataError, match=r"data.labelField: data.train has 1 distinct label\(s\) \['pos'\]"):
        label_names(["pos", "pos", "pos"])
    assert label_names([1, 0, 1]) == ["0", "1"]


def test_an_empty_eval_set_is_refused_rather_than_scored_perfect() -> None:
    empty = {"input_ids": torch.zeros((0, 8), dtype=torch.long), "labels": torch.zeros(0, dtype=torch.long)}
    with pytest.raises(DataError, match="data.eval: no examples to evaluate on"):
        eval_batches(empty, batch_size=4, limit=10, rank=0, world_size=1)


def test_metrics_outside_a_pod_listen_on_loopback_and_free_their_port(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("POD_IP", "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(variable, raising=False)
    port = free_port()
    first = TrainerMetrics("a", "default", "PretrainJob", 0)
    first.serve(port)
    assert urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).status == 200
    addresses = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)} - {"127.0.0.1"}
    for address in addresses:  # another of this machine's addresses: nothing listens there
        with pytest.raises(OSError), socket.create_connection((address, port), timeout=2):
            pass
    first.close()
    second = TrainerMetrics("b", "default", "PretrainJob", 0)
    second.serve(port)  # "Address already in use" if the first still held it
    second.close()


def test_run_of_two_jobs_with_a_metrics_port(tmp_path: Path) -> None:
    port = free_port()
    jobs = []
    for name in ("first", "second"):
        job = tiny_pretrain(name, maxSteps=2, warmupSteps=1, evalBatches=1, logInterval=1)
        job["spec"]["metrics"] = {"port": port}
        jobs.append(job)
    result = run_cli("run", str(write_manifest(tmp_path / "jobs.yaml", *jobs)), "--output", str(tmp_path / "out"),
                     "--no-progress", "--json", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["job"] for r in json.loads(result.stdout)] == ["first", "second"]
    assert f"metrics on 127.0.0.1:{port}/metrics" in result.stderr
