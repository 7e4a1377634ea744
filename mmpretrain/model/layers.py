"""Transformer building blocks shared by the image and text towers (single-device code)."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmpretrain.kernels import attention, attention_packed


_init_context: Callable[[nn.Parameter], ContextManager] = lambda p: nullcontext()


def set_init_context(fn: Callable[[nn.Parameter], ContextManager] | None) -> None:
    """Set the context in which a parameter is re-initialized after its module was built.

    Under ZeRO-3's `zero.Init`, a submodule's parameters are partitioned as soon as its
    `__init__` returns, so initializing them from the parent would write into empty shards;
    the engine installs a context that gathers the one parameter, lets rank 0 initialize it and
    re-partitions it. The model itself stays single-device code. None restores the default.
    """
    global _init_context
    _init_context = fn or (lambda p: nullcontext())


def init_normal_(param: nn.Parameter, std: float) -> None:
    """`init_normal_(param, std=std)`, in the installed init context."""
    with _init_context(param):
        nn.init.normal_(param, std=std)


def init_zeros_(param: nn.Parameter) -> None:
    """`init_zeros_(param)`, in the installed init context."""
    with _init_context(param):
        nn.init.zeros_(param)


class LayerNorm(nn.LayerNorm):
    """LayerNorm that always normalizes in fp32 and casts the result back to the input dtype.

    Chosen over plain `nn.LayerNorm` because DeepSpeed's bf16/fp16 modes cast the *weights* to
    half precision too (unlike autocast, which keeps LayerNorm in fp32 on its own): computing
    mean/variance of a width-1024 row in bf16 loses precision and hurts training stability
    (open_clip's `LayerNormFp32` exists for the same reason). In fp32 runs it is plain LayerNorm.
    The parameter names (`weight`, `bias`) are those of `nn.LayerNorm`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., D)
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        out = F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)
        return out.to(x.dtype)


class MLP(nn.Module):
    """Position-wise feed-forward network: Linear -> GELU -> Linear."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, S, D) -> (B, S, D)
        return self.fc2(self.act(self.fc1(x)))  # (B, S, hidden) inside


class KVCache:
    """Keys and values of the positions decoded so far, one (k, v) pair per attention layer.

    Used for incremental decoding (`model/generate.py`): each layer appends its new keys and
    values and attends over everything cached. `reorder` follows beam search's choices.
    """

    def __init__(self) -> None:
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add (B, H, s, D) keys/values of `layer`; return all of them, (B, H, T + s, D)."""
        if layer in self.layers:
            old_k, old_v = self.layers[layer]
            k, v = torch.cat([old_k, k], dim=2), torch.cat([old_v, v], dim=2)
        self.layers[layer] = (k, v)
        return k, v

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (B',) of every layer's cache (beam search)."""
        self.layers = {i: (k.index_select(0, index), v.index_select(0, index))
                       for i, (k, v) in self.layers.items()}


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused QKV projection, via `kernels.attention_packed`."""

    def __init__(self, width: int, heads: int, *, causal: bool = False,
                 attention_impl: str = "auto") -> None:
        super().__init__()
        if width % heads != 0:
            raise ValueError(f"width ({width}) must be a multiple of heads ({heads})")
        self.heads = heads
        self.head_dim = width // heads
        self.causal = causal
        self.attention_impl = attention_impl
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """x: (B, S, D); key_padding_mask: (B, S) bool, True = real token -> (B, S, D).

        With `cache`, x holds only the new positions: their keys/values are appended to the
        cache under `layer` and the (bottom-right aligned, causal) attention spans all of them.
        """
        b, s, d = x.shape
        qkv = self.qkv(x).view(b, s, 3, self.heads, self.head_dim)  # (B, S, 3, H, Dh)
        if cache is None:
            out = attention_packed(qkv, causal=self.causal, key_padding_mask=key_padding_mask,
                                   impl=self.attention_impl)  # (B, S, H, Dh)
            return self.proj(out.reshape(b, s, d))  # (B, S, D)
        if key_padding_mask is not None:
            raise ValueError("incremental decoding (cache) does not take a key padding mask")
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, S, Dh)
        k, v = cache.append(layer, k, v)  # (B, H, T + S, Dh)
        out = attention(q, k, v, causal=self.causal, impl=self.attention_impl)  # (B, H, S, Dh)
        return self.proj(out.transpose(1, 2).reshape(b, s, d))  # (B, S, D)


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, *, causal: bool = False,
                 attention_impl: str = "auto") -> None:
        super().__init__()
        self.ln1 = LayerNorm(width)
        self.attn = SelfAttention(width, heads, causal=causal, attention_impl=attention_impl)
        self.ln2 = LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """x: (B, S, D) -> (B, S, D) (`cache`, `layer`: see `SelfAttention.forward`)."""
        x = x + self.attn(self.ln1(x), key_padding_mask, cache, layer)  # (B, S, D)
        return x + self.mlp(self.ln2(x))  # (B, S, D)


class Transformer(nn.Module):
    """A stack of pre-norm `Block`s, optionally recomputed in backward (activation checkpointing).

    Checkpointing applies only in training mode with gradients enabled, one block at a time,
    with the non-reentrant implementation (works with DeepSpeed ZeRO-3 and keyword arguments).
    """

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0, *,
                 causal: bool = False, attention_impl: str = "auto",
                 activation_checkpointing: bool = False) -> None:
        super().__init__()
        self.width = width
        self.layers = layers
        self.activation_checkpointing = activation_checkpointing
        self.blocks = nn.ModuleList(
            Block(width, heads, mlp_ratio, causal=causal, attention_impl=attention_impl)
            for _ in range(layers))

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, layer_offset: int = 0) -> torch.Tensor:
        """x: (B, S, D); key_padding_mask: (B, S) bool or None -> (B, S, D).

        With `cache` (incremental decoding), block i keeps its keys/values under
        `layer_offset + i`."""
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if cache is not None:
                x = block(x, None, cache, layer_offset + i)  # (B, S, D)
            elif recompute:
                x = checkpoint(block, x, key_padding_mask, use_reentrant=False)  # (B, S, D)
            else:
                x = block(x, key_padding_mask)  # (B, S, D)
        return x

    def init_weights(self) -> None:
        """OpenCLIP initialization: normal weights scaled by width**-0.5 and (2*layers)**-0.5.

        QKV: std width**-0.5; attention out-proj and MLP fc2: width**-0.5 * (2*layers)**-0.5;
        MLP fc1: (2*width)**-0.5. Attention biases are zero (as in `nn.MultiheadAttention`);
        MLP biases keep PyTorch's default `nn.Linear` initialization, as in OpenCLIP.
        """
        attn_std = self.width ** -0.5
        proj_std = attn_std * (2 * self.layers) ** -0.5
        for block in self.blocks:
            assert isinstance(block, Block)
            init_self_attention_(block.attn, attn_std, proj_std)
            init_mlp_(block.mlp, (2 * self.width) ** -0.5, proj_std)


def init_self_attention_(attn: SelfAttention, std: float, proj_std: float) -> None:
    """QKV weights normal(std), output projection normal(proj_std), both biases zero."""
    init_normal_(attn.qkv.weight, std=std)
    init_zeros_(attn.qkv.bias)
    init_normal_(attn.proj.weight, std=proj_std)
    init_zeros_(attn.proj.bias)


def init_mlp_(mlp: MLP, fc_std: float, proj_std: float) -> None:
    """fc1 weight normal(fc_std), fc2 weight normal(proj_std); biases keep nn.Linear's."""
    init_normal_(mlp.fc1.weight, std=fc_std)
    init_normal_(mlp.fc2.weight, std=proj_std)
