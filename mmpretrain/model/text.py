"""The causal text Transformer tower of the two-tower model."""
from __future__ import annotations

import torch
from torch import nn

from mmpretrain.config.schema import TextConfig
from mmpretrain.model.layers import KVCache, LayerNorm, Transformer, init_normal_

PAD_ID = 0
"""Token id of padding; captions are right-padded with it (see `data/tokenize.py`)."""


def validate_text_config(cfg: TextConfig) -> None:
    """Raise ValueError, naming the config field, if the text tower cannot be built."""
    for name in ("vocab_size", "context_length", "width", "layers", "heads"):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"model.text.{name} must be positive, got {getattr(cfg, name)}")
    if cfg.width % cfg.heads != 0:
        raise ValueError(
            f"model.text.width ({cfg.width}) must be a multiple of model.text.heads ({cfg.heads})")
    if cfg.mlp_ratio <= 0:
        raise ValueError(f"model.text.mlp_ratio must be positive, got {cfg.mlp_ratio}")


def eot_index(tokens: torch.Tensor) -> torch.Tensor:
    """Position of the end-of-text token: the last non-pad token. (B, S) -> (B,) long.

    Tokens are right-padded with `PAD_ID`, so it is ``(tokens != PAD_ID).sum(1) - 1``, clamped
    at 0 for an all-padding row.
    """
    return ((tokens != PAD_ID).sum(dim=1) - 1).clamp_min(0)  # (B,)


class TextTransformer(nn.Module):
    """CLIP-style causal text encoder pooled at the end-of-text token.

    Input: token ids (B, S) with S <= context_length, right-padded with 0 and the last non-pad
    token being end-of-text. Because attention is causal, tokens after the end-of-text position
    cannot change the output, so no padding mask is needed. `forward` returns (B, embed_dim)
    (not L2-normalized); `forward_tokens` returns every token after `ln_final`, (B, S, width).
    """

    def __init__(self, cfg: TextConfig, embed_dim: int, attention_impl: str = "auto",
                 activation_checkpointing: bool = False) -> None:
        super().__init__()
        validate_text_config(cfg)
        self.context_length = cfg.context_length
        self.vocab_size = cfg.vocab_size
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(
            cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, causal=True,
            attention_impl=attention_impl, activation_checkpointing=activation_checkpointing)
        self.ln_final = LayerNorm(cfg.width)
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        """OpenCLIP text initialization: token emb std 0.02, positions 0.01, proj width**-0.5."""
        init_normal_(self.token_embedding.weight, std=0.02)
        init_normal_(self.positional_embedding, std=0.01)
        init_normal_(self.proj.weight, std=self.transformer.width ** -0.5)
        self.transformer.init_weights()

    def forward_tokens(self, tokens: torch.Tensor, cache: KVCache | None = None,
                       offset: int = 0) -> torch.Tensor:
        """tokens: (B, S) ids -> every token output after ln_final, (B, S, width).

        Incremental decoding: with `cache`, `tokens` are the ids at positions
        offset .. offset + S - 1 and the earlier positions' keys/values come from the cache.
        """
        if tokens.dim() != 2:
            raise ValueError(f"expected tokens of shape (B, S), got {tuple(tokens.shape)}")
        end = offset + tokens.shape[1]
        if end > self.context_length:
            raise ValueError(
                f"token sequence length {end} exceeds model.text.context_length "
                f"({self.context_length}); truncate captions when tokenizing")
        x = self.token_embedding(tokens)  # (B, S, W)
        x = x + self.positional_embedding[offset:end].to(x.dtype)  # (B, S, W)
        x = self.transformer(x, cache=cache)  # (B, S, W), causal
        return self.ln_final(x)  # (B, S, W)

    def pool(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Token outputs (B, S, W) -> projected features at each row's EOT token, (B, E)."""
        idx = eot_index(tokens)  # (B,)
        pooled = x[torch.arange(x.shape[0], device=x.device), idx]  # (B, W)
        return self.proj(pooled)  # (B, E)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (B, S) ids -> projected text features at the EOT token, (B, embed_dim)."""
        return self.pool(self.forward_tokens(tokens), tokens)  # (B, E)
