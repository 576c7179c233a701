"""Models: built from a transformers config for pretraining, loaded from a base for finetuning."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GPT2Config,
    LlamaConfig,
    PreTrainedModel,
)

from kubeforge.spec import HUB_SCHEME, VIRTUAL_TOKEN_METHODS, FinetuneSpec, JobError, ModelSpec, S3Spec
from kubeforge.storage import StorageError, download_tree, open_storage
from kubeforge.trainer.checkpoint import MANIFEST, fetch_verified, read_manifest, write_committed
from kubeforge.trainer.checkpoint.state import trained_weights

log = logging.getLogger(__name__)

#: What is fetched of a Hub repository: config, tokenizer and safetensors weights, never a pickle.
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


class BaseModelError(JobError):
    """A finetuning job's base model that cannot be found or is not a Hugging Face model; retrying
    will not help."""


class SequenceLengthError(JobError):
    """training.sequenceLength beyond the positions the base model was built with: its position
    embeddings have no row for the later tokens, so training would die on the first long batch."""


def build_pretrain_model(spec: ModelSpec, tokenizer: Any, sequence_length: int) -> PreTrainedModel:
    hidden, layers, heads, mlp = spec.dimensions()
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    config: GPT2Config | LlamaConfig
    if spec.architecture == "gpt2":
        config = GPT2Config(
            vocab_size=len(tokenizer), n_positions=sequence_length, n_embd=hidden, n_layer=layers,
            n_head=heads, n_inner=mlp, resid_pdrop=spec.dropout, embd_pdrop=spec.dropout,
            attn_pdrop=spec.dropout, **special,
        )
    else:
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=mlp,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
            max_position_embeddings=sequence_length, attention_dropout=spec.dropout,
            tie_word_embeddings=True, **special,
        )
    model = AutoModelForCausalLM.from_config(config)
    log.info("built a %s model with %.2fM parameters", spec.architecture,
             sum(p.numel() for p in model.parameters()) / 1e6)
    return model


def fetch_model_dir(uri: str, s3: S3Spec | None, scratch: Path, field: str = "baseModel") -> Path:
    """A local Hugging Face model directory for a base model URI (local directory or S3 prefix), or
    for the model that `field` (teacher, say) names.

    A kubeforge export is fetched as its manifest lists and verified against it; another model
    directory is fetched whole. Either way its weights must be safetensors: a pickled
    pytorch_model.bin can run code when loaded."""
    local = Path(uri.removeprefix("file://"))
    if not uri.startswith("s3://") and local.is_dir():
        if not (local / "config.json").is_file():
            raise BaseModelError(f"{field}: {uri} has no config.json: not a Hugging Face model directory")
        _require_safetensors(local, uri, field)
        return local
    storage = open_storage(uri, s3)
    keys = storage.list()
    if "config.json" not in keys:
        raise BaseModelError(f"{field}: no Hugging Face model (config.json) found at {uri}")
    target = scratch / "base-model"
    if MANIFEST in keys:
        manifest = read_manifest(storage, "")
        if manifest is None:
            raise StorageError(f"{field}.uri: {uri} has a manifest that does not match its files: "
                               "refusing to use it")
        fetch_verified(storage, "", manifest, target, field=f"{field}.uri")
    else:
        download_tree(storage, "", target, field=f"{field}.uri")
    _require_safetensors(target, uri, field)
    return target


def check_positions(spec: FinetuneSpec, base_dir: Path) -> None:
    """Refuse, before any data is read, sequences the base model cannot embed: training.sequenceLength
    beyond its positions, or, for prompt and prefix tuning, with the virtual tokens that come before
    every sequence and take positions of their own."""
    config = AutoConfig.from_pretrained(base_dir)
    positions = getattr(config, "max_position_embeddings", None)  # GPT-2's n_positions, by its attribute_map
    if positions is None:
        return
    length = spec.training.sequence_length
    if length > positions:
        # The key as config.json spells it: GPT-2 calls it n_positions.
        key = getattr(config, "attribute_map", {}).get("max_position_embeddings", "max_position_embeddings")
        raise SequenceLengthError(
            f"training.sequenceLength: {length} exceeds the {positions} positions of the base model "
            f"({key} in its config.json): set it to {positions} or less")
    if spec.method in VIRTUAL_TOKEN_METHODS:
        virtual = spec.virtual_tokens_settings().num_virtual_tokens
        if virtual + length > positions:
            raise JobError(f"{_BLOCK[spec.method]}.numVirtualTokens: {virtual} virtual tokens and "
                           f"training.sequenceLength {length} take {virtual + length} positions, more than the "
                           f"base model's {positions}")


def cache_hub_model(uri: str, cache_root: str, s3: S3Spec | None, scratch: Path) -> str:
    """The URI of the job storage's copy of a Hub model (hf://ORG/NAME[@REVISION]), fetched from the
    Hub the first time only: committed with a manifest under `<cache_root>/ORG/NAME/REVISION`, it
    is what every pod, restart and later job on the same revision reads, the Hub not asked again."""
    repo, _, revision = uri.removeprefix(HUB_SCHEME).partition("@")
    revision = revision or "main"
    cached = f"{cache_root.rstrip('/')}/{repo}/{revision}"
    storage = open_storage(cached, s3)
    if read_manifest(storage, "") is None:
        local = _download_from_hub(uri, repo, revision, scratch / "hub")
        # snapshot_download keeps its own bookkeeping in dot folders: not part of the model.
        files = {path.relative_to(local).as_posix(): path for path in sorted(local.rglob("*"))
                 if path.is_file() and not any(part.startswith(".") for part in path.relative_to(local).parts)}
        write_committed(storage, "", files, {"step": 0})
        log.info("fetched %s from the Hub into %s", uri, cached)
    return cached


def _download_from_hub(uri: str, repo: str, revision: str, target: Path) -> Path:
    """A snapshot of the Hub repository, checked to be a model in safetensors; the token, if any, is
    HF_TOKEN's (baseModel.tokenSecretRef), read by huggingface_hub itself and never logged."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        snapshot_download(repo, revision=revision, local_dir=target, allow_patterns=HUB_FILES)
    except RevisionNotFoundError:
        raise BaseModelError(f"baseModel.uri: {uri}: the Hub repository {repo} has no revision "
                             f"{revision!r}") from None
    except RepositoryNotFoundError:
        raise BaseModelError(f"baseModel.uri: {uri}: no model repository {repo} on the Hub, or it is private "
                             "or gated and baseModel.tokenSecretRef gives no token with access to it") from None
    if not (target / "config.json").is_file():
        raise BaseModelError(f"baseModel.uri: {uri} has no config.json: not a Hugging Face model")
    _require_safetensors(target, uri)
    return target


def _require_safetensors(model_dir: Path, uri: str, field: str = "baseModel") -> None:
    if not any(model_dir.glob("*.safetensors")):
        raise BaseModelError(
            f"{field}: {uri} has no .safetensors weights; kubeforge does not load pickled weights "
            "(pytorch_model.bin) because loading them can run code: save the model with "
            "save_pretrained(..., safe_serialization=True)")


def load_finetune_model(spec: FinetuneSpec, base_dir: Path, tokenizer: Any, labels: list[str] | None,
                        total_steps: int, full_precision: bool = False) -> PreTrainedModel:
    """The base model for the task, wrapped in the method's peft adapters (every method but full);
    `total_steps`, the job's optimizer steps, is what AdaLoRA schedules its rank budget over. With
    lora.quantizeBase the base's Linear layers load quantized (QLoRA) unless `full_precision`: the
    twin the export merges the trained adapters into.

    Weights load from safetensors only: a pickled checkpoint could run code."""
    quantize = None if full_precision else quantized_base(spec)
    loading: dict[str, Any] = {"use_safetensors": True}
    if quantize is not None:
        loading.update(quantization_config=bnb_config(quantize))
        if torch.cuda.is_available():  # bitsandbytes quantizes as the weights reach their device
            loading.update(device_map={"": torch.cuda.current_device()})
    config = AutoConfig.from_pretrained(base_dir)
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    model: PreTrainedModel
    if spec.task == "sequence-classification":
        assert labels is not None
        config.num_labels = len(labels)
        config.id2label = dict(enumerate(labels))
        config.label2id = {label: i for i, label in enumerate(labels)}
        # The base is usually a causal LM: its classification head is new, by design.
        model = AutoModelForSequenceClassification.from_pretrained(
            base_dir, config=config, ignore_mismatched_sizes=True, **loading)
    else:
        model = AutoModelForCausalLM.from_pretrained(base_dir, config=config, **loading)
    if quantize is not None:
        from peft import prepare_model_for_kbit_training

        # Activation checkpointing is the trainer's to enable (non-reentrant), as for any method.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        _train_and_eval_alike(model)
    if spec.method not in WHOLE_MODEL_METHODS:
        model = _with_adapters(model, spec, total_steps, announce=not full_precision)
    return model


#: Methods that train every weight of the base, with no adapters: distill trains the student whole.
WHOLE_MODEL_METHODS = ("full", "distill")

#: The settings block of each peft method, as its errors name it.
_BLOCK = {"lora": "lora", "ia3": "ia3", "prompt-tuning": "promptTuning", "prefix-tuning": "prefixTuning",
          "adalora": "adalora"}


def _with_adapters(model: PreTrainedModel, spec: FinetuneSpec, total_steps: int, announce: bool = True) -> Any:
    """The base wrapped in the method's adapters; `announce`: log what trains (not for an export's twin)."""
    from peft import get_peft_model

    block = _BLOCK[spec.method]
    try:
        config = _peft_config(spec, total_steps)
    except ValueError as exc:  # peft's own checks of the settings (AdaLoRA's schedule)
        raise JobError(f"{block}: {exc}") from None
    try:
        adapted = get_peft_model(model, config)
    except ValueError as exc:
        # peft names the modules it could not find; say which field to change.
        raise JobError(f"{block}.targetModules: {exc}") from None
    trainable, total = adapted.get_nb_trainable_parameters()
    if announce:
        log.info("%s: %d of %d parameters trainable (%.2f%%)", spec.method, trainable, total, 100 * trainable / total)
    return adapted


def _peft_config(spec: FinetuneSpec, total_steps: int) -> Any:
    """The peft config of the job's method, from its settings block."""
    from peft import AdaLoraConfig, IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType

    task = TaskType.SEQ_CLS if spec.task == "sequence-classification" else TaskType.CAUSAL_LM
    if spec.method == "lora":
        lora = spec.lora_settings()
        return LoraConfig(task_type=task, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=_names(lora.target_modules), use_dora=lora.use_dora,
                          use_rslora=lora.use_rslora)
    if spec.method == "ia3":
        ia3 = spec.ia3_settings()
        return IA3Config(task_type=task, target_modules=_names(ia3.target_modules),
                         feedforward_modules=_names(ia3.feedforward_modules))
    if spec.method == "prompt-tuning":
        return PromptTuningConfig(task_type=task, num_virtual_tokens=spec.virtual_tokens_settings().num_virtual_tokens)
    if spec.method == "prefix-tuning":
        return PrefixTuningConfig(task_type=task, num_virtual_tokens=spec.virtual_tokens_settings().num_virtual_tokens)
    ada = spec.adalora_settings()
    return AdaLoraConfig(task_type=task, init_r=ada.init_r, target_r=ada.target_r, lora_alpha=ada.alpha,
                         lora_dropout=ada.dropout, target_modules=_names(ada.target_modules), tinit=ada.tinit,
                         tfinal=ada.tfinal, deltaT=ada.delta_t, beta1=ada.beta1, beta2=ada.beta2,
                         total_step=total_steps)


def _names(modules: list[str] | None) -> list[str] | None:
    return list(modules) if modules else None


def quantized_base(spec: FinetuneSpec) -> Literal["4bit", "8bit"] | None:
    """lora.quantizeBase: how a QLoRA job's frozen base is quantized; None for every other job."""
    return spec.lora_settings().quantize_base if spec.method == "lora" else None


def bnb_config(quantize: Literal["4bit", "8bit"]) -> Any:
    """QLoRA's quantization (bitsandbytes): 4bit is NF4 with double-quantized scales, computing in
    bf16 on a GPU that has it and fp32 elsewhere (bf16 on CPU is ~30x slower); 8bit is LLM.int8()."""
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def dequantized_twin(trained: Any, twin: Any) -> Any:
    """`twin` (the same peft model on the full-precision base) given the trained adapters and, in
    place of each quantized base weight, that weight dequantized as the trained model computed with
    it: merging the adapters then exports the model that was trained and evaluated."""
    import bitsandbytes as bnb
    from peft.utils.integrations import dequantize_bnb_weight
    from transformers.pytorch_utils import Conv1D

    twin.load_state_dict(trained_weights(trained), strict=False)
    for name, layer in trained.named_modules():
        if isinstance(layer, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            weight: Any = layer.weight  # bitsandbytes' Params4bit or Int8Params
            state = layer.state if isinstance(layer, bnb.nn.Linear8bitLt) else weight.quant_state
            target = twin.get_submodule(name)
            dequantized = dequantize_bnb_weight(weight, state=state).to(target.weight.dtype)
            with torch.no_grad():  # GPT-2's Conv1D keeps its weight transposed, as (in, out)
                target.weight.copy_(dequantized.T if isinstance(target, Conv1D) else dequantized)
    return twin


def _train_and_eval_alike(model: Any) -> None:
    """bitsandbytes repacks a 4-bit layer's weights for its CPU inference kernel at the first forward
    without grad (an eval) and keeps them so: training then runs that kernel, which has no backward,
    and dequantize no longer reads the weights right. Keep every layer on the one kernel."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


#: Methods that training.parallelism fsdp cannot shard. AdaLoRA's rank allocator scores and masks
#: whole adapter matrices, which FSDP holds in shards; prompt and prefix tuning's virtual-token
#: encoder runs outside the transformer blocks that FSDP unshards.
NOT_SHARDABLE = ("adalora", "prompt-tuning", "prefix-tuning")


def refuse_unsupported(spec: FinetuneSpec, parallelism: str) -> None:
    """Refuse, naming the field, what the job's method cannot train with, before anything is loaded."""
    if quantized_base(spec) is not None and parallelism == "fsdp":
        # FSDP would shard bitsandbytes' packed weights without their quantization state.
        raise JobError("lora.quantizeBase: training.parallelism fsdp cannot shard a quantized base; use ddp")
    if parallelism == "fsdp" and spec.method in NOT_SHARDABLE:
        raise JobError(f"training.parallelism: fsdp does not support method {spec.method}; use ddp")


@contextlib.contextmanager
def task_loss_only(model: Any) -> Iterator[None]:
    """AdaLoRA adds its orthogonality regulariser to every loss it computes, in eval too: without it
    an eval's loss is the task's, comparable across methods and with the exported model's."""
    config: Any = getattr(model, "peft_config", {}).get("default")
    weight = getattr(config, "orth_reg_weight", None)
    if weight is None:
        yield
        return
    config.orth_reg_weight = 0.0
    try:
        yield
    finally:
        config.orth_reg_weight = weight


def trainable_parameters(model: Any) -> int:
    """The parameters the optimizer trains: peft counts a quantized base's packed weights as the
    values they hold, and a sharded model's parameters count whole."""
    counted = getattr(model, "get_nb_trainable_parameters", None)
    if counted is not None:
        return int(counted()[0])
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merges_on_export(model: Any) -> bool:
    """Whether the model's adapters fold into its weights (lora, ia3, adalora), or stay apart from
    the base as virtual tokens do (prompt and prefix tuning)."""
    return not getattr(model, "peft_config", None) or hasattr(model, "merge_and_unload")


def adalora_rank_pattern(model: Any) -> dict[str, int] | None:
    """Each AdaLoRA-adapted layer's rank as allocated so far (None before the first allocation or
    for another method): the count of its singular values left unmasked."""
    config = getattr(model, "peft_config", {}).get("default")
    pattern = getattr(config, "rank_pattern", None)
    if not pattern:
        return None
    return {name.removeprefix("base_model.model.").removesuffix(".lora_E.default"): int(sum(kept))
            for name, kept in pattern.items()}


def enable_activation_checkpointing(model: Any) -> None:
    """training.activationCheckpointing: each layer's activations recomputed in the backward pass
    (transformers' gradient checkpointing). Non-reentrant: it needs no input that requires grad (LoRA's
    frozen embeddings) and works under torch.compile and FSDP."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise JobError(f"training.activationCheckpointing: {type(model).__name__} does not support activation "
                       "checkpointing; set it to false")
    non_reentrant = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=non_reentrant)
    else:  # transformers releases before the rename
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=non_reentrant)


def unwrap_for_export(model: Any) -> PreTrainedModel:
    """A plain transformers model: LoRA, AdaLoRA or IA3 adapters merged into the base weights.
    Prompt and prefix tuning's cannot merge: see save_for_export."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


#: Where an export keeps adapters that cannot merge, next to the base model they adapt.
ADAPTER_DIR = "adapter"


def save_for_export(model: Any, directory: Path) -> Literal["merged", "base+adapter"]:
    """The trained model in Hugging Face format: one model with the adapters merged (lora, ia3,
    adalora, or none at all), or, for virtual tokens, which cannot merge, the base model with peft's
    adapter under adapter/ (`PeftModel.from_pretrained(base, directory / "adapter")`)."""
    if merges_on_export(model):
        unwrap_for_export(model).save_pretrained(directory)
        return "merged"
    model.save_pretrained(directory / ADAPTER_DIR)
    base = model.get_base_model()
    base.save_pretrained(directory, state_dict=_base_weights(base))
    return "base+adapter"


def _base_weights(base: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base's weights under their own names, with the modules peft trained whole (a classifier's
    head, held by peft next to the original) in place of the originals: the base alone then
    classifies as the adapter does."""
    weights = {}
    for name, tensor in base.state_dict().items():
        if ".original_module." not in name:
            weights[name.replace(".modules_to_save.default.", ".")] = tensor
    return weights
