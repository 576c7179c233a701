"""The job status and the trainer's outcome (kubeforge/status.py): what the CRDs accept and document,
and what the trainer's termination message tells the operator."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft4Validator
from support.jobs import ROOT
from support.processes import KUBEFORGE

from kubeforge.spec import ALL_KINDS, KINDS
from kubeforge.status import (
    EXIT_PERMANENT,
    BestTrial,
    CompressionReport,
    Condition,
    ExportedModel,
    IntermediateValue,
    JobStatus,
    PruningReport,
    SweepStatus,
    TrainerError,
    TrainerSummary,
    TrialStatus,
    read_termination_message,
    termination_message,
)

EVERY_FIELD = JobStatus(
    phase="Running", reason="Training", message="2 worker(s) training", restarts=1, observed_generation=3,
    conditions=[Condition(type="Running", status="True", reason="Training", message="2 worker(s) training",
                          last_transition_time="2026-11-23T12:00:00Z", observed_generation=3)],
    start_time="2026-11-23T12:00:00Z", completion_time="2026-11-23T13:00:00Z", checkpoint_uri="s3://b/j",
    base_model_uri="s3://b/base/export", teacher_uri="s3://b/teacher/export", export_uri="s3://b/j/export",
    device="gpu", step=120, total_steps=500,
    step_progress="120/500", loss=3.21, eval_metrics={"perplexity": 33.1}, eval_step=100, last_checkpoint_step=100,
    last_step_time="2026-11-23T12:59:00Z", disruptions=1, corpus_tokens_prepared=12_000, trainable_parameters=16_512,
    compression=CompressionReport(
        quantize="int8", scheme="int8 weights (W8A16)", size_ratio=0.31, summary="int8: 31% of the size",
        full=ExportedModel(uri="s3://b/j/export", size_bytes=1000, eval={"accuracy": 0.71}),
        quantized=ExportedModel(uri="s3://b/j/export/int8", size_bytes=310, eval={"accuracy": 0.7})),
    pruning=PruningReport(
        sparsity=0.5, summary="50% sparse, accuracy 0.7100 -> 0.6900",
        full=ExportedModel(uri="s3://b/j/export", size_bytes=1000, eval={"accuracy": 0.71}),
        pruned=ExportedModel(uri="s3://b/j/export/pruned", size_bytes=1000, eval={"accuracy": 0.69})))


def status_schema(kind: str) -> dict[str, Any]:
    crd = yaml.safe_load((ROOT / "crds" / f"{ALL_KINDS[kind].plural}.{ALL_KINDS[kind].group}.yaml").read_text())
    return dict(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"])


def test_the_api_server_keeps_every_status_field_the_operator_writes() -> None:
    written = EVERY_FIELD.to_json()
    assert set(written) == {field.alias for field in JobStatus.model_fields.values()}
    for kind in KINDS:
        schema = status_schema(kind)
        assert list(Draft4Validator(schema).iter_errors(written)) == []
        assert set(written) <= set(schema["properties"])  # none pruned
        assert set(written["conditions"][0]) <= set(schema["properties"]["conditions"]["items"]["properties"])


def test_the_api_server_keeps_every_field_of_a_sweeps_status() -> None:
    trial = TrialStatus(number=0, name="s-t0", parameters={"training.learningRate": 0.001, "lora.r": 4},
                        state="Pruned", reason="Pruned", message="below the median at step 30",
                        intermediate=[IntermediateValue(step=30, value=0.5)], value=None, step=30,
                        optuna={"completed_rung_0": 0.5})
    best = BestTrial(name="s-t1", number=1, parameters={"lora.r": 8}, value=0.8, export_uri="s3://b/t1/export")
    written = SweepStatus(phase="Succeeded", trials=[trial], trials_done=1, trials_progress="1/1", pruned_trials=1,
                          best_value=0.8, best_trial=best, start_time="2026-11-23T12:00:00Z").to_json()
    schema = status_schema("SweepJob")
    assert list(Draft4Validator(schema).iter_errors(written)) == []
    assert set(written) <= set(schema["properties"])
    assert set(written["trials"][0]) <= set(schema["properties"]["trials"]["items"]["properties"])
    assert list(Draft4Validator(schema).iter_errors({"trials": [{"number": 0, "name": "x", "parameters": {},
                                                                 "state": "Lost"}]}))


def test_the_api_server_refuses_a_status_of_the_wrong_shape_and_keeps_unknown_fields() -> None:
    schema = status_schema("PretrainJob")
    refused = [{"phase": "Done"}, {"restarts": -1}, {"loss": "low"}, {"conditions": [{"type": "Running"}]}]
    for status in refused:
        assert list(Draft4Validator(schema).iter_errors(status)), status
    # Kopf or an older operator may have written fields of its own: they are not pruned.
    assert schema["x-kubernetes-preserve-unknown-fields"] is True
    assert "default" not in yaml.safe_dump(schema)  # status holds what the operator wrote, nothing else


def test_every_status_field_is_explained_in_the_reference() -> None:
    reference = (ROOT / "docs" / "crd-reference.md").read_text().split("## Status")[1]
    paths = [f"status.{field.alias}" for field in JobStatus.model_fields.values()]
    paths += [f"status.conditions[].{field.alias}" for field in Condition.model_fields.values()]
    for path in paths:
        row = next((line for line in reference.splitlines() if line.startswith(f"| `{path}` |")), None)
        assert row is not None, f"{path} is missing"
        assert row.rstrip(" |").split("|")[-1].strip(), f"{path} has no description"


def test_the_trainers_summary_reads_back_as_written() -> None:
    result = {"job": "tiny", "step": 300, "totalSteps": 300, "resumedFromStep": 0, "trainLoss": 4.6,
              "finalEval": {"loss": 4.8}, "evalHistory": [{"step": 300, "loss": 4.8}],
              "exportUri": "s3://b/j/export", "checkpointUri": "s3://b/j", "teacherUri": "s3://b/teacher/export"}
    summary = TrainerSummary.model_validate(result)  # the trainer's whole result: only the summary is kept
    message = termination_message(summary)
    assert len(message) < 4000 and "evalHistory" not in message
    assert read_termination_message(message) == summary
    assert summary.teacher_uri == "s3://b/teacher/export"  # a distilled student's lineage reaches its status
    error = TrainerError(error="no .txt or .jsonl files found", permanent=True)
    assert read_termination_message(termination_message(error)) == error


def test_what_is_no_outcome_reads_as_none() -> None:
    cut = termination_message(TrainerSummary(step=1, total_steps=2, resumed_from_step=0, export_uri="e",
                                             checkpoint_uri="c"))[:-5]
    log_tail = "Traceback (most recent call last):\n  ...\nMemoryError"
    for message in (cut, log_tail, "", "[]", '{"step": 3}'):
        assert read_termination_message(message) is None, message


def test_a_bad_spec_exits_permanently_and_says_why_in_the_termination_message(tmp_path: Path) -> None:
    log = tmp_path / "termination-log"
    done = subprocess.run([*KUBEFORGE, "train", "--spec", str(tmp_path / "missing.yaml"),
                           "--termination-log", str(log)], capture_output=True, text=True, timeout=120)
    assert done.returncode == EXIT_PERMANENT, done.stderr
    outcome = read_termination_message(log.read_text())
    assert isinstance(outcome, TrainerError) and outcome.permanent
    assert "missing.yaml" in outcome.error
