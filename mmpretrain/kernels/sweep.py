"""`mmpretrain bench attention --sweep`: the Triton kernel's tile sizes timed per shape.

Candidates are every tile of a small grid that fits the register and shared-memory limits
below (`fwd_fits`, `bwd_fits`, `fused_fits`), the heuristic's default first. Per shape the
forward tiles are timed alone, then fwd+bwd for each backward tile with the best forward
fixed, through `tile_override`; a config that fails to compile or launch is recorded as
skipped. Timing is `bench`'s (CUDA events, median, rotated inputs); needs CUDA.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Callable

import torch

from mmpretrain.kernels.attention_triton import (Blocks, _bwd_blocks, _fused_blocks,
                                                 _fwd_blocks, _next_pow2, device_arch)
from mmpretrain.kernels.bench import SHAPES, _inputs, _time_ms, make_impl

SMEM_LIMIT = 227 * 1024  # bytes of shared memory one H100 block may use (opt-in maximum)
REG_LIMIT = 160  # fp32 accumulator + score values per thread; the rest of 255 regs is operands
FWD_M, FWD_N, FWD_WARPS, FWD_STAGES = (64, 128), (32, 64, 128), (4, 8), (2, 3, 4)
BWD_PAIRS = (((32, 64), (64, 32)), ((32, 128), (128, 32)), ((64, 64), (64, 64)),
             ((64, 128), (128, 64)))  # (dK/dV (m, n), dQ (m, n)) tiles
BWD_WARPS, BWD_STAGES = (4, 8), (2, 3)
FUSED_M, FUSED_N, FUSED_WARPS, FUSED_STAGES = (32, 64, 128), (64, 128), (4, 8), (1, 2)
RESIDENT_N = (16, 32, 64)  # key blocks of the resident kernel's candidates

Timer = Callable[[str, dict], float]  # (kernel "fwd" | "bwd", tile_override kwargs) -> ms


def _fits(rows: int, acc: int, scores: int, warps: int, smem: int) -> bool:
    """Launchable without obvious spills: >= 16 rows (one MMA tile) per warp, at most
    REG_LIMIT fp32 accumulator + score values per thread, SMEM_LIMIT bytes of shared memory."""
    return rows // warps >= 16 and (acc + scores) / (32 * warps) <= REG_LIMIT \
        and smem <= SMEM_LIMIT


def fwd_fits(b: Blocks, block_d: int, elt: int = 2) -> bool:
    """Forward: acc (m, D) and scores (m, n) in registers; Q + `stages` K/V tiles in smem."""
    smem = elt * (b.m * block_d + b.stages * 2 * b.n * block_d)
    return _fits(b.m, b.m * block_d, b.m * b.n, b.warps, smem)


def bwd_fits(kv: Blocks, q: Blocks, block_d: int, elt: int = 2) -> bool:
    """dK/dV: dk, dv (n, D) and scores (m, n) in registers; K, V + `stages` Q/dO tiles in smem.
    dQ: dq (m, D) and scores (m, n); Q, dO + `stages` K/V tiles. Both must fit."""
    kv_smem = elt * (2 * kv.n * block_d + kv.stages * 2 * kv.m * block_d)
    q_smem = elt * (2 * q.m * block_d + q.stages * 2 * q.n * block_d)
    return (_fits(kv.n, 2 * kv.n * block_d, kv.m * kv.n, kv.warps, kv_smem)
            and _fits(q.m, q.m * block_d, q.m * q.n, q.warps, q_smem))


def fused_fits(b: Blocks, block_d: int, elt: int = 2, sq: int | None = None) -> bool:
    """Fused backward: dk, dv (n, D) and dq (m, D) fp32 plus scores (m, n) in registers; K, V
    + `stages` Q/dO tiles in smem. No rows-per-warp rule: wgmma spreads a 64-row tile over 4
    warps, and ptxas compiled 32-query tiles on 8 warps without spills (`--aot --sweep`).
    With `sq` <= m (the resident kernel) the roles swap in smem: Q and dO stay, `stages` K/V
    tiles stream."""
    if sq is not None and b.m >= sq:
        smem = elt * (2 * b.m * block_d + b.stages * 2 * b.n * block_d)
    else:
        smem = elt * (2 * b.n * block_d + b.stages * 2 * b.m * block_d)
    values = 2 * b.n * block_d + b.m * block_d + b.m * b.n
    return values / (32 * b.warps) <= REG_LIMIT and smem <= SMEM_LIMIT


def fwd_candidates(sq: int, block_d: int, elt: int = 2) -> list[Blocks]:
    """The heuristic default first, then every (m, n, warps, stages) of FWD_* that fits.

    With the default limits: 24 configs for D <= 64, 19 for D <= 128 (of 36).
    """
    default = _fwd_blocks(sq, block_d)
    grid = [Blocks(m, n, w, s) for m in FWD_M for n in FWD_N for w in FWD_WARPS
            for s in FWD_STAGES]
    return [default] + [b for b in grid if b != default and fwd_fits(b, block_d, elt)]


def bwd_candidates(block_d: int, elt: int = 2, arch: int = 90) -> list[tuple[Blocks, Blocks]]:
    """(dK/dV, dQ) tiles: the default (for compute capability `arch`) first, then BWD_PAIRS x
    BWD_WARPS x BWD_STAGES that fit (warps and stages shared by both kernels). Default limits:
    10 for D <= 64, 8 for D <= 128."""
    default = _bwd_blocks(block_d, arch)
    grid = [(Blocks(*kv, w, s), Blocks(*q, w, s)) for kv, q in BWD_PAIRS for w in BWD_WARPS
            for s in BWD_STAGES]
    return [default] + [c for c in grid if c != default and bwd_fits(*c, block_d, elt)]


def fused_candidates(block_d: int, elt: int = 2, arch: int = 90,
                     sq: int | None = None) -> list[Blocks]:
    """Fused backward tiles: the default (for compute capability `arch` and, given, `sq`
    queries) first, then FUSED_* that fit. Given `sq` <= RESIDENT_MAX_M, also the resident
    kernel's tiles (query block next_pow2(max(Sq, 64)) x RESIDENT_N keys) that fit. Default
    limits: 16 for D <= 64, 8 for D <= 128; for ViT-B/16 (Sq = 197) 22, 6 of them resident."""
    from mmpretrain.kernels.attention_triton import RESIDENT_MAX_M

    default = _fused_blocks(block_d, arch, sq)
    grid = [Blocks(m, n, w, s) for m in FUSED_M for n in FUSED_N for w in FUSED_WARPS
            for s in FUSED_STAGES]
    rows = _next_pow2(max(sq or 0, 64))
    if sq is not None and rows <= RESIDENT_MAX_M:
        grid += [Blocks(rows, n, w, s) for n in RESIDENT_N for w in FUSED_WARPS
                 for s in FUSED_STAGES]
    fits = [b for b in grid if b != default and fused_fits(b, block_d, elt, sq)]
    return [default] + list(dict.fromkeys(fits))


def _config(override: dict) -> dict:
    """JSON form of a tile_override kwargs dict (Blocks -> {m, n, warps, stages})."""
    return {k: (None if b is None else asdict(b)) for k, b in override.items()}


def _try_config(shape_name: str, kernel: str, override: dict, timer: Timer,
                default: bool) -> dict:
    """One timed config; a failure (Triton OutOfResources, compile error, ...) is recorded as
    skipped with the exception's class name instead of stopping the sweep."""
    rec = {"shape": shape_name, "kernel": kernel, "config": _config(override), "ms": None,
           "best": False, "default": default}
    try:
        rec["ms"] = float(timer(kernel, override))
    except Exception as e:  # noqa: BLE001 - any per-config failure must not end the sweep
        rec["skipped"] = type(e).__name__
        rec["error"] = str(e).splitlines()[0][:160] if str(e) else ""
    return rec


def mark_best(records: list[dict]) -> list[dict]:
    """Flag (`best`: True) the fastest timed record of each (shape, kernel); returns records."""
    best: dict[tuple[str, str], dict] = {}
    for r in records:
        r["best"] = False
        key = (r["shape"], r["kernel"])
        if r["ms"] is not None and (key not in best or r["ms"] < best[key]["ms"]):
            best[key] = r
    for r in best.values():
        r["best"] = True
    return records


def sweep_shape(shape_name: str, fwd_cands: list[Blocks],
                bwd_cands: list[tuple[Blocks, Blocks]], timer: Timer,
                progress: Callable[[dict], None] | None = None,
                fused_cands: list[Blocks] = ()) -> list[dict]:
    """Time every forward candidate, then fwd+bwd for every split backward candidate
    (kernel `bwd`) and every fused one (`bwd_fused`) with the best forward tile fixed (the
    heuristic if every forward failed). The first candidate of each list is taken to be the
    heuristic default (`default`: True in its record)."""
    records = []
    for i, fwd in enumerate(fwd_cands):
        records.append(_try_config(shape_name, "fwd", {"fwd": fwd}, timer, i == 0))
        if progress:
            progress(records[-1])
    timed = [r for r in records if r["ms"] is not None]
    best_fwd = Blocks(**min(timed, key=lambda r: r["ms"])["config"]["fwd"]) if timed else None
    runs = [("bwd", i, {"bwd_kv": kv, "bwd_q": q}) for i, (kv, q) in enumerate(bwd_cands)]
    runs += [("bwd_fused", i, {"bwd_fused": b}) for i, b in enumerate(fused_cands)]
    for kernel, i, tiles in runs:
        records.append(_try_config(shape_name, kernel, {"fwd": best_fwd, **tiles}, timer,
                                   i == 0))
        if progress:
            progress(records[-1])
    return mark_best(records)


def _cuda_timer(shape: tuple, dtype: torch.dtype, warmup: int, iters: int) -> Timer:
    """A Timer on real inputs of `shape`: median CUDA-event ms of fwd or fwd+bwd (`_time_ms`)."""
    from mmpretrain.kernels.attention_triton import tile_override

    fn = make_impl("triton", shape[5], shape[2], shape[3], torch.device("cuda"))
    sets = _inputs(shape, dtype)

    def timer(kernel: str, override: dict) -> float:
        with tile_override(**override):
            if kernel == "fwd":
                with torch.no_grad():
                    return _time_ms(lambda s: fn(*s[:3]), sets, warmup, iters)
            return _time_ms(lambda s: torch.autograd.grad(fn(*s[:3]), s[:3], s[3]),
                            sets, warmup, iters)
    return timer


def sweep_tiles(shape_names: list[str], dtype: torch.dtype = torch.bfloat16,
                candidates: dict[str, list] | None = None, warmup: int = 5, iters: int = 20,
                progress: Callable[[dict], None] | None = None) -> list[dict]:
    """Tile sweep of the Triton kernel: per shape, forward tiles alone, then backward tiles
    of both plans (fwd+bwd time, best forward fixed). Returns records (shape, kernel, config,
    ms, best, default, and `skipped`/`error` for configs that failed); raises RuntimeError
    without CUDA.

    `candidates` {"fwd": [Blocks], "bwd": [(dkdv Blocks, dq Blocks)], "fused": [Blocks]}
    replaces the generated lists (`fwd_candidates` / `bwd_candidates` / `fused_candidates`;
    give the baseline first). Fused tiles are generated only for shapes the heuristic may send
    to the fused plan (both sequences <= FUSED_MAX_SEQ). Default size for the 5 SHAPES: 24 fwd
    + 10 split + 16 fused configs per D=64 shape, 19 + 8 + 0 for `long` (D=128). Compiles are
    shared only between shapes Triton specializes alike (same D and causal, H % 16 == 0 or
    not): 4 groups here, so 91 forward, 38 split backward (2 kernels each) and 48 fused
    compiles, estimated at 5-8 minutes on an H100 with the default warmup/iters (not
    measured yet).
    """
    if not torch.cuda.is_available():
        raise RuntimeError("a CUDA GPU is required and none is visible; "
                           "the Triton kernel's CPU checks are in tests/test_attention_triton.py")
    unknown = [s for s in shape_names if s not in SHAPES]
    if unknown:
        raise ValueError(f"unknown shapes {unknown}; shapes: {list(SHAPES)}")
    from mmpretrain.kernels.attention_triton import _validate_blocks

    for name, blocks in _flat_candidates(candidates or {}):
        _validate_blocks(name, blocks)
    records: list[dict] = []
    for shape_name in shape_names:
        records += _sweep_shape_cuda(shape_name, dtype, candidates or {}, warmup, iters,
                                     progress)
        torch.cuda.empty_cache()
    return records


def _sweep_shape_cuda(shape_name: str, dtype: torch.dtype, candidates: dict[str, list],
                      warmup: int, iters: int,
                      progress: Callable[[dict], None] | None) -> list[dict]:
    """`sweep_shape` with the CUDA timer; a failure to set up (e.g. out of memory for the
    inputs) gives one `setup` record with `skipped` instead of ending the sweep."""
    from mmpretrain.kernels.attention_triton import FUSED_MAX_SEQ

    shape = SHAPES[shape_name]
    block_d, elt = _next_pow2(shape[4]), torch.finfo(dtype).bits // 8
    fwd = candidates.get("fwd") or fwd_candidates(shape[2], block_d, elt)
    arch = device_arch(torch.device("cuda"))
    bwd = candidates.get("bwd") or bwd_candidates(block_d, elt, arch)
    fused = candidates.get("fused") or (
        fused_candidates(block_d, elt, arch, shape[2]) if max(shape[2:4]) <= FUSED_MAX_SEQ
        else [])
    try:
        timer = _cuda_timer(shape, dtype, warmup, iters)
    except Exception as e:  # noqa: BLE001
        return [{"shape": shape_name, "kernel": "setup", "config": None, "ms": None,
                 "best": False, "default": False, "skipped": type(e).__name__,
                 "error": str(e).splitlines()[0][:160] if str(e) else ""}]
    return sweep_shape(shape_name, fwd, bwd, timer, progress, fused)


def _flat_candidates(candidates: dict[str, list]) -> list[tuple[str, object]]:
    """(override name, Blocks) pairs of a `candidates` dict, for validation."""
    unknown = set(candidates) - {"fwd", "bwd", "fused"}
    if unknown:
        raise ValueError(f"candidates keys must be among 'fwd', 'bwd', 'fused', got "
                         f"{sorted(unknown)}")
    flat: list[tuple[str, object]] = [("fwd", b) for b in candidates.get("fwd") or []]
    flat += [("bwd_fused", b) for b in candidates.get("fused") or []]
    for pair in candidates.get("bwd") or []:
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise ValueError(f"bwd candidates must be (dkdv Blocks, dq Blocks) pairs, got {pair!r}")
        flat += [("bwd_kv", pair[0]), ("bwd_q", pair[1])]
    return flat


def config_label(rec: dict) -> str:
    """Short text of a record's tiles: `m128 n64 w4 s3` (fwd), `kv32x128 q128x32 w4 s2` (bwd),
    `fused64x64 w4 s1` (bwd_fused: query block x key block), `resident256x32 w8 s2` (a
    fused tile whose query block holds the shape's Sq)."""
    cfg = rec["config"]
    if rec["kernel"] == "fwd":
        f = cfg["fwd"]
        return f"m{f['m']} n{f['n']} w{f['warps']} s{f['stages']}"
    if rec["kernel"] == "bwd_fused":
        f = cfg["bwd_fused"]
        sq = SHAPES.get(rec.get("shape", ""), (0, 0, 1 << 30))[2]
        plan = "resident" if f["m"] >= sq else "fused"
        return f"{plan}{f['m']}x{f['n']} w{f['warps']} s{f['stages']}"
    kv, q = cfg["bwd_kv"], cfg["bwd_q"]
    warps = f"w{kv['warps']}" if kv["warps"] == q["warps"] else f"w{kv['warps']}/{q['warps']}"
    stages = f"s{kv['stages']}" if kv["stages"] == q["stages"] else \
        f"s{kv['stages']}/{q['stages']}"
    return f"kv{kv['m']}x{kv['n']} q{q['m']}x{q['n']} {warps} {stages}"


def progress_line(rec: dict) -> str:
    """One line per timed or skipped config, e.g. `sweep vit_b16 fwd m128 n64 w4 s3: 0.12 ms`."""
    label = config_label(rec) if rec["config"] else ""
    result = f"{rec['ms']:.3f} ms" if rec["ms"] is not None else \
        f"skipped ({rec.get('skipped')}: {rec.get('error', '')})"
    return f"sweep {rec['shape']} {rec['kernel']} {label}: {result}"


def format_best(records: list[dict]) -> str:
    """One row per (shape, kernel): best config and ms, the heuristic default's ms, speedup,
    and how many configs were timed / skipped. bwd times are fwd+bwd with the best fwd."""
    head = (f"{'shape':13s} {'kernel':6s} {'best config':24s} {'ms':>8s} {'default ms':>10s} "
            f"{'speedup':>7s} {'timed':>5s} {'skipped':>7s}")
    lines = [head, "-" * len(head)]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["shape"], r["kernel"]), []).append(r)
    for (shape, kernel), recs in groups.items():
        timed = [r for r in recs if r["ms"] is not None]
        best = next((r for r in recs if r["best"]), None)
        default = next((r for r in recs if r["default"] and r["ms"] is not None), None)
        base = f"{shape:13s} {kernel:6s} "
        if best is None:
            lines.append(base + f"n/a: every config skipped ({recs[0].get('skipped')})")
            continue
        dms = f"{default['ms']:10.3f}" if default else f"{'n/a':>10s}"
        speed = f"{default['ms'] / best['ms']:6.2f}x" if default else f"{'':>7s}"
        lines.append(base + f"{config_label(best):24s} {best['ms']:8.3f} {dms} {speed} "
                     f"{len(timed):5d} {len(recs) - len(timed):7d}")
    return "\n".join(lines)
