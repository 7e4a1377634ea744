"""Step meters (samples/s, data-wait fraction, peak memory) and the metrics.jsonl writer."""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, max RSS on CPU (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * (1 if sys.platform != "darwin" else 1 / 1024) / 2**20


class StepMeter:
    """Accumulates step and data-wait time between two log lines."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start a new logging window."""
        self.steps = 0
        self.samples = 0
        self.data_time = 0.0
        self.start = time.perf_counter()

    def update(self, samples: int, data_time: float) -> None:
        """Record one optimizer step of `samples` global samples that waited `data_time` s."""
        self.steps += 1
        self.samples += samples
        self.data_time += data_time

    def summary(self) -> dict[str, float]:
        """samples/s, seconds per step and data-wait fraction over the window."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {"samples_per_s": self.samples / elapsed,
                "step_time_s": elapsed / max(self.steps, 1),
                "data_wait_frac": self.data_time / elapsed}


class JsonlWriter:
    """Appends one JSON object per line to `metrics.jsonl` (rank 0 only)."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """On resume, drop records of steps after the checkpoint (they will be logged again)."""
        if not self.enabled or not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # blank, or torn by a crash while appending
                continue
            if record.get("step", 0) <= step:
                keep.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def format_metrics(record: dict[str, Any]) -> str:
    """One console line: `step 10/300 | loss 2.3012 | lr 3.3e-04 | ...`."""
    parts = []
    for key, value in record.items():
        if key == "step" and "total_steps" in record:
            parts.append(f"step {value}/{record['total_steps']}")
        elif key == "total_steps":
            continue
        elif isinstance(value, float):
            parts.append(f"{key} {value:.3e}" if key == "lr" or abs(value) < 1e-3 and value
                         else f"{key} {value:.4g}")
        else:
            parts.append(f"{key} {value}")
    return " | ".join(parts)
