"""Fused FlashAttention-2 style attention in Triton: forward and backward, `autograd.Function`.

Semantics are those of `kernels/reference.py` (bottom-right causal, key_padding_mask (B, Sk)
True = attend, fully masked rows -> 0 output and 0 grads, scale defaults to D ** -0.5).

* Inputs fp16 / bf16 (fp32 too, mainly for interpreter tests); fp32 accumulation; D <= 128
  (padded inside the kernels to the next power of two); any Sq, Sk (masked ragged tails).
* The forward saves only O and the per-row log-sum-exp (fp32, (B, H, Sq)); the backward
  recomputes the probabilities (kernels in `triton_fwd.py` / `triton_bwd.py`), either split
  (a dK/dV kernel and a dQ kernel, each recomputing them) or fused (one program per
  (batch, head) computing them once; `_use_fused`: short sequences, enough heads). A fused
  tile whose query block holds all Sq rows launches the resident kernel (dQ in registers).
* Inputs are read through their strides: `attention_packed_triton` takes the (B, S, 3, H, D)
  output of a fused QKV projection and never copies q, k or v; its backward writes dq/dk/dv
  straight into one (B, S, 3, H, D) gradient. Outputs are allocated (B, S, H, D)-contiguous
  and returned as (B, H, S, D) views, so the caller's transpose + reshape is free.
* Eager calls go through `autograd.Function`s; inside `torch.compile` through the custom ops
  of `kernels/ops.py` (one graph node for the forward, one for the backward; same launches).
* On CPU the kernels run only under Triton's interpreter (`TRITON_INTERPRET=1` set before
  triton is imported); there bf16 `tl.dot` is wrong (Triton 3.9), fp16/fp32 are correct.
* Ragged tails: the forward's query rows after its last whole query block run in a launch
  of their own, one block of `tail_block` rows (16 for ViT's 197 = 3 x 64 + 5 tokens) instead
  of a whole tile; without causality or padding, the keys after the last whole key block too.
* Tiles: `tile_override` / `set_tile_override` (the sweep in `kernels/bench.py`), else the
  loaded tile table's measured tiles for the call's shape (`kernels/tiles.py`), else the
  `_fwd_blocks` / `_bwd_blocks` / `_fused_blocks` heuristics (32x32 under the interpreter).
  Overrides are process-wide, not per thread: the backward runs on autograd's threads.
"""
from __future__ import annotations

import functools
import logging
import os

import torch

from mmpretrain.kernels import tiles as _tiles
from mmpretrain.kernels.tiles import (VALID_WARPS, Blocks, _Blocks, _override,  # noqa: F401
                                      _next_pow2, _query_launches, _tail, _validate_blocks,
                                      resident_transposed, set_tile_override, tail_block,
                                      tile_override)

logger = logging.getLogger("mmpretrain.kernels")

# Multiply-adds stay fused (FMA contraction), as every compile and benchmark here assumed:
# Triton 3.9 warns that its default turns that off in 3.10. A user's own setting wins.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

MAX_HEAD_DIM = 128
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreter_enabled() -> bool:
    """True when Triton's CPU interpreter is on (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def supports(q: torch.Tensor) -> bool:
    """Whether `auto` dispatch may pick this kernel for q (B, H, S, D): CUDA, fp16/bf16, D<=128."""
    return (q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16)
            and 16 <= q.shape[-1] <= MAX_HEAD_DIM and triton_importable())


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    """Whether the `triton` package imports in this environment."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("attention expects q, k, v of shape (B, H, S, D)")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"triton attention needs q/k/v of one dtype in fp16/bf16/fp32, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"triton attention supports head dim <= {MAX_HEAD_DIM}, "
                         f"got {q.shape[-1]}")
    if q.device.type == "cuda":
        return
    if q.device.type == "cpu" and interpreter_enabled():
        return
    raise RuntimeError(
        f"triton attention needs a CUDA device (got {q.device.type}); on CPU it only runs "
        "under Triton's interpreter: set TRITON_INTERPRET=1 before importing triton, or use "
        "model.attention=auto|sdpa|reference")


def _fwd_blocks(sq: int, block_d: int) -> _Blocks:
    """Forward tiles. D <= 64: 64 queries x 32 keys, 4 warps, 3 stages, the best geometric mean
    of the H200 sweep over the four issue shapes (2026-11-30, Triton 3.6: within 6% of each
    shape's best, against 8-26% slower for the 128x64 tile used before). D > 64: untimed."""
    if interpreter_enabled():
        return _Blocks(32, 32)
    if block_d <= 64:
        return _Blocks(64, 32, warps=4, stages=3)
    m = 64 if sq <= 64 else 128
    return _Blocks(m, 64 if m == 64 else 32, warps=8 if m == 128 else 4, stages=2)


def _bwd_blocks(block_d: int, arch: int = 90) -> tuple[_Blocks, _Blocks]:
    """(dK/dV tiles: n = key block, m = inner query block; dQ tiles: m = query block, n = inner).

    `arch`: compute capability (90 Hopper). Before Hopper the D <= 64 dK/dV tile of 128 keys
    spills ~500 bytes of registers per thread (compiled for sm_80, `bench attention --aot`),
    so 64 keys are used there; neither choice is timed on a GPU yet.
    """
    if interpreter_enabled():
        return _Blocks(32, 32), _Blocks(32, 32)
    if block_d <= 64 and arch >= 90:
        return _Blocks(32, 128, warps=4, stages=2), _Blocks(128, 32, warps=4, stages=2)
    return _Blocks(32, 64, warps=4, stages=2), _Blocks(64, 32, warps=4, stages=2)


def _fwd_tiles(sq: int, block_d: int, choice: _tiles.TileChoice | None = None) -> _Blocks:
    """The forward tiles actually launched: the override if set, else the loaded tile table's
    `choice` for this shape (`kernels/tiles.py`), else the heuristic."""
    return _override["fwd"] or (choice and choice.fwd) or _fwd_blocks(sq, block_d)


def _bwd_tiles(block_d: int, arch: int = 90,
               choice: _tiles.TileChoice | None = None) -> tuple[_Blocks, _Blocks]:
    """The split backward's (dK/dV, dQ) tiles: overrides where set, else the tile table's
    `choice`, else the heuristic."""
    kv_cfg, q_cfg = (choice and choice.split) or _bwd_blocks(block_d, arch)
    return _override["bwd_kv"] or kv_cfg, _override["bwd_q"] or q_cfg


FUSED_MAX_SEQ = 1024
"""Longest Sq and Sk the heuristic sends to the fused backward (one program per head)."""


RESIDENT_MAX_M = 256
"""Largest query block the heuristic gives the resident backward (dQ in registers)."""

RESIDENT_DK_T_MAX_M = 128
"""Largest query block whose resident backward also transposes dK (DK_T; D = 64, Hopper): at
256 rows both transposed spilled 148 bytes per thread (sm_90, Triton 3.6), dV alone did not."""


def _resident_blocks(sq: int, block_d: int) -> _Blocks | None:
    """The resident backward's tile for Sq queries (every row in one block of m >= Sq, 32-key
    blocks; 8 warps from 128 rows), or None past RESIDENT_MAX_M rows or D > 64: there its fp32
    dQ of m x D would not fit the registers. sm_90, `bench attention --aot`: ViT-B/16's
    256 x 32 tile uses 222 registers (Triton 3.6; 218 with 3.9), text's 128 x 32 on 8 warps
    126 (124), neither spills."""
    rows = _next_pow2(max(sq, 64))
    if rows > RESIDENT_MAX_M or block_d > 64:
        return None
    return _Blocks(rows, 32, warps=8 if rows >= 128 else 4, stages=2)


def _fused_blocks(block_d: int, arch: int = 90, sq: int | None = None) -> _Blocks:
    """Fused backward tiles (n = key block, m = query block; m >= Sq launches the resident
    kernel). With Hopper's wgmma and D <= 64: given `sq`, the resident tile where it fits
    (`_resident_blocks`; a prediction until timed: the same padded work as the 64 x 64 tile,
    without its dQ buffer traffic and reloads), else 64 x 64, 2 stages (the H200 sweep,
    2026-11-30: 2-13% faster than 1 stage on all four issue shapes, the best geometric mean).
    Otherwise 32 queries x 64 keys (64x64 spills ~170 bytes per thread on sm_80; untimed)."""
    if interpreter_enabled():
        return _Blocks(32, 32)
    if block_d <= 64 and arch >= 90:
        return (sq is not None and _resident_blocks(sq, block_d)) or _Blocks(64, 64, 4, 2)
    return _Blocks(32, 64, warps=8, stages=1)


def _use_fused(sq: int, sk: int, programs: int, sms: int,
               choice: _tiles.TileChoice | None = None) -> bool:
    """Backward plan: forced by an override; else fused when the (batch, head) programs fill
    the GPU at least once and either the tile table's `choice` measured it faster or, without
    a measurement, both sequences are short (a prediction until timed); split otherwise."""
    if _override["bwd_fused"] is not None:
        return True
    if _override["bwd_kv"] is not None or _override["bwd_q"] is not None:
        return False
    if choice is not None and choice.fused is not None and choice.split is not None:
        return choice.fused_faster and programs >= sms
    return max(sq, sk) <= FUSED_MAX_SEQ and programs >= sms


capture_arch = 90
"""Compute capability assumed for tensors not on a GPU (kernels/aot.py sets it while capturing
launches on CPU tensors for a target)."""


def device_arch(device: torch.device) -> int:
    """Compute capability of a CUDA device as an int (90 = Hopper); `capture_arch` otherwise."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return capture_arch


capture_sms = 132
"""Multiprocessor count assumed for tensors not on a GPU (an H100 SXM's)."""


def device_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; `capture_sms` otherwise."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return capture_sms


def _mask_arg(key_padding_mask: torch.Tensor | None, q: torch.Tensor,
              sk: int) -> torch.Tensor | None:
    """The key-padding mask as a uint8 (B, Sk) tensor the kernels can read (None: no mask)."""
    if key_padding_mask is None:
        return None
    if key_padding_mask.shape != (q.shape[0], sk):
        raise ValueError(f"key_padding_mask must have shape (B, Sk) = {(q.shape[0], sk)}, "
                         f"got {tuple(key_padding_mask.shape)}")
    return key_padding_mask.to(device=q.device, dtype=torch.bool).contiguous().view(torch.uint8)


def _mask_launch_args(kpm: torch.Tensor | None, dummy: torch.Tensor) -> tuple:
    """(pointer, stride_b, stride_n) for the kernels; a never-read dummy pointer if no mask."""
    return (dummy, 0, 0) if kpm is None else (kpm, kpm.stride(0), kpm.stride(1))


def _empty_bhsd(batch: int, heads: int, seq: int, dim: int, like: torch.Tensor) -> torch.Tensor:
    """A (B, H, S, D) view of a fresh (B, S, H, D)-contiguous buffer."""
    return torch.empty(batch, seq, heads, dim, dtype=like.dtype,
                       device=like.device).transpose(1, 2)


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kpm: torch.Tensor | None,
             causal: bool,
             scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. q (B,H,Sq,D), k/v (B,H,Sk,D) -> O (B,H,Sq,D), LSE (B,H,Sq)."""
    from mmpretrain.kernels.triton_fwd import _attn_fwd

    batch, heads, sq, dim = q.shape
    sk = k.shape[2]
    o = _empty_bhsd(batch, heads, sq, dim, q)  # (B, H, Sq, D)
    lse = torch.empty(batch, heads, sq, dtype=torch.float32, device=q.device)  # (B, H, Sq)
    block_d = _next_pow2(dim)
    cfg = _fwd_tiles(sq, block_d, _tiles.lookup(sq, sk, block_d, causal))
    mask_t, smb, smn = _mask_launch_args(kpm, lse)
    for block_m, row0, blocks in _query_launches(sq, cfg.m):
        _attn_fwd[(blocks, batch * heads)](
            q, k, v, o, lse, mask_t, *q.stride(), *k.stride(), *v.stride(), *o.stride(), smb,
            smn, scale, heads, sq, sk, row0, HEAD_D=dim, BLOCK_M=block_m, BLOCK_N=cfg.n,
            BLOCK_D=block_d, CAUSAL=causal, HAS_KPM=kpm is not None,
            TAIL_N=_tail(sk, cfg.n, causal, kpm), num_warps=cfg.warps, num_stages=cfg.stages)
    return o, lse


def _backward(saved: tuple, do: torch.Tensor, grads: tuple, kpm: torch.Tensor | None,
              causal: bool, scale: float) -> None:
    """Launch the backward, writing into grads = (dq, dk, dv) (any strides): the fused or
    the split plan (`_use_fused`) after the delta preprocess, or, when the fused tile's query
    block holds every query row, the resident kernel (which computes delta itself); with a
    `bwd_chunked` override, the resident kernel on chunks of its m rows."""
    from mmpretrain.kernels.triton_bwd import _attn_bwd_preprocess

    q, k, v, o, lse = saved
    batch, heads, sq, dim = q.shape
    block_d = _next_pow2(dim)
    arch = device_arch(q.device)
    choice = _tiles.lookup(sq, k.shape[2], block_d, causal)
    fused = _use_fused(sq, k.shape[2], batch * heads, device_sms(q.device), choice)
    if _override["bwd_chunked"] is not None:
        fused, cfgs = True, (_override["bwd_chunked"],)
    elif fused:
        cfgs = (_override["bwd_fused"] or (choice and choice.fused)
                or _fused_blocks(block_d, arch, sq),)
    else:
        cfgs = _bwd_tiles(block_d, arch, choice)
    chunked = _override["bwd_chunked"] is not None and cfgs[0].m < sq
    resident = fused and (cfgs[0].m >= sq or chunked)
    plan = "chunked" if chunked else "resident" if resident else "fused" if fused else "split"
    _log_plan(plan, cfgs, q.shape, k.shape[2], causal)
    if resident:
        _launch_bwd_resident((q, k, v, o, do, lse), grads, kpm, causal, scale, cfgs[0])
        return
    delta = torch.empty_like(lse)  # (B, H, Sq) fp32
    block_m = cfgs[-1].m  # the query block of the dQ (or fused) kernel
    _attn_bwd_preprocess[((sq + block_m - 1) // block_m, batch * heads)](
        o, do, delta, *o.stride(), *do.stride(), heads, sq,
        HEAD_D=dim, BLOCK_M=block_m, BLOCK_D=block_d)
    launch = _launch_bwd_fused if fused else _launch_bwd_split
    launch((q, k, v, do, lse, delta), grads, kpm, causal, scale, cfgs)


_logged_plans: set[tuple] = set()


def _log_plan(plan: str, cfgs: tuple, q_shape: torch.Size, sk: int, causal: bool) -> None:
    """Log the backward plan and tiles once per (plan, tiles, shape, causal)."""
    key = (plan, cfgs, tuple(q_shape), sk, causal)
    if key in _logged_plans:
        return
    _logged_plans.add(key)
    batch, heads, sq, dim = q_shape
    tiles = " + ".join(f"{c.m}x{c.n} w{c.warps} s{c.stages}" for c in cfgs)
    logger.info("triton attention backward: %s plan (%s) for B*H=%d Sq=%d Sk=%d D=%d%s",
                plan, tiles, batch * heads, sq, sk, dim, " causal" if causal else "")


def _launch_bwd_split(ins: tuple, grads: tuple, kpm: torch.Tensor | None, causal: bool,
                      scale: float, cfgs: tuple[_Blocks, _Blocks]) -> None:
    """dK/dV kernel (one program per key block), then dQ kernel (one per query block)."""
    from mmpretrain.kernels.triton_bwd import _attn_bwd_dkdv, _attn_bwd_dq

    q, k, v, do, lse, delta = ins
    dq, dk, dv = grads
    kv_cfg, q_cfg = cfgs
    batch, heads, sq, dim = q.shape
    sk = k.shape[2]
    mask_t, smb, smn = _mask_launch_args(kpm, lse)
    common = dict(HEAD_D=dim, BLOCK_D=_next_pow2(dim), CAUSAL=causal, HAS_KPM=kpm is not None)
    _attn_bwd_dkdv[((sk + kv_cfg.n - 1) // kv_cfg.n, batch * heads)](
        q, k, v, do, dk, dv, lse, delta, mask_t, *q.stride(), *k.stride(), *v.stride(),
        *do.stride(), *dk.stride(), *dv.stride(), smb, smn, scale, heads, sq, sk,
        BLOCK_M=kv_cfg.m, BLOCK_N=kv_cfg.n,
        num_warps=kv_cfg.warps, num_stages=kv_cfg.stages, **common)
    _attn_bwd_dq[((sq + q_cfg.m - 1) // q_cfg.m, batch * heads)](
        q, k, v, do, dq, lse, delta, mask_t, *q.stride(), *k.stride(), *v.stride(),
        *do.stride(), *dq.stride(), smb, smn, scale, heads, sq, sk,
        BLOCK_M=q_cfg.m, BLOCK_N=q_cfg.n, TAIL_N=_tail(sk, q_cfg.n, causal, kpm),
        num_warps=q_cfg.warps, num_stages=q_cfg.stages, **common)


def _dq_accumulator(programs: int, sq: int, block_d: int, device: torch.device) -> torch.Tensor:
    """The fused backward's fp32 dQ buffer (B*H, Sq, BD), uninitialised: the kernel writes
    every row before it reads any (the parity script fills it with NaN to check that)."""
    return torch.empty(programs, sq, block_d, dtype=torch.float32, device=device)


def _launch_bwd_fused(ins: tuple, grads: tuple, kpm: torch.Tensor | None, causal: bool,
                      scale: float, cfgs: tuple[_Blocks]) -> None:
    """One program per (batch, head): dK, dV and dQ (through an fp32 accumulator)."""
    from mmpretrain.kernels.triton_bwd import _attn_bwd_fused

    q, k, v, do, lse, delta = ins
    dq, dk, dv = grads
    (cfg,) = cfgs
    batch, heads, sq, dim = q.shape
    block_d = _next_pow2(dim)
    dq_acc = _dq_accumulator(batch * heads, sq, block_d, q.device)  # (B*H, Sq, BD)
    mask_t, smb, smn = _mask_launch_args(kpm, lse)
    _attn_bwd_fused[(batch * heads,)](
        q, k, v, do, dq, dk, dv, dq_acc, lse, delta, mask_t, *q.stride(), *k.stride(),
        *v.stride(), *do.stride(), *dq.stride(), *dk.stride(), *dv.stride(), smb, smn, scale,
        heads, sq, k.shape[2], HEAD_D=dim, BLOCK_M=cfg.m, BLOCK_N=cfg.n, BLOCK_D=block_d,
        CAUSAL=causal, HAS_KPM=kpm is not None,
        TAIL_N=_tail(k.shape[2], cfg.n, causal, kpm), num_warps=cfg.warps, num_stages=cfg.stages)


def _launch_bwd_resident(ins: tuple, grads: tuple, kpm: torch.Tensor | None, causal: bool,
                         scale: float, cfg: _Blocks) -> None:
    """One program per (batch, head) and chunk of cfg.m query rows (`_attn_bwd_resident`; the
    ragged last chunk in a smaller block, `_query_launches`): dQ in registers, each key
    block's dK and dV share finished in one step. One chunk (cfg.m >= Sq) stores dK and dV
    directly; several store fp32 partials (chunks, B, H, Sk, BD) that `_attn_bwd_sum_chunks`
    then adds up in a fixed order."""
    from mmpretrain.kernels.triton_bwd import _attn_bwd_resident, _attn_bwd_sum_chunks

    q, k, v, o, do, lse = ins
    dq, dk, dv = grads
    batch, heads, sq, dim = q.shape
    sk, block_d = k.shape[2], _next_pow2(dim)
    launches = _query_launches(sq, cfg.m)  # [(BLOCK_M, first row, chunks)]
    chunks = sum(n for _, _, n in launches)
    dkp, dvp = dk, dv
    if chunks > 1:  # (chunks, B, H, Sk, BD) fp32, every element written before it is read
        dkp, dvp = (torch.empty(chunks, batch, heads, sk, block_d, dtype=torch.float32,
                                device=q.device) for _ in range(2))
    s_chunk = dkp.stride(0) if chunks > 1 else 0
    kv_strides = (*dkp.stride()[-4:], *dvp.stride()[-4:])
    mask_t, smb, smn = _mask_launch_args(kpm, lse)
    chunk0, hopper = 0, device_arch(q.device) >= 90  # wgmma: M >= 64, so D = 64 as M
    transpose = resident_transposed() and block_d >= 64 and hopper
    for block_m, row0, n in launches:
        _attn_bwd_resident[(batch * heads, n)](
            q, k, v, o, do, dq, dkp, dvp, lse, mask_t, *q.stride(), *k.stride(), *v.stride(),
            *o.stride(), *do.stride(), *dq.stride(), *kv_strides, smb, smn, scale, heads, sq,
            sk, row0, chunk0, s_chunk, HEAD_D=dim, BLOCK_M=block_m, BLOCK_N=cfg.n,
            BLOCK_D=block_d, CAUSAL=causal, HAS_KPM=kpm is not None,
            TAIL_N=_tail(sk, cfg.n, causal, kpm), DV_T=transpose,
            DK_T=transpose and block_m <= RESIDENT_DK_T_MAX_M,
            num_warps=cfg.warps if block_m >= 128 else min(cfg.warps, 4),
            num_stages=cfg.stages)
        chunk0 += n
    if chunks > 1:
        _attn_bwd_sum_chunks[((sk + 63) // 64, batch * heads)](
            dkp, dvp, dk, dv, *dk.stride(), *dv.stride(), s_chunk, chunks, heads, sk,
            HEAD_D=dim, BLOCK_N=64, BLOCK_D=block_d)


def _grads_bhsd(q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh dq, dk, dv for separate q/k/v: (B, H, S, D) views of (B, S, H, D) buffers."""
    return _empty_bhsd(*q.shape, q), _empty_bhsd(*k.shape, k), _empty_bhsd(*v.shape, v)


def _unpack(qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v (B, H, S, D) as strided views of qkv (B, S, 3, H, D): no copy."""
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def _packed_grad(qkv: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """A fresh contiguous dqkv (B, S, 3, H, D) and its dq/dk/dv (B, H, S, D) views."""
    dqkv = torch.empty_like(qkv, memory_format=torch.contiguous_format)
    return dqkv, _unpack(dqkv)


class _TritonAttention(torch.autograd.Function):
    """Fused attention on separate (possibly strided) q (B,H,Sq,D), k/v (B,H,Sk,D)."""

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, causal, scale):  # type: ignore[override]
        kpm = _mask_arg(key_padding_mask, q, k.shape[2])
        o, lse = _forward(q, k, v, kpm, causal, scale)
        ctx.save_for_backward(q, k, v, o, lse, kpm)
        ctx.causal, ctx.scale = causal, scale
        return o  # (B, H, Sq, D)

    @staticmethod
    def backward(ctx, do):  # type: ignore[override]
        q, k, v, o, lse, kpm = ctx.saved_tensors
        grads = _grads_bhsd(q, k, v)
        _backward((q, k, v, o, lse), do, grads, kpm, ctx.causal, ctx.scale)
        return (*grads, None, None, None)


class _TritonPackedAttention(torch.autograd.Function):
    """Fused self-attention reading q/k/v as strided views of qkv (B, S, 3, H, D)."""

    @staticmethod
    def forward(ctx, qkv, key_padding_mask, causal, scale):  # type: ignore[override]
        q, k, v = _unpack(qkv)  # 3 x (B, H, S, D) views, no copy
        kpm = _mask_arg(key_padding_mask, q, k.shape[2])
        o, lse = _forward(q, k, v, kpm, causal, scale)
        ctx.save_for_backward(qkv, o, lse, kpm)
        ctx.causal, ctx.scale = causal, scale
        return o  # (B, H, S, D) view of a (B, S, H, D)-contiguous buffer

    @staticmethod
    def backward(ctx, do):  # type: ignore[override]
        qkv, o, lse, kpm = ctx.saved_tensors
        dqkv, grads = _packed_grad(qkv)  # (B, S, 3, H, D) and 3 views of it
        _backward((*_unpack(qkv), o, lse), do, grads, kpm, ctx.causal, ctx.scale)
        return dqkv, None, None, None


def attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Fused attention. q: (B, H, Sq, D), k/v: (B, H, Sk, D) -> (B, H, Sq, D) in q's dtype.

    Eager: an `autograd.Function`. Inside `torch.compile`: the custom ops of `kernels/ops.py`,
    one node each for the forward and the backward, so the graph does not break around it.
    """
    _check_inputs(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if torch.compiler.is_compiling():
        from mmpretrain.kernels import ops

        return ops.attention_fwd(q, k, v, key_padding_mask, bool(causal), scale)[0]
    return _TritonAttention.apply(q, k, v, key_padding_mask, bool(causal), scale)


def attention_packed_triton(
    qkv: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Fused self-attention on qkv (B, S, 3, H, D) -> (B, S, H, D) (contiguous), no copies.

    Eager or compiled as `attention_triton`."""
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must have shape (B, S, 3, H, D), got {tuple(qkv.shape)}")
    q = qkv[:, :, 0].transpose(1, 2)  # (B, H, S, D) view, for the checks
    _check_inputs(q, q, q)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if torch.compiler.is_compiling():
        from mmpretrain.kernels import ops

        out = ops.attention_packed_fwd(qkv, key_padding_mask, bool(causal), scale)[0]
    else:
        out = _TritonPackedAttention.apply(qkv, key_padding_mask, bool(causal), scale)
    return out.transpose(1, 2)  # (B, S, H, D)
