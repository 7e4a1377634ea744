"""The ViT image tower of the two-tower model."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmpretrain.config.schema import VisionConfig
from mmpretrain.model.layers import LayerNorm, Transformer, init_normal_


def validate_vision_config(cfg: VisionConfig) -> None:
    """Raise ValueError, naming the config field, if the image tower cannot be built."""
    for name in ("image_size", "patch_size", "width", "layers", "heads"):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"model.vision.{name} must be positive, got {getattr(cfg, name)}")
    if cfg.image_size % cfg.patch_size != 0:
        raise ValueError(
            f"model.vision.image_size ({cfg.image_size}) must be a multiple of "
            f"model.vision.patch_size ({cfg.patch_size})")
    if cfg.width % cfg.heads != 0:
        raise ValueError(
            f"model.vision.width ({cfg.width}) must be a multiple of "
            f"model.vision.heads ({cfg.heads})")
    if cfg.mlp_ratio <= 0:
        raise ValueError(f"model.vision.mlp_ratio must be positive, got {cfg.mlp_ratio}")
    if cfg.pool not in ("cls", "mean"):
        raise ValueError(f"model.vision.pool must be 'cls' or 'mean', got {cfg.pool!r}")


class PatchEmbed(nn.Conv2d):
    """Non-overlapping patch embedding: a Conv2d (kernel = stride = patch; its weight layout,
    init and state-dict name) computed as one matmul over the unfolded patches.

    For a stride-equal-kernel convolution the two are the same sum. cuDNN ran it on the H200
    (ViT-B/16, batch 256) as layout transposes (NCHW <-> NHWC, 1.3 ms a step), an implicit
    GEMM at 43 TFLOP/s (1.4 ms forward) and its weight gradient (0.4 ms): 3.1 ms a step. As a
    matmul it is one copy (the unfold) and one GEMM of (B*N, 3*p*p) x (3*p*p, width) forward,
    one for the weight gradient, like every other linear layer.
    """

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, N, width)
        b, c, h, w = images.shape
        p = self.kernel_size[0]
        gh, gw = h // p, w // p
        patches = images.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5)  # (B,gh,gw,C,p,p)
        patches = patches.reshape(b, gh * gw, c * p * p)  # (B, N, C*p*p), the kernel's order
        weight = self.weight.reshape(self.out_channels, -1)  # (width, C*p*p)
        return F.linear(patches, weight, self.bias)  # (B, N, width)


class VisionTransformer(nn.Module):
    """CLIP-style ViT: patch embedding, class token, learned positions, pre-norm Transformer.

    Input: normalized float images (B, 3, image_size, image_size). `forward` returns the pooled,
    projected features (B, embed_dim) (not L2-normalized); `forward_tokens` returns every token
    after `ln_post` (B, 1 + N, width), class token first.
    """

    def __init__(self, cfg: VisionConfig, embed_dim: int, attention_impl: str = "auto",
                 activation_checkpointing: bool = False) -> None:
        super().__init__()
        validate_vision_config(cfg)
        self.image_size = cfg.image_size
        self.patch_size = cfg.patch_size
        self.pool_kind = cfg.pool
        self.grid = cfg.image_size // cfg.patch_size
        num_tokens = 1 + self.grid * self.grid
        self.patch_embed = PatchEmbed(3, cfg.width, kernel_size=cfg.patch_size,
                                      stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(cfg.width))  # (width,)
        self.positional_embedding = nn.Parameter(torch.empty(num_tokens, cfg.width))  # (1+N, W)
        self.ln_pre = LayerNorm(cfg.width)
        self.transformer = Transformer(
            cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, causal=False,
            attention_impl=attention_impl, activation_checkpointing=activation_checkpointing)
        self.ln_post = LayerNorm(cfg.width)
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        """OpenAI CLIP / OpenCLIP ViT initialization (class/position/projection std width**-0.5).

        The blocks use `Transformer.init_weights` (OpenCLIP applies that scheme to its text
        tower; we use the same one in both towers).
        """
        std = self.transformer.width ** -0.5
        init_normal_(self.class_embedding, std=std)
        init_normal_(self.positional_embedding, std=std)
        init_normal_(self.proj.weight, std=std)
        self.transformer.init_weights()

    def forward_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) -> every token output after ln_post, (B, 1 + N, width)."""
        if images.dim() != 4 or images.shape[1:] != (3, self.image_size, self.image_size):
            raise ValueError(
                f"expected images of shape (B, 3, {self.image_size}, {self.image_size}) "
                f"(model.vision.image_size), got {tuple(images.shape)}")
        x = self.patch_embed(images)  # (B, N, W), N = grid * grid in row-major order
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, W)
        x = torch.cat([cls, x], dim=1)  # (B, 1 + N, W)
        x = x + self.positional_embedding.to(x.dtype)  # (B, 1 + N, W)
        x = self.ln_pre(x)  # (B, 1 + N, W)
        x = self.transformer(x)  # (B, 1 + N, W)
        return self.ln_post(x)  # (B, 1 + N, W)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token outputs (B, 1 + N, W) -> pooled, projected features (B, embed_dim)."""
        if self.pool_kind == "cls":
            pooled = tokens[:, 0]  # (B, W)
        else:
            pooled = tokens[:, 1:].mean(dim=1)  # (B, W)
        return self.proj(pooled)  # (B, E)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) -> projected image features (B, embed_dim), not normalized."""
        return self.pool(self.forward_tokens(images))  # (B, E)
