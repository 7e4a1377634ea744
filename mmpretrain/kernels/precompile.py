"""Compile the Triton kernels a benchmark will launch, in parallel, before it starts timing.

A GPU session's budget is minutes, and the tile sweep meets some 200 kernels, each compiled
on its first launch (1-3 s, one after another, while the GPU idles). Triton's JIT looks every
launch up in its on-disk cache (TRITON_CACHE_DIR) under a key made of the kernel's source,
the specialisation of its arguments, the compile options, the target and the environment.
`kernels/aot.py` captures the launches from the real launch code and specialises them as the
JIT does, so compiling them in worker processes (`precompile`) writes the entries the JIT
then reads: the timed loop starts with its kernels built. `cache_entries` counted before and
after the timed part shows whether the JIT still compiled anything (it should not).

Jobs mirror what `kernels/bench.py` launches: its contiguous (B, H, S, D) inputs, the shapes
of `bench.SHAPES`, the heuristic tiles or the forced plans of `bench_attention`
(`bench_jobs`), every tile candidate of `sweep_tiles` (`sweep_jobs`).
"""
from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from mmpretrain.kernels.attention_triton import FUSED_MAX_SEQ, Blocks, _next_pow2

BWD_SPLIT = ("bwd_preprocess", "bwd_dkdv", "bwd_dq")
BWD_FUSED = ("bwd_preprocess", "bwd_fused", "bwd_resident")  # whichever the tile launches


@dataclass(frozen=True)
class Job:
    """The kernels of one launch to compile: a `bench.SHAPES` name or explicit `dims`
    (B, H, Sq, Sk, D, causal, key-padding mask), tile_override kwargs, target."""

    shape: str
    tiles: tuple[tuple[str, Blocks], ...]
    kernels: tuple[str, ...]
    dtype: str = "bfloat16"
    arch: int = 90
    sms: int = 132
    dims: tuple[int, int, int, int, int, bool, bool] | None = None
    packed: bool = False
    """q, k, v as views of one (B, S, 3, H, D) projection, as the model's towers call it."""
    table: str = ""
    """A tile table (`kernels/tiles.py`) the launch follows, as the model's does."""

    def launch_dims(self) -> tuple[int, int, int, int, int, bool, bool]:
        """(B, H, Sq, Sk, D, causal, masked) of the launch."""
        from mmpretrain.kernels.bench import SHAPES

        return self.dims if self.dims is not None else (*SHAPES[self.shape], False)


def bench_jobs(shape_names: list[str], impls: list[str], dtype: torch.dtype, arch: int,
               sms: int) -> list[Job]:
    """Jobs for `bench_attention`: every Triton column (heuristic or forced plan) per shape
    (none for a plan the shape cannot take: the resident one past 256 queries)."""
    from mmpretrain.kernels.bench import SHAPES, TRITON_PLANS

    return [job for name in shape_names
            for impl in impls if impl == "triton" or impl in TRITON_PLANS
            for job in _plan_job(impl, SHAPES[name], dtype, arch, sms, name)]


def case_jobs(cases: list[tuple], dtypes: list[torch.dtype], plans: list[str], arch: int,
              sms: int) -> list[Job]:
    """Jobs for calls on separate contiguous (B, H, S, D) tensors, as the GPU parity tests
    make them: every case (B, H, Sq, Sk, D, causal, masked) x dtype x backward plan
    ("split", "fused", "resident", or "" for the heuristic's), where the case can take it."""
    return [job for case in cases for dtype in dtypes for plan in plans
            for job in _plan_job(f"triton_{plan}" if plan else "triton", case, dtype, arch,
                                 sms, "", tuple(case))]


def _plan_job(impl: str, dims: tuple, dtype: torch.dtype, arch: int, sms: int, shape: str,
              case: tuple | None = None) -> list[Job]:
    """[the Job of one Triton column / plan on (B, H, Sq, Sk, D, ...)], [] if the plan has no
    tile for it."""
    from mmpretrain.kernels.aot import KERNELS
    from mmpretrain.kernels.bench import plan_override

    try:
        tiles = tuple(plan_override(impl, dims[4], arch, dims[2]).items())
    except ValueError:
        return []
    return [Job(shape, tiles, KERNELS, _dtype_name(dtype), arch, sms, case)]


def model_jobs(model: Any, batch: int, dtype: torch.dtype, arch: int, sms: int) -> list[Job]:
    """Jobs for a training step of `model` (a `ModelConfig`) at `batch` per rank: each tower's
    self-attention on its packed QKV projection (the text tower causal), with the model's
    tile table. A CoCa decoder's attention compiles on its first call."""
    from mmpretrain.kernels.aot import KERNELS

    vision, text = model.vision, model.text
    tokens = (vision.image_size // vision.patch_size) ** 2 + 1
    towers = [(vision.heads, tokens, vision.width // vision.heads, False),
              (text.heads, text.context_length, text.width // text.heads, True)]
    return [Job("", (), KERNELS, _dtype_name(dtype), arch, sms,
                (batch, heads, seq, seq, dim, causal, False), True, model.attention_tiles)
            for heads, seq, dim, causal in towers]


def sweep_jobs(shape_names: list[str], dtype: torch.dtype, arch: int, sms: int) -> list[Job]:
    """Jobs for `sweep_tiles` with its generated candidates: each forward tile alone, each
    split pair and (short sequences) each fused tile with the preprocess it sets."""
    from mmpretrain.kernels.bench import SHAPES
    from mmpretrain.kernels.sweep import bwd_candidates, fused_candidates, fwd_candidates

    jobs = []
    elt = torch.finfo(dtype).bits // 8
    for name in shape_names:
        _, _, sq, sk, dim, _ = SHAPES[name]
        block_d = _next_pow2(dim)
        runs = [((("fwd", b),), ("fwd",)) for b in fwd_candidates(sq, block_d, elt)]
        runs += [((("bwd_kv", kv), ("bwd_q", q)), BWD_SPLIT)
                 for kv, q in bwd_candidates(block_d, elt, arch)]
        if max(sq, sk) <= FUSED_MAX_SEQ:
            runs += [((("bwd_fused", b),), BWD_FUSED)
                     for b in fused_candidates(block_d, elt, arch, sq)]
        jobs += [Job(name, tiles, kernels, _dtype_name(dtype), arch, sms)
                 for tiles, kernels in runs]
    return jobs


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def compile_job(job: Job) -> tuple[int, float, str]:
    """Compile one job's kernels into Triton's cache: (kernels compiled, seconds, error)."""
    from mmpretrain.kernels import aot
    from mmpretrain.kernels.attention_triton import tile_override
    from mmpretrain.kernels.tiles import load_tile_table

    batch, heads, sq, sk, dim, causal, masked = job.launch_dims()
    start, done = time.perf_counter(), 0
    try:
        if job.table:
            load_tile_table(job.table)
        with tile_override(**dict(job.tiles)):
            launches = aot.capture_launches(batch, heads, sq, sk, dim,
                                            dtype=getattr(torch, job.dtype), causal=causal,
                                            masked=masked, packed=job.packed,
                                            contiguous=not job.packed, arch=job.arch,
                                            sms=job.sms)
        for launch in (x for x in launches if x.name in job.kernels):
            aot.compile_kernel(launch, job.arch)
            done += 1
    except Exception as e:  # noqa: BLE001 - a candidate that does not compile is timed
        # (and reported as skipped) by the sweep itself
        return done, time.perf_counter() - start, f"{type(e).__name__}: {str(e)[:120]}"
    return done, time.perf_counter() - start, ""


def precompile(jobs: list[Job], workers: int) -> dict:
    """Compile `jobs` in `workers` processes (0: in this process). Returns a report: jobs,
    kernels, failed jobs, wall and summed seconds, workers, cache entries added."""
    before, start = cache_entries(), time.perf_counter()
    if workers > 0:
        ctx = multiprocessing.get_context("spawn")  # no forked CUDA or Triton state
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            results = list(pool.map(compile_job, jobs))
    else:
        results = [compile_job(job) for job in jobs]
    errors = [err for _, _, err in results if err]
    return {"jobs": len(jobs), "kernels": sum(r[0] for r in results), "failed": len(errors),
            "first_error": errors[0] if errors else "", "workers": workers,
            "wall_s": round(time.perf_counter() - start, 1),
            "compile_s": round(sum(r[1] for r in results), 1),
            "cache_entries_added": cache_entries() - before}


def cache_dir() -> str:
    """Triton's on-disk cache directory as of now (Inductor, e.g. compiling FlexAttention,
    may point Triton at its own directory later in the process)."""
    from triton import knobs

    return knobs.cache.dir


def cache_entries(path: str | None = None) -> int:
    """Entries (one directory per compiled kernel) in Triton's on-disk cache at `path`
    (default: `cache_dir()`)."""
    path = path or cache_dir()
    return sum(1 for e in os.scandir(path) if e.is_dir()) if os.path.isdir(path) else 0


def default_workers() -> int:
    """Worker processes for `precompile`: the CPUs this process may use, at most 16."""
    return max(1, min(16, len(os.sched_getaffinity(0))))
