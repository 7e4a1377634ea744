"""Fusion heads: one embedding for an image–text pair, from the two towers' embeddings.

For downstream use (e.g. a classifier on pairs): `model.fuse(images, tokens)` runs both towers
and the configured head (`model.fusion.head`). The pretraining losses do not train the heads'
parameters; fine-tune them on the downstream task.
"""
from __future__ import annotations

import torch
from torch import nn

from mmpretrain.model.layers import init_zeros_


class ConcatHead(nn.Module):
    """[image; text]: (B, E), (B, E) -> (B, 2E). No parameters."""

    out_dim_factor = 2

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """image, text (B, E) -> (B, 2E)."""
        return torch.cat([image, text], dim=-1)  # (B, 2E)


class WeightedSumHead(nn.Module):
    """a * image + (1 - a) * text with one learned a = sigmoid(w) (w = 0 at init: a = 0.5)."""

    out_dim_factor = 1

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))  # (1,)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """image, text (B, E) -> (B, E)."""
        a = torch.sigmoid(self.weight.float()).to(image.dtype)  # (1,)
        return a * image + (1 - a) * text  # (B, E)


class GatedHead(nn.Module):
    """Attention-gated fusion: g = sigmoid(W [image; text] + b), g * image + (1 - g) * text.

    The gate is per sample and per dimension, computed from both embeddings; W = 0, b = 0 at
    initialization, so the head starts as the plain average.
    """

    out_dim_factor = 1

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.gate = nn.Linear(2 * embed_dim, embed_dim)
        init_zeros_(self.gate.weight)
        init_zeros_(self.gate.bias)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """image, text (B, E) -> (B, E)."""
        g = torch.sigmoid(self.gate(torch.cat([image, text], dim=-1)))  # (B, E)
        return g * image + (1 - g) * text  # (B, E)


def build_fusion_head(kind: str, embed_dim: int) -> nn.Module | None:
    """The head `model.fusion.head` names (None for `none`)."""
    if kind == "none":
        return None
    if kind == "concat":
        return ConcatHead()
    if kind == "weighted_sum":
        return WeightedSumHead()
    if kind == "gated":
        return GatedHead(embed_dim)
    raise ValueError(f"model.fusion.head must be none, concat, weighted_sum or gated, got {kind!r}")
