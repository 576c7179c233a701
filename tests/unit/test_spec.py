"""The job spec: examples are valid, defaults are sane, and bad input names the field at fault."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from support.jobs import DELETE, EXAMPLES, ROOT, example, with_change, write_manifest
from support.processes import run_cli

from kubeforge.spec import (
    FinetuneJob,
    PretrainJob,
    SpecError,
    checkpoint_uri,
    export_uri,
    load_jobs,
    load_manifests,
    parse_job,
)

PRETRAIN = example("pretrain-tiny.yaml")[0]
FINETUNE = example("finetune-lora-classify.yaml")[0]


BAD_INPUTS = [
    # (job, path, value, the field the message must name, words the message must contain)
    (PRETRAIN, "kind", "TrainJob", "kind", "PretrainJob"),
    (PRETRAIN, "apiVersion", "kubeforge.io/v2", "apiVersion", "kubeforge.io/v1alpha1"),
    (PRETRAIN, "metadata.name", "Tiny_GPT", "metadata.name", "lowercase DNS label"),
    (PRETRAIN, "spec.trainng", {"maxSteps": 3}, "spec.trainng", "unknown field"),
    (PRETRAIN, "spec.training.maxSteps", 0, "spec.training.maxSteps", "greater than or equal to 1"),
    (PRETRAIN, "spec.training.maxSteps", "many", "spec.training.maxSteps", "integer"),
    (PRETRAIN, "spec.training.learningRate", -0.1, "spec.training.learningRate", "greater than 0"),
    (PRETRAIN, "spec.training.precision", "fp16", "spec.training.precision", "'auto', 'bf16' or 'fp32'"),
    (PRETRAIN, "spec.training.lrSchedule", "step", "spec.training.lrSchedule", "cosine"),
    (PRETRAIN, "spec.training.epochs", 2, "spec.training", "exactly one of maxSteps or epochs"),
    (PRETRAIN, "spec.training.maxSteps", DELETE, "spec.training", "exactly one of maxSteps or epochs"),
    (PRETRAIN, "spec.training.warmupSteps", 300, "spec.training", "warmupSteps (300) must be below maxSteps"),
    (PRETRAIN, "spec.training.batchSize", 0, "spec.training.batchSize", "greater than or equal to 1"),
    (PRETRAIN, "spec.model.architecture", "mamba", "spec.model.architecture", "'gpt2' or 'llama'"),
    (PRETRAIN, "spec.model.size", "huge", "spec.model.size", "tiny"),
    (PRETRAIN, "spec.model.numHeads", 3, "spec.model", "multiple of numHeads"),
    (PRETRAIN, "spec.tokenizer.vocabSize", 10, "spec.tokenizer.vocabSize", "greater than or equal to 260"),
    (PRETRAIN, "spec.data.train", DELETE, "spec.data.train", "Field required"),
    (PRETRAIN, "spec.data.train.uri", "", "spec.data.train.uri", "at least 1 character"),
    (PRETRAIN, "spec.data.train.uri", "gs://bucket/x", "spec.data.train.uri", "s3://bucket/prefix URI"),
    (PRETRAIN, "spec.data.train.format", "csv", "spec.data.train.format", "'jsonl' or 'parquet'"),
    (PRETRAIN, "spec.data.evalFraction", 0.9, "spec.data.evalFraction", "less than 0.5"),
    (PRETRAIN, "spec.checkpoint.keep", 0, "spec.checkpoint.keep", "greater than or equal to 1"),
    (PRETRAIN, "spec.checkpoint.uri", "s3://", "spec.checkpoint.uri", "bucket of 3-63 characters"),
    (PRETRAIN, "spec.resources.workers", 0, "spec.resources.workers", "greater than or equal to 1"),
    (PRETRAIN, "spec.resources.memory", "8 gigs", "spec.resources.memory", "Kubernetes quantity"),
    (PRETRAIN, "spec.metrics.port", 70000, "spec.metrics.port", "less than or equal to 65535"),
    (PRETRAIN, "spec.s3", {"endpointUrl": "minio:9000"}, "spec.s3.endpointUrl", "http:// or https:// URL"),
    (PRETRAIN, "spec.resources.processesPerWorker", 2, "spec.resources", "one process per GPU"),
    (PRETRAIN, "spec.podTemplate.tolerations", [{"key": "gpu", "operator": "Maybe"}],
     "spec.podTemplate.tolerations[0].operator", "'Exists' or 'Equal'"),
    (PRETRAIN, "spec.podTemplate", {"volumeMounts": [{"name": "cache", "mountPath": "/data"}]}, "spec.podTemplate",
     "no volume 'cache'"),
    (PRETRAIN, "spec.podTemplate", {"volumes": [{"name": "cache"}]}, "spec.podTemplate.volumes[0]",
     "exactly one of persistentVolumeClaim"),
    (PRETRAIN, "spec.podTemplate", {"env": [{"name": "WORLD_SIZE", "value": "64"}]}, "spec.podTemplate.env[0]",
     "set by the operator"),
    (PRETRAIN, "spec.podTemplate", {"labels": {"kubeforge.io/rank": "0"}}, "spec.podTemplate", "operator's"),
    (PRETRAIN, "spec.podTemplate.shmSize", "lots", "spec.podTemplate.shmSize", "Kubernetes quantity"),
    (PRETRAIN, "spec.podTemplate.podSpec", {}, "spec.podTemplate.podSpec", "unknown field"),
    (PRETRAIN, "spec.gang.podGroup", "yunikorn", "spec.gang.podGroup", "'volcano' or 'coscheduling'"),
    (PRETRAIN, "spec.gang.queueName", "Team A", "spec.gang.queueName", "lowercase DNS label"),
    # Finetuning options make no sense on a pretrain job.
    (PRETRAIN, "spec.method", "lora", "spec.method", "unknown field"),
    (PRETRAIN, "spec.lora", {"r": 8}, "spec.lora", "unknown field"),
    (FINETUNE, "spec.baseModel", {}, "spec.baseModel", "exactly one of uri, fromPretrainJob or fromSweepJob"),
    (FINETUNE, "spec.baseModel", {"uri": "s3://models/m", "fromPretrainJob": "x"}, "spec.baseModel",
     "exactly one of uri, fromPretrainJob or fromSweepJob"),
    (FINETUNE, "spec.baseModel", {"fromPretrainJob": "x", "fromSweepJob": "y"}, "spec.baseModel",
     "exactly one of uri, fromPretrainJob or fromSweepJob"),
    (FINETUNE, "spec.baseModel", {"fromSweepJob": "Lr Search"}, "spec.baseModel.fromSweepJob", "lowercase DNS label"),
    (FINETUNE, "spec.baseModel.fromPretrainJob", "Not A Name", "spec.baseModel.fromPretrainJob", "lowercase DNS label"),
    (FINETUNE, "spec.task", "translation", "spec.task", "'causal-lm' or 'sequence-classification'"),
    (FINETUNE, "spec.method", "qlora", "spec.method", "'adalora' or 'distill'"),
    (FINETUNE, "spec.method", "full", "spec", "lora is only valid with method: lora"),
    (FINETUNE, "spec.lora.r", 0, "spec.lora.r", "greater than or equal to 1"),
    (FINETUNE, "spec.lora.dropout", 1.0, "spec.lora.dropout", "less than 1"),
    (FINETUNE, "spec.lora.targetModules", [], "spec.lora.targetModules", "at least 1 item"),
    (FINETUNE, "spec.lora.quantizeBase", "2bit", "spec.lora.quantizeBase", "'4bit' or '8bit'"),
    (FINETUNE, "spec.ia3", {"r": 4}, "spec.ia3.r", "unknown field"),
    (FINETUNE, "spec.promptTuning", {"numVirtualTokens": 8}, "spec",
     "promptTuning is only valid with method: prompt-tuning"),
    (FINETUNE, "spec.adalora", {"targetR": 4}, "spec", "adalora is only valid with method: adalora"),
    (FINETUNE, "spec.model", {"size": "tiny"}, "spec.model", "unknown field"),
    (FINETUNE, "spec.data.labelField", "", "spec.data.labelField", "at least 1 character"),
    (FINETUNE, "spec.data.packing", True, "spec", "data.packing is only valid with task: causal-lm"),
    (FINETUNE, "spec.training.groupByLength", "sometimes", "spec.training.groupByLength", "valid boolean"),
    (FINETUNE, "spec.export.quantize", "int3", "spec.export.quantize", "'int8' or 'int4'"),
    (FINETUNE, "spec.export", {"keepFullPrecision": False}, "spec.export", "keepFullPrecision: false needs quantize"),
    (FINETUNE, "spec.export", {"prune": {"sparsity": 1.0}}, "spec.export.prune.sparsity", "less than 1"),
    (FINETUNE, "spec.export", {"prune": {"amount": 0.5}}, "spec.export.prune.sparsity", "required"),
    (PRETRAIN, "spec.export", {"quantize": "int8", "keepFullPrecision": False}, "spec",
     "keepFullPrecision: false is only valid on a FinetuneJob"),
    # The name becomes the Service `<name>-ptj`: a DNS-1035 label of at most 63 characters.
    (PRETRAIN, "metadata.name", "7b-pretrain", "metadata.name", "starts with a letter"),
    (PRETRAIN, "metadata.name", "a" * 60, "metadata.name", "at most 59 characters"),
]

# Each method's own settings block, set wrongly: the error names the field.
BAD_METHOD_SETTINGS = [
    ("ia3", "spec.ia3", {"feedforwardModules": ["c_fc"]}, "spec.ia3", "feedforwardModules needs targetModules"),
    ("ia3", "spec.ia3", {"targetModules": ["c_attn"], "feedforwardModules": ["c_fc"]}, "spec.ia3",
     "feedforwardModules must be among targetModules"),
    ("ia3", "spec.ia3.targetModules", [], "spec.ia3.targetModules", "at least 1 item"),
    ("prompt-tuning", "spec.promptTuning.numVirtualTokens", 0, "spec.promptTuning.numVirtualTokens",
     "greater than or equal to 1"),
    ("prefix-tuning", "spec.prefixTuning.numVirtualTokens", 10_000, "spec.prefixTuning.numVirtualTokens",
     "less than or equal to 512"),
    ("prefix-tuning", "spec.lora", {"r": 4}, "spec", "lora is only valid with method: lora"),
    ("prefix-tuning", "spec.task", "sequence-classification", "spec",
     "method: prefix-tuning is only valid with task: causal-lm"),
    ("adalora", "spec.adalora", {"initR": 4, "targetR": 8}, "spec.adalora", "targetR must not exceed initR"),
    ("adalora", "spec.adalora.beta1", 1.0, "spec.adalora.beta1", "less than 1"),
    ("adalora", "spec.adalora.deltaT", 0, "spec.adalora.deltaT", "greater than or equal to 1"),
    ("distill", "spec.distill", {"alpha": 0.5}, "spec", "teacher is required with method: distill"),
    ("distill", "spec.teacher", {}, "spec.teacher", "exactly one of uri or fromFinetuneJob"),
    ("distill", "spec.teacher", {"uri": "s3://models/t", "fromFinetuneJob": "t"}, "spec.teacher",
     "exactly one of uri or fromFinetuneJob"),
    ("distill", "spec.teacher.fromFinetuneJob", "Big Teacher", "spec.teacher.fromFinetuneJob", "lowercase DNS label"),
    ("distill", "spec.teacher.uri", "gs://models/t", "spec.teacher.uri", "s3://bucket/prefix URI"),
    ("distill", "spec.distill.temperature", 0, "spec.distill.temperature", "greater than 0"),
    ("distill", "spec.distill.alpha", 1.5, "spec.distill.alpha", "less than or equal to 1"),
    ("full", "spec.teacher", {"uri": "s3://models/t"}, "spec", "teacher is required with method: distill and only"),
    ("full", "spec.distill", {"alpha": 0.5}, "spec", "distill is only valid with method: distill"),
]


@pytest.mark.parametrize(("job", "path", "value", "field", "words"), BAD_INPUTS,
                         ids=[f"{row[1]}={row[2]!r}" for row in BAD_INPUTS])
def test_bad_input_names_the_field(job: dict[str, Any], path: str, value: Any, field: str, words: str) -> None:
    with pytest.raises(SpecError) as raised:
        parse_job(with_change(job, path, value))
    problems = raised.value.problems
    assert any(p.startswith(f"{field}: ") and words in p for p in problems), problems


@pytest.mark.parametrize(("method", "path", "value", "field", "words"), BAD_METHOD_SETTINGS,
                         ids=[f"{row[0]}:{row[1]}={row[2]!r}" for row in BAD_METHOD_SETTINGS])
def test_bad_method_settings_name_the_field(method: str, path: str, value: Any, field: str, words: str) -> None:
    document = with_change(with_change(FINETUNE, "spec.method", method), "spec.lora", DELETE)
    if method == "prefix-tuning" and path != "spec.task":
        document = with_change(document, "spec.task", "causal-lm")
    with pytest.raises(SpecError) as raised:
        parse_job(with_change(document, path, value))
    problems = raised.value.problems
    assert any(p.startswith(f"{field}: ") and words in p for p in problems), problems


def test_a_distilling_job_names_its_teacher_and_defaults_its_settings() -> None:
    document = with_change(with_change(FINETUNE, "spec.method", "distill"), "spec.lora", DELETE)
    job = parse_job(with_change(document, "spec.teacher", {"fromFinetuneJob": "big-teacher"}))
    assert isinstance(job, FinetuneJob) and job.spec.teacher is not None
    assert job.spec.teacher.from_finetune_job == "big-teacher"
    settings = job.spec.distill_settings()
    assert (settings.temperature, settings.alpha) == (2.0, 0.5)
    other = parse_job(with_change(document, "spec.teacher", {"fromFinetuneJob": "other-teacher"}))
    assert other.spec_hash() != job.spec_hash()  # another teacher trains another student


def test_virtual_tokens_refuse_packing() -> None:
    document = with_change(with_change(FINETUNE, "spec.method", "prompt-tuning"), "spec.lora", DELETE)
    document = with_change(with_change(document, "spec.task", "causal-lm"), "spec.data.packing", True)
    with pytest.raises(SpecError, match="data.packing is not valid with method: prompt-tuning"):
        parse_job(document)


def test_every_example_is_valid() -> None:
    manifests = sorted(EXAMPLES.glob("*.yaml"))
    assert len(manifests) >= 3
    for manifest in manifests:
        assert load_manifests(manifest.read_text()), manifest


def test_pipeline_example_chains_finetune_to_pretrain() -> None:
    pretrain, finetune = load_jobs((EXAMPLES / "pipeline.yaml").read_text())
    assert isinstance(pretrain, PretrainJob) and isinstance(finetune, FinetuneJob)
    assert finetune.spec.base_model.from_pretrain_job == pretrain.name
    assert finetune.spec.method == "lora" and finetune.spec.task == "sequence-classification"


def test_defaults_and_presets() -> None:
    job = parse_job(PRETRAIN)
    assert isinstance(job, PretrainJob)
    assert job.spec.model.dimensions() == (64, 2, 2, 256)
    assert job.spec.training.precision == "auto"
    overridden = parse_job(with_change(PRETRAIN, "spec.model", {"size": "small", "numLayers": 6}))
    assert overridden.spec.model.dimensions() == (256, 6, 4, 1024)  # type: ignore[union-attr]
    assert job.spec.resources.allow_cpu_fallback is True


def test_manifest_round_trips_through_yaml() -> None:
    job = parse_job(FINETUNE)
    again = parse_job(yaml.safe_load(yaml.safe_dump(job.to_manifest())))
    assert again == job
    assert again.spec_hash() == job.spec_hash()
    assert parse_job(with_change(FINETUNE, "spec.training.seed", 5)).spec_hash() != job.spec_hash()


def test_objects_read_back_from_a_cluster_parse() -> None:
    """The operator parses what the API server returns: extra metadata and a status are not errors."""
    live = with_change(PRETRAIN, "metadata.uid", "0d2f6c1e-8b3a-4b8e-9a51-3c1f5a7e9d10")
    live["metadata"]["resourceVersion"] = "812"
    live["status"] = {"phase": "Running"}
    job = parse_job(live)
    assert job.metadata.uid and "status" not in job.to_manifest()
    assert checkpoint_uri(job, "s3://models/kf").endswith("/default/pretrainjob/tiny-shakespeare-0d2f6c1e")


def test_outputs_are_derived_from_the_job() -> None:
    job = parse_job(PRETRAIN)
    assert checkpoint_uri(job, "runs") == "runs/default/pretrainjob/tiny-shakespeare"
    assert export_uri(checkpoint_uri(job, "s3://b/p/")) == "s3://b/p/default/pretrainjob/tiny-shakespeare/export"
    explicit = parse_job(with_change(PRETRAIN, "spec.checkpoint.uri", "s3://ckpt/mine"))
    assert checkpoint_uri(explicit, "runs") == "s3://ckpt/mine"


def test_multi_document_errors_say_which_document() -> None:
    bad = with_change(FINETUNE, "spec.training.batchSize", -1)
    text = yaml.safe_dump_all([PRETRAIN, bad])
    with pytest.raises(SpecError, match=r"document 2: spec.training.batchSize"):
        load_jobs(text)
    with pytest.raises(SpecError, match="appears twice"):
        load_jobs(yaml.safe_dump_all([PRETRAIN, PRETRAIN]))
    with pytest.raises(SpecError, match="not valid YAML"):
        load_jobs("kind: [")


def test_cli_reports_bad_spec_without_a_traceback(tmp_path: Path) -> None:
    """A bad manifest exits 2 (never retried) with the field named, and no stack trace."""
    manifest = write_manifest(tmp_path / "bad.yaml", with_change(PRETRAIN, "spec.training.learningRate", 0))
    for command in (["validate", str(manifest)], ["run", str(manifest)], ["train", "--spec", str(manifest)]):
        result = run_cli(*command, timeout=120)
        assert result.returncode == 2, result.stderr
        assert "spec.training.learningRate: Input should be greater than 0" in result.stderr
        assert "Traceback" not in result.stderr
    missing = run_cli("validate", str(ROOT / "no-such.yaml"), timeout=60)
    assert missing.returncode == 2 and "No such file" in missing.stderr
