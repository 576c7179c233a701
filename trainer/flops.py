"""Model FLOPs utilisation (MFU): the FLOPs a training token costs against the GPU's peak.

MFU = achieved model FLOP/s / peak FLOP/s of the device, where the model FLOPs per token follow
PaLM (Chowdhery et al. 2022, appendix B): 6 per parameter (forward, backward for activations and
for weights) plus 12 * layers * hidden * sequence length for attention. Recomputation, padding and
optimizer work are not counted, so MFU understates what the hardware does, by design.
"""

from __future__ import annotations

import re

# Dense peak FLOP/s per GPU from NVIDIA's data sheets, without sparsity: (name pattern, bf16, fp32).
# fp32 is the TF32 tensor-core rate where the GPU has one (Ampere and later: distributed.start turns
# TF32 matmuls on), else the plain fp32 rate.
# The first pattern that matches the device name (lower-cased, as torch.cuda.get_device_name gives
# it, e.g. "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "Tesla T4") wins.
PEAK_FLOPS: tuple[tuple[str, float | None, float], ...] = (
    (r"\bh100 pcie\b", 756e12, 378e12),
    (r"\bh100 nvl\b", 835e12, 417.5e12),
    (r"\bh100\b", 989.4e12, 494.7e12),  # SXM
    (r"\bh200 nvl\b", 835e12, 417.5e12),
    (r"\bh200\b", 989.4e12, 494.7e12),  # SXM
    (r"\ba100\b", 312e12, 156e12),
    (r"\bl40s\b", 362.05e12, 183e12),
    (r"\bl40\b", 181.05e12, 90.5e12),
    (r"\bl4\b", 121e12, 60e12),
    (r"\ba10\b", 125e12, 62.5e12),
    (r"\bv100\b", None, 15.7e12),  # Volta and Turing: no TF32, no bf16
    (r"\bt4\b", None, 8.1e12),
)


def peak_flops(device_name: str, bf16: bool) -> float | None:
    """The device's dense peak FLOP/s for the precision trained in, or None when it is not in the table
    (or has no bf16)."""
    name = device_name.lower()
    for pattern, bf16_peak, fp32_peak in PEAK_FLOPS:
        if re.search(pattern, name):
            return bf16_peak if bf16 else fp32_peak
    return None


def training_flops_per_token(parameters: int, layers: int, hidden: int, sequence_length: int) -> float:
    """Model FLOPs of one trained token: 6N for the weights plus 12·L·H·T for attention."""
    return 6.0 * parameters + 12.0 * layers * hidden * sequence_length


def model_flops_utilization(tokens_per_second: float, flops_per_token: float, peak: float) -> float:
    """The fraction (0..1) of the device's peak that the model's own FLOPs use."""
    return tokens_per_second * flops_per_token / peak
