"""The one definition of a kubeforge job.

`PretrainJob` and `FinetuneJob` are read from the very YAML that `kubectl apply` takes. The CRD
schemas, the operator's pods and the trainer's configuration are all derived from these models;
nothing downstream re-parses raw dicts. Field names are camelCase on the wire (Kubernetes
convention) and snake_case in Python.

Keep every model expressible as a Kubernetes structural schema: no unions other than `X | None`,
enums as `Literal`, no free-form maps except where marked.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, cast

import yaml
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError, WithJsonSchema, model_validator
from pydantic.alias_generators import to_camel

API_GROUP = "kubeforge.io"
VERSION = "v1alpha1"

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
#: A job's name: its headless Service is `<name>-ptj` (or -ftj), a DNS-1035 label (a letter first, at
#: most 63 characters), and the name is the value of the pods' job-name label.
JOB_NAME = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
JOB_NAME_MAX_LENGTH = 63 - len("-ptj")
QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"
STORAGE_URI = r"^(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?|[^:]+|file://.+)$"
HTTP_URL = r"^https?://"
#: A model repository on the Hugging Face Hub, at a branch, tag or commit (default: main).
HUB_URI = r"^hf://[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9][A-Za-z0-9._/-]*)?$"
BASE_MODEL_URI = f"({STORAGE_URI}|{HUB_URI})"

#: What each pattern means, for error messages people can act on.
PATTERN_MEANINGS = {
    DNS_LABEL: "a lowercase DNS label (a-z, 0-9 and '-', starting and ending alphanumeric)",
    JOB_NAME: "a lowercase DNS label that starts with a letter (a-z, 0-9 and '-', ending alphanumeric): "
              "the job's Service is named after it",
    QUANTITY: "a Kubernetes quantity such as 2, 500m or 8Gi",
    STORAGE_URI: "an s3://bucket/prefix URI (bucket of 3-63 characters) or a local path",
    HTTP_URL: "an http:// or https:// URL",
    BASE_MODEL_URI: "an s3://bucket/prefix URI, a local path or hf://ORG/NAME[@REVISION] (a Hugging Face Hub model)",
}


class JobError(ValueError):
    """The job can never succeed as written (spec, data, hardware request): retrying will not help."""


class SpecError(JobError):
    """A manifest that is not a valid job; each line names the offending field."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid job spec:\n" + "\n".join(f"  - {p}" for p in problems))


def cel(rule: str, message: str) -> dict[str, Any]:
    """A CEL rule for the CRD schema: the API server enforces what the model validators check."""
    return {"x-kubernetes-validations": [{"rule": rule, "message": message}]}


#: Fields that define what is trained: changing them under a running job would mix two runs.
IMMUTABLE = cel("self == oldSelf", "cannot change after the job is created")


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
        frozen=True,
    )


# ---------------------------------------------------------------------------------------------
# Pretraining: a model built from a transformers config


ARCHITECTURES = ("gpt2", "llama")

#: hidden size, layers, heads, MLP width. `tiny` trains in seconds on a CPU; `125m` is GPT-2 small's
#: shape, `1b` Llama 3.2 1B's (about 1.1B parameters as a llama, 0.8B as a gpt2, plus the embeddings).
SIZE_PRESETS: dict[str, tuple[int, int, int, int]] = {
    "tiny": (64, 2, 2, 256),
    "small": (256, 4, 4, 1024),
    "125m": (768, 12, 12, 3072),
    "1b": (2048, 16, 32, 8192),
}


class ModelSpec(_Model):
    """The architecture to pretrain: a size preset, optionally overridden dimension by dimension."""

    model_config = ConfigDict(json_schema_extra=IMMUTABLE)

    architecture: Literal["gpt2", "llama"] = Field("gpt2", description="transformers model family")
    size: Literal["tiny", "small", "125m", "1b"] = Field(
        "tiny", description="dimension preset (hidden, layers, heads, MLP): tiny 64/2/2/256, small 256/4/4/1024, "
                            "125m 768/12/12/3072 (GPT-2 small), 1b 2048/16/32/8192 (Llama 3.2 1B)")
    hidden_size: int | None = Field(None, ge=8, le=16384, description="overrides the preset")
    num_layers: int | None = Field(None, ge=1, le=256, description="overrides the preset")
    num_heads: int | None = Field(None, ge=1, le=256, description="overrides the preset")
    intermediate_size: int | None = Field(None, ge=8, le=65536, description="MLP width; overrides")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on attention, residuals and embeddings")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelSpec:
        hidden, _, heads, _ = self.dimensions()
        if hidden % heads:
            raise ValueError(f"hiddenSize ({hidden}) must be a multiple of numHeads ({heads})")
        return self

    def dimensions(self) -> tuple[int, int, int, int]:
        """(hidden size, layers, heads, MLP width) after overrides."""
        hidden, layers, heads, mlp = SIZE_PRESETS[self.size]
        return (
            self.hidden_size or hidden,
            self.num_layers or layers,
            self.num_heads or heads,
            self.intermediate_size or mlp,
        )


class TokenizerSpec(_Model):
    """The tokenizer: an existing Hugging Face one (uri), or a byte-level BPE tokenizer trained on a
    sample of the training corpus before pretraining starts."""

    model_config = ConfigDict(json_schema_extra=IMMUTABLE)

    uri: str | None = Field(None, min_length=1, pattern=STORAGE_URI,
                            description="a Hugging Face tokenizer (a directory or s3:// prefix holding "
                                        "tokenizer.json) to use instead of training one")
    vocab_size: int = Field(2048, ge=260, le=262144, description="tokens in the trained vocabulary")
    min_frequency: int = Field(2, ge=1, description="a merge must occur this often in the sample")
    sample_bytes: int = Field(
        64 << 20, ge=1 << 20, le=16 << 30, description="training reads at most this many characters of the "
        "corpus: an even share of each training file's beginning")


class DataSource(_Model):
    """Where data is read from."""

    uri: str = Field(..., min_length=1, pattern=STORAGE_URI,
                     description="a local file or directory, or an s3://bucket/prefix")
    format: Literal["auto", "txt", "jsonl", "parquet"] = Field(
        "auto", description="auto: by file extension (.txt, .jsonl, .parquet; .gz or .zst compress .txt and .jsonl)")


class PretrainData(_Model):
    """Training and eval data."""

    model_config = ConfigDict(json_schema_extra=IMMUTABLE)

    train: DataSource = Field(..., description="the training data")
    eval: DataSource | None = Field(None, description="held-out data; when absent, evalFraction of train")
    eval_fraction: float = Field(0.05, gt=0.0, lt=0.5, description="held out of train when eval is absent")
    text_field: str = Field("text", min_length=1, description="the text field of .jsonl records")


class TrainingSpec(_Model):
    """Optimisation: length, batch, schedule, precision, evaluation."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        *IMMUTABLE["x-kubernetes-validations"],
        {"rule": "has(self.maxSteps) != has(self.epochs)", "message": "set exactly one of maxSteps or epochs"},
        {"rule": "!has(self.maxSteps) || !has(self.warmupSteps) || self.warmupSteps < self.maxSteps",
         "message": "warmupSteps must be below maxSteps"},
    ]})

    max_steps: int | None = Field(None, ge=1, description="optimizer steps; or set epochs")
    epochs: float | None = Field(None, gt=0.0, le=10000, description="passes over the data; or set maxSteps")
    batch_size: int = Field(8, ge=1, le=65536, description="sequences per device per micro-batch")
    gradient_accumulation_steps: int = Field(1, ge=1, le=4096, description="micro-batches per optimizer step")
    sequence_length: int = Field(128, ge=8, le=131072, description="tokens per sequence (packed or truncated)")
    learning_rate: float = Field(3e-4, gt=0.0, le=1.0, description="peak AdamW learning rate")
    warmup_steps: int = Field(0, ge=0, description="linear warmup from 0 to the peak learning rate")
    lr_schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="decay after warmup")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="final LR as a fraction of the peak")
    weight_decay: float = Field(0.01, ge=0.0, le=1.0, description="AdamW decay (not on biases and norms)")
    max_grad_norm: float = Field(1.0, ge=0.0, description="gradient clipping; 0 disables it")
    seed: int = Field(0, ge=0, description="seeds initialisation, shuffling and dropout")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 on GPUs that support it, fp32 on CPU")
    parallelism: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: every process holds the whole model and optimizer; fsdp: parameters, gradients "
                           "and optimizer state sharded across the processes (PyTorch FSDP2), checkpoints sharded "
                           "too and resumable on another number of processes")
    eval_interval: int = Field(100, ge=1, description="steps between evaluations")
    eval_batches: int = Field(50, ge=1, description="at most this many batches per evaluation")
    log_interval: int = Field(10, ge=1, description="steps between log lines and loss metrics")
    group_by_length: bool = Field(
        True, description="finetuning: batch examples of similar length together so little padding is "
                          "computed; the batches stay a function of seed, epoch and step")
    compile: bool = Field(
        False, description="torch.compile the model: faster steps on a GPU after a compilation of a minute or "
                           "so at the start; it gives nothing dependable on CPU (and needs a C++ compiler there)")
    activation_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass instead of keeping them: less GPU "
                           "memory for about a third more compute; the model must support it (transformers' "
                           "gradient checkpointing)")

    @model_validator(mode="after")
    def _one_length(self) -> TrainingSpec:
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of maxSteps or epochs")
        if self.max_steps is not None and self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmupSteps ({self.warmup_steps}) must be below maxSteps ({self.max_steps})")
        return self


class CheckpointSpec(_Model):
    """Where and how often checkpoints are written, and how many are kept."""

    model_config = ConfigDict(json_schema_extra=IMMUTABLE)

    uri: str | None = Field(None, pattern=STORAGE_URI,
                            description="s3://bucket/prefix or a directory; default: derived from the job")
    interval_steps: int = Field(100, ge=1, description="steps between checkpoints (one is always written at the end)")
    keep: int = Field(3, ge=1, le=1000, description="complete checkpoints kept; the newest is never deleted")
    warm_start_from: str | None = Field(
        None, pattern=STORAGE_URI,
        description="another job's checkpoint URI: with no checkpoint of its own yet, this job starts from the "
                    "weights of the newest verified checkpoint there (step 0, fresh optimizer); without it, "
                    "checkpoints of another job at checkpoint.uri are refused")


class S3Spec(_Model):
    """Where S3 is; credentials come from the standard AWS environment variables, in a cluster from a
    Secret given by name (never by value)."""

    model_config = ConfigDict(json_schema_extra=cel(
        "!has(self.kmsKeyId) || (has(self.serverSideEncryption) && self.serverSideEncryption == 'aws:kms')",
        "kmsKeyId is only valid with serverSideEncryption: aws:kms"))

    endpoint_url: str | None = Field(None, pattern=HTTP_URL, description="e.g. http://minio:9000")
    region: str | None = Field(None, description="default: AWS_DEFAULT_REGION, else us-east-1")
    credentials_secret: str | None = Field(
        None, pattern=DNS_LABEL, description="Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    server_side_encryption: Literal["AES256", "aws:kms"] | None = Field(
        None, description="encrypt every object kubeforge writes at rest: AES256 (SSE-S3) or aws:kms (SSE-KMS)")
    kms_key_id: str | None = Field(
        None, min_length=1, description="the KMS key of aws:kms; default: the bucket's or the account's S3 key")

    @model_validator(mode="after")
    def _key_only_with_kms(self) -> S3Spec:
        if self.kms_key_id is not None and self.server_side_encryption != "aws:kms":
            raise ValueError("kmsKeyId is only valid with serverSideEncryption: aws:kms")
        return self


class ResourcesSpec(_Model):
    """Pods, GPUs, trainer processes per pod and the CPU fallback."""

    model_config = ConfigDict(json_schema_extra=cel(
        "!has(self.processesPerWorker) || self.gpusPerWorker == 0 || self.processesPerWorker == self.gpusPerWorker",
        "processesPerWorker must equal gpusPerWorker: one process per GPU"))

    workers: int = Field(1, ge=1, le=1024, description="pods training together")
    gpus_per_worker: int = Field(1, ge=0, le=16, description="nvidia.com/gpu per pod")
    processes_per_worker: int | None = Field(
        None, ge=1, le=64, description="trainer processes per pod; default: one per GPU (gpusPerWorker), else 1")
    cpu: str = Field("2", pattern=QUANTITY, description="CPU request per pod")
    memory: str = Field("8Gi", pattern=QUANTITY, description="memory request and limit per pod")
    allow_cpu_fallback: bool = Field(True, description="run on CPU when no GPU can be had")

    @model_validator(mode="after")
    def _one_process_per_gpu(self) -> ResourcesSpec:
        if self.processes_per_worker is not None and self.gpus_per_worker \
                and self.processes_per_worker != self.gpus_per_worker:
            raise ValueError(f"processesPerWorker ({self.processes_per_worker}) must equal gpusPerWorker "
                             f"({self.gpus_per_worker}): one process per GPU")
        return self

    def processes(self) -> int:
        """Trainer processes in each pod. A job that falls back to CPU keeps this count, so its world
        size, and with it the data each step sees, does not depend on the hardware it got."""
        return self.processes_per_worker or self.gpus_per_worker or 1

    def world_size(self) -> int:
        return self.workers * self.processes()


class MetricsSpec(_Model):
    """The trainer's Prometheus endpoint."""

    port: int = Field(9090, ge=0, le=65535, description="Prometheus endpoint; 0 disables it")


#: The weight-only schemes of export.quantize, as compressed-tensors stores them (what vLLM loads natively).
QUANTIZE_SCHEMES = {
    "int8": "int8 weights, symmetric, one scale per output channel; activations unquantized (W8A16)",
    "int4": "int4 weights, symmetric, one scale per group of 32 input features, packed eight to an int32 "
            "(W4A16)",
}


class PruneSpec(_Model):
    """Magnitude pruning of the exported model's linear layers (torch.nn.utils.prune)."""

    sparsity: float = Field(gt=0.0, lt=1.0, description="the fraction of each linear layer's weights set to "
                            "zero, the smallest in magnitude first (L1, unstructured)")


class ExportSpec(_Model):
    """What the job exports besides its full-precision Hugging Face model: a quantized copy of it,
    a pruned one, or both, each evaluated on the eval set next to the full model."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        *IMMUTABLE["x-kubernetes-validations"],
        {"rule": "!has(self.keepFullPrecision) || self.keepFullPrecision || has(self.quantize)",
         "message": "keepFullPrecision: false needs quantize"},
    ]})

    quantize: Literal["int8", "int4"] | None = Field(
        None, description="also export the model with its Linear layers' weights quantized (compressed-tensors "
        "pack-quantized: int8 " + QUANTIZE_SCHEMES["int8"].removeprefix("int8 weights") + "; int4 "
        + QUANTIZE_SCHEMES["int4"].removeprefix("int4 weights") + "), under export/QUANTIZE/; embeddings and the "
        "output head stay full precision. Needs nn.Linear layers (llama-like bases, not gpt2's Conv1D)")
    prune: PruneSpec | None = Field(
        None, description="also export the model with the smallest-magnitude weights of each linear layer of the "
        "base (gpt2's Conv1D too) set to zero, under export/pruned/; embeddings and the output head stay whole. "
        "Saved dense: as large on disk as the full model")
    keep_full_precision: bool = Field(
        True, description="false: the export is the quantized model alone, at export/ (FinetuneJob only: a "
                          "PretrainJob's export is what finetunes start from)")

    def compresses(self) -> bool:
        """Whether the job exports a compressed copy, evaluated beside its full model."""
        return self.quantize is not None or self.prune is not None

    @model_validator(mode="after")
    def _dropping_full_needs_quantized(self) -> ExportSpec:
        if not self.keep_full_precision and self.quantize is None:
            raise ValueError("keepFullPrecision: false needs quantize")
        return self



# ---------------------------------------------------------------------------------------------
# Where and how the pods run: a typed subset of a PodSpec (not a free-form one, so the CRD checks
# it), and gang admission. None of it changes what is trained.

#: A DNS subdomain (RFC 1123): names of PVCs, Secrets, PriorityClasses, schedulers...
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_.\-]*$"
ABSOLUTE_PATH = r"^/"
PATTERN_MEANINGS |= {
    DNS_SUBDOMAIN: "a lowercase DNS subdomain (a-z, 0-9, '-' and '.')",
    ENV_NAME: "an environment variable name (letters, digits, '_', '.', '-'; not starting with a digit)",
    ABSOLUTE_PATH: "an absolute path",
}
#: Volumes and paths the trainer container always has: a template may not replace them.
RESERVED_VOLUMES = ("shm", "tmp")
RESERVED_MOUNT_PATHS = ("/dev/shm", "/tmp")
#: Variables the operator sets for the trainer (torchrun's contract and the job itself).
RESERVED_ENV = ("KUBEFORGE_JOB", "RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE",
                "MASTER_ADDR", "MASTER_PORT", "POD_IP", "AWS_ENDPOINT_URL")
RESERVED_LABEL_PREFIX = "kubeforge.io/"
MAX_ITEMS = 64
Name = Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)]
LabelMap = dict[Annotated[str, Field(min_length=1, max_length=317)], Annotated[str, Field(max_length=4096)]]


class Toleration(_Model):
    """Lets the pods onto nodes with a matching taint (as in a PodSpec)."""

    key: str | None = Field(None, max_length=317, description="the taint key; empty with Exists matches all")
    operator: Literal["Exists", "Equal"] = Field("Equal", description="Exists: any value")
    value: str | None = Field(None, max_length=63, description="the taint value, with Equal")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="empty: every effect")
    toleration_seconds: int | None = Field(None, ge=0, description="NoExecute only: how long the pod stays")


class NodeSelectorRequirement(_Model):
    key: str = Field(..., min_length=1, max_length=317, description="a node label (or field) key")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"] = Field(..., description="how values match")
    values: list[Annotated[str, Field(max_length=63)]] | None = Field(
        None, max_length=MAX_ITEMS, description="for In and NotIn; one number for Gt and Lt")


class NodeSelectorTerm(_Model):
    match_expressions: list[NodeSelectorRequirement] | None = Field(
        None, max_length=MAX_ITEMS, description="requirements on node labels, all must hold")
    match_fields: list[NodeSelectorRequirement] | None = Field(
        None, max_length=MAX_ITEMS, description="requirements on node fields (metadata.name), all must hold")


class NodeSelector(_Model):
    node_selector_terms: list[NodeSelectorTerm] = Field(..., min_length=1, max_length=MAX_ITEMS,
                                                        description="any one term must match")


class PreferredSchedulingTerm(_Model):
    weight: int = Field(..., ge=1, le=100, description="added to a node's score when it matches")
    preference: NodeSelectorTerm = Field(..., description="the node term to prefer")


class NodeAffinity(_Model):
    required_during_scheduling_ignored_during_execution: NodeSelector | None = Field(
        None, description="nodes the pods must run on")
    preferred_during_scheduling_ignored_during_execution: list[PreferredSchedulingTerm] | None = Field(
        None, max_length=MAX_ITEMS, description="nodes the scheduler prefers, by weight")


class LabelSelectorRequirement(_Model):
    key: str = Field(..., min_length=1, max_length=317, description="a pod label key")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(..., description="how values match")
    values: list[Annotated[str, Field(max_length=63)]] | None = Field(
        None, max_length=MAX_ITEMS, description="for In and NotIn")


class LabelSelector(_Model):
    match_labels: LabelMap | None = Field(None, description="labels the pods must have")
    match_expressions: list[LabelSelectorRequirement] | None = Field(
        None, max_length=MAX_ITEMS, description="requirements on pod labels, all must hold")


class PodAffinityTerm(_Model):
    label_selector: LabelSelector | None = Field(None, description="which pods")
    topology_key: str = Field(..., min_length=1, max_length=317, description="e.g. kubernetes.io/hostname")
    namespaces: list[Name] | None = Field(None, max_length=MAX_ITEMS, description="default: the job's")


class WeightedPodAffinityTerm(_Model):
    weight: int = Field(..., ge=1, le=100, description="added to a node's score when it matches")
    pod_affinity_term: PodAffinityTerm = Field(..., description="the pod term to prefer")


class PodAffinity(_Model):
    """Pod affinity or anti-affinity (the same shape)."""

    required_during_scheduling_ignored_during_execution: list[PodAffinityTerm] | None = Field(
        None, max_length=MAX_ITEMS, description="terms every pod must satisfy")
    preferred_during_scheduling_ignored_during_execution: list[WeightedPodAffinityTerm] | None = Field(
        None, max_length=MAX_ITEMS, description="terms the scheduler prefers, by weight")


class Affinity(_Model):
    """Node and pod (anti-)affinity, as in a PodSpec."""

    node_affinity: NodeAffinity | None = Field(None, description="which nodes, by their labels")
    pod_affinity: PodAffinity | None = Field(None, description="near which pods (e.g. same rack)")
    pod_anti_affinity: PodAffinity | None = Field(None, description="away from which pods")


class PvcSource(_Model):
    claim_name: str = Field(..., min_length=1, max_length=253, pattern=DNS_SUBDOMAIN,
                            description="a PersistentVolumeClaim in the job's namespace")
    read_only: bool = Field(False, description="mount it read-only")


class ConfigMapSource(_Model):
    name: str = Field(..., min_length=1, max_length=253, pattern=DNS_SUBDOMAIN, description="a ConfigMap")
    optional: bool | None = Field(None, description="the pod starts without it")


class SecretSource(_Model):
    secret_name: str = Field(..., min_length=1, max_length=253, pattern=DNS_SUBDOMAIN, description="a Secret")
    optional: bool | None = Field(None, description="the pod starts without it")


class EmptyDirSource(_Model):
    medium: Literal["", "Memory"] | None = Field(None, description="Memory: a tmpfs; empty: the node's disk")
    size_limit: str | None = Field(None, pattern=QUANTITY, description="e.g. 100Gi")


class NfsSource(_Model):
    server: str = Field(..., min_length=1, max_length=253, description="the NFS server's host name or IP")
    path: str = Field(..., pattern=ABSOLUTE_PATH, max_length=4096, description="the exported path")
    read_only: bool = Field(False, description="mount it read-only")


VOLUME_SOURCES = ("persistentVolumeClaim", "configMap", "secret", "emptyDir", "nfs")


class Volume(_Model):
    """An extra volume for the pods: exactly one source (a dataset cache PVC, a config map...)."""

    model_config = ConfigDict(json_schema_extra=cel(
        " + ".join(f"(has(self.{s}) ? 1 : 0)" for s in VOLUME_SOURCES) + " == 1",
        f"set exactly one of {', '.join(VOLUME_SOURCES)}"))

    name: str = Field(..., max_length=63, pattern=DNS_LABEL, description="what volumeMounts call it")
    persistent_volume_claim: PvcSource | None = Field(None, description="a PVC, e.g. a dataset cache")
    config_map: ConfigMapSource | None = Field(None, description="a ConfigMap's keys as files")
    secret: SecretSource | None = Field(None, description="a Secret's keys as files")
    empty_dir: EmptyDirSource | None = Field(None, description="scratch space for the pod's life")
    nfs: NfsSource | None = Field(None, description="an NFS export")

    @model_validator(mode="after")
    def _one_source(self) -> Volume:
        sources = [self.persistent_volume_claim, self.config_map, self.secret, self.empty_dir, self.nfs]
        if sum(s is not None for s in sources) != 1:
            raise ValueError(f"set exactly one of {', '.join(VOLUME_SOURCES)}")
        return self


class VolumeMount(_Model):
    """Where the trainer container sees a volume of podTemplate.volumes."""

    name: str = Field(..., max_length=63, pattern=DNS_LABEL, description="a volume of podTemplate.volumes")
    mount_path: str = Field(..., max_length=4096, pattern=ABSOLUTE_PATH, description="where in the container")
    read_only: bool = Field(False, description="mount it read-only")
    sub_path: str | None = Field(None, max_length=4096, description="a path inside the volume")


class KeySelector(_Model):
    name: str = Field(..., min_length=1, max_length=253, pattern=DNS_SUBDOMAIN, description="the object")
    key: str = Field(..., min_length=1, max_length=253, description="the key in it")
    optional: bool | None = Field(None, description="the pod starts without it")


class EnvVarSource(_Model):
    model_config = ConfigDict(json_schema_extra=cel(
        "has(self.secretKeyRef) != has(self.configMapKeyRef)", "set exactly one of secretKeyRef or configMapKeyRef"))

    secret_key_ref: KeySelector | None = Field(None, description="a key of a Secret")
    config_map_key_ref: KeySelector | None = Field(None, description="a key of a ConfigMap")

    @model_validator(mode="after")
    def _one_source(self) -> EnvVarSource:
        if (self.secret_key_ref is None) == (self.config_map_key_ref is None):
            raise ValueError("set exactly one of secretKeyRef or configMapKeyRef")
        return self


class EnvVar(_Model):
    model_config = ConfigDict(json_schema_extra=cel(
        "!(has(self.value) && has(self.valueFrom))", "set value or valueFrom, not both"))

    name: str = Field(..., min_length=1, max_length=253, pattern=ENV_NAME,
                      description="not one the operator sets (RANK, WORLD_SIZE, MASTER_ADDR...)")
    value: str | None = Field(None, max_length=65536, description="the value; or set valueFrom")
    value_from: EnvVarSource | None = Field(None, description="the value from a Secret or ConfigMap key")

    @model_validator(mode="after")
    def _value_or_reference(self) -> EnvVar:
        if self.value is not None and self.value_from is not None:
            raise ValueError("set value or valueFrom, not both")
        if self.name in RESERVED_ENV:
            raise ValueError(f"{self.name} is set by the operator (reserved: {', '.join(RESERVED_ENV)})")
        return self


class LocalObjectReference(_Model):
    name: str = Field(..., min_length=1, max_length=253, pattern=DNS_SUBDOMAIN, description="in the job's namespace")


def _unique(names: Iterable[str], what: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"{what} {name!r} appears twice")
        seen.add(name)


class PodTemplateSpec(_Model):
    """What the trainer pods get besides what the operator sets: scheduling, volumes, env, metadata.

    A typed subset of a PodSpec. The operator's own defaults (chart value `trainer.podDefaults`)
    are merged under it: maps key by key, lists by name, single values when unset here."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        {"rule": "!has(self.volumeMounts) || self.volumeMounts.all(m, has(self.volumes) && "
                 "self.volumes.exists(v, v.name == m.name))",
         "message": "every volumeMount must name a volume of podTemplate.volumes"},
        {"rule": "!has(self.labels) || self.labels.all(k, !k.startsWith('kubeforge.io/'))",
         "message": "labels under kubeforge.io/ are the operator's"},
    ]})

    labels: LabelMap | None = Field(None, description="added to every pod (kubeforge.io/ keys are the operator's)")
    annotations: LabelMap | None = Field(None, description="added to every pod")
    node_selector: LabelMap | None = Field(None, description="node labels the pods require")
    tolerations: list[Toleration] | None = Field(
        None, max_length=MAX_ITEMS, description="GPU pods always tolerate nvidia.com/gpu:NoSchedule")
    affinity: Affinity | None = Field(None, description="node and pod (anti-)affinity")
    priority_class_name: str | None = Field(None, max_length=253, pattern=DNS_SUBDOMAIN,
                                            description="a PriorityClass (also the Volcano PodGroup's)")
    scheduler_name: str | None = Field(None, max_length=253, pattern=DNS_SUBDOMAIN,
                                       description="default: the cluster's, or the gang scheduler's")
    runtime_class_name: str | None = Field(None, max_length=253, pattern=DNS_SUBDOMAIN,
                                           description="e.g. nvidia")
    image_pull_secrets: list[LocalObjectReference] | None = Field(
        None, max_length=MAX_ITEMS, description="Secrets for pulling the trainer image")
    volumes: list[Volume] | None = Field(None, max_length=MAX_ITEMS, description="extra volumes, e.g. a PVC")
    volume_mounts: list[VolumeMount] | None = Field(None, max_length=MAX_ITEMS,
                                                    description="mounts of those volumes in the trainer")
    shm_size: str | None = Field(None, pattern=QUANTITY, description="/dev/shm size limit; default: unlimited")
    env: list[EnvVar] | None = Field(None, max_length=MAX_ITEMS, description="extra trainer environment")

    @model_validator(mode="after")
    def _consistent(self) -> PodTemplateSpec:
        volumes = [v.name for v in self.volumes or []]
        _unique(volumes, "volume")
        _unique((e.name for e in self.env or []), "env variable")
        _unique((m.mount_path for m in self.volume_mounts or []), "mountPath")
        for name in volumes:
            if name in RESERVED_VOLUMES:
                raise ValueError(f"volume name {name!r} is the operator's ({', '.join(RESERVED_VOLUMES)})")
        for mount in self.volume_mounts or []:
            if mount.name not in volumes:
                raise ValueError(f"volumeMount {mount.mount_path}: no volume {mount.name!r} in podTemplate.volumes")
            if mount.mount_path.rstrip("/") in RESERVED_MOUNT_PATHS:
                raise ValueError(f"mountPath {mount.mount_path} is the operator's (set shmSize for /dev/shm)")
        for key in self.labels or {}:
            if key.startswith(RESERVED_LABEL_PREFIX):
                raise ValueError(f"label {key!r}: labels under {RESERVED_LABEL_PREFIX} are the operator's")
        return self


def merge_pod_templates(defaults: PodTemplateSpec, job: PodTemplateSpec) -> PodTemplateSpec:
    """The operator's defaults under a job's template: the job wins.

    Maps merge key by key; tolerations and imagePullSecrets are the union; volumes, env and mounts
    merge by name (mounts by path), the job's replacing a default's; single values are the job's when set."""

    def by_key(items_default: list[Any] | None, items_job: list[Any] | None, key: str) -> list[Any] | None:
        merged = {getattr(item, key): item for item in [*(items_default or []), *(items_job or [])]}
        return list(merged.values()) or None

    def union(first: list[Any] | None, second: list[Any] | None) -> list[Any] | None:
        out = list(first or [])
        out += [item for item in second or [] if item not in out]
        return out or None

    def mapping(first: dict[str, str] | None, second: dict[str, str] | None) -> dict[str, str] | None:
        return {**(first or {}), **(second or {})} or None

    return PodTemplateSpec.model_construct(
        labels=mapping(defaults.labels, job.labels),
        annotations=mapping(defaults.annotations, job.annotations),
        node_selector=mapping(defaults.node_selector, job.node_selector),
        tolerations=union(defaults.tolerations, job.tolerations),
        affinity=job.affinity or defaults.affinity,
        priority_class_name=job.priority_class_name or defaults.priority_class_name,
        scheduler_name=job.scheduler_name or defaults.scheduler_name,
        runtime_class_name=job.runtime_class_name or defaults.runtime_class_name,
        image_pull_secrets=union(defaults.image_pull_secrets, job.image_pull_secrets),
        volumes=by_key(defaults.volumes, job.volumes, "name"),
        volume_mounts=by_key(defaults.volume_mounts, job.volume_mounts, "mount_path"),
        shm_size=job.shm_size or defaults.shm_size,
        env=by_key(defaults.env, job.env, "name"),
    )


class GangSpec(_Model):
    """Gang admission: all of the job's pods start together or none does. Each is off by default."""

    queue_name: str | None = Field(
        None, max_length=63, pattern=DNS_LABEL,
        description="a Kueue LocalQueue: the pods are admitted together as one Kueue pod group")
    pod_group: Literal["volcano", "coscheduling"] | None = Field(
        None, description="a PodGroup (minMember = workers) for Volcano or the coscheduling plugin")

    def merged_under(self, defaults: GangSpec) -> GangSpec:
        """This job's gang settings over the operator's defaults: each field the job sets wins."""
        return GangSpec.model_construct(queue_name=self.queue_name or defaults.queue_name,
                                        pod_group=self.pod_group or defaults.pod_group)


class _JobSpec(_Model):
    training: TrainingSpec
    checkpoint: CheckpointSpec = CheckpointSpec()
    resources: ResourcesSpec = ResourcesSpec()
    metrics: MetricsSpec = MetricsSpec()
    export: ExportSpec = Field(ExportSpec(), description="what is exported besides the full-precision model")
    s3: S3Spec | None = None
    pod_template: PodTemplateSpec | None = Field(None, description="scheduling, volumes, env and metadata of the pods")
    gang: GangSpec | None = Field(None, description="gang admission by Kueue, Volcano or coscheduling")

    # How the operator runs the job, as in a batch/v1 Job. None of it changes what is trained.
    suspend: bool = Field(False, description="true deletes the pods and keeps the checkpoints; false resumes")
    backoff_limit: int = Field(3, ge=0, le=1000, description="gang restarts before the job is marked Failed")
    active_deadline_seconds: int | None = Field(None, ge=1, description="the job fails when running longer")
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, description="delete the finished job (and its pods) this many seconds after it ends")
    clean_pod_policy: Literal["All", "Running", "None"] = Field(
        "All", description="which pods to delete when the job finishes")
    termination_grace_period_seconds: int = Field(
        120, ge=1, le=3600, description="seconds a stopped worker (suspend, eviction, preemption) has to commit "
        "a checkpoint before it is killed: the pods' terminationGracePeriodSeconds")
    stall_timeout_seconds: int | None = Field(
        1800, ge=10, description="restart the gang (reason Stalled, counted against backoffLimit) when the "
        "trainer reports no new step for this long; needs metrics.port; null disables it")


class PretrainSpec(_JobSpec):
    """What a PretrainJob trains and how."""

    model_config = ConfigDict(json_schema_extra=cel(
        "!has(self.export) || !has(self.export.keepFullPrecision) || self.export.keepFullPrecision",
        "export.keepFullPrecision: false is only valid on a FinetuneJob"))

    model: ModelSpec = ModelSpec()
    tokenizer: TokenizerSpec = TokenizerSpec()
    data: PretrainData

    @model_validator(mode="after")
    def _export_keeps_the_base(self) -> PretrainSpec:
        if not self.export.keep_full_precision:
            raise ValueError("export.keepFullPrecision: false is only valid on a FinetuneJob: a PretrainJob's "
                             "export is the full-precision model finetunes start from")
        return self


#: The fields that may change after creation (the others are immutable: CEL `self == oldSelf`).
RUN_POLICY_FIELDS = {"suspend", "backoff_limit", "active_deadline_seconds", "ttl_seconds_after_finished",
                     "clean_pod_policy", "termination_grace_period_seconds", "stall_timeout_seconds",
                     "base_model_wait_seconds", "resources", "metrics", "pod_template", "gang"}


# ---------------------------------------------------------------------------------------------
# Finetuning: from a base checkpoint in Hugging Face format


#: Where a finetune's base model comes from: one of these, and only one.
BASE_MODEL_SOURCES = "set exactly one of uri, fromPretrainJob or fromSweepJob"


class BaseModelSpec(_Model):
    """The model a finetune starts from: exactly one of uri, fromPretrainJob or fromSweepJob."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        *IMMUTABLE["x-kubernetes-validations"],
        {"rule": "[has(self.uri), has(self.fromPretrainJob), has(self.fromSweepJob)].filter(given, given).size() == 1",
         "message": BASE_MODEL_SOURCES},
        {"rule": "!has(self.tokenSecretRef) || (has(self.uri) && self.uri.startsWith('hf://'))",
         "message": "tokenSecretRef is only valid with an hf:// uri"},
    ]})

    uri: str | None = Field(
        None, pattern=BASE_MODEL_URI,
        description="a Hugging Face model directory (local path or s3://), or hf://ORG/NAME[@REVISION]: a model "
                    "on the Hub at a branch, tag or commit (default main), fetched once into the job's storage "
                    "and reused from there by every pod, restart and later job")
    from_pretrain_job: str | None = Field(None, pattern=DNS_LABEL,
                                          description="a PretrainJob in the same namespace")
    from_sweep_job: str | None = Field(
        None, pattern=DNS_LABEL, description="a SweepJob in the same namespace: the export of its best trial "
                                             "(status.bestTrial.exportUri), once the sweep succeeded")
    token_secret_ref: KeySelector | None = Field(
        None, description="with an hf:// uri: the key of a Secret holding a Hub access token (private or gated "
                          "models), given to the trainer as HF_TOKEN")

    @model_validator(mode="after")
    def _exactly_one(self) -> BaseModelSpec:
        if [self.uri, self.from_pretrain_job, self.from_sweep_job].count(None) != 2:
            raise ValueError(BASE_MODEL_SOURCES)
        if self.token_secret_ref is not None and not self.from_hub():
            raise ValueError("tokenSecretRef is only valid with an hf:// uri")
        return self

    def from_hub(self) -> bool:
        return (self.uri or "").startswith(HUB_SCHEME)


class LoraSpec(_Model):
    """LoRA adapters (peft)."""

    model_config = ConfigDict(json_schema_extra=IMMUTABLE)

    r: int = Field(8, ge=1, le=1024, description="rank of the adapter matrices")
    alpha: int = Field(16, ge=1, description="adapter scaling (alpha / r)")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="dropout on the adapter input")
    target_modules: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, min_length=1, description="default: peft's choice for the architecture")
    use_dora: bool = Field(False, description="DoRA: each adapted weight split into a magnitude and a direction, "
                                              "the adapters train the direction")
    use_rslora: bool = Field(False, description="rank-stabilised scaling: alpha / sqrt(r) instead of alpha / r")
    quantize_base: Literal["4bit", "8bit"] | None = Field(
        None, description="QLoRA: the frozen base quantized by bitsandbytes, 4-bit NF4 or 8-bit LLM.int8(); "
                    "on CPU or GPU, ddp only")


#: Module names: at least one, none empty.
ModuleNames = list[Annotated[str, Field(min_length=1)]]


class Ia3Spec(_Model):
    """(IA)^3: learned vectors that rescale the keys, values and feed-forward activations (peft)."""

    model_config = ConfigDict(json_schema_extra=IMMUTABLE)

    target_modules: ModuleNames | None = Field(
        None, min_length=1, description="the layers rescaled; default: peft's choice for the architecture")
    feedforward_modules: ModuleNames | None = Field(
        None, min_length=1, description="those of targetModules whose input (not output) is rescaled; "
        "default: peft's choice; needs targetModules")

    @model_validator(mode="after")
    def _feedforward_among_targets(self) -> Ia3Spec:
        if self.feedforward_modules is None:
            return self
        if self.target_modules is None:
            raise ValueError("feedforwardModules needs targetModules")
        if not set(self.feedforward_modules) <= set(self.target_modules):
            raise ValueError("feedforwardModules must be among targetModules")
        return self


class VirtualTokensSpec(_Model):
    """Prompt or prefix tuning (peft): learned virtual tokens before every input; the base stays as it is."""

    model_config = ConfigDict(json_schema_extra=IMMUTABLE)

    num_virtual_tokens: int = Field(20, ge=1, le=512, description="how many virtual tokens are learned")


class AdaLoraSpec(_Model):
    """AdaLoRA (peft): LoRA in SVD form whose rank budget is moved, while training, to the layers
    that matter most, from initR per layer down to targetR on average."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        IMMUTABLE["x-kubernetes-validations"][0],
        {"rule": "!has(self.initR) || !has(self.targetR) || self.targetR <= self.initR",
         "message": "targetR must not exceed initR"},
    ]})

    init_r: int = Field(12, ge=1, le=1024, description="each layer's rank at the start")
    target_r: int = Field(8, ge=1, le=1024, description="the average rank per layer at the end")
    alpha: int = Field(16, ge=1, description="adapter scaling")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="dropout on the adapter input")
    target_modules: ModuleNames | None = Field(
        None, min_length=1, description="default: peft's choice for the architecture")
    tinit: int = Field(0, ge=0, description="optimizer steps at full rank before the budget shrinks")
    tfinal: int = Field(0, ge=0, description="optimizer steps at the final ranks, which no longer change")
    delta_t: int = Field(1, ge=1, description="optimizer steps between two reallocations of the budget")
    beta1: float = Field(0.85, gt=0.0, lt=1.0, description="smoothing of the importance scores")
    beta2: float = Field(0.85, gt=0.0, lt=1.0, description="smoothing of their uncertainty")

    @model_validator(mode="after")
    def _target_within_init(self) -> AdaLoraSpec:
        if self.target_r > self.init_r:
            raise ValueError("targetR must not exceed initR")
        return self


class TeacherSpec(_Model):
    """The model a distilling student learns from: exactly one of uri or fromFinetuneJob. It must
    share the student's tokenizer (and, to classify, its labels); it runs in inference mode, never trained."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        *IMMUTABLE["x-kubernetes-validations"],
        {"rule": "has(self.uri) != has(self.fromFinetuneJob)", "message": "set exactly one of uri or fromFinetuneJob"},
    ]})

    uri: str | None = Field(None, pattern=STORAGE_URI,
                            description="a Hugging Face model directory (local path or s3://), in safetensors")
    from_finetune_job: str | None = Field(
        None, pattern=DNS_LABEL, description="a FinetuneJob in the same namespace: its export, once it succeeded")

    @model_validator(mode="after")
    def _exactly_one(self) -> TeacherSpec:
        if (self.uri is None) == (self.from_finetune_job is None):
            raise ValueError("set exactly one of uri or fromFinetuneJob")
        return self


class DistillSpec(_Model):
    """Knowledge distillation (Hinton et al. 2015): the loss is alpha * temperature^2 * KL(teacher || student),
    both softened by the temperature, plus (1 - alpha) * the task's loss on the labels."""

    model_config = ConfigDict(json_schema_extra=IMMUTABLE)

    temperature: float = Field(2.0, gt=0.0, le=100.0, description="softens both distributions before the KL")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="the KL term's weight; the task loss gets 1 - alpha")


#: Each finetuning method with a settings block, by the block's field name: only that method may set it.
METHOD_SETTINGS = {"lora": "lora", "ia3": "ia3", "prompt-tuning": "prompt_tuning",
                   "prefix-tuning": "prefix_tuning", "adalora": "adalora", "distill": "distill"}
#: Methods that put virtual tokens before the input: a packed row's pairs would all see them as one
#: sequence's start, and peft drops the position_ids that separate the pairs.
VIRTUAL_TOKEN_METHODS = ("prompt-tuning", "prefix-tuning")


def _settings_rules() -> list[JsonValue]:
    rules: list[JsonValue] = []
    for method, block in METHOD_SETTINGS.items():
        name = to_camel(block)
        rules.append({"rule": f"self.method == '{method}' || !has(self.{name})",
                      "message": f"{name} is only valid with method: {method}"})
    return rules


class FinetuneData(PretrainData):
    """Training and eval data, with the fields each task reads."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        *IMMUTABLE["x-kubernetes-validations"],
        {"rule": "!has(self.chatTemplate) || has(self.messagesField)",
         "message": "chatTemplate is only valid with messagesField"},
    ]})

    label_field: str = Field("label", min_length=1, description="sequence-classification label")
    prompt_field: str = Field("prompt", min_length=1, description="causal-lm instruction")
    response_field: str = Field("response", min_length=1, description="causal-lm answer")
    messages_field: str | None = Field(
        None, min_length=1,
        description="causal-lm: the field holding a conversation, a list of {role, content} messages (as the "
                    "Hub's chat datasets and TRL have them), used instead of promptField and responseField: "
                    "rendered with the chat template, the loss on the assistant's turns only")
    chat_template: str | None = Field(
        None, min_length=1,
        description="with messagesField: a Jinja chat template (as tokenizer_config.json carries one) used "
                    "instead of the base model's, and exported with the model; required when the base has none")
    packing: bool = Field(False, description="causal-lm: several prompt/response pairs (or conversations) per "
                                             "sequence, each attending only to itself")

    @model_validator(mode="after")
    def _template_only_with_messages(self) -> FinetuneData:
        if self.chat_template is not None and self.messages_field is None:
            raise ValueError("chatTemplate is only valid with messagesField")
        return self


class FinetuneSpec(_JobSpec):
    """What a FinetuneJob trains and how."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        *_settings_rules(),
        {"rule": "self.task == 'causal-lm' || !has(self.data.packing) || !self.data.packing",
         "message": "data.packing is only valid with task: causal-lm"},
        {"rule": "self.task == 'causal-lm' || !has(self.data.messagesField)",
         "message": "data.messagesField is only valid with task: causal-lm"},
        {"rule": f"!(self.method in {list(VIRTUAL_TOKEN_METHODS)}) || !has(self.data.packing) || !self.data.packing",
         "message": "data.packing is not valid with method: prompt-tuning or prefix-tuning"},
        {"rule": "self.method != 'prefix-tuning' || self.task == 'causal-lm'",
         "message": "method: prefix-tuning is only valid with task: causal-lm"},
        {"rule": "(self.method == 'distill') == has(self.teacher)",
         "message": "teacher is required with method: distill and only valid with it"},
    ]})

    base_model: BaseModelSpec = Field(..., description="the model to start from")
    base_model_wait_seconds: int = Field(
        604800, ge=1, description="fail (reason BaseModelTimeout, or TeacherTimeout) when baseModel.fromPretrainJob "
        "or fromSweepJob (or teacher.fromFinetuneJob) has not succeeded this long after the FinetuneJob was created")
    task: Literal["causal-lm", "sequence-classification"] = Field("causal-lm", json_schema_extra=IMMUTABLE,
                                                                  description="causal-lm: prompt/response SFT")
    method: Literal["full", "lora", "ia3", "prompt-tuning", "prefix-tuning", "adalora", "distill"] = Field(
        "lora", json_schema_extra=IMMUTABLE,
        description="full: every weight; lora, adalora: low-rank adapters; ia3: rescaling vectors; "
        "prompt-tuning, prefix-tuning: learned virtual tokens; distill: every weight of baseModel (the student), "
        "trained to match the teacher's predictions as well as the labels")
    lora: LoraSpec | None = Field(None, description="only with method: lora; defaults apply if absent")
    ia3: Ia3Spec | None = Field(None, description="only with method: ia3; defaults apply if absent")
    prompt_tuning: VirtualTokensSpec | None = Field(
        None, description="only with method: prompt-tuning; defaults apply if absent")
    prefix_tuning: VirtualTokensSpec | None = Field(
        None, description="only with method: prefix-tuning; defaults apply if absent")
    adalora: AdaLoraSpec | None = Field(None, description="only with method: adalora; defaults apply if absent")
    teacher: TeacherSpec | None = Field(None, description="required with method: distill, and only valid with it")
    distill: DistillSpec | None = Field(None, description="only with method: distill; defaults apply if absent")
    data: FinetuneData

    @model_validator(mode="after")
    def _settings_only_with_their_method(self) -> FinetuneSpec:
        for method, block in METHOD_SETTINGS.items():
            if self.method != method and getattr(self, block) is not None:
                raise ValueError(f"{to_camel(block)} is only valid with method: {method}")
        if self.task != "causal-lm" and self.data.packing:
            raise ValueError("data.packing is only valid with task: causal-lm")
        if self.task != "causal-lm" and self.data.messages_field is not None:
            raise ValueError("data.messagesField is only valid with task: causal-lm")
        if self.method in VIRTUAL_TOKEN_METHODS and self.data.packing:
            raise ValueError("data.packing is not valid with method: prompt-tuning or prefix-tuning")
        if self.method == "prefix-tuning" and self.task != "causal-lm":
            # peft passes the prefix as past_key_values, which transformers 5's classifiers no longer take.
            raise ValueError("method: prefix-tuning is only valid with task: causal-lm")
        if (self.method == "distill") != (self.teacher is not None):
            raise ValueError("teacher is required with method: distill and only valid with it")
        return self

    def lora_settings(self) -> LoraSpec:
        return self.lora or LoraSpec()

    def ia3_settings(self) -> Ia3Spec:
        return self.ia3 or Ia3Spec()

    def virtual_tokens_settings(self) -> VirtualTokensSpec:
        """promptTuning's or prefixTuning's, whichever the method is."""
        return (self.prompt_tuning if self.method == "prompt-tuning" else self.prefix_tuning) or VirtualTokensSpec()

    def adalora_settings(self) -> AdaLoraSpec:
        return self.adalora or AdaLoraSpec()

    def distill_settings(self) -> DistillSpec:
        return self.distill or DistillSpec()


# ---------------------------------------------------------------------------------------------
# The objects


class ObjectMeta(BaseModel):
    # Objects read back from a cluster carry uid, resourceVersion, managedFields...: ignore them.
    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str = Field(..., max_length=JOB_NAME_MAX_LENGTH, pattern=JOB_NAME)
    namespace: str = Field("default", max_length=63, pattern=DNS_LABEL)
    uid: str | None = None
    labels: dict[str, str] = {}


class _Job(_Model):
    api_version: Literal["kubeforge.io/v1alpha1"]
    metadata: ObjectMeta

    # `kubectl get -o yaml` output carries a status; it is the operator's, not part of the spec.
    status: dict[str, Any] | None = Field(None, exclude=True)

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace

    def spec_hash(self) -> str:
        """Identifies what is trained; written into every checkpoint manifest, and a resume refuses
        checkpoints of another. Where and how often checkpoints are written is not part of it."""
        excluded: dict[str, Any] = {name: True for name in RUN_POLICY_FIELDS | {"checkpoint"}}
        # How the work is split over the processes and computed: the same model is trained either way.
        excluded["training"] = {"parallelism", "compile", "activation_checkpointing"}
        trained = self.spec.model_dump(mode="json", by_alias=True, exclude=excluded)  # type: ignore[attr-defined]
        return hashlib.sha256(json.dumps(trained, sort_keys=True).encode()).hexdigest()[:16]

    def to_manifest(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class PretrainJob(_Job):
    """Pretrains a language model from a transformers config on a text corpus."""

    kind: Literal["PretrainJob"]
    spec: PretrainSpec


class FinetuneJob(_Job):
    """Finetunes a base model (fully or with LoRA) for causal-LM SFT or sequence classification."""

    kind: Literal["FinetuneJob"]
    spec: FinetuneSpec


Job = PretrainJob | FinetuneJob


@dataclass(frozen=True)
class JobKind:
    """How the API server knows one kind of job (its CRD's names), and the model that reads it."""

    kind: str
    model: type[_Model]
    group: str
    version: str
    plural: str
    short_name: str
    #: `kubectl get kubeforge` lists every kind in it.
    category: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"


#: The two kinds that train: the CRDs, the pods' labels and the operator's watches all read their names
#: here. `ALL_KINDS` adds the SweepJob, which trains through jobs of these kinds.
KINDS: dict[str, JobKind] = {kind.kind: kind for kind in (
    #       kind           model        group      version  plural          short  category
    JobKind("PretrainJob", PretrainJob, API_GROUP, VERSION, "pretrainjobs", "ptj", "kubeforge"),
    JobKind("FinetuneJob", FinetuneJob, API_GROUP, VERSION, "finetunejobs", "ftj", "kubeforge"),
)}


def _location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(document)"


def field_problem(error: Any) -> str:
    """One pydantic error as `path: what is wrong`."""
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown field"
    elif error["type"] == "string_pattern_mismatch":
        meaning = PATTERN_MEANINGS.get(error["ctx"]["pattern"], f"match {error['ctx']['pattern']}")
        message = f"must be {meaning}, got {error['input']!r}"
    elif error["type"] == "literal_error":
        message = f"must be one of {error['ctx']['expected']}, got {error['input']!r}"
    return f"{_location(error['loc'])}: {message}"


def parse_job(document: Any) -> Job:
    """Validate one manifest (a dict as YAML gives it) into a job, or raise SpecError."""
    if not isinstance(document, dict):
        raise SpecError([f"(document): expected a mapping, got {type(document).__name__}"])
    kind = document.get("kind")
    if kind not in KINDS:
        raise SpecError([f"kind: must be one of {', '.join(KINDS)}, got {kind!r}"])
    try:
        return cast(Job, KINDS[kind].model.model_validate(document))
    except ValidationError as exc:
        raise SpecError([field_problem(e) for e in exc.errors()]) from None


def _documents(text: str) -> list[Any]:
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise SpecError([f"(document): not valid YAML: {exc}"]) from None
    if not documents:
        raise SpecError(["(document): no job found"])
    return documents


def _parse_each(documents: list[Any], parse: Callable[[Any], Any]) -> list[Any]:
    parsed: list[Any] = []
    problems: list[str] = []
    for index, document in enumerate(documents):
        try:
            parsed.append(parse(document))
        except SpecError as exc:
            prefix = f"document {index + 1}: " if len(documents) > 1 else ""
            problems.extend(prefix + p for p in exc.problems)
    if problems:
        raise SpecError(problems)
    _check_unique(parsed)
    return parsed


def load_jobs(text: str) -> list[Job]:
    """Every job in a (multi-document) YAML text, in order; names must be unique per kind."""
    return _parse_each(_documents(text), parse_job)


def _check_unique(jobs: Iterable[Job | SweepJob]) -> None:
    seen: set[tuple[str, str, str]] = set()
    for job in jobs:
        key = (job.kind, job.namespace, job.name)
        if key in seen:
            raise SpecError([f"metadata.name: {job.kind} {job.namespace}/{job.name} appears twice"])
        seen.add(key)


def load_job_file(path: str) -> list[Job]:
    try:
        with open(path, encoding="utf-8") as handle:
            return load_jobs(handle.read())
    except OSError as exc:
        raise SpecError([f"{path}: {exc.strerror}"]) from None


# ---------------------------------------------------------------------------------------------
# Sweeps: a SweepJob searches hyperparameters by running trials, each a job of a training kind

#: A camelCase path into a template's spec: `training.learningRate`, `lora.r`.
PARAMETER_PATH = r"^[a-z][A-Za-z0-9]*(\.[a-z][A-Za-z0-9]*)*$"
PATTERN_MEANINGS[PARAMETER_PATH] = "a camelCase path into template.spec such as training.learningRate"
#: A trial's name is `<sweep>-t<N>`: the sweep's name leaves room for the suffix.
TRIAL_SUFFIX = "-t"
#: A choice's value (any JSON), and a template's spec: the CRD keeps them as they are; the models check them.
FreeForm = Annotated[JsonValue, WithJsonSchema({"x-kubernetes-preserve-unknown-fields": True})]
FreeObject = Annotated[dict[str, Any], WithJsonSchema({"type": "object", "x-kubernetes-preserve-unknown-fields": True})]
#: What each kind of trial reports at each evaluation, as the objective names it (`eval.<name>`).
EVAL_METRICS = {"causal-lm": ("loss", "perplexity"), "sequence-classification": ("loss", "accuracy", "f1")}


class SweepTemplate(_Model):
    """The job every trial is: its kind and spec, each parameter set into the spec."""

    kind: Literal["FinetuneJob", "PretrainJob"] = Field(..., description="the kind of every trial")
    spec: FreeObject = Field(
        ..., description="the trials' spec, as in a job of that kind; checked when the sweep is created")


class SweepParameter(_Model):
    """One hyperparameter: where it goes in the template's spec, and the values it may take."""

    # values (items of any JSON) has no type the API server's CEL can read: its rule is the model's alone.
    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        {"rule": "self.type == 'choice' || (has(self.low) && has(self.high) && self.low < self.high)",
         "message": "float and int parameters need low below high"},
    ]})

    path: str = Field(..., max_length=253, pattern=PARAMETER_PATH,
                      description="where the value goes in template.spec, camelCase: training.learningRate, lora.r")
    type: Literal["float", "int", "choice"] = Field(..., description="the distribution's kind")
    low: float | None = Field(None, description="float and int: the smallest value")
    high: float | None = Field(None, description="float and int: the largest value")
    step: float | None = Field(None, gt=0, description="float and int: values low, low + step, ... (int: default 1)")
    log: bool = Field(False, description="float and int: sample the logarithm uniformly (low must be above 0)")
    values: list[FreeForm] | None = Field(None, min_length=1, max_length=MAX_ITEMS,
                                          description="choice: the values to choose from")

    @model_validator(mode="after")
    def _distribution(self) -> SweepParameter:
        if (self.type == "choice") != (self.values is not None):
            raise ValueError("values is set with type choice only")
        if self.type == "choice":
            if self.low is not None or self.high is not None or self.step is not None or self.log:
                raise ValueError("low, high, step and log are for float and int parameters")
            return self
        if self.low is None or self.high is None or self.low >= self.high:
            raise ValueError(f"{self.path}: float and int parameters need low below high")
        if self.log and (self.low <= 0 or self.step is not None):
            raise ValueError(f"{self.path}: log needs low above 0 and no step")
        if self.type == "int" and any(v is not None and v != int(v) for v in (self.low, self.high, self.step)):
            raise ValueError(f"{self.path}: an int parameter's low, high and step are integers")
        return self

    def candidates(self) -> list[JsonValue]:
        """The values that show whether the template's schema takes this parameter: its bounds, or every choice."""
        if self.values is not None:
            return list(self.values)
        assert self.low is not None and self.high is not None  # the validator saw to it
        if self.type == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]


class SweepObjective(_Model):
    """What the search optimises: an eval metric every trial reports."""

    metric: str = Field(..., pattern=r"^eval\.[a-z0-9]+$",
                        description="eval.loss or eval.perplexity (causal-lm, pretraining), eval.accuracy or "
                                    "eval.f1 (sequence-classification)")
    direction: Literal["maximize", "minimize"] = Field(..., description="whether a higher value is better")

    @property
    def eval_name(self) -> str:
        return self.metric.removeprefix("eval.")


class SweepSpec(_Model):
    """What a SweepJob searches, how, and for how long."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        *IMMUTABLE["x-kubernetes-validations"],
        {"rule": "self.parallelism <= self.maxTrials", "message": "parallelism must not exceed maxTrials"},
    ]})

    template: SweepTemplate = Field(..., description="the job each trial runs, before its parameters are set")
    parameters: list[SweepParameter] = Field(..., min_length=1, max_length=MAX_ITEMS,
                                             description="the hyperparameters searched")
    objective: SweepObjective
    max_trials: int = Field(..., ge=1, le=1000, description="trials in all")
    parallelism: int = Field(1, ge=1, le=64, description="trials running at once")
    max_failed_trials: int = Field(
        3, ge=0, le=1000, description="the sweep fails when more trials than this fail (pruned ones do not count)")
    algorithm: Literal["tpe", "random", "grid", "cmaes"] = Field(
        "tpe", description="Optuna's sampler: TPE, random, grid (int, stepped float and choice parameters) or CMA-ES")
    early_stopping: Literal["none", "median", "successive-halving"] = Field(
        "none", description="Optuna's pruner, fed each trial's eval metrics as they arrive: a trial worse than "
                            "the median of the finished ones at the same step, or not promoted by successive "
                            "halving, is stopped (reason Pruned)")
    startup_trials: int = Field(
        2, ge=0, le=1000, description="trials sampled at random before TPE or CMA-ES model the results, and that "
                                      "must succeed before the median pruner prunes")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="seeds the sampler: the same seed asks the same trials")

    @model_validator(mode="after")
    def _searchable(self) -> SweepSpec:
        paths = [p.path for p in self.parameters]
        if len(set(paths)) != len(paths):
            raise ValueError("parameters: each path appears once")
        if self.parallelism > self.max_trials:
            raise ValueError(f"parallelism ({self.parallelism}) must not exceed maxTrials ({self.max_trials})")
        if self.algorithm == "grid" and any(p.type == "float" and p.step is None for p in self.parameters):
            raise ValueError("algorithm grid needs a step on every float parameter")
        problems = template_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self


def _spec_model(kind: str) -> type[BaseModel]:
    annotation = KINDS[kind].model.model_fields["spec"].annotation
    assert isinstance(annotation, type) and issubclass(annotation, BaseModel)
    return annotation


def _leaf_problem(model: type[BaseModel], path: str) -> str | None:
    """Why `path` names no value of `model`'s fields (None when it does): each part a camelCase field,
    every part but the last one an object."""
    parts = path.split(".")
    for index, part in enumerate(parts):
        field = next((f for name, f in model.model_fields.items() if to_camel(name) == part), None)
        if field is None:
            return f"{'.'.join(parts[:index + 1])} is no field of the template's spec"
        nested = [t for t in (field.annotation, *getattr(field.annotation, "__args__", ()))
                  if isinstance(t, type) and issubclass(t, BaseModel)]
        if index == len(parts) - 1:
            return f"{path} is an object, not a value" if nested else None
        if not nested:
            return f"{'.'.join(parts[:index + 1])} is a value, not an object"
        model = nested[0]
    return None


def with_parameters(template: dict[str, Any], values: dict[str, JsonValue]) -> dict[str, Any]:
    """A copy of a template's spec with each value set at its camelCase path (objects made as needed)."""
    spec = json.loads(json.dumps(template))
    for path, value in values.items():
        *parents, leaf = path.split(".")
        node = spec
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
    return spec


def trial_manifest(template: SweepTemplate, name: str, namespace: str, values: dict[str, JsonValue]
                   ) -> dict[str, Any]:
    """A trial's job: the template's spec with its values; a checkpoint.uri of the template is the
    root under which each trial has its own (no trial resumes another's checkpoints)."""
    spec = with_parameters(template.spec, values)
    checkpoint = spec.get("checkpoint")
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("uri"), str):
        checkpoint["uri"] = f"{checkpoint['uri'].rstrip('/')}/{name}"
    return {"apiVersion": KINDS[template.kind].api_version, "kind": template.kind,
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def _refusals(template: SweepTemplate, values: dict[str, JsonValue]) -> list[str]:
    try:
        KINDS[template.kind].model.model_validate(trial_manifest(template, "trial", "default", values))
    except ValidationError as exc:
        return [field_problem(e).removeprefix("spec.") for e in exc.errors()]
    return []


def template_problems(spec: SweepSpec) -> list[str]:
    """Why the template, or a parameter's value in it, is refused by the trials' schema, naming the
    parameter: each value checked with the other parameters at their first candidate."""
    model = _spec_model(spec.template.kind)
    problems = []
    for index, parameter in enumerate(spec.parameters):
        problem = _leaf_problem(model, parameter.path)
        if problem:
            problems.append(f"parameters[{index}].path: {problem}")
    if problems:
        return problems
    first = {p.path: p.candidates()[0] for p in spec.parameters}
    problems = [f"template.spec.{problem}" for problem in _refusals(spec.template, first)]
    if problems:
        return problems
    for index, parameter in enumerate(spec.parameters):
        for value in parameter.candidates()[1:]:
            problems += [f"parameters[{index}] ({parameter.path} = {value!r}): the {spec.template.kind} schema "
                         f"refuses it: {problem}" for problem in _refusals(spec.template, {**first,
                                                                                         parameter.path: value})]
    task = spec.template.spec.get("task", "causal-lm") if spec.template.kind == "FinetuneJob" else "causal-lm"
    reported = EVAL_METRICS.get(str(task), ())
    if reported and spec.objective.eval_name not in reported:
        problems.append(f"objective.metric: a {task} trial reports " + ", ".join(f"eval.{m}" for m in reported))
    return problems


class SweepJob(_Model):
    """Searches hyperparameters with Optuna: trials run as FinetuneJobs or PretrainJobs it owns."""

    api_version: Literal["kubeforge.io/v1alpha1"]
    kind: Literal["SweepJob"]
    metadata: ObjectMeta
    spec: SweepSpec
    status: dict[str, Any] | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _trial_names_fit(self) -> SweepJob:
        longest = f"{self.metadata.name}{TRIAL_SUFFIX}{self.spec.max_trials - 1}"
        if len(longest) > JOB_NAME_MAX_LENGTH:
            raise ValueError(f"metadata.name: the trial name {longest} would be longer than "
                             f"{JOB_NAME_MAX_LENGTH} characters: shorten the name")
        return self

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace

    def trial_name(self, number: int) -> str:
        return f"{self.name}{TRIAL_SUFFIX}{number}"


SWEEP_KIND = JobKind("SweepJob", SweepJob, API_GROUP, VERSION, "sweepjobs", "swj", "kubeforge")
#: Every kind the CRDs and the chart's RBAC know.
ALL_KINDS: dict[str, JobKind] = {**KINDS, SWEEP_KIND.kind: SWEEP_KIND}


def parse_sweep(document: Any) -> SweepJob:
    """Validate one SweepJob manifest, or raise SpecError naming each offending field."""
    try:
        return SweepJob.model_validate(document)
    except ValidationError as exc:
        raise SpecError([field_problem(e) for e in exc.errors()]) from None


def _parse_manifest(document: Any) -> Job | SweepJob:
    if isinstance(document, dict) and document.get("kind") == SWEEP_KIND.kind:
        return parse_sweep(document)
    return parse_job(document)


def load_manifests(text: str) -> list[Job | SweepJob]:
    """Every job and sweep in a (multi-document) YAML text, in order; names unique per kind."""
    return _parse_each(_documents(text), _parse_manifest)


def load_manifest_file(path: str) -> list[Job | SweepJob]:
    try:
        with open(path, encoding="utf-8") as handle:
            return load_manifests(handle.read())
    except OSError as exc:
        raise SpecError([f"{path}: {exc.strerror}"]) from None


# ---------------------------------------------------------------------------------------------
# Where a job's outputs live: the same answer for `kubeforge run`, the operator and the trainer.

EXPORT_DIR = "export"
HUB_SCHEME = "hf://"


def job_storage_uri(root: str, kind: str, namespace: str, name: str, uid: str | None = None) -> str:
    """The default checkpoint URI of a job under a storage root (s3://bucket/prefix or a directory).

    A uid suffix keeps a re-created job with the same name from resuming its predecessor."""
    leaf = f"{name}-{uid[:8]}" if uid else name
    return f"{root.rstrip('/')}/{namespace}/{kind.lower()}/{leaf}"


def base_model_cache_uri(root: str, namespace: str) -> str:
    """Where a namespace's jobs keep the Hub models they start from (hf:// base models), each fetched once."""
    return f"{root.rstrip('/')}/{namespace}/base-models"


def corpus_cache_uri(root: str, namespace: str) -> str:
    """Where a namespace's PretrainJobs keep their corpora prepared (tokenized into shards), each prepared once."""
    return f"{root.rstrip('/')}/{namespace}/corpora"


def checkpoint_uri(job: Job, default_root: str) -> str:
    return job.spec.checkpoint.uri or job_storage_uri(
        default_root, job.kind, job.namespace, job.name, job.metadata.uid)


def export_uri(checkpoint_root: str) -> str:
    """Where the final Hugging Face model of a job with this checkpoint URI is exported."""
    return f"{checkpoint_root.rstrip('/')}/{EXPORT_DIR}"
