"""Per-step flags read on the host one step late, so the training step never waits on the GPU.

Each step produces two flags on the device: whether the optimizer skipped the update
(non-finite gradients, agreed across ranks by `AdamWSkipNonFinite`) and whether any rank
received a stop signal. Every rank reads the same all-reduced values at the same step, so the
decisions taken from them (count a skip, stop after too many, save and exit on a signal) stay
in lockstep across ranks.

They are read through `HostCopy` (`engine/host_read.py`): copied into pinned host memory
right after they are made, and read by waiting for an event recorded behind that copy, i.e.
for step s alone while step s+1 stays queued on the GPU. Until 2026-12-02 they were read with
`.tolist()`, which waited for the whole of step s+1 too and left the GPU idle between steps.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from mmpretrain.engine.host_read import HostCopy


@dataclass(frozen=True)
class StepFlags:
    """What the host learned about one finished step."""

    step: int
    skipped: bool
    stop: bool


class LaggedFlags:
    """Queue of per-step device flags; `push` returns the previous step's, `drain` all."""

    def __init__(self, device: torch.device, world: int) -> None:
        self.device = device
        self.world = world
        self._pending: list[tuple[int, HostCopy]] = []

    def push(self, step: int, skip_flag: torch.Tensor | None, stop: bool) -> list[StepFlags]:
        """Record step `step`'s flags (no host sync) and return those of earlier steps.

        `skip_flag`: the optimizer's () tensor, 1.0 when the update was skipped; None when the
        optimizer was not called (DeepSpeed's fp16 overflow skip), which counts as skipped.
        `stop`: this rank's stop request; the flags are all-reduced (max) across ranks.
        """
        skip = (torch.ones((), device=self.device) if skip_flag is None
                else skip_flag.detach().reshape(()).float().to(self.device))
        flags = torch.stack([skip, torch.full((), float(stop), device=self.device)])  # (2,)
        if self.world > 1 and dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # queued on the device, no wait
        earlier = self.drain()
        self._pending.append((step, HostCopy(flags)))
        return earlier

    def drain(self) -> list[StepFlags]:
        """Read every pending step's flags on the host (waits for those steps to finish, and
        for nothing queued after them)."""
        out = []
        for step, flags in self._pending:
            skipped, stop = flags.read().tolist()
            out.append(StepFlags(step, skipped > 0, stop > 0))
        self._pending = []
        return out

