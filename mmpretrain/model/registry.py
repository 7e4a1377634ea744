"""Named model sizes. Each entry is the `model` subtree of a config (plain data, no torch).

The CLIP sizes follow the published OpenAI/OpenCLIP architectures (widths, depths, heads, patch
size, resolution, embedding dimension, 49,408-token vocabulary, 77-token context). The `coca_*`
sizes add OpenCLIP's CoCa multimodal decoder (`coca_ViT-B-32`, `coca_ViT-L-14`: as many decoder
layers as text layers, the text width, 256 attentional-pooler queries) to the same towers.
"""
from __future__ import annotations

import copy
from typing import Any

_CLIP_TEXT_B = {"vocab_size": 49408, "context_length": 77, "width": 512, "layers": 12, "heads": 8}
_CLIP_TEXT_L = {"vocab_size": 49408, "context_length": 77, "width": 768, "layers": 12, "heads": 12}
_CLIP_TEXT_H = {"vocab_size": 49408, "context_length": 77, "width": 1024, "layers": 24, "heads": 16}
_CLIP_TEXT_BIGG = {"vocab_size": 49408, "context_length": 77, "width": 1280, "layers": 32,
                   "heads": 20}

MODEL_SIZES: dict[str, dict[str, Any]] = {
    # CPU-friendly: trains the digits demo in minutes on two cores.
    "tiny": {
        "embed_dim": 128,
        "vision": {"image_size": 32, "patch_size": 4, "width": 128, "layers": 4, "heads": 4},
        "text": {"vocab_size": 1024, "context_length": 32, "width": 128, "layers": 4, "heads": 4},
    },
    "vit_b32": {
        "embed_dim": 512,
        "vision": {"image_size": 224, "patch_size": 32, "width": 768, "layers": 12, "heads": 12},
        "text": _CLIP_TEXT_B,
    },
    "vit_b16": {
        "embed_dim": 512,
        "vision": {"image_size": 224, "patch_size": 16, "width": 768, "layers": 12, "heads": 12},
        "text": _CLIP_TEXT_B,
    },
    "vit_l14": {
        "embed_dim": 768,
        "vision": {"image_size": 224, "patch_size": 14, "width": 1024, "layers": 24, "heads": 16},
        "text": _CLIP_TEXT_L,
    },
    "vit_h14": {
        "embed_dim": 1024,
        "vision": {"image_size": 224, "patch_size": 14, "width": 1280, "layers": 32, "heads": 16},
        "text": _CLIP_TEXT_H,
    },
    # The largest OpenCLIP sizes (head widths 88 and 104): for the one-GPU memory limits with
    # ZeRO-3 + CPU offload + activation checkpointing (docs/PERFORMANCE.md).
    "vit_g14": {
        "embed_dim": 1024,
        "vision": {"image_size": 224, "patch_size": 14, "width": 1408, "layers": 40, "heads": 16,
                   "mlp_ratio": 4.3637},
        "text": _CLIP_TEXT_H,
    },
    "vit_bigg14": {
        "embed_dim": 1280,
        "vision": {"image_size": 224, "patch_size": 14, "width": 1664, "layers": 48, "heads": 16,
                   "mlp_ratio": 4.9231},
        "text": _CLIP_TEXT_BIGG,
    },
    # EVA-CLIP's E/14-plus dimensions (head width 112) in our plain pre-norm blocks: ~5.0B
    # parameters, the size where one GPU needs the optimizer state offloaded.
    "vit_e14": {
        "embed_dim": 1024,
        "vision": {"image_size": 224, "patch_size": 14, "width": 1792, "layers": 64, "heads": 16,
                   "mlp_ratio": 8.5715},
        "text": _CLIP_TEXT_BIGG,
    },
}


def _coca(base: str, fusion: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(MODEL_SIZES[base])
    out["fusion"] = {"decoder": True, **fusion}
    return out


MODEL_SIZES.update({
    "coca_tiny": _coca("tiny", {"layers": 2, "heads": 4, "pool_queries": 0}),
    "coca_vit_b32": _coca("vit_b32", {"layers": 12, "heads": 8, "pool_queries": 256}),
    "coca_vit_b16": _coca("vit_b16", {"layers": 12, "heads": 8, "pool_queries": 256}),
    "coca_vit_l14": _coca("vit_l14", {"layers": 12, "heads": 12, "pool_queries": 256}),
})


def preset(size: str) -> dict[str, Any]:
    """Return a fresh copy of the named size's `model` subtree (with `size` set)."""
    if size not in MODEL_SIZES:
        raise KeyError(f"unknown model size {size!r}; known sizes: {', '.join(MODEL_SIZES)}")
    out = copy.deepcopy(MODEL_SIZES[size])
    out["size"] = size
    return out
