"""Device values read on the host later, without draining the GPU's queue.

A plain read of a CUDA tensor (`.tolist()`, `.item()`, `float()`) copies it on the current
stream and then waits for that stream (c10's `memcpy_and_sync`): for all the work queued before
the copy, not only the work that made the tensor. Read after the next step has been queued, it
waits for the whole of that step too and leaves the GPU with nothing to do while the host
prepares the step after. `HostCopy` instead copies the tensor into pinned host memory as soon
as it is made (non-blocking, queued behind the work that made it) and records an event behind
the copy; `read` waits for that event only, while whatever was queued after stays queued.
"""
from __future__ import annotations

import torch


class HostCopy:
    """A tensor's copy on its way to host memory: queued now, read later (`read`), waiting for
    the work queued before the copy and for nothing queued after it. A CPU tensor is its own
    host copy."""

    def __init__(self, value: torch.Tensor) -> None:
        value = value.detach()
        self._event: torch.cuda.Event | None = None
        if value.device.type != "cuda":
            self._host = value
            return
        self._host = torch.empty(value.shape, dtype=value.dtype, device="cpu", pin_memory=True)
        self._host.copy_(value, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()  # on the current stream, behind the copy

    def read(self) -> torch.Tensor:
        """The host tensor, once the copy has arrived."""
        if self._event is not None:
            self._event.synchronize()
        return self._host
