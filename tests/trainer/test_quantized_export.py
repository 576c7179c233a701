"""export.quantize: a finetuned classifier exported again with int8 or int4 weights (compressed-tensors),
loadable with from_pretrained, smaller, and evaluated next to the full-precision model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from support.jobs import tiny_pretrain
from support.models import REVIEWS, finetune_manifest, records, tiny_base

from kubeforge.spec import parse_job
from kubeforge.status import TrainerResult, termination_message
from kubeforge.trainer.compression import QuantizeError
from kubeforge.trainer.loop import train

EVAL_ROWS = records(REVIEWS / "eval.jsonl")
SEQUENCE_LENGTH = 64


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama: its Linear layers hold most of its weights (its embeddings a fifth), as a served model's do."""
    return tiny_base(tmp_path_factory.mktemp("llama"), architecture="llama")


def finetune(base: Path, root: Path, **export: Any) -> TrainerResult:
    """A LoRA classifier on the reviews, evaluated on every eval example, exported as `export` asks."""
    manifest = finetune_manifest(str(base), root, task="sequence-classification", method="lora",
                                 sequence_length=SEQUENCE_LENGTH, max_steps=30, learning_rate=3e-3)
    manifest["spec"]["training"].update(batchSize=16, evalBatches=len(EVAL_ROWS))
    manifest["spec"]["export"] = export
    return train(parse_job(manifest), checkpoint_root=str(root), base_model_uri=str(base))


def accuracy_when_loaded(directory: Path) -> float:
    """The model of `directory` loaded as a user would (from_pretrained, its quantization config and all)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(directory).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    batch = tokenizer([r["text"] for r in EVAL_ROWS], max_length=SEQUENCE_LENGTH, truncation=True,
                      padding="max_length", return_tensors="pt")
    with torch.no_grad():
        predicted = model(**batch).logits.argmax(-1).tolist()
    labels = model.config.id2label
    return sum(labels[p] == r["label"] for p, r in zip(predicted, EVAL_ROWS, strict=True)) / len(EVAL_ROWS)


def quantization(directory: Path) -> dict[str, Any]:
    """The weights' quantization args in the model's config.json."""
    config = json.loads((directory / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    (group,) = config["config_groups"].values()
    return dict(group["weights"])


def test_int8_export_loads_is_under_half_the_size_and_is_evaluated_next_to_the_full_model(
        llama_base: Path, tmp_path: Path) -> None:
    result = finetune(llama_base, tmp_path, quantize="int8")
    export = tmp_path / "export"
    report = result.compression
    assert report is not None and report.quantize == "int8"
    assert report.full.uri == str(export) and report.quantized.uri == str(export / "int8")
    # Each size is what its weight files take on disk: the int8 one under half of the full one.
    assert report.full.size_bytes == (export / "model.safetensors").stat().st_size
    assert report.quantized.size_bytes == (export / "int8" / "model.safetensors").stat().st_size
    assert report.quantized.size_bytes < 0.5 * report.full.size_bytes
    assert report.size_ratio == pytest.approx(report.quantized.size_bytes / report.full.size_bytes, abs=1e-4)
    # On disk the layers hold int8 values packed into int32s, one scale per output channel; the head is whole.
    assert quantization(export / "int8") | {"num_bits": 8, "strategy": "channel"} == quantization(export / "int8")
    with safe_open(export / "int8" / "model.safetensors", "pt") as weights:
        assert weights.get_tensor("model.layers.0.mlp.up_proj.weight_packed").dtype == torch.int32
        assert weights.get_tensor("model.layers.0.mlp.up_proj.weight_scale").shape == (256, 1)
        assert weights.get_tensor("score.weight").dtype == torch.float32
    # Both exports were evaluated on the eval set: each loads and predicts as recorded.
    assert report.full.eval["accuracy"] == pytest.approx(result.final_eval["accuracy"], abs=1e-6)
    assert accuracy_when_loaded(export) == pytest.approx(report.full.eval["accuracy"], abs=1e-6)
    assert accuracy_when_loaded(export / "int8") == pytest.approx(report.quantized.eval["accuracy"], abs=1e-6)
    assert abs(report.quantized.eval["loss"] - report.full.eval["loss"]) < 0.01  # int8 barely moves the loss
    full, quantized = report.full.eval["accuracy"], report.quantized.eval["accuracy"]
    assert report.summary == f"int8: {report.size_ratio:.0%} of the size, accuracy {full:.4f} -> {quantized:.4f}"
    # result.json and the termination message (what the operator copies into the status) carry it too.
    saved = json.loads((export / "result.json").read_text())
    assert saved["compression"] == report.to_json()
    message = termination_message(result.summary())
    assert len(message) < 4000 and json.loads(message)["compression"] == report.to_json()


def test_int4_without_the_full_model_exports_the_quantized_one_alone(llama_base: Path, tmp_path: Path) -> None:
    result = finetune(llama_base, tmp_path, quantize="int4", keepFullPrecision=False)
    export = tmp_path / "export"
    report = result.compression
    assert report is not None and report.full.uri is None and report.quantized.uri == str(export)
    assert quantization(export) | {"num_bits": 4, "strategy": "group", "group_size": 32} == quantization(export)
    assert not (export / "int4").exists() and sorted(p.name for p in export.glob("*.safetensors")) == [
        "model.safetensors"]
    assert report.quantized.size_bytes == (export / "model.safetensors").stat().st_size
    assert report.size_ratio < 0.4  # int4's Linear weights are half of int8's
    assert accuracy_when_loaded(export) == pytest.approx(report.quantized.eval["accuracy"], abs=1e-6)
    assert report.full.eval["accuracy"] == pytest.approx(result.final_eval["accuracy"], abs=1e-6)


def test_a_model_without_linear_layers_is_refused_by_field_before_training(tmp_path: Path) -> None:
    """GPT-2 keeps its layers in Conv1D, which no quantized loader takes: nothing would be quantized."""
    gpt2 = tiny_base(tmp_path / "gpt2")
    with pytest.raises(QuantizeError, match=r"^export\.quantize: the gpt2 model has no nn\.Linear layers"):
        finetune(gpt2, tmp_path / "job", quantize="int8")
    assert not (tmp_path / "job" / "checkpoints").exists()


def test_virtual_tokens_are_refused_by_field(llama_base: Path, tmp_path: Path) -> None:
    manifest = finetune_manifest(str(llama_base), tmp_path, task="sequence-classification", method="prompt-tuning")
    manifest["spec"]["export"] = {"quantize": "int8"}
    with pytest.raises(QuantizeError, match=r"^export\.quantize is not valid with method: prompt-tuning"):
        train(parse_job(manifest), checkpoint_root=str(tmp_path), base_model_uri=str(llama_base))
    assert not (tmp_path / "checkpoints").exists()


def test_a_pretrain_job_quantizes_its_causal_lm_the_same_way(tmp_path: Path) -> None:
    """The same export path: a llama language model, its perplexity measured before and after."""
    from transformers import AutoModelForCausalLM

    manifest = tiny_pretrain(maxSteps=3, warmupSteps=0, evalBatches=2)
    manifest["spec"].update(model={"architecture": "llama", "size": "tiny"}, export={"quantize": "int8"},
                            resources={"gpusPerWorker": 0}, metrics={"port": 0})
    result = train(parse_job(manifest), checkpoint_root=str(tmp_path))
    report = result.compression
    assert report is not None and report.quantized.uri == str(tmp_path / "export" / "int8")
    assert quantization(tmp_path / "export" / "int8")["num_bits"] == 8
    assert report.full.eval["perplexity"] == pytest.approx(result.final_eval["perplexity"], rel=1e-6)
    assert report.quantized.eval["perplexity"] == pytest.approx(report.full.eval["perplexity"], rel=0.01)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "int8")
    config = json.loads((tmp_path / "export" / "int8" / "config.json").read_text())
    assert config["quantization_config"]["ignore"] == ["lm_head"]  # the output head stays whole
    assert model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False).shape == (1, 5)


def test_prune_exports_a_model_of_that_sparsity_evaluated_next_to_the_full_one(tmp_path: Path) -> None:
    """export.prune on GPT-2 (its Conv1D layers pruned too): half of each layer's weights, the smallest,
    are zero in export/pruned/, which loads and predicts as recorded; the head and embeddings are whole."""
    result = finetune(tiny_base(tmp_path / "gpt2"), tmp_path / "job", prune={"sparsity": 0.5})
    export = tmp_path / "job" / "export"
    report = result.pruning
    assert report is not None and result.compression is None
    assert report.full.uri == str(export) and report.pruned.uri == str(export / "pruned")
    assert report.sparsity == pytest.approx(0.5, abs=1e-3)
    with safe_open(export / "pruned" / "model.safetensors", "pt") as pruned, \
            safe_open(export / "model.safetensors", "pt") as full:
        layer = pruned.get_tensor("transformer.h.0.mlp.c_fc.weight")
        original = full.get_tensor("transformer.h.0.mlp.c_fc.weight")
        assert (layer == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
        kept = layer != 0  # the largest in magnitude, unchanged
        assert torch.equal(layer[kept], original[kept])
        assert original[kept].abs().min() >= original[~kept].abs().max()
        assert torch.equal(pruned.get_tensor("score.weight"), full.get_tensor("score.weight"))
        assert torch.equal(pruned.get_tensor("transformer.wte.weight"), full.get_tensor("transformer.wte.weight"))
    assert accuracy_when_loaded(export / "pruned") == pytest.approx(report.pruned.eval["accuracy"], abs=1e-6)
    assert report.full.eval["accuracy"] == pytest.approx(result.final_eval["accuracy"], abs=1e-6)
    full, pruned_accuracy = report.full.eval["accuracy"], report.pruned.eval["accuracy"]
    assert report.summary == f"50% sparse, accuracy {full:.4f} -> {pruned_accuracy:.4f}"
    assert json.loads(termination_message(result.summary()))["pruning"] == report.to_json()


def test_quantize_and_prune_each_measure_their_copy_against_the_same_full_model(
        llama_base: Path, tmp_path: Path) -> None:
    result = finetune(llama_base, tmp_path, quantize="int8", prune={"sparsity": 0.3})
    assert result.compression is not None and result.pruning is not None
    assert result.compression.full == result.pruning.full
    assert {p.name for p in (tmp_path / "export").iterdir() if p.is_dir()} >= {"int8", "pruned"}
    assert result.pruning.sparsity == pytest.approx(0.3, abs=1e-3)


def test_prune_with_virtual_tokens_is_refused_by_field(llama_base: Path, tmp_path: Path) -> None:
    manifest = finetune_manifest(str(llama_base), tmp_path, task="sequence-classification", method="prompt-tuning")
    manifest["spec"]["export"] = {"prune": {"sparsity": 0.5}}
    with pytest.raises(QuantizeError, match=r"^export\.prune is not valid with method: prompt-tuning"):
        train(parse_job(manifest), checkpoint_root=str(tmp_path), base_model_uri=str(llama_base))
