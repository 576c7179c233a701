"""The CRDs in crds/ are generated from the spec models, and the API server would reject what they reject.

Nothing here trusts the emulator: the schema is checked with a JSON Schema validator (OpenAPI v3.0 is
Draft 4 for the keywords used) and the CEL rules with a CEL interpreter, after applying the schema's
defaults as the API server does.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from k8s.admission import admit, crd_file, schema_of
from support.jobs import DELETE, EXAMPLES, example, with_change

from kubeforge.crds import render
from kubeforge.spec import ALL_KINDS, KINDS

PRETRAIN = example("pretrain-tiny.yaml")[0]
FINETUNE = example("finetune-lora-classify.yaml")[0]


def test_crds_match_the_spec_models() -> None:
    for kind in ALL_KINDS:
        assert crd_file(kind).read_text() == render(kind), (
            f"{crd_file(kind)} is stale: run `kubeforge crds` and commit the result")


def test_schemas_are_structural() -> None:
    def walk(node: dict[str, Any], path: str) -> None:
        assert not {"anyOf", "oneOf", "$ref", "title", "additionalProperties"} & set(node) or (
            set(node) & {"additionalProperties"} and node.get("type") == "object"), path
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), f"{path} has no type"
        for name, sub in node.get("properties", {}).items():
            walk(sub, f"{path}.{name}")
        if "items" in node:
            walk(node["items"], f"{path}[]")

    for kind in ALL_KINDS:
        walk(schema_of(kind), kind)


def test_names_columns_and_status_subresource() -> None:
    for kind, names in KINDS.items():
        crd = yaml.safe_load(crd_file(kind).read_text())
        version = crd["spec"]["versions"][0]
        assert crd["spec"]["names"]["shortNames"] == [names.short_name]
        assert crd["spec"]["names"]["categories"] == ["kubeforge"]
        assert version["subresources"] == {"status": {}}
        assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Phase", "Step", "Loss", "Restarts",
                                                                            "Age", "Trainable", "Quantized", "Pruned"]
    sweep = yaml.safe_load(crd_file("SweepJob").read_text())
    assert sweep["spec"]["names"]["shortNames"] == ["swj"] and sweep["spec"]["names"]["categories"] == ["kubeforge"]
    assert [c["jsonPath"] for c in sweep["spec"]["versions"][0]["additionalPrinterColumns"]] == [
        ".status.phase", ".status.trialsProgress", ".status.bestValue", ".status.prunedTrials",
        ".metadata.creationTimestamp"]
    spec = schema_of("PretrainJob")["properties"]["spec"]["properties"]
    assert spec["training"]["properties"]["precision"]["enum"] == ["auto", "bf16", "fp32"]
    assert spec["checkpoint"]["default"] == {"intervalSteps": 100, "keep": 3}


def test_every_field_is_explained() -> None:
    """`kubectl explain ptj.spec.training.learningRate` has something to say for every field."""
    def undocumented(node: dict[str, Any], path: str) -> list[str]:
        missing = [] if node.get("description") else [path]
        for name, sub in node.get("properties", {}).items():
            missing += undocumented(sub, f"{path}.{name}")
        return missing

    for kind in ALL_KINDS:
        assert undocumented(schema_of(kind)["properties"]["spec"], f"{kind}.spec") == []


def test_every_example_is_admitted() -> None:
    for manifest in sorted(EXAMPLES.glob("*.yaml")):
        for document in yaml.safe_load_all(manifest.read_text()):
            assert admit(document) == [], manifest


def test_a_base_model_from_a_sweep_job_is_admitted_alone() -> None:
    assert admit(with_change(FINETUNE, "spec.baseModel", {"fromSweepJob": "lr-search"})) == []
    assert any("fromSweepJob" in p for p in admit(with_change(FINETUNE, "spec.baseModel", {"fromSweepJob": "LR"})))


REJECTED_BY_SCHEMA = [
    (PRETRAIN, "spec.training.precision", "fp16"),
    (PRETRAIN, "spec.training.learningRate", 0),
    (PRETRAIN, "spec.training.batchSize", 0),
    (PRETRAIN, "spec.training.maxSteps", "many"),
    (PRETRAIN, "spec.model.architecture", "mamba"),
    (PRETRAIN, "spec.data.train", DELETE),
    (PRETRAIN, "spec.resources.memory", "8 gigs"),
    (PRETRAIN, "spec.checkpoint.uri", "gs://elsewhere/x"),
    (FINETUNE, "spec.lora.targetModules", []),
    (FINETUNE, "spec.lora.dropout", 1.0),
    (FINETUNE, "spec.lora.quantizeBase", "2bit"),
    (FINETUNE, "spec.export", {"prune": {"sparsity": 0}}),
    (with_change(FINETUNE, "spec.method", "prefix-tuning"), "spec.prefixTuning.numVirtualTokens", 0),
    (FINETUNE, "spec.task", "translation"),
    (PRETRAIN, "metadata.name", "7b-pretrain"),  # its Service, 7b-pretrain-ptj, would not be a DNS-1035 label
    (FINETUNE, "metadata.name", "a" * 60),  # a-...-ftj would be longer than 63
]


@pytest.mark.parametrize(("job", "path", "value"), REJECTED_BY_SCHEMA,
                         ids=[f"{r[1]}={r[2]!r}" for r in REJECTED_BY_SCHEMA])
def test_schema_rejects_bad_fields(job: dict[str, Any], path: str, value: Any) -> None:
    problems = admit(with_change(job, path, value))
    assert any(p.startswith(path.removeprefix("spec.").split(".")[0]) or path.split(".")[-1] in p
               for p in problems), problems


REJECTED_BY_CEL = [
    (PRETRAIN, "spec.training.epochs", 2, ".spec.training: set exactly one of maxSteps or epochs"),
    (PRETRAIN, "spec.training.maxSteps", DELETE, ".spec.training: set exactly one of maxSteps or epochs"),
    (PRETRAIN, "spec.training.warmupSteps", 300, ".spec.training: warmupSteps must be below maxSteps"),
    (FINETUNE, "spec.baseModel", {}, ".spec.baseModel: set exactly one of uri, fromPretrainJob or fromSweepJob"),
    (FINETUNE, "spec.baseModel", {"uri": "s3://models/m", "fromPretrainJob": "x"},
     ".spec.baseModel: set exactly one of uri, fromPretrainJob or fromSweepJob"),
    (FINETUNE, "spec.baseModel", {"uri": "s3://models/m", "fromSweepJob": "lr-search"},
     ".spec.baseModel: set exactly one of uri, fromPretrainJob or fromSweepJob"),
    (FINETUNE, "spec.baseModel", {"fromPretrainJob": "x", "fromSweepJob": "lr-search"},
     ".spec.baseModel: set exactly one of uri, fromPretrainJob or fromSweepJob"),
    (FINETUNE, "spec.method", "full", ".spec: lora is only valid with method: lora"),
    (FINETUNE, "spec.data.packing", True, ".spec: data.packing is only valid with task: causal-lm"),
    (FINETUNE, "spec.baseModel.tokenSecretRef", {"name": "hub", "key": "token"},
     ".spec.baseModel: tokenSecretRef is only valid with an hf:// uri"),
    (FINETUNE, "spec.data.messagesField", "messages", ".spec: data.messagesField is only valid with task: causal-lm"),
    (FINETUNE, "spec.data.chatTemplate", "{{ messages }}", ".spec.data: chatTemplate is only valid with messagesField"),
    (FINETUNE, "spec.method", "ia3", ".spec: lora is only valid with method: lora"),
    (with_change(FINETUNE, "spec.lora", DELETE), "spec.promptTuning", {"numVirtualTokens": 8},
     ".spec: promptTuning is only valid with method: prompt-tuning"),
    (with_change(FINETUNE, "spec.lora", DELETE), "spec.adalora", {"initR": 4},
     ".spec: adalora is only valid with method: adalora"),
    (with_change(with_change(FINETUNE, "spec.lora", DELETE), "spec.method", "adalora"), "spec.adalora",
     {"initR": 4, "targetR": 8}, ".spec.adalora: targetR must not exceed initR"),
    (with_change(FINETUNE, "spec.lora", DELETE), "spec.method", "prefix-tuning",
     ".spec: method: prefix-tuning is only valid with task: causal-lm"),
    (FINETUNE, "spec.export", {"keepFullPrecision": False}, ".spec.export: keepFullPrecision: false needs quantize"),
    (PRETRAIN, "spec.export", {"quantize": "int8", "keepFullPrecision": False},
     ".spec: export.keepFullPrecision: false is only valid on a FinetuneJob"),
    (with_change(FINETUNE, "spec.lora", DELETE), "spec.method", "distill",
     ".spec: teacher is required with method: distill and only valid with it"),
    (with_change(FINETUNE, "spec.lora", DELETE), "spec.distill", {"alpha": 0.5},
     ".spec: distill is only valid with method: distill"),
    (with_change(with_change(FINETUNE, "spec.lora", DELETE), "spec.method", "distill"), "spec.teacher",
     {"uri": "s3://models/t", "fromFinetuneJob": "t"}, ".spec.teacher: set exactly one of uri or fromFinetuneJob"),
]


@pytest.mark.parametrize(("job", "path", "value", "message"), REJECTED_BY_CEL,
                         ids=[f"{r[1]}={r[2]!r}" for r in REJECTED_BY_CEL])
def test_cel_rules_reject_what_the_models_reject(job: dict[str, Any], path: str, value: Any, message: str) -> None:
    assert message in admit(with_change(job, path, value))


def test_what_is_trained_cannot_change_but_run_policy_can() -> None:
    assert ".spec.model: cannot change after the job is created" in admit(
        with_change(PRETRAIN, "spec.model.size", "small"), old=PRETRAIN)
    assert ".spec.baseModel: cannot change after the job is created" in admit(
        with_change(FINETUNE, "spec.baseModel.fromPretrainJob", "other"), old=FINETUNE)
    full = with_change(with_change(FINETUNE, "spec.lora", DELETE), "spec.method", "full")
    assert ".spec.method: cannot change after the job is created" in admit(full, old=FINETUNE)
    assert admit(with_change(PRETRAIN, "spec.suspend", True), old=PRETRAIN) == []
    for path, value in [("spec.training.maxSteps", 600), ("spec.data.train.uri", "s3://other/train.txt"),
                        ("spec.checkpoint.uri", "s3://other/ckpt")]:
        field = ".".join(path.split(".")[:2])
        assert admit(with_change(PRETRAIN, path, value), old=PRETRAIN) == [
            f".{field}: cannot change after the job is created"], path
    assert ".spec.lora: cannot change after the job is created" in admit(
        with_change(FINETUNE, "spec.lora.r", 4), old=FINETUNE)


def test_only_the_run_policy_may_change_after_creation() -> None:
    """Every spec field is immutable (CEL self == oldSelf) except the run policy and where S3 is."""
    mutable = {"suspend": True, "backoffLimit": 7, "activeDeadlineSeconds": 60, "ttlSecondsAfterFinished": 5,
               "cleanPodPolicy": "None", "terminationGracePeriodSeconds": 30, "stallTimeoutSeconds": 600,
               "resources": {"workers": 2}, "metrics": {"port": 0}, "s3": {"credentialsSecret": "other"},
               "baseModelWaitSeconds": 60, "podTemplate": {"labels": {"team": "nlp"}}, "gang": {"queueName": "q"}}
    for job in (PRETRAIN, FINETUNE):
        fields = set(schema_of(job["kind"])["properties"]["spec"]["properties"])
        changeable = {f for f in fields if f in mutable and admit(with_change(job, f"spec.{f}", mutable[f]),
                                                                  old=job) == []}
        immutable = {f for f in fields - changeable
                     if "self == oldSelf" in str(schema_of(job["kind"])["properties"]["spec"]["properties"][f])}
        assert changeable | immutable == fields, fields - changeable - immutable
