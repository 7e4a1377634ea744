"""The two-tower image–text model (CLIP; with a logit bias for SigLIP)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmpretrain.config.schema import ModelConfig
from mmpretrain.model.heads import build_fusion_head
from mmpretrain.model.text import TextTransformer
from mmpretrain.model.vision import VisionTransformer


class CLIP(nn.Module):
    """Image tower + text tower projected into a shared embedding space, with a learned scale.

    `logit_scale` is the *log* of the temperature's inverse, stored as a shape-[1] parameter
    (DeepSpeed 0.19.8 fails on 0-dim parameters); `logit_bias` (shape [1]) exists only when
    `with_logit_bias` (SigLIP). `forward` returns the exponentiated, clamped scale.
    """

    def __init__(self, cfg: ModelConfig, with_logit_bias: bool = False) -> None:
        super().__init__()
        if cfg.embed_dim <= 0:
            raise ValueError(f"model.embed_dim must be positive, got {cfg.embed_dim}")
        if cfg.max_logit_scale <= 0:
            raise ValueError(f"model.max_logit_scale must be positive, got {cfg.max_logit_scale}")
        self.embed_dim = cfg.embed_dim
        self.max_logit_scale = cfg.max_logit_scale
        self.visual = VisionTransformer(cfg.vision, cfg.embed_dim, cfg.attention,
                                        cfg.activation_checkpointing)
        self.text = TextTransformer(cfg.text, cfg.embed_dim, cfg.attention,
                                    cfg.activation_checkpointing)
        self.logit_scale = nn.Parameter(torch.full((1,), float(cfg.init_logit_scale)))  # (1,)
        self.logit_bias: nn.Parameter | None = None
        if with_logit_bias:
            self.logit_bias = nn.Parameter(torch.full((1,), float(cfg.init_logit_bias)))  # (1,)
        self.fusion_head = build_fusion_head(cfg.fusion.head, cfg.embed_dim)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """images: (B, 3, H, W) normalized floats -> (B, E), L2-normalized if `normalize`."""
        features = self.visual(images)  # (B, E)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """tokens: (B, S) ids -> (B, E), L2-normalized if `normalize`."""
        features = self.text(tokens)  # (B, E)
        return F.normalize(features, dim=-1) if normalize else features

    def scale_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """exp(logit_scale) clamped at max_logit_scale, and the logit bias; both 0-dim."""
        scale = self.logit_scale.exp().clamp(max=self.max_logit_scale).squeeze(0)  # ()
        bias = self.logit_bias.squeeze(0) if self.logit_bias is not None else None  # ()
        return scale, bias

    def fuse(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """One embedding per (image, caption) pair from the configured fusion head.

        images (B, 3, H, W), tokens (B, S) -> (B, E), or (B, 2E) for `concat`."""
        if self.fusion_head is None:
            raise ValueError("model.fusion.head is 'none': no fusion head to apply")
        return self.fusion_head(self.encode_image(images), self.encode_text(tokens))

    def forward(self, images: torch.Tensor, tokens: torch.Tensor,
                with_caption: bool = True) -> dict[str, torch.Tensor | None]:
        """images (B, 3, H, W), tokens (B, S) -> dict of losses' inputs.

        Returns ``image_features`` (B, E) and ``text_features`` (B, E), both L2-normalized;
        ``logit_scale``: 0-dim tensor exp(logit_scale) clamped at `max_logit_scale` (the value
        that multiplies cosine similarities); ``logit_bias``: 0-dim tensor, or None without bias.
        `with_caption` is accepted for a uniform interface with `CoCa` (no effect here).
        """
        scale, bias = self.scale_and_bias()
        return {
            "image_features": self.encode_image(images, normalize=True),  # (B, E)
            "text_features": self.encode_text(tokens, normalize=True),  # (B, E)
            "logit_scale": scale,  # ()
            "logit_bias": bias,  # () or None
        }
