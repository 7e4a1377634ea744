"""ZeRO-1/2's gradient norm in one multi-tensor kernel instead of three launches per parameter.

DeepSpeed's `DeepSpeedZeroOptimizer.get_grad_norm_direct` casts each parameter's gradient to
fp64, takes its norm and moves it to the device, one parameter at a time: ~900 kernel launches
per ViT-B/16 step (302 parameters), all after the backward, while the GPU waits (H200 profile,
docs/PERFORMANCE.md). `install_foreach_grad_norm` replaces that method on one optimizer
instance by the same sum with `torch._foreach_norm` (fp32 norms per tensor, summed in fp64),
the same all-reduces and the same mark for a NaN/inf norm (-1); `tests/engine_checks.py clip`
shows the norms and the clipped weights match DeepSpeed's own on 2 ranks.
"""
from __future__ import annotations

import types
from typing import Any

import torch
from deepspeed import comm as dist
from deepspeed.runtime.constants import PIPE_REPLICATED
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer


def _foreach_grad_norm(self: Any, gradients: list[torch.Tensor], params: list[Any],
                       norm_type: float = 2) -> torch.Tensor:
    """`get_grad_norm_direct` for the L2 norm without model or pipeline parallelism."""
    if float(norm_type) != 2.0:
        return DeepSpeedZeroOptimizer.get_grad_norm_direct(self, gradients, params, norm_type)
    grads = [g for g in gradients if not getattr(g, "_zero_padding", False)]
    if grads:
        norms = torch._foreach_norm(grads, 2.0, dtype=torch.float32)
        total = torch.stack(norms).double().square().sum().float().to(self.device)
    else:
        total = torch.tensor(0.0, dtype=torch.float32, device=self.device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.dp_process_group)
    self._model_parallel_all_reduce(tensor=total, op=dist.ReduceOp.SUM)
    total = total.sqrt()
    return total.masked_fill_(~torch.isfinite(total), -1.0)  # as DeepSpeed marks a bad norm


def install_foreach_grad_norm(optimizer: Any) -> bool:
    """Use `_foreach_grad_norm` on a ZeRO-1/2 optimizer whose norm is the plain sum over its
    parameters (no model-parallel rank but 0, no pipeline-replicated parameters, gradients on
    the device); True if installed."""
    if not isinstance(optimizer, DeepSpeedZeroOptimizer) or optimizer.cpu_offload:
        return False
    params = [p for group in optimizer.bit16_groups for p in group]
    if optimizer.model_parallel_rank != 0 or any(
            getattr(p, PIPE_REPLICATED, False) for p in params):
        return False
    optimizer.get_grad_norm_direct = types.MethodType(_foreach_grad_norm, optimizer)
    return True
