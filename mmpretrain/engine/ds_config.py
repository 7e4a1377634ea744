"""The one place where precision, ZeRO stage, accumulation and clipping become DeepSpeed config."""
from __future__ import annotations

from typing import Any

import torch

from mmpretrain.config.schema import ExperimentConfig


def resolve_precision(requested: str, device: torch.device) -> str:
    """`auto` -> bf16 on CUDA, fp32 on CPU; explicit choices are checked against the device."""
    if requested == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if requested == "fp16" and device.type == "cpu":
        raise ValueError("engine.precision=fp16 needs CUDA; use fp32 or bf16 on CPU")
    return requested


def precision_dtype(precision: str) -> torch.dtype:
    """The dtype the model's weights and activations use under `precision`."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def overlap_comm(cfg: ExperimentConfig, world_size: int, device: torch.device) -> bool:
    """Resolve `engine.overlap_comm`. DeepSpeed's overlap path (ZeRO-1/2) reduces on a side
    stream and ends every backward with a device-wide synchronize (a stream wait instead where
    `engine/zero_epilogue.py` applies; never with offload), which stalls the host until the GPU
    drains; worth it only where a reduction or an offload copy is long enough to hide behind
    the backward."""
    choice = cfg.engine.overlap_comm
    if choice != "auto":
        return bool(choice)
    return device.type == "cuda" and (world_size > 1 or cfg.engine.offload_optimizer)


def contiguous_gradients(cfg: ExperimentConfig, world_size: int) -> bool:
    """Resolve `engine.contiguous_gradients`. The contiguous path copies every gradient three
    times (into a bucket, back from the reduced bucket, into the partition) with per-parameter
    Python around each copy; on one rank of ZeRO-1/2 there is nothing to reduce-scatter, and
    the plain path's one flatten for the optimizer halves the host work per step (the ViT-B/16
    host twin: ~47,000 Python calls and ~11,200 aten ops a step -> ~27,000 and ~5,400)."""
    choice = cfg.engine.contiguous_gradients
    if choice != "auto":
        return bool(choice)
    eng = cfg.engine
    return world_size > 1 or eng.offload_optimizer or eng.zero_stage == 3


def _check_cpu_reduction(stage: int, contiguous: bool, world_size: int,
                         device: torch.device) -> None:
    """Refuse ZeRO-1/2's plain gradient path on several CPU ranks: DeepSpeed 0.19.7 sorts the
    gradients to reduce by `tensor.type()` against names built from the accelerator's device
    name (`torch.cpu.FloatTensor`), which a CPU tensor never has (`torch.FloatTensor`), so
    nothing is reduced and each rank silently trains on its own gradients (2 CPU ranks of
    ZeRO-1: weights 6e-3 away from ZeRO-0's after 3 steps; the contiguous path matches)."""
    if stage in (1, 2) and world_size > 1 and device.type == "cpu" and not contiguous:
        raise ValueError(
            f"engine.contiguous_gradients=false with ZeRO-{stage} on {world_size} CPU ranks: "
            "DeepSpeed's plain gradient path does not reduce CPU gradients across ranks "
            "(each rank would train on its own); use engine.contiguous_gradients=auto or true")


def slow_path_warning(cfg: ExperimentConfig, precision: str, device: torch.device) -> str:
    """A warning for a configuration DeepSpeed runs on a slow GPU path ('' when none).

    ZeRO-0 in bf16 goes through DeepSpeed's `BF16_Optimizer`, whose step takes the gradient
    norm one parameter at a time (~4 kernels each) and asserts on the norm, a device tensor:
    the host waits for the GPU every step. ZeRO-1 on the same ranks does neither."""
    if device.type == "cuda" and precision == "bf16" and cfg.engine.zero_stage == 0:
        return ("engine.zero_stage=0 in bf16 runs DeepSpeed's BF16_Optimizer, which waits for "
                "the GPU every step (an assert on the gradient norm) and takes that norm one "
                "parameter at a time; engine.zero_stage=1 avoids both")
    return ""


def build_ds_config(cfg: ExperimentConfig, world_size: int, precision: str,
                    device: torch.device) -> dict[str, Any]:
    """Return the DeepSpeed config dict for this run (a pure function of its inputs)."""
    eng = cfg.engine
    zero: dict[str, Any] = {"stage": eng.zero_stage}
    if eng.zero_stage >= 1:
        zero.update(overlap_comm=overlap_comm(cfg, world_size, device),
                    contiguous_gradients=contiguous_gradients(cfg, world_size),
                    reduce_bucket_size=int(5e7), allgather_bucket_size=int(5e7))
        _check_cpu_reduction(eng.zero_stage, zero["contiguous_gradients"], world_size, device)
    if eng.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False,
                    stage3_param_persistence_threshold=int(1e5))
    offload = eng.offload_optimizer
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    if eng.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": eng.grad_accum,
        "train_batch_size": cfg.data.batch_size * eng.grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        # AdamWSkipNonFinite checks the flat fp32 partitions (a few kernels, no host sync);
        # ZeRO-1/2's own bf16 check costs ~7 kernels per parameter and a host sync per step.
        "bf16": {"enabled": precision == "bf16", "check_grad_overflow": False},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # We pass torch.optim.AdamW (fused on CUDA): DeepSpeed's own Adam JIT-compiles an op.
        "zero_allow_untested_optimizer": True,
        # With offload, torch's AdamW runs on the CPU copies; DeepSpeedCPUAdam would be faster
        # there but JIT-compiles a C++ op (~40 s) on first use.
        **({"zero_force_ds_cpu_optimizer": False} if offload else {}),
        "steps_per_print": 1 << 30,
        # DeepSpeed's throughput timer (on by default) synchronizes the device at the start of
        # every forward and the end of every step; we time steps ourselves (logging/metrics.py).
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
        "wall_clock_breakdown": False,
        "dump_state": False,
    }


def deepspeed_logs_to_stderr() -> None:
    """Import DeepSpeed with stdout pointing at stderr: its logger binds its handler to the
    stdout of that moment (and warns about the accelerator during the import itself). For
    commands whose stdout is data (JSON reports, exported configs)."""
    import contextlib
    import sys

    with contextlib.redirect_stdout(sys.stderr):
        import deepspeed  # noqa: F401
