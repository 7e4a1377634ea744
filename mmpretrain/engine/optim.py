"""AdamW with parameter groups, and the warm-up + cosine learning-rate schedule."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from mmpretrain.config.schema import OptimConfig


def no_decay(name: str, param: nn.Parameter) -> bool:
    """Norm weights, biases, 1-d embeddings (class token) and the logit scale/bias never decay
    (as in CLIP/open_clip); every tensor of two or more dimensions does."""
    # Under ZeRO-3's zero.Init a parameter's data is an empty 1-d placeholder; `ds_shape`
    # holds its real shape.
    ndim = len(getattr(param, "ds_shape", param.shape))
    return ndim < 2 or "logit_" in name


ALIGN_NUMEL = 8
"""16 bytes of bf16/fp16 (and 32 of fp32): the alignment cuBLAS's fast kernels want."""


def _aligned_first(params: list[nn.Parameter]) -> list[nn.Parameter]:
    """`params` with those whose element count is a multiple of ALIGN_NUMEL first (stable).

    DeepSpeed (ZeRO 0-2 in bf16/fp16) packs each group's weights back to back into one flat
    buffer and makes every parameter a view of it, so one odd-sized tensor (the (1,) logit
    scale) misaligns all that follow it. Measured on an H200: with the logit scale first, 199
    of ViT-B/16's 302 parameters (every bias and norm weight) sat 2 bytes off 16-byte
    alignment and cuBLAS ran their addmm with sm75-era kernels: steps took 1.7x as long."""
    def numel(p: nn.Parameter) -> int:
        return math.prod(getattr(p, "ds_shape", p.shape))

    return sorted(params, key=lambda p: numel(p) % ALIGN_NUMEL != 0)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed matrices and everything `no_decay` exempts; in each, the
    odd-sized tensors last (`_aligned_first`)."""
    decay, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (plain if no_decay(name, p) else decay).append(p)
    return [{"params": _aligned_first(decay), "weight_decay": weight_decay, "name": "decay"},
            {"params": _aligned_first(plain), "weight_decay": 0.0, "name": "no_decay"}]


def param_group_names(model: nn.Module) -> list[list[str]]:
    """The names of `param_groups(model)`'s parameters, per group, in order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in param_groups(model, 0.0)]


class AdamWSkipNonFinite(torch.optim.AdamW):
    """AdamW that leaves parameters and moments untouched when any gradient is NaN/Inf.

    DeepSpeed calls this optimizer's `step()` on every rank (on each rank's partition under
    ZeRO), so the decision is agreed with an all-reduce: one bad shard skips the step
    everywhere. (ZeRO's own overflow check only runs for fp16; for fp32/bf16 a NaN would
    otherwise reach the weights.)

    `skip_flag` is the last step's agreed flag, a float tensor of shape () (1.0 = skipped) on
    the flag device. With the fused kernel and the flag on the parameters' device (CUDA
    without CPU offload), the flag goes to the kernel as `found_inf`, which skips the update
    and the step count on the device: no host sync in the step. Otherwise the flag is read on
    the host (cheap on CPU; with CPU offload the update waits for the gradients anyway).
    The trainer reads `skip_flag` one step late (`engine/stepflags.py`).
    """

    skip_flag: torch.Tensor | None = None

    def step(self, closure=None):  # type: ignore[override]
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        bad = torch.zeros((), device=_flag_device(grads))
        if grads:
            bad += (~torch.stack([torch.isfinite(g).all() for g in grads]).all()).float().to(
                bad.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        self.skip_flag = bad
        if self.defaults.get("fused") and all(g.device == bad.device for g in grads):
            self.found_inf = bad  # read by the fused kernel (torch.optim.Adam.step)
            try:
                return super().step(closure)
            finally:
                del self.found_inf
        if bad.item() > 0:
            return None
        return super().step(closure)


def _flag_device(grads: list[torch.Tensor]) -> torch.device:
    """Where the skip flag lives: the collective backend's device (nccl needs CUDA)."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return grads[0].device if grads else torch.device("cpu")


def optimizer_impl(cfg: OptimConfig, device: torch.device) -> str:
    """`optim.impl` resolved for `device`: fused on CUDA and loop on CPU for `auto`."""
    if cfg.impl == "auto":
        return "fused" if device.type == "cuda" else "loop"
    return cfg.impl


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW (`optimizer_impl`: fused on CUDA) over `param_groups` that skips steps with
    non-finite gradients."""
    impl = optimizer_impl(cfg, device)
    kwargs = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    return AdamWSkipNonFinite(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                              betas=tuple(cfg.betas), eps=cfg.eps, **kwargs)


def lr_factor(step: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    decay_steps = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine


def build_scheduler(optimizer: torch.optim.Optimizer,
                    cfg: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over `lr_factor`; DeepSpeed steps it once per optimizer step and saves it."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
