"""The CoCa multimodal decoder: text tokens attend causally to themselves and to image tokens.

Structure (shapes with B batch, S text positions, M memory tokens, Wd decoder width):

    image tokens (B, 1+N, Wv) --[AttentionalPooler, optional]--> memory (B, M, Wm)
    text tokens  (B, S, Wt)   --[Linear if Wt != Wd]-----------> x (B, S, Wd)
    L x DecoderBlock: x += SelfAttn(ln1 x, causal); x += CrossAttn(ln2 x, ln_mem memory);
                      x += MLP(ln3 x)
    ln_final -> lm_head -> next-token logits (B, S, V)

The memory is the pooler's Q learned-query outputs (Wm = Wd) when `fusion.pool_queries > 0`,
else every image token (Wm = Wv). Incremental decoding keeps the self-attention keys/values in a
`KVCache`; the cross-attention keys/values depend only on the image and are computed once per
generation (`memory_kv`).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmpretrain.config.schema import FusionConfig, ModelConfig
from mmpretrain.kernels import attention
from mmpretrain.model.layers import (MLP, KVCache, LayerNorm, SelfAttention, init_mlp_,
                                     init_normal_, init_self_attention_, init_zeros_)

MemoryKV = list[tuple[torch.Tensor, torch.Tensor]]
"""Per decoder block, the cross-attention keys and values of the memory, (B, H, M, Dh) each."""


def validate_fusion_config(cfg: FusionConfig, text_width: int) -> int:
    """Raise ValueError naming the field if the decoder cannot be built; return its width."""
    width = cfg.width or text_width
    for name, value in (("width", width), ("layers", cfg.layers), ("heads", cfg.heads)):
        if value <= 0:
            raise ValueError(f"model.fusion.{name} must be positive, got {value}")
    if width % cfg.heads:
        raise ValueError(f"model.fusion.width ({width}) must be a multiple of "
                         f"model.fusion.heads ({cfg.heads})")
    if cfg.pool_queries < 0 or cfg.mlp_ratio <= 0:
        raise ValueError("model.fusion.pool_queries must be >= 0 and model.fusion.mlp_ratio > 0")
    return width


class CrossAttention(nn.Module):
    """Multi-head attention from queries x (width Wd) to a memory of another width (Wm)."""

    def __init__(self, width: int, memory_width: int, heads: int,
                 attention_impl: str = "auto") -> None:
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.attention_impl = attention_impl
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(memory_width, 2 * width)
        self.proj = nn.Linear(width, width)

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """memory (B, M, Wm) -> keys and values, (B, H, M, Dh) each."""
        b, m, _ = memory.shape
        kv = self.kv(memory).view(b, m, 2, self.heads, self.head_dim)  # (B, M, 2, H, Dh)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, H, M, Dh)
        return k, v

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, S, Wd) attends to `memory` (B, M, Wm), or to precomputed `kv` -> (B, S, Wd)."""
        b, s, d = x.shape
        k, v = kv if kv is not None else self.memory_kv(memory)  # (B, H, M, Dh)
        q = self.q(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)  # (B, H, S, Dh)
        out = attention(q, k, v, impl=self.attention_impl)  # (B, H, S, Dh)
        return self.proj(out.transpose(1, 2).reshape(b, s, d))  # (B, S, Wd)

    def init_weights(self, std: float, proj_std: float) -> None:
        """Normal projections (std, proj_std for the output), zero biases."""
        for lin, sd in ((self.q, std), (self.kv, std), (self.proj, proj_std)):
            init_normal_(lin.weight, std=sd)
            init_zeros_(lin.bias)


class AttentionalPooler(nn.Module):
    """Pools image tokens to `queries` learned query tokens with one cross-attention (CoCa)."""

    def __init__(self, width: int, memory_width: int, heads: int, queries: int,
                 attention_impl: str = "auto") -> None:
        super().__init__()
        self.width = width
        self.query = nn.Parameter(torch.empty(queries, width))  # (Q, Wd)
        self.ln_q = LayerNorm(width)
        self.ln_k = LayerNorm(memory_width)
        self.attn = CrossAttention(width, memory_width, heads, attention_impl)
        self.ln_out = LayerNorm(width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, 1+N, Wv) -> pooled (B, Q, Wd)."""
        q = self.ln_q(self.query.to(tokens.dtype)).expand(tokens.shape[0], -1, -1)  # (B, Q, Wd)
        return self.ln_out(self.attn(q, self.ln_k(tokens)))  # (B, Q, Wd)

    def init_weights(self) -> None:
        """Queries and projections normal with std width**-0.5."""
        std = self.width ** -0.5  # not query.shape: under ZeRO-3 it is an empty placeholder
        init_normal_(self.query, std=std)
        self.attn.init_weights(std, std)


class DecoderBlock(nn.Module):
    """Pre-norm block: causal self-attention, cross-attention to the memory, MLP."""

    def __init__(self, width: int, memory_width: int, heads: int, mlp_ratio: float,
                 attention_impl: str = "auto") -> None:
        super().__init__()
        self.ln1 = LayerNorm(width)
        self.attn = SelfAttention(width, heads, causal=True, attention_impl=attention_impl)
        self.ln2 = LayerNorm(width)
        self.ln_mem = LayerNorm(memory_width)
        self.cross = CrossAttention(width, memory_width, heads, attention_impl)
        self.ln3 = LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio))

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """memory (B, M, Wm) -> this block's cross-attention keys/values (B, H, M, Dh)."""
        return self.cross.memory_kv(self.ln_mem(memory))

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """x (B, S, Wd), kv from `memory_kv` -> (B, S, Wd)."""
        x = x + self.attn(self.ln1(x), None, cache, layer)  # (B, S, Wd)
        x = x + self.cross(self.ln2(x), kv=kv)  # (B, S, Wd)
        return x + self.mlp(self.ln3(x))  # (B, S, Wd)


class MultimodalDecoder(nn.Module):
    """CoCa's multimodal text decoder (see the module docstring); returns next-token logits."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        fc, t = cfg.fusion, cfg.text
        self.width = validate_fusion_config(fc, t.width)
        self.layers = fc.layers
        self.activation_checkpointing = cfg.activation_checkpointing
        impl = cfg.attention
        self.pooler: AttentionalPooler | None = None
        memory_width = cfg.vision.width
        if fc.pool_queries > 0:
            self.pooler = AttentionalPooler(self.width, memory_width, fc.heads, fc.pool_queries,
                                            impl)
            memory_width = self.width
        self.input_proj = (nn.Linear(t.width, self.width, bias=False)
                           if t.width != self.width else None)
        self.blocks = nn.ModuleList(
            DecoderBlock(self.width, memory_width, fc.heads, fc.mlp_ratio, impl)
            for _ in range(fc.layers))
        self.ln_final = LayerNorm(self.width)
        self.lm_head = nn.Linear(self.width, t.vocab_size, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        """OpenCLIP-style: std width**-0.5, output projections scaled by (2*layers)**-0.5."""
        std = self.width ** -0.5
        proj_std = std * (2 * self.layers) ** -0.5
        if self.pooler is not None:
            self.pooler.init_weights()
        if self.input_proj is not None:
            init_normal_(self.input_proj.weight, std=std)
        for block in self.blocks:
            assert isinstance(block, DecoderBlock)
            init_self_attention_(block.attn, std, proj_std)
            block.cross.init_weights(std, proj_std)
            init_mlp_(block.mlp, (2 * self.width) ** -0.5, proj_std)
        init_normal_(self.lm_head.weight, std=std)

    def memory(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """Image tokens (B, 1+N, Wv) -> the memory the text attends to, (B, M, Wm)."""
        return self.pooler(image_tokens) if self.pooler is not None else image_tokens

    def memory_kv(self, memory: torch.Tensor) -> MemoryKV:
        """Every block's cross-attention keys/values of `memory` (computed once per image)."""
        return [block.memory_kv(memory) for block in self.blocks]

    def _block(self, block: nn.Module, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return block(x, block.memory_kv(memory))

    def forward(self, text_tokens: torch.Tensor, memory: torch.Tensor | None = None,
                memory_kv: MemoryKV | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """Text tower outputs (B, S, Wt) + memory (B, M, Wm) -> logits (B, S, V).

        Incremental decoding: pass `memory_kv` (from `memory_kv`) and a `cache`; then
        `text_tokens` holds only the new positions."""
        x = self.input_proj(text_tokens) if self.input_proj is not None else text_tokens
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if memory_kv is not None:
                x = block(x, memory_kv[i], cache, i)  # (B, S, Wd)
            elif recompute:
                x = checkpoint(self._block, block, x, memory,
                               use_reentrant=False)  # (B, S, Wd)
            else:
                x = self._block(block, x, memory)  # (B, S, Wd)
        return self.lm_head(self.ln_final(x))  # (B, S, V)
