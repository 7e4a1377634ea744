"""`mmpretrain bench train --profile DIR`: where a training step's time goes.

A few steps of ours (and of OpenCLIP's with `--compare open_clip`) run under
`torch.profiler` after the timed steps. Printed (stderr): the wall time per step, the device's
busy time per step (the sum of its kernels' own times; a step whose busy time is far below its
wall time waits on the host), the busy time split into kernel families, and the ops with the
most device (or, on CPU, host) time. The Chrome traces are written to DIR, gzipped.
"""
from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from mmpretrain.engine.timeline import format_timeline, load_trace, timeline

FAMILIES = (  # (family, pattern on the kernel's name); the first match wins
    ("attention", r"sdpa|flash|fmha|attn|dot_do_o"),
    ("matmul", r"gemm|nvjet|cutlass|xmma|cublas|matmul|splitk|conv"),
    ("optimizer", r"adam|multi_tensor"),
    ("communication", r"nccl"),
    ("norm", r"norm|welford|gammabeta"),
    ("copy", r"memcpy|memset|copy_kernel|catarray|fill"),
    ("reduction", r"reduce|triton_red|triton_per|softmax|logsumexp"),
    ("elementwise", r"elementwise|triton_poi|pointwise"),
)
"""Kernel families of the busy-time split (device kernels' names are matched lowercased)."""
ROWS = 25


def family(name: str) -> str:
    """The family in FAMILIES of a kernel named `name` ("other" if none matches)."""
    low = name.lower()
    for fam, pattern in FAMILIES:
        if re.search(pattern, low):
            return fam
    return "other"


def _device_times(prof: Any) -> list[tuple[str, float]]:
    """(name, self device µs) of every op or kernel the profiler saw on the device."""
    out = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = getattr(e, "self_cuda_time_total", 0.0)
        if t > 0 and getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA:
            out.append((e.key, float(t)))
    return out


def summarize(prof: Any, steps: int, wall_s: float) -> dict[str, Any]:
    """Per-step wall and device-busy milliseconds, the busy time by kernel family, and the
    host's aten operator calls per step (a count the machine's speed does not change)."""
    kernels = _device_times(prof)
    busy_ms = sum(t for _, t in kernels) / 1e3 / steps
    fams: dict[str, float] = {}
    for name, t in kernels:
        fams[family(name)] = fams.get(family(name), 0.0) + t / 1e3 / steps
    wall_ms = wall_s * 1e3 / steps
    aten = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
    return {"steps": steps, "wall_ms_per_step": wall_ms, "device_busy_ms_per_step": busy_ms,
            "aten_ops_per_step": aten / steps,  # host dispatches, nested ones included
            "device_busy_frac": busy_ms / wall_ms if wall_ms else None,
            "families_ms_per_step": dict(sorted(fams.items(), key=lambda kv: -kv[1]))}


def _rank_suffix() -> str:
    """".rankN" when several ranks profile (each writes its own trace), else ""."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return f".rank{dist.get_rank()}"
    return ""


def profile_steps(label: str, run: Callable[[int], Any], steps: int, device: torch.device,
                  out_dir: str) -> dict[str, Any]:
    """Run `run(steps)` under the profiler; print its summary and top ops, write the trace
    to `out_dir/LABEL.trace.json.gz` (`LABEL.rankN.trace.json.gz` on several ranks), and
    return the summary."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        run(steps)
        if cuda:
            torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    summary = summarize(prof, steps, wall)
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(f"== profile {label}: {summary}", file=sys.stderr)
    for key in (sort, "self_cpu_time_total") if cuda else (sort,):
        print(prof.key_averages().table(sort_by=key, row_limit=ROWS, max_name_column_width=70),
              file=sys.stderr)
    path = Path(out_dir) / f"{label}{_rank_suffix()}.trace.json.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))
    phases = timeline(load_trace(path), steps)
    print(f"== timeline {label}, per step:\n{format_timeline(phases)}", file=sys.stderr)
    return {**summary, "timeline": phases, "trace": str(path)}
