"""The Triton attention kernels as `torch.library` custom ops, for `torch.compile`.

Eager calls run the kernels through the `autograd.Function`s of `attention_triton.py`. Inside
`torch.compile` (`engine.compile`) Dynamo cannot trace those: their launch code picks tiles and
the backward plan in Python and calls Triton's launcher. Before these ops the kernel was
`torch.compiler.disable`d, so every attention call split its block's graph in two (a graph break
on each side): LayerNorm, bias and residual fusions stopped at the attention, and each block ran
as two compiled graphs with eager code between them, also for CUDA graphs (`reduce-overhead`).

As custom ops, the forward and the backward are one opaque node each: Dynamo and AOTAutograd
trace them through their fake implementations (the kernels' output shapes, strides and dtypes,
so the code around them is planned for the real layouts), and at run time the compiled graph
calls the real implementation, which is the eager launch code. Eager keeps the
`autograd.Function`s: a custom op's eager dispatch costs ~35 µs more per call (measured on the
CPU machine with torch 2.11 and 2.13), which a compiled graph does not pay per op.

    mmpretrain::attention_fwd(q, k, v, key_padding_mask, causal, scale) -> (o, lse)
    mmpretrain::attention_bwd(do, q, k, v, o, lse, key_padding_mask, causal, scale)
        -> (dq, dk, dv)
    mmpretrain::attention_packed_fwd(qkv, key_padding_mask, causal, scale) -> (o, lse)
    mmpretrain::attention_packed_bwd(do, qkv, o, lse, key_padding_mask, causal, scale) -> dqkv

q (B, H, Sq, D), k/v (B, H, Sk, D), qkv (B, S, 3, H, D), key_padding_mask (B, Sk) bool or
None; o (B, H, Sq, D) is a view of a (B, Sq, H, D)-contiguous buffer, lse (B, H, Sq) fp32.
The log-sum-exp is an output only for the backward: it is marked non-differentiable.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mmpretrain.kernels import attention_triton as at


@torch.library.custom_op("mmpretrain::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
                  causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """The forward kernel on separate q, k, v: (o, lse)."""
    kpm = at._mask_arg(key_padding_mask, q, k.shape[2])
    return at._forward(q, k, v, kpm, causal, scale)


@attention_fwd.register_fake
def _attention_fwd_fake(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
                        causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    return _outputs_like(q)


@torch.library.custom_op("mmpretrain::attention_bwd", mutates_args=())
def attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                  key_padding_mask: Tensor | None, causal: bool,
                  scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """The backward kernels on separate q, k, v: (dq, dk, dv)."""
    kpm = at._mask_arg(key_padding_mask, q, k.shape[2])
    grads = at._grads_bhsd(q, k, v)
    at._backward((q, k, v, o, lse), do, grads, kpm, causal, scale)
    return grads


@attention_bwd.register_fake
def _attention_bwd_fake(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                        key_padding_mask: Tensor | None, causal: bool,
                        scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return at._grads_bhsd(q, k, v)


@torch.library.custom_op("mmpretrain::attention_packed_fwd", mutates_args=())
def attention_packed_fwd(qkv: Tensor, key_padding_mask: Tensor | None, causal: bool,
                         scale: float) -> tuple[Tensor, Tensor]:
    """The forward kernel reading q, k, v through qkv's strides: (o, lse)."""
    q, k, v = at._unpack(qkv)  # 3 x (B, H, S, D) views
    kpm = at._mask_arg(key_padding_mask, q, k.shape[2])
    return at._forward(q, k, v, kpm, causal, scale)


@attention_packed_fwd.register_fake
def _attention_packed_fwd_fake(qkv: Tensor, key_padding_mask: Tensor | None, causal: bool,
                               scale: float) -> tuple[Tensor, Tensor]:
    return _outputs_like(at._unpack(qkv)[0])


@torch.library.custom_op("mmpretrain::attention_packed_bwd", mutates_args=())
def attention_packed_bwd(do: Tensor, qkv: Tensor, o: Tensor, lse: Tensor,
                         key_padding_mask: Tensor | None, causal: bool, scale: float) -> Tensor:
    """The backward kernels writing dq, dk, dv into one contiguous dqkv (B, S, 3, H, D)."""
    q, k, v = at._unpack(qkv)
    kpm = at._mask_arg(key_padding_mask, q, k.shape[2])
    dqkv, grads = at._packed_grad(qkv)
    at._backward((q, k, v, o, lse), do, grads, kpm, causal, scale)
    return dqkv


@attention_packed_bwd.register_fake
def _attention_packed_bwd_fake(do: Tensor, qkv: Tensor, o: Tensor, lse: Tensor,
                               key_padding_mask: Tensor | None, causal: bool,
                               scale: float) -> Tensor:
    return at._packed_grad(qkv)[0]


def _outputs_like(q: Tensor) -> tuple[Tensor, Tensor]:
    """Empty (o, lse) laid out as `attention_triton._forward` lays them out."""
    batch, heads, sq, dim = q.shape
    o = at._empty_bhsd(batch, heads, sq, dim, q)  # (B, H, Sq, D)
    lse = q.new_empty((batch, heads, sq), dtype=torch.float32)  # (B, H, Sq)
    return o, lse


def _setup(ctx: Any, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
    *tensors, key_padding_mask, causal, scale = inputs  # tensors: [q, k, v] or [qkv]
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(*tensors, o, lse, key_padding_mask)
    ctx.causal, ctx.scale = causal, scale


def _attention_backward(ctx: Any, do: Tensor, _dlse: Tensor | None) -> tuple:
    q, k, v, o, lse, key_padding_mask = ctx.saved_tensors
    return (*attention_bwd(do, q, k, v, o, lse, key_padding_mask, ctx.causal, ctx.scale),
            None, None, None)


def _packed_backward(ctx: Any, do: Tensor, _dlse: Tensor | None) -> tuple:
    qkv, o, lse, key_padding_mask = ctx.saved_tensors
    return (attention_packed_bwd(do, qkv, o, lse, key_padding_mask, ctx.causal, ctx.scale),
            None, None, None)


attention_fwd.register_autograd(_attention_backward, setup_context=_setup)
attention_packed_fwd.register_autograd(_packed_backward, setup_context=_setup)
