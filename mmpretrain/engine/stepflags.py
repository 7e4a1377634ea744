"""Per-step flags read on the host one step late, so the training step never waits on the GPU.

Each step produces two flags on the device: whether the optimizer skipped the update
(non-finite gradients, agreed across ranks by `AdamWSkipNonFinite`) and whether any rank
received a stop signal. Every rank reads the same all-reduced values at the same step, so the
decisions taken from them (count a skip, stop after too many, save and exit on a signal) stay
in lockstep across ranks.

How they are read matters. A plain read of a CUDA tensor (`.tolist()`, `.item()`) copies it
on the current stream and waits for that stream: for all the work queued before the copy,
not only the work that made the tensor. Reading step s's flags that way after step s+1 had
been queued (as this module did until 2026-12-02) waited for the whole of step s+1, so every
step ended with the GPU's queue empty: the host's work between two steps (the next batch,
its copy, the first launches) ran while the GPU idled, and the batch's copy could not overlap
the previous step. Now each step's flags are copied into pinned host memory right after they
are made (non-blocking, queued behind that step only) and an event is recorded behind the
copy; reading them waits for that event, i.e. for step s alone, while step s+1 stays queued
on the GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


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
        self._pending: list[tuple[int, torch.Tensor, torch.cuda.Event | None]] = []  # host copies

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
        self._pending.append((step, *_on_host(flags)))
        return earlier

    def drain(self) -> list[StepFlags]:
        """Read every pending step's flags on the host (waits for those steps to finish, and
        for nothing queued after them)."""
        out = []
        for step, flags, copied in self._pending:
            if copied is not None:
                copied.synchronize()  # this step's flags have reached the pinned buffer
            skipped, stop = flags.tolist()
            out.append(StepFlags(step, skipped > 0, stop > 0))
        self._pending = []
        return out


def _on_host(flags: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """(host tensor, event): a CUDA tensor is copied into pinned memory without a wait, and
    the event, recorded behind the copy on the current stream, says when it has arrived; a CPU
    tensor is its own host copy (event None)."""
    if flags.device.type != "cuda":
        return flags, None
    host = torch.empty(flags.shape, dtype=flags.dtype, device="cpu", pin_memory=True)  # (2,)
    host.copy_(flags, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    return host, copied
