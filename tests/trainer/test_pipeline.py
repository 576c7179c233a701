"""The README's main command: a tiny pretrain, then a LoRA classifier finetuned from it, no cluster."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from support.jobs import EXAMPLES, ROOT, example, write_manifest
from support.processes import run_cli


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    output = tmp_path_factory.mktemp("runs")
    result = run_cli("run", "examples/pipeline.yaml", "--output", str(output), "--no-progress", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    pretrain, finetune = json.loads(result.stdout)
    return {"pretrain": pretrain, "finetune": finetune, "log": result.stderr, "output": output}


def test_pretraining_lowers_eval_loss_well_below_its_start(pipeline: dict[str, Any]) -> None:
    pretrain = pipeline["pretrain"]
    start, end = pretrain["evalHistory"][0], pretrain["finalEval"]
    assert pretrain["kind"] == "PretrainJob" and pretrain["step"] == pretrain["totalSteps"] == 300
    assert start["step"] == 0
    assert end["loss"] < 0.8 * start["loss"], pretrain["evalHistory"]
    assert end["perplexity"] < start["perplexity"] / 5
    assert pretrain["device"] == "cpu"
    assert "no GPU found: training on CPU" in pipeline["log"]


def test_lora_classifier_beats_the_majority_class(pipeline: dict[str, Any]) -> None:
    finetune = pipeline["finetune"]
    eval_labels = [json.loads(line)["label"]
                   for line in (EXAMPLES / "data/reviews/eval.jsonl").read_text().splitlines()]
    majority = Counter(eval_labels).most_common(1)[0][1] / len(eval_labels)
    assert finetune["labels"] == ["negative", "positive"]
    assert finetune["finalEval"]["accuracy"] > majority + 0.1, finetune["evalHistory"]
    assert finetune["finalEval"]["f1"] > 0.6


def test_finetune_starts_from_the_pretrain_export(pipeline: dict[str, Any]) -> None:
    pretrain, finetune = pipeline["pretrain"], pipeline["finetune"]
    assert Path(pretrain["exportUri"]) == pipeline["output"] / "default/pretrainjob/tiny-shakespeare/export"
    # The classifier uses the tokenizer trained by the pretrain job, byte for byte.
    base_vocab = json.loads((Path(pretrain["exportUri"]) / "tokenizer.json").read_text())["model"]["vocab"]
    tuned_vocab = json.loads((Path(finetune["exportUri"]) / "tokenizer.json").read_text())["model"]["vocab"]
    assert base_vocab == tuned_vocab and len(base_vocab) == 1024


def test_exported_classifier_loads_and_predicts_like_its_eval(pipeline: dict[str, Any]) -> None:
    """The export is a plain transformers model (LoRA merged) that reproduces the reported accuracy."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    export = Path(pipeline["finetune"]["exportUri"])
    model = AutoModelForSequenceClassification.from_pretrained(export).eval()
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert not any("lora" in name for name, _ in model.named_parameters())
    rows = [json.loads(line) for line in (EXAMPLES / "data/reviews/eval.jsonl").read_text().splitlines()]
    batch = tokenizer([r["text"] for r in rows], max_length=64, truncation=True, padding="max_length",
                      return_tensors="pt")
    with torch.no_grad():
        predicted = model(**batch).logits.argmax(-1).tolist()
    accuracy = sum(model.config.id2label[p] == r["label"] for p, r in zip(predicted, rows, strict=True)) / len(rows)
    assert accuracy == pytest.approx(pipeline["finetune"]["finalEval"]["accuracy"], abs=0.01)
    job = (export / "job.yaml").read_text()
    assert "kind: FinetuneJob" in job and "fromPretrainJob: tiny-shakespeare" in job


def test_rerunning_a_finished_pipeline_trains_nothing_again(pipeline: dict[str, Any]) -> None:
    """Each job resumes from its final checkpoint: no step is repeated, the exports stay valid."""
    result = run_cli("run", "examples/pipeline.yaml", "--output", str(pipeline["output"]), "--no-progress",
                     "--json", cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    for again, before in zip(json.loads(result.stdout), (pipeline["pretrain"], pipeline["finetune"]), strict=True):
        assert again["resumedFromStep"] == again["step"] == before["step"]
        assert again["finalEval"]["loss"] == pytest.approx(before["finalEval"]["loss"], rel=1e-5)


def test_a_base_model_that_is_no_model_fails_for_good_naming_the_field(tmp_path: Path) -> None:
    job = example("finetune-lora-classify.yaml")[0]
    job["spec"]["baseModel"] = {"uri": str(tmp_path)}  # a directory, but no config.json in it
    result = run_cli("train", "--spec", str(write_manifest(tmp_path / "job.yaml", job)),
                     "--checkpoint-uri", str(tmp_path / "out"), timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]  # permanent: a retry cannot help
    assert f"error: baseModel: {tmp_path} has no config.json" in result.stderr
