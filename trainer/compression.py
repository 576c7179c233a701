"""export.quantize and export.prune: the exported model again, its Linear weights quantized or pruned,
measured against the full one.

compressed-tensors writes it: safetensors only (nothing loaded runs code), loaded back by transformers'
`from_pretrained` through the quantization_config in its config.json (CompressedTensorsConfig, on CPU
too), and the format vLLM serves natively (W8A16 and W4A16, "pack-quantized"). Weight-only schemes
need no calibration data: each scale comes from its weights' range, as llm-compressor's min-max
observer computes it (llm-compressor itself would pin another transformers).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import torch

from kubeforge.spec import QUANTIZE_SCHEMES, FinetuneJob, Job, JobError
from kubeforge.status import CompressionReport, ExportedModel, PruningReport

#: int4's scales cover this many input features each (a group size vLLM's kernels take).
INT4_GROUP_SIZE = 32
#: The format on disk: each int4 or int8 weight packed into int32s, as vLLM's WNA16 kernels read it.
FORMAT = "pack-quantized"
#: Where export.prune's model goes, under export/.
PRUNED_DIR = "pruned"


class QuantizeError(JobError):
    """export.quantize or export.prune cannot be done on this model: refused before any training."""


def _base_layers(model: Any, kinds: tuple[type[torch.nn.Module], ...]) -> Iterator[tuple[str, torch.nn.Module]]:
    """The base model's layers of these kinds (names as in the exported model): the output head,
    outside the base, and embeddings and norms are none of them."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: the adapted model
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    if not isinstance(base, torch.nn.Module):
        return
    for name, module in base.named_modules():
        # peft's adapter matrices are merged away on export; its wrapped layer is the one exported.
        if isinstance(module, kinds) and not any(part.startswith("lora_") for part in name.split(".")):
            yield f"{prefix}.{name.replace('.base_layer', '')}", module


def quantized_layers(model: Any) -> Iterator[tuple[str, torch.nn.Linear]]:
    """What export.quantize quantizes: the base model's Linear layers; the head stays full precision."""
    return cast(Iterator[tuple[str, torch.nn.Linear]], _base_layers(model, (torch.nn.Linear,)))


def refuse_uncompressible(job: Job, model: Any) -> None:
    """export.quantize's and export.prune's refusals, once the model is built and before it trains."""
    settings = job.spec.export
    if not settings.compresses():
        return
    field = "export.quantize" if settings.quantize is not None else "export.prune"
    if isinstance(job, FinetuneJob) and job.spec.method in ("prompt-tuning", "prefix-tuning"):
        raise QuantizeError(f"{field} is not valid with method: {job.spec.method}: its export is the base "
                            "model with the virtual tokens' adapter beside it, not one model to compress")
    quantize = settings.quantize
    if quantize is None:
        return
    layers = list(quantized_layers(model))
    if not layers:
        model_type = getattr(getattr(model, "config", None), "model_type", "this")
        raise QuantizeError(f"export.quantize: the {model_type} model has no nn.Linear layers to quantize (gpt2's "
                            "are transformers' Conv1D, which compressed-tensors and vLLM's quantized loaders do "
                            "not take): use a llama-architecture model")
    if quantize == "int4":
        for name, layer in layers:
            if layer.in_features % INT4_GROUP_SIZE:
                raise QuantizeError(f"export.quantize: int4 scales groups of {INT4_GROUP_SIZE} input features, and "
                                    f"{name} has {layer.in_features}")


def _weight_args(quantize: str) -> Any:
    from compressed_tensors.quantization import QuantizationArgs

    if quantize == "int8":
        return QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
    return QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=INT4_GROUP_SIZE)


def quantize_model_dir(full_dir: Path, target: Path, quantize: str, model_class: Any) -> None:
    """The Hugging Face model in full_dir, quantized by `quantize` (int8 or int4), saved to target with
    its quantization_config."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, apply_quantization_config
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    model = model_class.from_pretrained(full_dir, dtype=torch.float32)
    args = _weight_args(quantize)
    layers = dict(quantized_layers(model))
    config = QuantizationConfig(config_groups={"weights": QuantizationScheme(targets=["Linear"], weights=args)},
                                ignore=[name for name, module in model.named_modules()
                                        if isinstance(module, torch.nn.Linear) and name not in layers],
                                format=FORMAT)
    apply_quantization_config(model, config)
    with torch.no_grad():
        for layer in layers.values():
            weight = layer.weight
            grouped = weight.unflatten(-1, (-1, INT4_GROUP_SIZE)) if args.group_size else weight.unsqueeze(1)
            scale, zero_point = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
            layer.weight_scale.copy_(scale)  # type: ignore[operator]
            layer.weight_zero_point.copy_(zero_point)  # type: ignore[operator]
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=FORMAT)
    compressor.compress_model(model)
    model.save_pretrained(target)
    compressor.update_config(target)


def weights_size(directory: Path) -> int:
    """Bytes of a model directory's weight files (its config and tokenizer are the same either way)."""
    return sum(path.stat().st_size for path in directory.glob("*.safetensors"))


def compression_report(quantize: str, full: ExportedModel, quantized: ExportedModel) -> CompressionReport:
    """The two models side by side, with a one-line summary of size and the task's metric (accuracy for a
    classifier, perplexity for a causal LM)."""
    ratio = quantized.size_bytes / max(full.size_bytes, 1)
    metric = "accuracy" if "accuracy" in full.eval else "perplexity"
    summary = (f"{quantize}: {ratio:.0%} of the size, {metric} {full.eval[metric]:.4f} -> "
               f"{quantized.eval[metric]:.4f}")
    return CompressionReport(quantize=quantize, scheme=QUANTIZE_SCHEMES[quantize], full=full,  # type: ignore[arg-type]
                             quantized=quantized, size_ratio=round(ratio, 4), summary=summary)


def pruned_layers(model: Any) -> Iterator[tuple[str, torch.nn.Module]]:
    """What export.prune prunes: the base model's linear layers, transformers' Conv1D (GPT-2's) among them."""
    from transformers.pytorch_utils import Conv1D

    return _base_layers(model, (torch.nn.Linear, Conv1D))


def prune_model_dir(full_dir: Path, target: Path, sparsity: float, model_class: Any) -> float:
    """The Hugging Face model in full_dir with `sparsity` of each pruned layer's weights, the smallest
    in magnitude, set to zero (torch.nn.utils.prune, made permanent), saved to target; the fraction of
    those layers' weights that are zero after it."""
    from torch.nn.utils import prune

    model = model_class.from_pretrained(full_dir, dtype=torch.float32)
    zeros = total = 0
    for _, layer in pruned_layers(model):
        prune.l1_unstructured(layer, "weight", amount=sparsity)
        prune.remove(layer, "weight")
        weight = cast(torch.Tensor, layer.weight)
        zeros += int(torch.count_nonzero(weight == 0))
        total += weight.numel()
    model.save_pretrained(target)
    return zeros / max(total, 1)


def pruning_report(sparsity: float, full: ExportedModel, pruned: ExportedModel) -> PruningReport:
    """The pruned model beside the full one, with a one-line summary as compression_report's."""
    metric = "accuracy" if "accuracy" in full.eval else "perplexity"
    summary = f"{sparsity:.0%} sparse, {metric} {full.eval[metric]:.4f} -> {pruned.eval[metric]:.4f}"
    return PruningReport(sparsity=round(sparsity, 4), full=full, pruned=pruned, summary=summary)
