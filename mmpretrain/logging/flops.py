"""Model FLOPs per training sample, peak bf16 tensor throughput by GPU, and MFU.

Convention: *model* FLOPs, as in the PaLM paper's MFU (Chowdhery et al. 2022, appendix B):
only matrix multiplications count, 2·m·n·k each; a training step costs 3x the forward (the
backward computes a gradient for the input and one for the weight of every matmul). Work that
an implementation adds on top is *not* counted (activation checkpointing's recomputed forward,
the no-grad feature pass of gradient accumulation with feature caching), and causal attention
is counted over the full S x S square although a causal kernel skips half of it. Elementwise
work (norms, GELU, softmax, residuals), embedding lookups and the contrastive logits (2·B·E per
sample, B the global batch) are left out; at a global batch of 32k the logits would add 0.08%
to ViT-B/16's count (0.23% to ViT-B/32's).

MFU = achieved model FLOP/s per accelerator / that accelerator's peak dense bf16 FLOP/s.
"""
from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch

from mmpretrain.config.schema import ModelConfig, TextConfig, VisionConfig

PEAK_TFLOPS_ENV = "MMPRETRAIN_PEAK_TFLOPS"
"""Environment variable that overrides the peak TFLOP/s of the device (any device, CPU too)."""

# Peak dense (no structured sparsity) bf16 tensor-core TFLOP/s with fp32 accumulation, from the
# vendor datasheets (NVIDIA publishes "with sparsity" figures: these are half of those). Matched
# in order against `torch.cuda.get_device_name()`, case-insensitive; the first match wins.
# Variants whose figure differs and is not listed (H100/H200 NVL, A10G, L40 without S) match
# nothing, so their MFU is "unknown" unless MMPRETRAIN_PEAK_TFLOPS is set.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"H100.*PCIe", 756.0),          # H100 PCIe: 1,513 with sparsity
    (r"H100.*(HBM3|SXM)", 989.0),    # H100 SXM5 ("NVIDIA H100 80GB HBM3"): 1,979 with sparsity
    (r"H200(?!.*NVL)", 989.0),       # H200 SXM: 1,979 with sparsity
    (r"A100", 312.0),                # A100 SXM4 and PCIe, 40 and 80 GB: 624 with sparsity
    (r"L40S", 362.0),                # L40S: 733 with sparsity
    (r"\bL4\b", 121.0),              # L4: 242 with sparsity
    (r"\bA10\b", 125.0),             # A10: 250 with sparsity
    (r"RTX 4090", 165.0),            # GeForce RTX 4090: 165.2 (bf16, fp32 accumulate)
)


def _block_flops(tokens: int, width: int, mlp_ratio: float) -> int:
    """One pre-norm Transformer block (fused QKV self-attention + MLP) over `tokens` tokens."""
    hidden = int(width * mlp_ratio)
    linear = 2 * tokens * width * (3 * width + width + 2 * hidden)  # qkv, out proj, fc1, fc2
    attention = 2 * 2 * tokens * tokens * width  # QK^T and AV, all heads, full square
    return linear + attention


def _image_tokens(cfg: VisionConfig) -> int:
    """Class token + patches."""
    return 1 + (cfg.image_size // cfg.patch_size) ** 2


def vision_forward_flops(cfg: VisionConfig, embed_dim: int) -> int:
    """Image tower, one image: patch-embedding conv, blocks, output projection."""
    patches = (cfg.image_size // cfg.patch_size) ** 2
    conv = 2 * patches * (3 * cfg.patch_size ** 2) * cfg.width  # (N, 3·p·p) @ (3·p·p, W)
    blocks = cfg.layers * _block_flops(_image_tokens(cfg), cfg.width, cfg.mlp_ratio)
    return conv + blocks + 2 * cfg.width * embed_dim  # pooled token -> embedding


def text_forward_flops(cfg: TextConfig, embed_dim: int) -> int:
    """Text tower, one caption at the full context length: blocks, output projection."""
    blocks = cfg.layers * _block_flops(cfg.context_length, cfg.width, cfg.mlp_ratio)
    return blocks + 2 * cfg.width * embed_dim  # EOT token -> embedding


def fusion_forward_flops(cfg: ModelConfig) -> int:
    """CoCa decoder, one sample: attentional pooler (if any), input projection (if widths
    differ), `fusion.layers` blocks of causal self-attention, cross-attention and MLP over the
    S caption tokens, and the LM head. 0 when `fusion.decoder` is off."""
    f, v, t = cfg.fusion, cfg.vision, cfg.text
    if not f.decoder:
        return 0
    wt, wv, s = t.width, v.width, t.context_length
    wd = f.width or wt
    n1, q = _image_tokens(v), f.pool_queries
    flops = 0
    if q > 0:  # Q learned queries attend to the N1 image tokens
        flops += 2 * q * wd * wd + 2 * 2 * n1 * wv * wd  # q proj; k, v proj
        flops += 2 * 2 * q * n1 * wd + 2 * q * wd * wd  # scores, AV; out proj
        m, wm = q, wd
    else:
        m, wm = n1, wv
    if wd != wt:
        flops += 2 * s * wt * wd  # input projection
    hidden = int(wd * f.mlp_ratio)
    self_attn = 2 * s * wd * 3 * wd + 2 * 2 * s * s * wd + 2 * s * wd * wd
    cross = (2 * s * wd * wd + 2 * 2 * m * wm * wd  # q proj; k, v proj of the memory
             + 2 * 2 * s * m * wd + 2 * s * wd * wd)  # scores, AV; out proj
    mlp = 2 * 2 * s * wd * hidden
    flops += f.layers * (self_attn + cross + mlp)
    return flops + 2 * s * wd * t.vocab_size  # LM head


def forward_flops_per_sample(model_cfg: ModelConfig) -> int:
    """Matmul FLOPs of one sample's forward pass through the model `model_cfg` describes."""
    return (vision_forward_flops(model_cfg.vision, model_cfg.embed_dim)
            + text_forward_flops(model_cfg.text, model_cfg.embed_dim)
            + fusion_forward_flops(model_cfg))


def train_flops_per_sample(model_cfg: ModelConfig) -> int:
    """Model FLOPs of one training sample: 3 x forward (see the module docstring)."""
    return 3 * forward_flops_per_sample(model_cfg)


def device_name(device: torch.device) -> str:
    """The accelerator's name (`torch.cuda.get_device_name`), or the CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "cpu"


def peak_tflops_for_name(name: str) -> float | None:
    """Peak dense bf16 TFLOP/s of the GPU called `name` (None when not in the table)."""
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return tflops
    return None


def peak_tflops(device: torch.device) -> float | None:
    """Peak dense bf16 TFLOP/s of `device`: $MMPRETRAIN_PEAK_TFLOPS if set, else the table's
    value for a known GPU; None on CPU or an unknown GPU."""
    override = os.environ.get(PEAK_TFLOPS_ENV, "").strip()
    if override:
        try:
            value = float(override)
        except ValueError:
            value = -1.0
        if not value > 0:
            raise ValueError(f"{PEAK_TFLOPS_ENV} must be a positive number of TFLOP/s, "
                             f"got {override!r}")
        return value
    if device.type != "cuda":
        return None
    return peak_tflops_for_name(device_name(device))


def flops_metrics(samples_per_s: float, train_flops: int, world_size: int,
                  peak: float | None) -> dict[str, float]:
    """`tflops_per_s` (model TFLOP/s per rank) from the global samples/s, and `mfu` (its
    fraction of `peak` TFLOP/s) when the peak is known."""
    tflops = train_flops * samples_per_s / max(world_size, 1) / 1e12
    out = {"tflops_per_s": tflops}
    if peak:
        out["mfu"] = tflops / peak
    return out
