"""ZeRO-1 on one data-parallel rank: no gradient "reduction" at the end of each step.

At each accumulation boundary DeepSpeed's `DeepSpeedZeroOptimizer.reduce_gradients` (ZeRO-1,
no `overlap_comm`) walks every parameter through its bucket bookkeeping (a dozen Python calls
each: ~3,000 a step for ViT-B/16's 302 parameters), then reduces each bucket: the gradients
flattened into one buffer, divided by the group's size, all-reduced, and copied back into
every gradient (one copy kernel per parameter). With one rank in the group all of it is the
identity: x / 1.0 and a one-rank all-reduce change no bit, and the copies write back what was
read. On a GPU that is two passes over the gradients (~300 MB each way in bf16 for ViT-B/16)
and ~300 launches while nothing else is queued; on the host, ~10 ms of the ViT-B/16 host
twin's ~60 ms profiled step.

`install_one_rank_reduce_skip` replaces the method on one optimizer instance by what follows
the reduction in DeepSpeed's own code (the epilogue that resets the reduced marks and hands the
optimizer its flat gradient partition), where nothing else in the path changes a gradient: no
`overlap_comm`, contiguous gradients, offload, separate accumulation dtype, MoE, sequence
parallelism or ZenFlow. `tests/engine_checks.py contiguous` checks that it is installed there
and that 3 steps end with bitwise DeepSpeed's contiguous path's weights.
"""
from __future__ import annotations

import types
from typing import Any

from deepspeed import comm as dist
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer


def _epilogue_only(self: Any, pipeline_parallel: bool = False) -> None:
    """`reduce_gradients` on one rank: the epilogue alone (pipeline parallelism: DeepSpeed's)."""
    if pipeline_parallel:
        DeepSpeedZeroOptimizer.reduce_gradients(self, pipeline_parallel)
        return
    self.overlapping_partition_gradients_reduce_epilogue()


def _reduction_is_identity(optimizer: Any) -> bool:
    """Whether ZeRO-1's reduction leaves every gradient as it is (see the module docstring)."""
    groups = [optimizer.dp_process_group, *optimizer.real_dp_process_group]
    return (not optimizer.partition_gradients and not optimizer.overlap_comm
            and not optimizer.contiguous_gradients and not optimizer.cpu_offload
            and not optimizer.use_grad_accum_attribute and not optimizer.zenflow
            and not optimizer.has_moe_layers and optimizer.sequence_parallel_size == 1
            and all(dist.get_world_size(group=g) == 1 for g in groups))


def install_one_rank_reduce_skip(optimizer: Any) -> bool:
    """Use `_epilogue_only` on a ZeRO-1 optimizer whose reduction is the identity; True if
    installed."""
    if not isinstance(optimizer, DeepSpeedZeroOptimizer) or not _reduction_is_identity(optimizer):
        return False
    optimizer.reduce_gradients = types.MethodType(_epilogue_only, optimizer)
    return True
