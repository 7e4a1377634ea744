"""Host-to-device batch copies on a side stream, so that a batch's copy overlaps the previous
step's compute instead of adding to the step.

The DataLoader pins each batch and the trainer copies it with `non_blocking=True`, which frees
the host. On the compute stream, though, the copy still runs in stream order: after every
kernel of the previous step (its optimizer included) and before the next forward, so on the
device its whole time adds to every step: ViT-B/16's batch of 256 uint8 images is 38.5 MB, about
1 ms at a PCIe 5 link's ~40 GB/s, and ViT-B/32's 512 images twice that; more where several GPUs
share a PCIe switch. Synthetic benchmark batches, kept on the device, never pay it.

`BatchCopier` issues the copies on a stream of their own: the copy engine moves the batch while
the SMs still run the previous step, and the compute stream waits only for the copy's
completion, on the device (`wait_stream`: an event, the host does not wait). `record_stream`
tells the caching allocator that the compute stream uses the copied tensors (they were allocated
on the copy stream), so their memory is not handed out again before that work is done. The
pinned source stays valid too: a non-blocking copy records an event on its stream in the pinned
memory's caching allocator. `engine.copy_stream=false` copies on the compute stream as before.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class BatchCopier:
    """Copies a step's input tensors to `device`: on `stream` (a side stream) when one is given,
    else on the current stream (non-blocking on CUDA). `cuda` is the module whose
    `current_stream` and `stream` it uses (`torch.cuda`; tests pass a stand-in)."""

    def __init__(self, device: torch.device, stream: Any = None, cuda: Any = torch.cuda) -> None:
        self.device = device
        self.stream = stream
        self.cuda = cuda

    def __call__(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The tensors on the device, ready for the compute stream's next kernels."""
        if self.stream is None:
            nb = self.device.type == "cuda"
            return [t.to(self.device, non_blocking=nb) for t in tensors]
        compute = self.cuda.current_stream(self.device)
        with self.cuda.stream(self.stream):
            out = [t.to(self.device, non_blocking=True) for t in tensors]
        compute.wait_stream(self.stream)  # the next forward starts after the copies, on-device
        for t in out:
            t.record_stream(compute)  # allocated on the copy stream, used on the compute stream
        return out


def batch_copier(device: torch.device, side_stream: bool) -> BatchCopier:
    """A `BatchCopier` for `device`: with its own copy stream on CUDA when `side_stream`
    (`engine.copy_stream`), on the current stream otherwise and on CPU."""
    stream = torch.cuda.Stream(device) if side_stream and device.type == "cuda" else None
    return BatchCopier(device, stream)
