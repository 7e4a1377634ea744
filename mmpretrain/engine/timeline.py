"""Where a profiled step's device time goes, phase by phase, and what the host did while the
device sat idle (`mmpretrain bench train --profile`).

The training step marks its phases with `phase(name)` (a `torch.profiler.record_function`
range named "phase:NAME": forward, backward, optimizer step; OpenCLIP's timed loop marks the
same ones). From a Chrome trace that `torch.profiler` exported, `timeline` assigns every
device kernel (and memcpy/memset) to the phase during which the host launched it (the launch
call and the kernel share a correlation id; backward kernels are launched by autograd's own
thread while the main thread sits in the backward phase, so phases are matched by time, not
thread) and reports, per step:

* per phase: host milliseconds, kernels launched, their device-busy milliseconds, and the
  device's idle milliseconds just before them (the gaps it waited for this phase's launches);
* the idle milliseconds by the host ops (outermost > innermost) running on the launching
  thread in the middle of each gap (e.g. `aten::isfinite > aten::resize_` in DeepSpeed's
  per-parameter overflow check).

A step whose device idles for long in one phase is bound by the host there; a step whose
device is busy throughout is bound by its kernels (`engine/profile.py` splits those by family).
"""
from __future__ import annotations

import bisect
import gzip
import json
from collections import defaultdict
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from torch.profiler import record_function

PREFIX = "phase:"
DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
MIN_GAP_US = 5.0
"""Device gaps shorter than this (µs) are launch latency, not waiting; they are not counted."""
TOP_OPS = 10


def phase(name: str) -> AbstractContextManager:
    """Mark a phase of the training step for `timeline` (a no-op unless profiling)."""
    return record_function(PREFIX + name)


def load_trace(path: str | Path) -> dict[str, Any]:
    """A Chrome trace written by `torch.profiler` (`.json` or `.json.gz`)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)


def _spans(events: list[dict], cats: tuple[str, ...]) -> list[dict]:
    return sorted((e for e in events if e.get("cat") in cats and "dur" in e),
                  key=lambda e: e["ts"])


def _phase_at(phases: list[dict], starts: list[float], ts: float) -> str:
    """The name of the phase whose host span holds time `ts` ("other" if none); phases are
    sequential, never nested."""
    i = bisect.bisect_right(starts, ts) - 1
    if i >= 0 and phases[i]["ts"] + phases[i]["dur"] >= ts:
        return phases[i]["name"][len(PREFIX):]
    return "other"


class _HostOps:
    """The host ops running on a thread at a given time."""

    def __init__(self, events: list[dict]) -> None:
        self.by_tid: dict[Any, list[dict]] = defaultdict(list)
        for e in _spans(events, ("cpu_op",)):
            self.by_tid[e.get("tid")].append(e)
        self.starts = {t: [e["ts"] for e in ops] for t, ops in self.by_tid.items()}
        self.longest = {t: max((e["dur"] for e in ops), default=0.0)
                        for t, ops in self.by_tid.items()}

    def at(self, tid: Any, ts: float) -> str:
        """"OUTER > INNER": the outermost and innermost ops running on `tid` at `ts`."""
        ops, starts = self.by_tid.get(tid, []), self.starts.get(tid, [])
        i = bisect.bisect_right(starts, ts) - 1
        covering = []
        while i >= 0 and ops[i]["ts"] >= ts - self.longest[tid]:
            if ops[i]["ts"] + ops[i]["dur"] >= ts:
                covering.append(ops[i])
            i -= 1
        if not covering:
            return "(no host op)"
        outer = max(covering, key=lambda e: e["dur"])["name"]
        inner = min(covering, key=lambda e: e["dur"])["name"]
        return outer if outer == inner else f"{outer} > {inner}"


def timeline(trace: dict[str, Any], steps: int) -> dict[str, Any]:
    """Per-step phase table and idle attribution of a profiled run of `steps` steps (see the
    module docstring). Without device kernels (a CPU run) only the host milliseconds are there."""
    events = trace.get("traceEvents", [])
    phases = [e for e in _spans(events, ("user_annotation",))
              if str(e.get("name", "")).startswith(PREFIX)]
    starts = [p["ts"] for p in phases]
    table: dict[str, dict[str, float]] = defaultdict(
        lambda: {"host_ms": 0.0, "kernels": 0.0, "device_busy_ms": 0.0, "device_idle_ms": 0.0})
    for p in phases:
        table[p["name"][len(PREFIX):]]["host_ms"] += p["dur"] / 1e3 / steps
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    host = _HostOps(events)
    idle_by_op: dict[str, float] = defaultdict(float)
    end = None
    for k in _spans(events, DEVICE_CATS):
        launch = launches.get(k.get("args", {}).get("correlation"))
        name = _phase_at(phases, starts, launch["ts"]) if launch else "other"
        row = table[name]
        row["kernels"] += 1 / steps
        row["device_busy_ms"] += k["dur"] / 1e3 / steps
        if end is not None and k["ts"] - end >= MIN_GAP_US:
            gap_ms = (k["ts"] - end) / 1e3 / steps
            row["device_idle_ms"] += gap_ms
            op = host.at(launch["tid"], (end + k["ts"]) / 2) if launch else "?"
            idle_by_op[f"{name}: {op}"] += gap_ms
        end = k["ts"] + k["dur"] if end is None else max(end, k["ts"] + k["dur"])
    top = sorted(idle_by_op.items(), key=lambda kv: -kv[1])[:TOP_OPS]
    return {"phases_per_step": {n: {k: round(v, 3) for k, v in row.items()}
                                for n, row in table.items()},
            "device_idle_ms_per_step_by_host_op": {n: round(v, 3) for n, v in top}}


def format_timeline(result: dict[str, Any]) -> str:
    """The phase table and the idle attribution as text."""
    lines = [f"{'phase':>16} {'host ms':>9} {'kernels':>8} {'busy ms':>9} {'idle ms':>9}"]
    for name, row in result["phases_per_step"].items():
        lines.append(f"{name:>16} {row['host_ms']:9.2f} {row['kernels']:8.0f} "
                     f"{row['device_busy_ms']:9.2f} {row['device_idle_ms']:9.2f}")
    idle = result["device_idle_ms_per_step_by_host_op"]
    if idle:
        lines.append("device idle per step, by the host op running meanwhile:")
        lines += [f"  {ms:8.2f} ms  {op}" for op, ms in idle.items()]
    return "\n".join(lines)
