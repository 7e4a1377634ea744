"""Parity of the Triton attention kernels against the float64 reference, on CPU via Triton's
interpreter. TRITON_INTERPRET must be set before triton is imported, hence a separate script:

    TRITON_INTERPRET=1 python tests/triton_checks.py DTYPE [--json]   # DTYPE: float32 | float16

For every case it compares the output and dq/dk/dv with `attention_reference` on .double()
inputs; error = max|x - ref| / max(max|ref|, 0.01). Prints one line per case and a final JSON line
{"dtype": ..., "max_err": {...}, "cases": N}; exits 1 if any error exceeds TOLERANCE[dtype], a
fully masked row is not exactly 0, or anything is non-finite (also with extreme scores,
`check_extreme_scores`).
"""
from __future__ import annotations

import json
import os
import sys
import time
import zlib
from contextlib import nullcontext

import torch

from mmpretrain.kernels import attention, attention_packed
from mmpretrain.kernels import attention_triton as at
from mmpretrain.kernels.attention_triton import Blocks, tile_override
from mmpretrain.kernels.reference import attention_reference
from mmpretrain.kernels.tiles import resident_untransposed

TOLERANCE = {"float32": 1e-4, "float16": 2e-2}  # relative to max |reference| per tensor

# (name, B, H, Sq, Sk, D, causal, mask): mask None | "pad" (~30% random padding, key 0 always
# kept) | "empty" ("pad", and batch 0 has every key padded: fully masked rows).
CASES = [
    ("s1", 1, 2, 1, 1, 32, False, None),
    ("s17_causal", 2, 2, 17, 17, 64, True, None),
    ("s77_pad_empty_d80", 2, 2, 77, 77, 80, False, "empty"),
    ("s130_causal_pad_d128", 1, 2, 130, 130, 128, True, "pad"),
    ("cross_17x77_pad", 2, 2, 17, 77, 64, False, "pad"),
    ("cross_77x17_causal_emptyrows", 1, 2, 77, 17, 32, True, None),
    ("cross_40x130_causal_d80", 1, 2, 40, 130, 80, True, "pad"),
    # several key and query blocks (32 under the interpreter) with no padding mask: the
    # kernels run interior blocks without masks and only the causal band and ragged tail with
    ("s100_causal", 1, 2, 100, 100, 64, True, None),
    ("cross_50x130_causal", 1, 2, 50, 130, 32, True, None),
    ("cross_130x70_causal_emptyrows", 1, 2, 130, 70, 64, True, None),
    ("cross_64x96_even", 2, 2, 64, 96, 64, False, None),
]
# The fused backward (one program per (batch, head)); the heuristic picks the split one for
# these few heads. CASES and PACKED_CASES run under both.
FUSED = {"bwd_fused": Blocks(32, 32)}
# The fused plan's tile with every query row in one block (m >= Sq): the resident kernel
# (dQ in registers, delta computed in the kernel). Every case of CASES and PACKED_CASES fits.
RESIDENT = {"bwd_fused": Blocks(256, 32, 8, 2)}
# The resident kernel on chunks of 32 query rows (the ragged last one in a 16- or 32-row
# block) with their dK/dV shares summed after: several chunks for every case with Sq > 32.
CHUNKED = {"bwd_chunked": Blocks(32, 32, 4, 2)}
# The GPU tile heuristics (the interpreter's default is 32x32): unequal query and key blocks
# move the split between unmasked and masked blocks. Run on TILE_CASES, which span several
# 128-blocks with and without causality and never a padding mask (which masks everything).
TILE_SETS = {
    "hopper_d64": {"fwd": Blocks(128, 64, 4, 3), "bwd_kv": Blocks(32, 128, 4, 2),
                   "bwd_q": Blocks(128, 32, 4, 2)},
    "d128": {"fwd": Blocks(128, 32, 8, 2), "bwd_kv": Blocks(32, 64, 4, 2),
             "bwd_q": Blocks(64, 32, 4, 2)},
    "64x64": {"fwd": Blocks(64, 64, 4, 2), "bwd_kv": Blocks(64, 64, 4, 2),
              "bwd_q": Blocks(64, 64, 4, 2)},
    "fused_hopper_d64": {"fwd": Blocks(64, 32, 4, 3), "bwd_fused": Blocks(64, 64, 4, 2)},
    "fused_32x64": {"fwd": Blocks(64, 64, 4, 2), "bwd_fused": Blocks(32, 64, 8, 1)},
    # resident: 300 rows in one 512-row block; 32-key blocks leave tails of 16 (s197), 32
    "resident_512x32": {"fwd": Blocks(64, 32, 4, 3), "bwd_fused": Blocks(512, 32, 8, 2)},
    # chunked: 128-row chunks (s300: 2 and a 64-row one; s197: 1 and a 128-row one)
    "chunked_128x32": {"fwd": Blocks(64, 32, 4, 3), "bwd_chunked": Blocks(128, 32, 8, 2)},
}
TILE_CASES = [
    ("s300_causal", 1, 1, 300, 300, 32, True, None),
    ("s197", 2, 1, 197, 197, 32, False, None),
    ("cross_100x300_causal", 1, 1, 100, 300, 32, True, None),
    ("cross_300x150_causal_emptyrows", 1, 1, 300, 150, 32, True, None),
    # ragged tails of 22 queries (a 32-row tail block under 64-row tiles) and 52 keys (64 of
    # 128); s197 above leaves 5 (a 16-wide tail)
    ("cross_150x180", 1, 1, 150, 180, 32, False, None),
]
PACKED_CASES = [
    ("packed_s77_causal_pad", 2, 2, 77, 77, 64, True, "empty"),
    ("packed_s130_d80", 1, 2, 130, 130, 80, False, None),
    ("packed_s40_d104", 1, 1, 40, 40, 104, False, None),  # ViT-bigG/14's head width
]


def _mask(kind: str | None, batch: int, sk: int, gen: torch.Generator) -> torch.Tensor | None:
    if kind is None:
        return None
    keep = torch.rand(batch, sk, generator=gen) > 0.3  # (B, Sk)
    keep[:, 0] = True
    if kind == "empty":
        keep[0] = False  # every query of batch 0 is fully masked
    return keep


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x = x.double()
    if not torch.isfinite(x).all():
        return float("inf")
    # The floor keeps exactly-zero gradients (e.g. dq, dk with a single key) from dividing
    # rounding noise by ~1e-17; every other tensor here has max |ref| well above it.
    return ((x - ref).abs().max() / ref.abs().max().clamp_min(1e-2)).item()


def _reference(q, k, v, do, causal, kpm):
    """Output and grads of the float64 reference; q/k/v (B,H,S,D) of any dtype."""
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = attention_reference(qd, kd, vd, causal=causal, key_padding_mask=kpm)
    out.backward(do.double())
    return out.detach(), qd.grad, kd.grad, vd.grad


def check_case(case: tuple, dtype: torch.dtype, packed: bool) -> dict[str, float]:
    """Run one case; returns {tensor: relative error} and asserts masked rows are exactly 0."""
    name, batch, heads, sq, sk, dim, causal, mask_kind = case
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    kpm = _mask(mask_kind, batch, sk, gen)
    if packed:
        qkv = torch.randn(batch, sq, 3, heads, dim, generator=gen).to(dtype).requires_grad_()
        out = attention_packed(qkv, causal=causal, key_padding_mask=kpm,
                               impl="triton")  # (B, S, H, D)
        assert out.is_contiguous(), "packed output should be (B, S, H, D)-contiguous"
        do = torch.randn(out.shape, generator=gen).to(dtype)  # (B, S, H, D)
        out.backward(do)
        q, k, v = qkv.detach().permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, S, D)
        out, do = out.transpose(1, 2), do.transpose(1, 2)  # (B, H, S, D)
        grads = qkv.grad.permute(2, 0, 3, 1, 4).unbind(0)
    else:
        # (B, S, H, D) buffers viewed as (B, H, S, D): the kernels must honour the strides.
        q, k, v = (torch.randn(batch, s, heads, dim, generator=gen).to(dtype).transpose(1, 2)
                   .requires_grad_() for s in (sq, sk, sk))
        out = attention(q, k, v, causal=causal, key_padding_mask=kpm, impl="triton")
        do = torch.randn(out.shape, generator=gen).to(dtype)  # (B, H, Sq, D)
        out.backward(do)
        grads = (q.grad, k.grad, v.grad)
    ref = _reference(q, k, v, do, causal, kpm)
    errs = {key: _rel_err(x, r) for key, x, r in zip(("out", "dq", "dk", "dv"),
                                                      (out, *grads), ref)}
    empty_rows = ref[0].abs().amax(dim=-1) == 0  # (B, H, Sq): rows the reference zeroes
    if empty_rows.any():
        assert (out.detach()[empty_rows] == 0).all(), f"{name}: fully masked rows not 0"
        assert (grads[0][empty_rows] == 0).all(), f"{name}: dq of fully masked rows not 0"
    return errs


def check_extreme_scores(dtype: torch.dtype, tiles: dict, suffix: str) -> list[str]:
    """Every score near -640 (q and k anti-aligned, large norms) with ragged key blocks: the
    unmasked loops then meet exp(-lse) = inf for the zero-loaded keys past Sk, which must stay
    in their never-stored rows (and out of the fused backward's dQ sums). Returns failures: any
    non-finite output or gradient, or an output / dK / dV off the reference by more than 1e-3
    (dQ is ill-conditioned here). `tiles`: tile_override kwargs; `suffix` ends case names."""
    failed = []
    gen = torch.Generator().manual_seed(7)
    for sq, sk, causal in ((70, 40, False), (40, 70, False), (100, 100, True)):
        base = torch.randn(32, generator=gen)
        base = 60 * base / base.norm()
        q = (base + 0.1 * torch.randn(1, 1, sq, 32, generator=gen)).to(dtype).requires_grad_()
        k = (-base + 0.1 * torch.randn(1, 1, sk, 32, generator=gen)).to(dtype).requires_grad_()
        v = torch.randn(1, 1, sk, 32, generator=gen).to(dtype).requires_grad_()
        with tile_override(**tiles):
            out = attention(q, k, v, causal=causal, impl="triton")
            do = torch.randn(out.shape, generator=gen).to(dtype)
            got = (out, *torch.autograd.grad(out, (q, k, v), do))
        ref = _reference(q, k, v, do, causal, None)
        name = f"extreme_{sq}x{sk}{'_causal' if causal else ''}{suffix}"
        if not all(torch.isfinite(t).all() for t in got):
            failed.append(f"{name}: non-finite output or gradient")
        for label, x, r in zip(("out", "dk", "dv"), (got[0], got[2], got[3]),
                               (ref[0], ref[2], ref[3])):
            if not _rel_err(x, r) <= 1e-3:
                failed.append(f"{name}:{label}={_rel_err(x, r):.2e}")
    return failed


def _count_launches(name: str) -> list[int]:
    """Count launches of the backward kernel `name` (a one-element list, updated in place),
    so that a plan silently not taken fails the test."""
    from mmpretrain.kernels import triton_bwd

    kernel, count = getattr(triton_bwd, name), [0]

    class Counted:
        def __getitem__(self, grid: tuple):  # noqa: ANN204
            count[0] += 1
            return kernel[grid]
    setattr(triton_bwd, name, Counted())
    return count


def main(argv: list[str]) -> int:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    dtype_name = argv[0]
    dtype, tol = getattr(torch, dtype_name), TOLERANCE[dtype_name]
    worst: dict[str, float] = {}
    failed = []
    # The fused backward's dQ buffer starts as NaN here: a row read before it is written
    # shows up as a NaN gradient.
    at._dq_accumulator = lambda *args: torch.full(args[:3], float("nan"), device=args[3])
    runs = []
    resident = _count_launches("_attn_bwd_resident")
    sums = _count_launches("_attn_bwd_sum_chunks")
    # @resident_v6: dK, dV as kernel version 6 computed them (not transposed; mma.sync)
    for label, tiles in (("", {}), ("@fused", FUSED), ("@resident", RESIDENT),
                         ("@resident_v6", RESIDENT), ("@chunked", CHUNKED)):
        runs += [((case[0] + label, *case[1:]), False, tiles) for case in CASES]
        runs += [((case[0] + label, *case[1:]), True, tiles) for case in PACKED_CASES]
    runs += [((f"{case[0]}@{tiles}", *case[1:]), False, TILE_SETS[tiles])
             for tiles in TILE_SETS for case in TILE_CASES]
    for case, packed, tiles in runs:
        start = time.perf_counter()
        v6 = resident_untransposed() if case[0].endswith("@resident_v6") else nullcontext()
        with v6, tile_override(**tiles):
            errs = check_case(case, dtype, packed)
        for key, err in errs.items():
            worst[key] = max(worst.get(key, 0.0), err)
        bad = [k for k, e in errs.items() if not e <= tol]
        failed += [f"{case[0]}:{k}={errs[k]:.2e}" for k in bad]
        print(f"{case[0]:32s} {dtype_name} "
              + " ".join(f"{k}={e:.1e}" for k, e in errs.items())
              + f" {time.perf_counter() - start:.1f}s" + (" FAIL" if bad else ""),
              flush=True)
    for tiles, suffix in (({}, ""), (FUSED, "@fused"), (RESIDENT, "@resident"),
                          (CHUNKED, "@chunked")):
        failed += check_extreme_scores(dtype, tiles, suffix)
    print(json.dumps({"dtype": dtype_name, "max_err": worst, "tolerance": tol,
                      "cases": len(runs), "resident_launches": resident[0],
                      "chunk_sums": sums[0], "failed": failed}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
