"""Model construction: the two-tower CLIP/SigLIP model from a validated `ModelConfig`."""
from __future__ import annotations

from torch import nn

from mmpretrain.config.schema import ModelConfig
from mmpretrain.kernels import set_default_impl
from mmpretrain.model.clip import CLIP
from mmpretrain.model.coca import CoCa
from mmpretrain.model.text import TextTransformer
from mmpretrain.model.vision import VisionTransformer

__all__ = ["CLIP", "CoCa", "TextTransformer", "VisionTransformer", "build_model",
           "count_parameters"]


def build_model(cfg: ModelConfig, loss_kind: str = "clip") -> CLIP:
    """Build the two-tower model (`CoCa` with `model.fusion.decoder`); a learned logit bias is
    added for ``loss_kind == "siglip"``.

    `cfg` is used as given: resolving `cfg.size` into the other fields is the config loader's
    job. `cfg.attention` is passed to every attention layer and also becomes the process
    default for ``impl="auto"`` (`kernels.set_default_impl`), so other attention users follow
    the config too; `cfg.attention_tiles` becomes the process's tile table for the Triton
    kernel. Build under ``with torch.device("meta"):`` to get shapes without memory.
    """
    if loss_kind not in ("clip", "siglip"):
        raise ValueError(f"loss.kind must be 'clip' or 'siglip', got {loss_kind!r}")
    set_default_impl(cfg.attention)
    if cfg.attention_tiles:
        from mmpretrain.kernels.tiles import load_tile_table
        load_tile_table(cfg.attention_tiles)
    cls = CoCa if cfg.fusion.decoder else CLIP
    return cls(cfg, with_logit_bias=loss_kind == "siglip")


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (each shared parameter counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
