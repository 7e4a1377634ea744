"""`mmpretrain bench loss`: the contrastive loss alone, plain vs fused, at large global batches.

What one rank computes for CLIP without `local_loss` (the whole (N, N) logit matrix of a
global batch of N) or for SigLIP over N texts, in one process: forward + backward time (CUDA
events on a GPU, the wall clock on CPU; median after warm-up), the bytes autograd keeps between
the forward and the backward (saved-tensor hooks, inputs excluded) and, on CUDA, the
allocator's peak above the inputs. Out of memory is a record, not an error.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from mmpretrain.engine.memory import saved_storages
from mmpretrain.losses.contrastive import ClipLoss, SigLipLoss

KINDS = ("clip", "siglip")
IMPLS = ("plain", "fused")
MIB = 2**20


def _inputs(n: int, width: int, device: torch.device, seed: int) -> tuple[torch.Tensor, ...]:
    """Features as the task passes them: fp32, L2-normalized, (N, E) each; scale and bias."""
    g = torch.Generator(device=device).manual_seed(seed)
    img = F.normalize(torch.randn(n, width, device=device, generator=g), dim=-1)
    txt = F.normalize(img + torch.randn(n, width, device=device, generator=g), dim=-1)
    scale = torch.tensor(100.0, device=device)
    bias = torch.tensor(-10.0, device=device)
    return tuple(t.requires_grad_() for t in (img, txt, scale, bias))


def _run(loss: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """One forward and backward; the gradients are dropped so runs do not accumulate them."""
    out = loss(*inputs)
    out.backward()
    for t in inputs:
        t.grad = None
    return out.detach()


def _saved_bytes(loss: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> int:
    """Bytes of the distinct storages the forward saves for the backward, inputs excluded."""
    with saved_storages(inputs) as seen:
        out = loss(*inputs)
    del out
    return sum(seen.values())


def _time_ms(step: Callable[[], object], device: torch.device, warmup: int,
             iters: int) -> float:
    """Median milliseconds of `step()` after `warmup` untimed runs."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def bench_one(kind: str, impl: str, n: int, width: int, device: torch.device,
              warmup: int, iters: int) -> dict:
    """One (kind, implementation, global batch) cell."""
    rec: dict = {"kind": kind, "impl": impl, "batch": n, "width": width,
                 "device": str(device)}
    fused = impl == "fused"
    loss = ClipLoss(fused=fused) if kind == "clip" else SigLipLoss(fused=fused)
    try:
        inputs = _inputs(n, width, device, seed=n)
        rec["saved_mib"] = round(_saved_bytes(loss, inputs) / MIB, 2)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        rec["loss"] = float(_run(loss, inputs))
        if device.type == "cuda":
            rec["peak_mib"] = round((torch.cuda.max_memory_allocated(device) - base) / MIB, 1)
        rec["ms"] = round(_time_ms(lambda: _run(loss, inputs), device, warmup, iters), 3)
    except torch.OutOfMemoryError:
        rec["oom"] = True
    finally:
        inputs = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rec


def bench_loss(kinds: list[str], impls: list[str], batches: list[int], width: int,
               device: torch.device, warmup: int = 3, iters: int = 10,
               progress: Callable[[dict], None] | None = None, tf32: bool = False
               ) -> list[dict]:
    """Every (kind, global batch, implementation) cell, in that order; `tf32` lets CUDA's
    fp32 matmuls use TF32 (`engine.tf32`) while it runs."""
    for name, given, known in (("kind", kinds, KINDS), ("impl", impls, IMPLS)):
        bad = [x for x in given if x not in known]
        if bad:
            raise ValueError(f"unknown {name} {bad}; choose from {', '.join(known)}")
    records = []
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        for kind in kinds:
            for n in batches:
                for impl in impls:
                    records.append({**bench_one(kind, impl, n, width, device, warmup, iters),
                                    "tf32": tf32})
                    if progress:
                        progress(records[-1])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    return records


def format_table(records: list[dict]) -> str:
    """One row per cell: ms fwd+bwd, MiB kept for the backward, CUDA peak MiB."""
    lines = [f"{'kind':7} {'impl':6} {'batch':>7} {'ms fwd+bwd':>11} {'saved MiB':>10} "
             f"{'peak MiB':>9}  loss"]
    for r in records:
        if r.get("oom"):
            lines.append(f"{r['kind']:7} {r['impl']:6} {r['batch']:>7}  out of memory")
            continue
        peak = r.get("peak_mib")
        lines.append(f"{r['kind']:7} {r['impl']:6} {r['batch']:>7} {r['ms']:>11.3f} "
                     f"{r['saved_mib']:>10.1f} {'n/a' if peak is None else peak:>9}  "
                     f"{r['loss']:.6f}")
    return "\n".join(lines)
