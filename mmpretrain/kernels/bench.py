"""`mmpretrain bench attention`: the Triton kernel against SDPA backends and FlexAttention.

Times forward and forward+backward with CUDA events: median of `iters` runs after `warmup`,
inputs rotated among several copies so that L2 caches do not flatter small shapes. TFLOP/s
counts 4*B*H*Sq*Sk*D for the forward (halved when causal) and 2.5x that for the backward.
The tile sweep (`bench attention --sweep`) is `kernels/sweep.py`.
Needs CUDA: `bench_attention` raises a clear RuntimeError without it.
No numbers are recorded here until they are measured on a GPU (docs/PERFORMANCE.md).
"""
from __future__ import annotations

import contextlib
import json
import statistics
from typing import Callable

import torch
import torch.nn.functional as F

from mmpretrain.kernels.attention_triton import (Blocks, _bwd_blocks, _fused_blocks,
                                                 _next_pow2, _resident_blocks, device_arch)

# name -> (B, H, Sq, Sk, D, causal)
SHAPES: dict[str, tuple[int, int, int, int, int, bool]] = {
    "vit_b16": (256, 12, 197, 197, 64, False),
    "vit_l14": (128, 16, 257, 257, 64, False),
    "vit_l14_336": (64, 16, 577, 577, 64, False),
    "text_causal": (512, 8, 77, 77, 64, True),
    "long": (8, 16, 4096, 4096, 128, False),
}
IMPLS = ("triton", "triton_split", "triton_fused", "triton_resident", "triton_resident_v6",
         "triton_chunked", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flex")
# `triton`: the backward plan and tiles the heuristic picks; these force one plan:
# split, fused with its query-blocked tile (64 x 64 on Hopper), fused with every query row
# in one block (the resident kernel; Sq <= 256, D <= 64), the same with dK, dV computed as
# kernel version 6 did (mma.sync; for A/B timing of version 8), the resident kernel on chunks
# of 256 query rows (D <= 64; an experiment, never the heuristic's choice)
TRITON_PLANS = ("triton_split", "triton_fused", "triton_resident", "triton_resident_v6",
                "triton_chunked")
CHUNK = Blocks(256, 32, 8, 2)  # `triton_chunked`'s tile: ViT-B/16's resident tile
COPIES = 4  # input sets rotated between timed runs

AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _sdpa(backend_name: str, causal: bool) -> AttnFn:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return run


def _flex(causal: bool, sq: int, sk: int, device: torch.device) -> AttnFn:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    block_mask = None
    if causal:
        offset = sk - sq  # bottom-right aligned, as everywhere in mmpretrain

        def mask_mod(b, h, q_idx, kv_idx):  # noqa: ANN001, ANN202
            return kv_idx <= q_idx + offset
        block_mask = create_block_mask(mask_mod, None, None, sq, sk, device=device)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)


def make_impl(name: str, causal: bool, sq: int, sk: int, device: torch.device) -> AttnFn:
    """The attention callable (q, k, v) -> out (B, H, Sq, D) for one benchmark column."""
    if name == "triton" or name in TRITON_PLANS:
        from mmpretrain.kernels.attention_triton import attention_triton
        return lambda q, k, v: attention_triton(q, k, v, causal=causal)
    if name.startswith("sdpa_"):
        backend = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION",
                   "sdpa_efficient": "EFFICIENT_ATTENTION"}[name]
        return _sdpa(backend, causal)
    if name == "flex":
        return _flex(causal, sq, sk, device)
    raise ValueError(f"unknown implementation {name!r}; choose from {IMPLS}")


def plan_override(name: str, dim: int, arch: int, sq: int = 0) -> dict[str, Blocks]:
    """`tile_override` kwargs that force `name`'s backward plan with its heuristic tiles
    ({} for every other implementation). `triton_resident` needs `sq` (the query length) and
    raises ValueError where the resident kernel has no tile (Sq > 256 or D > 64), as
    `triton_chunked` does for D > 64."""
    block_d = _next_pow2(dim)
    if name == "triton_split":
        kv, q = _bwd_blocks(block_d, arch)
        return {"bwd_kv": kv, "bwd_q": q}
    if name == "triton_fused":
        return {"bwd_fused": _fused_blocks(block_d, arch)}
    if name in ("triton_resident", "triton_resident_v6", "triton_chunked"):
        resident = name != "triton_chunked"
        tile = _resident_blocks(sq, block_d) if resident else CHUNK if block_d <= 64 else None
        if tile is None:
            raise ValueError(f"no {name[7:]} tile for Sq={sq}, D={dim} (D <= 64, resident: "
                             "Sq <= 256)")
        return {"bwd_fused" if resident else "bwd_chunked": tile}
    return {}


def _inputs(shape: tuple, dtype: torch.dtype) -> list[tuple[torch.Tensor, ...]]:
    """COPIES sets of (q, k, v, dO), each (B, H, S, D), requiring grad."""
    batch, heads, sq, sk, dim, _ = shape
    sets = []
    for _ in range(COPIES):
        q, k, v = (torch.randn(batch, heads, s, dim, device="cuda", dtype=dtype,
                               requires_grad=True) for s in (sq, sk, sk))
        sets.append((q, k, v, torch.randn(batch, heads, sq, dim, device="cuda", dtype=dtype)))
    return sets


def _time_ms(step: Callable[[tuple], None], sets: list, warmup: int, iters: int) -> float:
    """Median milliseconds of `step(inputs)` over `iters` runs, inputs rotated."""
    for i in range(warmup):
        step(sets[i % len(sets)])
    torch.cuda.synchronize()
    times = []
    for i in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(sets[i % len(sets)])
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _flops(shape: tuple) -> float:
    batch, heads, sq, sk, dim, causal = shape
    return 4.0 * batch * heads * sq * sk * dim * (0.5 if causal else 1.0)


def bench_one(name: str, shape_name: str, dtype: torch.dtype, warmup: int,
              iters: int) -> dict:
    """One (implementation, shape) cell: fwd and fwd+bwd ms and TFLOP/s, or the error."""
    shape = SHAPES[shape_name]
    rec: dict = {"impl": name, "shape": shape_name, "dims": list(shape[:5]),
                 "causal": shape[5], "dtype": str(dtype).replace("torch.", "")}
    try:
        from mmpretrain.kernels.attention_triton import tile_override
        from mmpretrain.kernels.tiles import resident_untransposed

        fn = make_impl(name, shape[5], shape[2], shape[3], torch.device("cuda"))
        sets = _inputs(shape, dtype)
        v6 = resident_untransposed() if name == "triton_resident_v6" else contextlib.nullcontext()
        with v6, tile_override(**plan_override(name, shape[4], device_arch(sets[0][0].device),
                                               shape[2])):
            with torch.no_grad():
                fwd = _time_ms(lambda s: fn(*s[:3]), sets, warmup, iters)
            fwd_bwd = _time_ms(
                lambda s: torch.autograd.grad(fn(*s[:3]), s[:3], s[3]), sets, warmup, iters)
    except Exception as e:  # a backend that does not support this shape/dtype/GPU
        rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        return rec
    finally:
        torch.cuda.empty_cache()
    flops = _flops(shape)
    rec.update(fwd_ms=fwd, fwd_bwd_ms=fwd_bwd, fwd_tflops=flops / fwd / 1e9,
               fwd_bwd_tflops=3.5 * flops / fwd_bwd / 1e9)
    return rec


def bench_attention(shapes: list[str], impls: list[str], dtype: torch.dtype = torch.bfloat16,
                    warmup: int = 10, iters: int = 50,
                    progress: Callable[[dict], None] | None = None) -> list[dict]:
    """Every (shape, implementation) cell, each passed to `progress` as it is measured (so a
    run cut short still reports what it measured); raises RuntimeError without CUDA."""
    if not torch.cuda.is_available():
        raise RuntimeError("a CUDA GPU is required and none is visible; "
                           "the Triton kernel's CPU checks are in tests/test_attention_triton.py")
    unknown = [s for s in shapes if s not in SHAPES] + [i for i in impls if i not in IMPLS]
    if unknown:
        raise ValueError(f"unknown shapes/impls {unknown}; shapes: {list(SHAPES)}, "
                         f"impls: {list(IMPLS)}")
    records = []
    for shape in shapes:
        for impl in impls:
            records.append(bench_one(impl, shape, dtype, warmup, iters))
            if progress is not None:
                progress(records[-1])
    return records


def format_table(records: list[dict]) -> str:
    """A plain-text table: one row per cell, ms and TFLOP/s for fwd and fwd+bwd."""
    head = f"{'shape':13s} {'impl':15s} {'fwd ms':>8s} {'TFLOP/s':>8s} " \
           f"{'fwd+bwd ms':>11s} {'TFLOP/s':>8s}"
    lines = [head, "-" * len(head)]
    for r in records:
        if "error" in r:
            lines.append(f"{r['shape']:13s} {r['impl']:15s} n/a ({r['error']})")
            continue
        lines.append(f"{r['shape']:13s} {r['impl']:15s} {r['fwd_ms']:8.3f} "
                     f"{r['fwd_tflops']:8.1f} {r['fwd_bwd_ms']:11.3f} {r['fwd_bwd_tflops']:8.1f}")
    return "\n".join(lines)


def write_json(records: list[dict], path: str) -> None:
    """Save the records with the GPU and library versions they were measured with."""
    import triton

    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda}
    with open(path, "w") as f:
        json.dump({"meta": meta, "records": records}, f, indent=1)
