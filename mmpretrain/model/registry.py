"""Named model sizes. Each entry is the `model` subtree of a config (plain data, no torch).

The CLIP sizes follow the published OpenAI/OpenCLIP architectures (widths, depths, heads, patch
size, resolution, embedding dimension, 49,408-token vocabulary, 77-token context).
"""
from __future__ import annotations

import copy
from typing import Any

_CLIP_TEXT_B = {"vocab_size": 49408, "context_length": 77, "width": 512, "layers": 12, "heads": 8}
_CLIP_TEXT_L = {"vocab_size": 49408, "context_length": 77, "width": 768, "layers": 12, "heads": 12}
_CLIP_TEXT_H = {"vocab_size": 49408, "context_length": 77, "width": 1024, "layers": 24, "heads": 16}

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
}


def preset(size: str) -> dict[str, Any]:
    """Return a fresh copy of the named size's `model` subtree (with `size` set)."""
    if size not in MODEL_SIZES:
        raise KeyError(f"unknown model size {size!r}; known sizes: {', '.join(MODEL_SIZES)}")
    out = copy.deepcopy(MODEL_SIZES[size])
    out["size"] = size
    return out
