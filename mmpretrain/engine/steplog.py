"""A log line's device numbers, read on the host one step late.

A log step needs the losses averaged over its window (and over the ranks) and the step's
gradient norm: device tensors. Reading them there (`.tolist()`, `float()`) waits for the whole
step and leaves the GPU idle while the host prepares the next one, once every `log_every`
steps. `LossWindow.close` instead queues them for the host (`HostCopy`: a non-blocking copy
into pinned memory and an event) and the trainer writes the line after the next step has been
queued (`take`), when that wait costs nothing: the host had already waited for the logged
step's flags (`engine/stepflags.py`). Where a step must be read at once anyway (checkpoint,
evaluation, the last step) the trainer takes the line right away.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from mmpretrain.engine.host_read import HostCopy


@dataclass
class LogValues:
    """What a closed window gives the log line: its step, the mean of each loss over the window's
    steps and the ranks, the step's gradient norm (nan where none is known), host fields."""

    step: int
    losses: dict[str, float]
    grad_norm: float
    fields: dict[str, Any]


class LossWindow:
    """Each loss summed on the device over the steps since the last log line; `close` ends the
    window and queues its numbers for the host, `take` reads them (waiting for that step only)."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self._pending: tuple[int, list[str], HostCopy, float | None, dict[str, Any]] | None = None

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        """Add one step's losses (device tensors; no host wait)."""
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, 0.0) + value.detach().float()
        self.steps += 1

    def close(self, step: int, grad_norm: torch.Tensor | float | None,
              fields: dict[str, Any]) -> None:
        """End the window at `step`: queue the losses' means over its steps and the ranks (one
        all_reduce, every rank at the same step) and `grad_norm` for the host without waiting.
        `fields` are host values carried to `take` unchanged."""
        if self._pending is not None:
            raise RuntimeError(f"the log line of step {self._pending[0]} was never taken")
        names = sorted(self.sums)
        means = torch.stack([self.sums[k] for k in names]) / max(self.steps, 1)  # (K,)
        if self.world > 1 and dist.is_initialized():
            dist.all_reduce(means)  # queued, no wait
            means /= self.world
        on_device = isinstance(grad_norm, torch.Tensor) and grad_norm.device == means.device
        if on_device:
            means = torch.cat([means, grad_norm.detach().reshape(1).float()])  # (K + 1,)
        host_norm = None if on_device else _host_float(grad_norm)
        self._pending = (step, names, HostCopy(means), host_norm, fields)
        self.sums, self.steps = {}, 0

    def take(self) -> LogValues | None:
        """The closed window's numbers once its step has finished; None when none is pending."""
        if self._pending is None:
            return None
        step, names, copy, host_norm, fields = self._pending
        self._pending = None
        values = copy.read().tolist()
        norm = values.pop() if host_norm is None else host_norm
        return LogValues(step, dict(zip(names, values)), norm, fields)


def _host_float(value: torch.Tensor | float | None) -> float:
    """A gradient norm known on the host (a float, a CPU tensor) as a float; nan for None."""
    if value is None:
        return math.nan
    return float(value)
