"""Plain-PyTorch attention: the ground truth every faster implementation is tested against.

Conventions shared by every implementation behind `mmpretrain.kernels.attention`:

* q: (B, H, Sq, D), k and v: (B, H, Sk, D); the output is (B, H, Sq, D) in q's dtype.
* `key_padding_mask`: (B, Sk) bool, True = a real key (attend to it), False = padding.
* `causal=True` aligns the causal mask to the *bottom-right* corner, as FlashAttention does:
  query i may attend key j iff ``j <= i + (Sk - Sq)``. With Sq == Sk this is the usual lower
  triangle; with Sq < Sk (e.g. new queries against a longer cached prefix) the last query sees
  every key; with Sq > Sk the first ``Sq - Sk`` queries see no key at all.
  (Note: `torch.nn.functional.scaled_dot_product_attention(is_causal=True)` aligns *top-left*
  when Sq != Sk; the dispatcher builds an explicit mask in that case.)
* A query row whose keys are all masked out produces an output of exactly 0 (and zero
  gradients), never NaN.
* `scale` defaults to ``D ** -0.5``.
"""
from __future__ import annotations

import torch


def causal_mask(sq: int, sk: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Bottom-right aligned causal mask, (Sq, Sk) bool, True where query i may attend key j."""
    rows = torch.arange(sq, device=device).unsqueeze(1)  # (Sq, 1)
    cols = torch.arange(sk, device=device).unsqueeze(0)  # (1, Sk)
    return cols <= rows + (sk - sq)  # (Sq, Sk)


def build_keep_mask(
    batch: int,
    sq: int,
    sk: int,
    *,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    device: torch.device | str | None,
) -> torch.Tensor | None:
    """Combine causal and key-padding masks into one (B|1, 1, Sq, Sk) bool mask, True = attend.

    Returns None when nothing is masked.
    """
    keep: torch.Tensor | None = None
    if causal:
        keep = causal_mask(sq, sk, device=device)[None, None]  # (1, 1, Sq, Sk)
    if key_padding_mask is not None:
        if key_padding_mask.shape != (batch, sk):
            raise ValueError(
                f"key_padding_mask must have shape (B, Sk) = {(batch, sk)}, "
                f"got {tuple(key_padding_mask.shape)}")
        pad = key_padding_mask.to(device=device, dtype=torch.bool)[:, None, None, :]  # (B,1,1,Sk)
        keep = pad if keep is None else keep & pad  # (B, 1, Sq, Sk)
    return keep


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("attention expects q, k, v of shape (B, H, S, D)")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on B, H and D")


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention: matmul, softmax in fp32, matmul (see module docstring).

    q: (B, H, Sq, D), k/v: (B, H, Sk, D) -> (B, H, Sq, D) in q's dtype.
    """
    _check_shapes(q, k, v)
    batch, _, sq, dim = q.shape
    sk = k.shape[2]
    scale = dim ** -0.5 if scale is None else scale
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.matmul(q.to(compute), k.to(compute).transpose(-2, -1)) * scale  # (B,H,Sq,Sk)
    keep = build_keep_mask(batch, sq, sk, causal=causal, key_padding_mask=key_padding_mask,
                           device=q.device)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))  # (B, H, Sq, Sk)
    # Softmax by hand so fully masked rows give 0: their max is -inf, replaced by 0, so every
    # exp() is exactly 0 and the clamped denominator keeps the row at 0 (no NaN, zero grads).
    row_max = scores.amax(dim=-1, keepdim=True).detach()  # (B, H, Sq, 1)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)  # (B, H, Sq, Sk)
    denom = weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(compute).tiny)  # (B,H,Sq,1)
    probs = weights / denom  # (B, H, Sq, Sk)
    out = torch.matmul(probs, v.to(compute))  # (B, H, Sq, D)
    return out.to(q.dtype)
