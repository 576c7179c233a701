"""The parameter-efficient finetuning methods: each trains, logs what it trains, exports a model
that loads and predicts as its eval did, and resumes exactly; bad settings are refused by field."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from support.jobs import EXAMPLES, ROOT, write_manifest
from support.processes import free_port

from kubeforge.spec import FinetuneJob, JobError, ModelSpec, TokenizerSpec, parse_job
from kubeforge.trainer import data as trainer_data
from kubeforge.trainer.checkpoint import step_prefix
from kubeforge.trainer.loop import eval_metrics, train
from kubeforge.trainer.models import build_pretrain_model
from kubeforge.trainer.tokenization import train_tokenizer

REVIEWS = EXAMPLES / "data" / "reviews"
INSTRUCTIONS = EXAMPLES / "data" / "instructions" / "train.jsonl"

#: Each method with settings for a tiny GPT-2 (method, its settings block's name, the block).
METHODS = {
    "dora": ("lora", "lora", {"r": 4, "useDora": True}),
    "rslora": ("lora", "lora", {"r": 4, "useRslora": True}),
    "ia3": ("ia3", "ia3", {}),
    "prompt-tuning": ("prompt-tuning", "promptTuning", {"numVirtualTokens": 8}),
    "prefix-tuning": ("prefix-tuning", "prefixTuning", {"numVirtualTokens": 8}),
    "adalora": ("adalora", "adalora", {"initR": 6, "targetR": 2, "tinit": 4, "tfinal": 4, "deltaT": 2}),
    # QLoRA: bitsandbytes' 4-bit NF4 and 8-bit LLM.int8() bases, on its CPU backend.
    "qlora-4bit": ("lora", "lora", {"r": 4, "quantizeBase": "4bit"}),
    "qlora-8bit": ("lora", "lora", {"r": 4, "quantizeBase": "8bit"}),
}


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 with a tokenizer trained on the example data, saved as a Hugging Face model."""
    texts = [r["text"] for r in records(REVIEWS / "train.jsonl")]
    texts += [r["prompt"] + " " + r["response"] for r in records(INSTRUCTIONS)]
    tokenizer = train_tokenizer(texts, TokenizerSpec(vocab_size=512))
    directory = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    build_pretrain_model(ModelSpec(size="tiny"), tokenizer, 128).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def finetune(name: str, base: Path, root: Path, task: str = "sequence-classification", steps: int = 24,
             learning_rate: float = 1e-2, **spec: Any) -> FinetuneJob:
    method, block, settings = METHODS[name]
    data = ({"train": {"uri": str(REVIEWS / "train.jsonl")}, "eval": {"uri": str(REVIEWS / "eval.jsonl")}}
            if task == "sequence-classification" else {"train": {"uri": str(INSTRUCTIONS)}})
    job = parse_job({
        "apiVersion": "kubeforge.io/v1alpha1", "kind": "FinetuneJob", "metadata": {"name": f"peft-{name}"},
        "spec": {
            "baseModel": {"uri": str(base)}, "task": task, "method": method, block: settings, "data": data,
            "training": {"maxSteps": steps, "batchSize": 16, "sequenceLength": 64, "learningRate": learning_rate,
                         "warmupSteps": 2, "evalInterval": 1000, "evalBatches": 2, "logInterval": 4},
            "checkpoint": {"uri": str(root), "intervalSteps": 1000},
            "resources": {"gpusPerWorker": 0}, "metrics": {"port": 0}, **spec,
        },
    })
    assert isinstance(job, FinetuneJob)
    return job


def run(job: FinetuneJob, base: Path) -> Any:
    return train(job, checkpoint_root=job.spec.checkpoint.uri, base_model_uri=str(base))


TRAINABLE = re.compile(r"^(\S+): (\d+) of (\d+) parameters trainable")


#: Prefix tuning is refused for classification (tests/unit/test_spec.py): peft passes the prefix as
#: past_key_values, which transformers 5's classifiers no longer take.
CLASSIFIERS = [name for name in METHODS if name != "prefix-tuning"]


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_each_method_trains_and_exports_a_model_that_classifies_as_its_eval(
        name: str, base: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    job = finetune(name, base, tmp_path / "out", steps=16)
    with caplog.at_level(logging.INFO, logger="kubeforge.trainer"):
        result = run(job, base)
    trained = [m for m in map(TRAINABLE.match, caplog.messages) if m]
    assert len(trained) == 1 and trained[0].group(1) == job.spec.method, caplog.messages
    assert 0 < int(trained[0].group(2)) < int(trained[0].group(3)) / 10  # a small part of the model
    assert result.trainable_parameters == int(trained[0].group(2))  # what the status reports
    final = result.final_eval
    assert 0.0 <= final["accuracy"] <= 1.0 and result.step == 16

    exported = load_export(tmp_path / "out" / "export", result.export_format)
    assert result.export_format == ("base+adapter" if name == "prompt-tuning" else "merged")
    assert not any(n for n, _ in exported.named_parameters() if "lora" in n or "ia3" in n)
    tokenizer = exported_tokenizer(tmp_path / "out" / "export")
    _, eval_set, _ = trainer_data.classification_sets(job.spec.data, None, tokenizer, 64)
    batches = trainer_data.eval_batches(eval_set, 16, 2, 0, 1)
    again = eval_metrics(exported, batches, True, 2, cpu_runtime(), None)
    assert again["accuracy"] == pytest.approx(final["accuracy"])
    assert again["loss"] == pytest.approx(final["loss"], abs=1e-4)


def load_export(directory: Path, export_format: str | None) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(directory)
    if export_format == "base+adapter":
        from peft import PeftModel

        return PeftModel.from_pretrained(model, directory / "adapter")
    return model


def exported_tokenizer(directory: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def cpu_runtime() -> Any:
    from kubeforge.trainer import distributed

    return distributed.Runtime(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


@pytest.mark.parametrize("name", list(METHODS))
def test_each_method_lowers_the_eval_loss_of_instruction_tuning(name: str, base: Path, tmp_path: Path) -> None:
    """Causal-LM loss over the responses only: virtual tokens lengthen every sequence, and the
    labels and attention mask must still line up with the tokens they belong to."""
    # Methods with few parameters, far from the loss (virtual tokens, rescaling vectors), learn at
    # higher rates, as in their papers.
    learning_rate = {"prompt-tuning": 1.0, "prefix-tuning": 3e-1, "ia3": 1.0, "adalora": 5e-2}.get(name, 1e-2)
    result = run(finetune(name, base, tmp_path / "out", task="causal-lm", steps=32, learning_rate=learning_rate), base)
    start, final = result.eval_history[0]["loss"], result.final_eval["loss"]
    print(f"{name}: eval loss {start:.4f} -> {final:.4f}")
    # A prompt reaches the loss only through attention to it: on this untrained base it moves the loss
    # by about 0.01 (more steps do not help), the others by 0.1 or more.
    assert final < start - (0.005 if name == "prompt-tuning" else 0.05), result.eval_history


@pytest.mark.parametrize("name", list(METHODS))
def test_a_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_result(
        name: str, base: Path, tmp_path: Path) -> None:
    """Killed at step 6, AdaLoRA's budget is shrinking: its importance scores and the ranks it has
    allocated must come back as they were for the run to go on as it would have."""
    job = finetune(name, base, tmp_path / "out", task="causal-lm", steps=12)
    job = job.model_copy(update={"spec": job.spec.model_copy(update={
        "checkpoint": job.spec.checkpoint.model_copy(update={"interval_steps": 6})})})
    uninterrupted = run(job, base)
    shutil.rmtree(tmp_path / "out" / step_prefix(12))  # as if the run had died after its step-6 checkpoint
    resumed = run(job, base)
    assert resumed.resumed_from_step == 6 and resumed.step == 12
    assert resumed.final_eval["loss"] == uninterrupted.final_eval["loss"]
    assert resumed.train_loss == uninterrupted.train_loss
    assert resumed.adapter_ranks == uninterrupted.adapter_ranks
    if name == "adalora":  # targetR 2 on average over the layers, from initR 6
        assert uninterrupted.adapter_ranks and sum(uninterrupted.adapter_ranks.values()) == 2 * len(
            uninterrupted.adapter_ranks)


REFUSED = [
    ("adalora", {"training": {"parallelism": "fsdp"}}, "training.parallelism: fsdp does not support method adalora"),
    ("prompt-tuning", {"training": {"parallelism": "fsdp"}}, "training.parallelism: fsdp does not support"),
    ("qlora-4bit", {"training": {"parallelism": "fsdp"}}, "lora.quantizeBase: training.parallelism fsdp cannot"),
    ("ia3", {"ia3": {"targetModules": ["no_such_layer"]}}, "ia3.targetModules: "),
    ("adalora", {"adalora": {"tinit": 10, "tfinal": 10}}, "adalora: "),
    # The base has 128 positions: virtual tokens take positions before the sequence's.
    ("prompt-tuning", {"promptTuning": {"numVirtualTokens": 80}}, "promptTuning.numVirtualTokens: 80 virtual tokens"),
]


@pytest.mark.parametrize(("name", "change", "words"), REFUSED, ids=[f"{r[0]}:{r[2].split(':')[0]}" for r in REFUSED])
def test_what_a_method_cannot_train_is_refused_naming_the_field(
        name: str, change: dict[str, Any], words: str, base: Path, tmp_path: Path) -> None:
    document = finetune(name, base, tmp_path / "out", task="causal-lm", steps=12).to_manifest()
    for section, fields in change.items():
        document["spec"][section] = {**document["spec"].get(section, {}), **fields}
    job = parse_job(document)
    assert isinstance(job, FinetuneJob)
    with pytest.raises(JobError) as refused:
        run(job, base)
    assert str(refused.value).startswith(words), refused.value


def train_on_two_processes(manifest: Path, base: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`kubeforge train` under torchrun, as a pod's 2 processes run it: checkpoints and export in
    tmp_path/out, the result in tmp_path/result.json."""
    binaries = Path(sys.executable).parent
    command = [
        str(binaries / "torchrun"), "--nnodes", "1", "--nproc_per_node", "2", "--rdzv_backend", "static",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "--no-python", str(binaries / "kubeforge"),
        "train", "--spec", str(manifest), "--checkpoint-uri", str(tmp_path / "out"), "--result",
        str(tmp_path / "result.json"), "--base-model-uri", str(base),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{binaries}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


RANKS = re.compile(r"INFO rank(\d) \S+: AdaLoRA's ranks: (.*)")


def test_adalora_under_ddp_allocates_the_same_ranks_on_every_process(base: Path, tmp_path: Path) -> None:
    job = finetune("adalora", base, tmp_path / "out", task="causal-lm", steps=12).to_manifest()
    job["spec"]["training"]["gradientAccumulationSteps"] = 2  # reallocations once per optimizer step
    manifest = write_manifest(tmp_path / "job.yaml", job)
    process = train_on_two_processes(manifest, base, tmp_path)
    log = process.stdout + process.stderr
    assert process.returncode == 0, log[-3000:]
    ranks = dict(RANKS.findall(log))
    assert set(ranks) == {"0", "1"} and ranks["0"] == ranks["1"], log[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["workers"] == 2 and result["adapterRanks"]
    assert ranks["0"] == ", ".join(f"{name}={rank}" for name, rank in result["adapterRanks"].items())


@pytest.mark.parametrize("name", ["dora", "rslora", "ia3"])
def test_lora_and_ia3_train_sharded_and_export_a_whole_model(name: str, base: Path, tmp_path: Path) -> None:
    """training.parallelism fsdp, 2 processes: the adapters are sharded with the base, and the export
    gathers them into one merged model that loads with from_pretrained."""
    job = finetune(name, base, tmp_path / "out", task="causal-lm", steps=8).to_manifest()
    job["spec"]["training"]["parallelism"] = "fsdp"
    manifest = write_manifest(tmp_path / "job.yaml", job)
    process = train_on_two_processes(manifest, base, tmp_path)
    assert process.returncode == 0, (process.stdout + process.stderr)[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["workers"] == 2 and result["finalEval"]["loss"] < result["evalHistory"][0]["loss"]
    committed = json.loads((tmp_path / "out" / step_prefix(8) / "manifest.json").read_text())
    assert committed["sharded"] and committed["worldSize"] == 2
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "export")
    assert not any("lora" in key or "ia3" in key for key in exported.state_dict())  # merged, not wrapped


def test_qlora_under_ddp_checkpoints_the_adapters_alone_and_exports_a_whole_model(base: Path, tmp_path: Path) -> None:
    """2 processes on a 4-bit base: the checkpoint holds only what trains (the base is quantized
    afresh from the base model at each start), and the export is one full-precision merged model."""
    job = finetune("qlora-4bit", base, tmp_path / "out", task="causal-lm", steps=8).to_manifest()
    job["spec"]["checkpoint"]["intervalSteps"] = 4
    manifest = write_manifest(tmp_path / "job.yaml", job)
    process = train_on_two_processes(manifest, base, tmp_path)
    assert process.returncode == 0, (process.stdout + process.stderr)[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["workers"] == 2 and result["finalEval"]["loss"] < result["evalHistory"][0]["loss"]
    saved = torch.load(tmp_path / "out" / step_prefix(8) / "model.pt", weights_only=True)
    assert saved and all(".lora_A." in key or ".lora_B." in key for key in saved), sorted(saved)[:5]
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "export")
    weights = exported.state_dict()
    assert not any("lora" in key or "absmax" in key for key in weights)  # merged, full precision
    assert all(t.dtype == torch.float32 for t in weights.values())


def test_qlora_warm_starts_from_a_qlora_checkpoint_under_activation_checkpointing(base: Path, tmp_path: Path) -> None:
    """checkpoint.warmStartFrom another QLoRA job's checkpoint, which holds the adapters alone: the
    new job starts from the model the first one ended with (its step-0 eval is that job's final one),
    its layers recomputed in the backward pass (training.activationCheckpointing)."""
    first = finetune("qlora-4bit", base, tmp_path / "first", task="causal-lm", steps=6)
    ended = run(first, base)
    document = finetune("qlora-4bit", base, tmp_path / "second", task="causal-lm", steps=6).to_manifest()
    document["spec"]["checkpoint"]["warmStartFrom"] = str(tmp_path / "first")
    document["spec"]["training"]["activationCheckpointing"] = True
    second = parse_job(document)
    assert isinstance(second, FinetuneJob)
    started = run(second, base)
    assert started.eval_history[0]["loss"] == ended.final_eval["loss"]
    assert started.step == 6 and started.final_eval["loss"] < started.eval_history[0]["loss"]
