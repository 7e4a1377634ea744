"""`engine/timeline.py`: device time and idle gaps per marked phase of a profiled step, from a
Chrome trace (a synthetic one here: the CPU suite has no device kernels)."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from mmpretrain.engine.timeline import (PREFIX, format_timeline, load_trace, phase,
                                        timeline)


def _phase(name: str, ts: float, dur: float) -> dict:
    return {"cat": "user_annotation", "name": PREFIX + name, "ts": ts, "dur": dur, "tid": 1}


def _op(name: str, ts: float, dur: float, tid: int = 1) -> dict:
    return {"cat": "cpu_op", "name": name, "ts": ts, "dur": dur, "tid": tid}


def _launch(corr: int, ts: float, tid: int = 1) -> dict:
    return {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts, "dur": 2, "tid": tid,
            "args": {"correlation": corr}}


def _kernel(corr: int, ts: float, dur: float, cat: str = "kernel") -> dict:
    return {"cat": cat, "name": f"k{corr}", "ts": ts, "dur": dur, "args": {"correlation": corr}}


def one_step(t: float) -> list[dict]:
    """A step at time t (µs): forward launches 2 kernels (1 ms busy), backward launches 2 from
    autograd's thread (tid 2; 3 ms), the optimizer step launches 1 memcpy after 800 µs of host
    work inside `aten::narrow`, during which the device idles."""
    return [
        _phase("forward", t, 300), _op("aten::addmm", t + 10, 20), _launch(1, t + 20),
        _kernel(1, t + 30, 600), _launch(2, t + 40), _kernel(2, t + 630, 400),
        _phase("backward", t + 300, 200), _launch(3, t + 310, tid=2),
        _kernel(3, t + 1030, 2000), _launch(4, t + 320, tid=2), _kernel(4, t + 3030, 1000),
        _phase("optimizer", t + 600, 4500), _op("DeepSpeedZeroOptimizer.step", t + 600, 4400),
        _op("aten::narrow", t + 4030, 800), _op("aten::slice", t + 4040, 10),
        _launch(5, t + 4835),
        _kernel(5, t + 4830 + 10, 100, cat="gpu_memcpy"),
    ]


def test_phases_busy_idle_and_the_host_op_the_device_waited_on() -> None:
    trace = {"traceEvents": one_step(0) + one_step(10_000)}
    out = timeline(trace, steps=2)
    p = out["phases_per_step"]
    # the first step's first kernel has no gap before it; the second's waits from
    # 4.94 ms (the first step's memcpy ends) to 10.03 ms: 5.09 ms, halved per step
    assert p["forward"] == {"host_ms": 0.3, "kernels": 2, "device_busy_ms": 1.0,
                            "device_idle_ms": pytest.approx(2.545)}
    assert p["backward"] == {"host_ms": 0.2, "kernels": 2, "device_busy_ms": 3.0,
                             "device_idle_ms": 0}
    assert p["optimizer"]["kernels"] == 1 and p["optimizer"]["device_busy_ms"] == 0.1
    assert p["optimizer"]["device_idle_ms"] == pytest.approx(0.81)  # 4030 -> 4840 µs
    idle = out["device_idle_ms_per_step_by_host_op"]
    assert idle["optimizer: DeepSpeedZeroOptimizer.step > aten::narrow"] == pytest.approx(0.81)
    assert list(idle)[0] == "forward: (no host op)"  # the wait between the two steps
    text = format_timeline(out)
    assert "optimizer" in text and "aten::narrow" in text


def test_kernels_launched_outside_any_phase_and_gaps_below_launch_latency() -> None:
    events = [_phase("forward", 0, 100), _launch(1, 10), _kernel(1, 20, 50),
              _launch(2, 200), _kernel(2, 73, 10),  # 3 µs after k1: launch latency
              _launch(3, 300), _kernel(3, 400, 10)]
    p = timeline({"traceEvents": events}, steps=1)["phases_per_step"]
    assert p["forward"]["kernels"] == 1 and p["forward"]["device_idle_ms"] == 0
    assert p["other"]["kernels"] == 2
    assert p["other"]["device_idle_ms"] == pytest.approx(0.317)  # 83 -> 400 µs only


def test_a_profiled_cpu_run_marks_phases_and_the_trace_round_trips(tmp_path: Path) -> None:
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(64, 64, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            with phase("forward"):
                y = (x @ x).relu().sum()
            with phase("backward"):
                y.backward()
    path = tmp_path / "t.trace.json.gz"
    prof.export_chrome_trace(str(path))
    assert json.load(gzip.open(path))  # torch gzips by the suffix
    p = timeline(load_trace(path), steps=2)["phases_per_step"]
    assert set(p) == {"forward", "backward"} and p["forward"]["host_ms"] > 0
    assert all(row["kernels"] == 0 for row in p.values())  # no device on CPU
