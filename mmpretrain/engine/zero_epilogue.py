"""ZeRO-1/2 with `overlap_comm`: end the backward with a stream wait, not a device synchronize.

With `overlap_comm`, DeepSpeed reduces each gradient bucket on a side stream (its
`reduction_stream`) while the backward goes on. `DeepSpeedZeroOptimizer.
independent_gradient_partition_epilogue`, which runs after every backward, reduces the last
bucket and then, before the optimizer reads the reduced gradients on the compute stream,
calls `get_accelerator().synchronize()` unless the accelerator "resolves data dependencies"
itself. That device-wide synchronize stops the host until the GPU has drained the whole
backward; the host then runs the epilogue's bookkeeping, the optimizer step and the next
forward's first launches while the GPU has nothing queued. It is the one synchronize a
several-rank ZeRO-1/2 step makes (`tests/engine_checks.py epilogue`).

The dependency it guards is between two streams on the device: the compute stream must not
read the gradient partitions before the reduction stream has written them. A stream wait
(`current_stream().wait_stream(reduction_stream)`) orders exactly that on the device without
stopping the host, as DeepSpeed's `average_tensor` already does between buckets. Memory is
safe as before: the tensors the reduction stream uses are DeepSpeed's persistent buckets or
carry `record_stream`, and everything the compute stream allocates afterwards runs after the
wait. It assumes, as DeepSpeed's own waits between buckets do, that the next backward's
gradient copies run on the compute stream or on streams ordered after it (our model uses no
side streams). DeepSpeed made the same change inside the backward in 2022 (its PR #2500
replaced `average_tensor`'s synchronize by stream waits); the epilogue kept its synchronize.

`install_stream_ordered_epilogue` applies this to one optimizer instance where that reasoning
holds: overlap on, the contiguous gradient path (whose buckets and partitions it is about; the
other path's per-bucket synchronizes are left as they are), and no CPU offload (there the host
reads the gradients in pinned memory, so it must wait). `engine.epilogue_sync=true` keeps
DeepSpeed's synchronize.
"""
from __future__ import annotations

import types
from typing import Any

from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

_NONE = object()


def _stream_ordered_epilogue(self: Any) -> None:
    """DeepSpeed's epilogue with its `synchronize()` answered by a wait of the current stream
    on the reduction stream (an instance attribute of the accelerator for the call only)."""
    acc = get_accelerator()
    reduction = self.reduction_stream

    def wait(device_index: Any = None) -> None:
        acc.current_stream().wait_stream(reduction)

    before = vars(acc).get("synchronize", _NONE)
    acc.synchronize = wait
    try:
        DeepSpeedZeroOptimizer.independent_gradient_partition_epilogue(self)
    finally:
        if before is _NONE:
            del acc.synchronize
        else:
            acc.synchronize = before


def install_stream_ordered_epilogue(optimizer: Any) -> bool:
    """Use `_stream_ordered_epilogue` on a ZeRO-1/2 optimizer that overlaps its reduction on
    the contiguous gradient path without CPU offload, on a device whose streams DeepSpeed
    orders by synchronizing (CUDA); True if installed."""
    if not isinstance(optimizer, DeepSpeedZeroOptimizer) or optimizer.cpu_offload:
        return False
    if not (optimizer.overlap_comm and optimizer.contiguous_gradients):
        return False
    if get_accelerator().resolves_data_dependency() or optimizer.reduction_stream is None:
        return False  # DeepSpeed skips the synchronize there itself
    optimizer.independent_gradient_partition_epilogue = types.MethodType(
        _stream_ordered_epilogue, optimizer)
    return True
