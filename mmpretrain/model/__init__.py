"""Model construction: the two-tower CLIP/SigLIP model from a validated `ModelConfig`."""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from torch import nn

from mmpretrain.config.schema import ModelConfig
from mmpretrain.kernels import set_default_impl
from mmpretrain.kernels.speeds import load_speed_table
from mmpretrain.model.clip import CLIP
from mmpretrain.model.coca import CoCa
from mmpretrain.model.fusion import DecoderBlock
from mmpretrain.model.layers import Block
from mmpretrain.model.text import TextTransformer
from mmpretrain.model.vision import VisionTransformer

__all__ = ["CLIP", "CoCa", "TextTransformer", "VisionTransformer", "build_model",
           "count_parameters", "local_model_config", "transformer_blocks"]

logger = logging.getLogger("mmpretrain.model")
_warned: set[tuple[str, str]] = set()


def build_model(cfg: ModelConfig, loss_kind: str = "clip") -> CLIP:
    """Build the two-tower model (`CoCa` with `model.fusion.decoder`); a learned logit bias is
    added for ``loss_kind == "siglip"``.

    `cfg` is used as given: resolving `cfg.size` into the other fields is the config loader's
    job. `cfg.attention` is passed to every attention layer and also becomes the process
    default for ``impl="auto"`` (`kernels.set_default_impl`), so other attention users follow
    the config too; `cfg.attention_tiles` becomes the process's tile table for the Triton
    kernel and `cfg.attention_speeds` its speed table (`auto`'s per-shape choice). Build
    under ``with torch.device("meta"):`` to get shapes without memory.
    """
    if loss_kind not in ("clip", "siglip"):
        raise ValueError(f"loss.kind must be 'clip' or 'siglip', got {loss_kind!r}")
    set_default_impl(cfg.attention)
    if cfg.attention_tiles:
        from mmpretrain.kernels.tiles import load_tile_table
        load_tile_table(cfg.attention_tiles)
    if cfg.attention_speeds:
        load_speed_table(cfg.attention_speeds)
    cls = CoCa if cfg.fusion.decoder else CLIP
    return cls(cfg, with_logit_bias=loss_kind == "siglip")


def local_model_config(cfg: ModelConfig, origin: str = "the saved config") -> ModelConfig:
    """`cfg` read from a run (evaluation, export, captioning, maybe on another machine) with
    its `attention_tiles` / `attention_speeds` dropped where their files are not here: they
    only choose kernels, so the built-in choices stand in, with a warning naming the file."""
    drop = {}
    for name in ("attention_tiles", "attention_speeds"):
        path = getattr(cfg, name)
        if path and not Path(path).is_file():
            if (name, path) not in _warned:  # export builds the model up to three times
                _warned.add((name, path))
                logger.warning("%s names model.%s=%s, which is not here; using the built-in "
                               "attention choices instead", origin, name, path)
            drop[name] = ""
    return replace(cfg, **drop) if drop else cfg


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (each shared parameter counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def transformer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, block) of every Transformer block of `model`: both towers' `Block`s and the
    decoder's `DecoderBlock`s (what `engine.compile` compiles and `engine.float8` converts)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (Block, DecoderBlock))]
