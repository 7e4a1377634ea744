"""The single attention entry point of mmpretrain and its dispatch between implementations.

Implementations (all follow the conventions documented in `kernels/reference.py`: q/k/v of shape
(B, H, S, D), `key_padding_mask` (B, Sk) with True = attend, bottom-right aligned causal mask,
fully masked query rows give 0):

* ``reference``: plain PyTorch (`attention_reference`), always available; the ground truth.
* ``sdpa``: `torch.nn.functional.scaled_dot_product_attention` (flash / cuDNN / efficient / math
  backends chosen by PyTorch).
* ``triton``: the fused FlashAttention-2 style kernel of `kernels/attention_triton.py` (CUDA;
  on CPU only under Triton's interpreter, ``TRITON_INTERPRET=1``). Imported lazily.
* ``auto``: the process default set by `set_default_impl` if it names a concrete implementation,
  otherwise by device: ``sdpa`` on CUDA, ``reference`` elsewhere (CPU, meta). ``triton`` is
  opt-in: its bf16/fp16 GPU parity passed (H200, 2026-11-30), but SDPA's cuDNN backend was
  faster on every benchmarked shape (docs/PERFORMANCE.md). With a measured speed table
  loaded (`kernels/speeds.py`, `model.attention_speeds`), ``auto`` on CUDA takes ``triton``
  for the shape classes where `bench attention` timed it faster than every SDPA backend.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F

from mmpretrain.kernels.reference import attention_reference, build_keep_mask, causal_mask
from mmpretrain.kernels.speeds import prefers_triton

__all__ = [
    "attention", "attention_packed", "attention_reference", "available_impls", "causal_mask",
    "get_default_impl", "resolve_impl", "set_default_impl",
]

logger = logging.getLogger("mmpretrain.kernels")

AttentionFn = Callable[..., torch.Tensor]


def _attention_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """`F.scaled_dot_product_attention` with our mask conventions; (B,H,Sq,D) -> (B,H,Sq,D)."""
    batch, _, sq, _ = q.shape
    sk = k.shape[2]
    if key_padding_mask is None and (not causal or sq == sk):
        # No explicit mask needed: is_causal is top-left aligned, equal to ours when Sq == Sk.
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    keep = build_keep_mask(batch, sq, sk, causal=causal, key_padding_mask=key_padding_mask,
                           device=q.device)  # (B|1, 1, Sq, Sk)
    assert keep is not None
    # Guard fully masked rows: let them attend everywhere (finite in every backend), then zero
    # their output; the zeroing also zeroes their gradient contributions.
    row_any = keep.any(dim=-1, keepdim=True)  # (B|1, 1, Sq, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep | ~row_any, scale=scale)
    return out.masked_fill(~row_any, 0.0)  # (B, H, Sq, D)


def _attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """The fused Triton kernel (imported on first use); (B,H,Sq,D) -> (B,H,Sq,D). Inside
    `torch.compile` it is one custom op (`kernels/ops.py`): no graph break."""
    from mmpretrain.kernels.attention_triton import attention_triton

    return attention_triton(q, k, v, causal=causal, key_padding_mask=key_padding_mask,
                            scale=scale)


# Dispatch table: name -> implementation with the signature of `attention_reference`.
_IMPLS: dict[str, AttentionFn] = {
    "reference": attention_reference,
    "sdpa": _attention_sdpa,
    "triton": _attention_triton,
}

_default_impl = "auto"
_logged: set[tuple[str, str, str, bool]] = set()


def available_impls() -> list[str]:
    """Names accepted by `attention(impl=...)` and `set_default_impl`."""
    return ["auto", *_IMPLS]


def set_default_impl(name: str) -> None:
    """Set what ``impl="auto"`` means in this process (``model.attention`` in the config).

    ``"auto"`` restores the device-based choice; any other name forces that implementation.
    """
    global _default_impl
    if name not in available_impls():
        raise ValueError(
            f"unknown attention implementation {name!r} (model.attention); "
            f"choose one of {available_impls()}")
    _default_impl = name


def get_default_impl() -> str:
    """The current process default (``"auto"`` unless `set_default_impl` changed it)."""
    return _default_impl


def _auto_impl(q: torch.Tensor, sk: int, causal: bool, padded: bool) -> str:
    """Device/dtype/shape-based choice for ``impl="auto"``."""
    # The Triton kernel is opt-in (`model.attention=triton`), or taken per shape class where
    # a loaded speed table measured it faster than every SDPA backend (`kernels/speeds.py`).
    if q.device.type == "cuda":
        return "triton" if prefers_triton(q, sk, causal, padded) else "sdpa"
    return "reference"


def resolve_impl(impl: str, q: torch.Tensor, sk: int | None = None, causal: bool = False,
                 padded: bool = False) -> str:
    """The concrete implementation name `attention` would use for `impl` and this query
    (q: (B, H, Sq, D); `sk` keys, default Sq; `padded`: a key padding mask is given)."""
    if impl == "auto":
        impl = _default_impl if _default_impl != "auto" else _auto_impl(
            q, q.shape[2] if sk is None else sk, causal, padded)
    if impl not in _IMPLS:
        raise ValueError(
            f"unknown attention implementation {impl!r}; choose one of {available_impls()}")
    return impl


def _log_choice(name: str, q: torch.Tensor, causal: bool) -> None:
    key = (name, q.device.type, str(q.dtype).replace("torch.", ""), causal)
    if key in _logged or torch.compiler.is_compiling():
        return
    _logged.add(key)
    logger.info("attention: using %s for device=%s dtype=%s causal=%s", *key)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Multi-head attention. q: (B, H, Sq, D), k/v: (B, H, Sk, D) -> (B, H, Sq, D).

    `key_padding_mask` (B, Sk) bool, True = attend; `causal` is bottom-right aligned;
    `scale` defaults to D ** -0.5; `impl` is one of `available_impls()`.
    """
    name = resolve_impl(impl, q, k.shape[2], causal, key_padding_mask is not None)
    _log_choice(name, q, causal)
    return _IMPLS[name](q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)


def _attention_packed_triton(qkv: torch.Tensor, *, causal: bool,
                             key_padding_mask: torch.Tensor | None,
                             scale: float | None) -> torch.Tensor:
    """Zero-copy: the kernels read q/k/v through qkv's strides and write dqkv directly."""
    from mmpretrain.kernels.attention_triton import attention_packed_triton

    return attention_packed_triton(qkv, causal=causal, key_padding_mask=key_padding_mask,
                                   scale=scale)  # (B, S, H, D)


def attention_packed(
    qkv: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Self-attention on a fused QKV projection. qkv: (B, S, 3, H, D) -> (B, S, H, D).

    The caller reshapes the result to (B, S, H * D) before the output projection.
    """
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must have shape (B, S, 3, H, D), got {tuple(qkv.shape)}")
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, S, D), strided views
    name = resolve_impl(impl, q, k.shape[2], causal, key_padding_mask is not None)
    if name == "triton":
        _log_choice(name, q, causal)
        return _attention_packed_triton(qkv, causal=causal, key_padding_mask=key_padding_mask,
                                        scale=scale)  # (B, S, H, D)
    out = attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
                    impl=name)  # (B, H, S, D)
    return out.transpose(1, 2)  # (B, S, H, D)
