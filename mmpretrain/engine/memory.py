"""Device and host memory of a training run: a plan before it starts, and limits while it runs.

`plan_memory` predicts the peak of the device's caching allocator and the host memory that a
run config needs on one node, before any GPU is touched:

- model states, in bytes per parameter, as the ZeRO paper counts them (Rajbhandari et al.
  2020) plus the fp32 gradient DeepSpeed's optimizers step on: 16-bit weights 2, 16-bit
  gradients 2, and for the optimizer an fp32 gradient 4, an fp32 master weight 4 and Adam's two
  moments 8, each divided by the ranks where the ZeRO stage partitions it, on the host where it
  is offloaded (ZeRO-3 keeps its 16-bit gradient partition next to the optimizer, so offloaded
  too). DeepSpeed's own estimators (`estimate_zero3_model_states_mem_needs`) leave out that
  gradient partition and add a 1.5x host buffer factor;
- activations, measured rather than modelled: the tensors autograd saves for the backward pass
  (`torch.autograd.graph.saved_tensors_hooks`, parameters excluded) in training forwards of
  the task on CPU at batches 1 and 2, with every tower cut to one and to two blocks, which gives
  the bytes per sample of one block of each tower and of everything else (and what a forward
  saves whatever the batch); the configured depth and batch are then exact multiples, and the
  contrastive logits (quadratic in the batch) are added by formula. The CPU run uses SDPA,
  whose flash kernels save what the GPU paths save (q, k, v as views of the QKV projection,
  the output and the log-sum-exp), never a sequence-squared matrix. With activation
  checkpointing a block keeps only its input, and the block being recomputed holds its full
  set for its backward.

Not counted: the CUDA context, the allocator's fragmentation and the transient gradients of
activations inside the backward; the GPU benchmark (`bench train`) reports the measured peak.
"""
from __future__ import annotations

import contextlib
import copy
import math
import resource
import sys
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Iterator

import torch
from torch.autograd.graph import saved_tensors_hooks

from mmpretrain.engine.ds_config import overlap_comm, precision_dtype

GIB = 2**30
H100_80GB_GIB = 79.1
"""The total PyTorch sees on an H100 80GB (79.10-79.18 GiB in its out-of-memory messages across
drivers; nvidia-smi shows 81,559 MiB, part of which the driver keeps): the low end."""
BUCKET_ELEMENTS = int(5e7)
"""DeepSpeed's reduce and all-gather bucket sizes, as `ds_config` sets them."""


@dataclass
class MemoryPlan:
    """Predicted memory of one rank of a run (bytes), with the terms that make it up."""

    params: int
    largest_layer_params: int
    device: dict[str, int] = field(default_factory=dict)
    host: dict[str, int] = field(default_factory=dict)
    activation_bytes_per_sample: int = 0
    batch: int = 1
    activation_fixed: int = 0
    """Activation bytes that do not grow with the batch."""
    loss_bytes_per_sample2: int = 0
    """The contrastive loss's bytes over the batch squared (its logits grow quadratically)."""

    @property
    def device_total(self) -> int:
        """Predicted peak of the device allocator (bytes)."""
        return sum(self.device.values())

    @property
    def host_total(self) -> int:
        """Predicted host memory for model states (bytes; the process's own footprint aside)."""
        return sum(self.host.values())

    def max_batch(self, device_bytes: int) -> int:
        """The largest per-rank batch whose predicted device peak fits `device_bytes` (0: none):
        the largest b with loss·b² + per_sample·b + fixed <= device_bytes."""
        grows = self.device.get("activations", 0) + self.device.get("loss", 0)
        room = device_bytes - self.device_total + grows - self.activation_fixed
        q, p = self.loss_bytes_per_sample2, self.activation_bytes_per_sample
        if p <= 0 or room <= 0:
            return 0
        b = int(room // p) if q == 0 else int((math.sqrt(p * p + 4 * q * room) - p) / (2 * q))
        while q * (b + 1) ** 2 + p * (b + 1) <= room:  # the float root may be one off
            b += 1
        while b > 0 and q * b * b + p * b > room:
            b -= 1
        return b


def model_state_bytes(params: int, largest_layer: int, stage: int, world: int, precision: str,
                      offload_optimizer: bool = False, offload_params: bool = False,
                      overlap_comm: bool = True) -> tuple[dict[str, int], dict[str, int]]:
    """(device, host) bytes of weights, gradients and AdamW state for one rank (and ZeRO's
    gradient buckets: ZeRO-1/2 double theirs with `overlap_comm`).

    Mixed precision (bf16/fp16) keeps 16-bit weights and gradients for the model and fp32
    gradients, master weights and moments for the optimizer. fp32 runs keep fp32 weights and
    gradients; without ZeRO the optimizer holds only the moments, with ZeRO DeepSpeed's
    optimizer still steps on its own fp32 copy of its partition and of its gradient."""
    half = precision in ("bf16", "fp16")
    w, g = (2, 2) if half else (4, 4)
    opt = 4 + 4 + 8 if half or stage >= 1 else 8  # fp32 grad + master + moments
    n = max(1, world)
    device: dict[str, int] = {}
    host: dict[str, int] = {}
    opt_place = host if offload_optimizer else device
    opt_place["optimizer"] = params * opt // (n if stage >= 1 else 1)
    if stage == 3:
        (host if offload_params else device)["weights"] = params * w // n
        opt_place["gradients"] = params * g // n
        device["gathered_layer"] = 4 * largest_layer  # DeepSpeed's working-set allowance
    else:
        device["weights"] = params * w
        device["gradients"] = params * g // (n if stage == 2 else 1)
    if stage >= 1:
        device["buckets"] = (2 if overlap_comm or stage == 3 else 1) * BUCKET_ELEMENTS * w
    return device, host


@contextlib.contextmanager
def saved_storages(exclude: Iterable[torch.Tensor] = ()) -> Iterator[dict[int, int]]:
    """Within the block, collect the distinct storages autograd saves for the backward pass
    ({data pointer: bytes}), leaving out those of `exclude` (parameters, inputs)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        yield seen


def _saved_bytes(task: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves in one forward of `task`, parameters
    excluded."""
    with saved_storages(task.parameters()) as seen:
        out = task(images, tokens)
    del out
    return sum(seen.values())


def _depths(model_cfg: Any) -> dict[str, int]:
    depths = {"vision": model_cfg.vision.layers, "text": model_cfg.text.layers}
    if model_cfg.fusion.decoder:
        depths["fusion"] = model_cfg.fusion.layers
    return depths


def _with_depths(cfg: Any, depths: dict[str, int]) -> Any:
    model = copy.deepcopy(cfg.model)
    for tower, n in depths.items():
        setattr(model, tower, replace(getattr(model, tower), layers=n))
    return replace(cfg, model=replace(model, attention="sdpa", activation_checkpointing=False,
                                      attention_tiles="", attention_speeds=""))


@contextlib.contextmanager
def _scratch_builds() -> Iterator[None]:
    """Build and run throwaway models without touching the process: building one sets the
    default attention implementation, its initialization draws from the random state, and its
    loss would gather across the process group, which only this rank is measuring."""
    from mmpretrain.kernels import get_default_impl, set_default_impl
    from mmpretrain.losses.contrastive import as_one_process

    default = get_default_impl()
    try:
        with torch.random.fork_rng(devices=[]), as_one_process():
            torch.manual_seed(0)
            yield
    finally:
        set_default_impl(default)


def measure_activations(cfg: Any, dtype: torch.dtype) -> dict[str, int]:
    """Saved-activation bytes: {'base': per sample outside the blocks, '<tower>': per sample of
    one block of that tower, 'fixed': per forward whatever the batch (e.g. fp32 copies of 16-bit
    LayerNorm weights), at the configured depths}, measured on CPU at batches 1 and 2 (see the
    module docstring)."""
    from mmpretrain.model import build_model
    from mmpretrain.model.task import build_task

    def measure(depths: dict[str, int]) -> tuple[int, int]:  # (per sample, per forward)
        small = _with_depths(cfg, depths)
        task = build_task(small, build_model(small.model, small.loss.kind)).to(dtype).train()
        size, ctx = small.model.vision.image_size, small.model.text.context_length
        saved = []
        for batch in (1, 2):
            images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
            tokens = torch.randint(1, small.model.text.vocab_size, (batch, ctx))  # (B, L)
            saved.append(_saved_bytes(task, images, tokens))
        return saved[1] - saved[0], 2 * saved[0] - saved[1]

    depths = _depths(cfg.model)
    ones = {tower: 1 for tower in depths}
    with _scratch_builds():
        one, one_fixed = measure(ones)
        per_block = {tower: tuple(a - b for a, b in zip(measure({**ones, tower: 2}),
                                                        (one, one_fixed))) for tower in ones}
    fixed = one_fixed + sum((depths[t] - 1) * per_block[t][1] for t in depths)
    return {"base": one - sum(b[0] for b in per_block.values()),
            **{t: b[0] for t, b in per_block.items()}, "fixed": max(0, fixed)}


def _block_inputs(cfg: Any, dtype_bytes: int) -> dict[str, int]:
    """Bytes per sample of one block's input (what a checkpointed block keeps), per tower."""
    m = cfg.model
    patches = (m.vision.image_size // m.vision.patch_size) ** 2 + 1  # + class token
    out = {"vision": patches * m.vision.width * dtype_bytes,
           "text": m.text.context_length * m.text.width * dtype_bytes}
    if m.fusion.decoder:
        out["fusion"] = m.text.context_length * (m.fusion.width or m.text.width) * dtype_bytes
    return out


def plan_memory(cfg: Any, world: int, precision: str, measured: dict[str, int] | None = None
                ) -> MemoryPlan:
    """The predicted memory of one rank of the run `cfg` (an `ExperimentConfig`) on `world`
    ranks in `precision`; `measured` reuses a `measure_activations` result."""
    from mmpretrain.model import build_model

    with _scratch_builds(), torch.device("meta"):
        model = build_model(replace(cfg.model, attention_tiles="", attention_speeds=""),
                            cfg.loss.kind)
    params = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    eng = cfg.engine
    device, host = model_state_bytes(params, largest, eng.zero_stage, world, precision,
                                     eng.offload_optimizer, eng.offload_params,
                                     overlap_comm(cfg, world, torch.device("cuda")))
    dtype = precision_dtype(precision)
    acts = measured if measured is not None else measure_activations(cfg, dtype)
    depths = _depths(cfg.model)
    if cfg.model.activation_checkpointing:
        kept = _block_inputs(cfg, torch.finfo(dtype).bits // 8)
        per_sample = acts["base"] + sum(depths[t] * kept[t] for t in depths)
        per_sample += max(acts[t] for t in depths)  # the block being recomputed
    else:
        per_sample = acts["base"] + sum(depths[t] * acts[t] for t in depths)
    batch = cfg.data.batch_size
    logits = contrastive_loss_bytes(cfg.loss, batch * cfg.engine.grad_accum, world)
    device["activations"] = per_sample * batch + acts.get("fixed", 0)
    if logits:
        device["loss"] = logits  # the plain contrastive loss's logits, quadratic in the batch
    per_sample2 = contrastive_loss_bytes(cfg.loss, cfg.engine.grad_accum, world)  # at batch 1
    return MemoryPlan(params, largest, device, host, per_sample, batch, acts.get("fixed", 0),
                      per_sample2)


def contrastive_loss_bytes(loss: Any, rows: int, world: int) -> int:
    """Bytes the contrastive loss (a `LossConfig`) keeps for its backward when each of `world`
    ranks holds `rows` samples (the micro-batch times the accumulation steps, whose cached
    features the loss covers): fp32, as `tests/test_memory.py` measures with saved-tensor
    hooks. Plain CLIP keeps one log-softmax per direction of its logits, (N, N) each over the
    global batch N, or (rows, N) with `local_loss`; plain SigLIP 12 bytes per logit of its
    (rows, N); the fused losses only O(N) vectors."""
    if loss.fused:
        return 0
    n = rows * max(1, world)
    if loss.kind == "siglip":
        return 12 * rows * n
    return 8 * (rows if loss.local_loss else n) * n


def loss_memory_warning(cfg: Any, world: int, limit: int = GIB) -> str | None:
    """A warning when the plain contrastive loss of the run `cfg` on `world` ranks keeps over
    `limit` bytes per rank for its backward (None otherwise), naming the settings that avoid
    it."""
    rows = cfg.data.batch_size * cfg.engine.grad_accum
    kept = contrastive_loss_bytes(cfg.loss, rows, world)
    if kept <= limit:
        return None
    whole = cfg.loss.kind == "clip" and not cfg.loss.local_loss
    shape = (f"({rows * world}, {rows * world}) logits of the global batch, on every rank"
             if whole else f"({rows}, {rows * world}) logits of this rank's rows")
    return (f"the contrastive loss keeps {kept / GIB:.1f} GiB per rank for its backward (the "
            f"{shape}); loss.fused=true computes the same loss without keeping them"
            + ("; loss.local_loss=true computes only each rank's rows" if whole else ""))


def cap_device_memory(gib: float, device: torch.device) -> float:
    """Let this process's CUDA allocator use only as much as a `gib`-GiB device would leave it.

    What the device already holds outside the allocator (the CUDA context, other processes)
    counts against `gib`, as it would on the smaller device. Returns the fraction set;
    ValueError when the device is smaller than `gib` or is not CUDA."""
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ValueError("--gpu-memory needs a CUDA device (none is available)")
    free, total = torch.cuda.mem_get_info(device)
    outside = total - free - torch.cuda.memory_reserved(device)
    if gib * GIB > total:
        raise ValueError(f"--gpu-memory {gib:g} GiB is more than the device's "
                         f"{total / GIB:.1f} GiB")
    fraction = max(0.0, gib * GIB - outside) / total
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction


def host_peak_gib() -> float:
    """Peak resident memory of this process so far (GiB)."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * (1 if sys.platform != "darwin" else 1 / 1024) / 2**20


def format_plan(plan: MemoryPlan, device_gib: float | None = None,
                host_gib: float | None = None) -> str:
    """The plan as a table in GiB, with whether it fits `device_gib` / `host_gib`."""
    largest = plan.largest_layer_params / 1e6
    lines = [f"parameters {plan.params / 1e6:,.1f} M (largest layer {largest:,.1f} M), batch "
             f"{plan.batch} per rank; activations "
             f"{plan.activation_bytes_per_sample / 2**20:,.1f} MiB per sample"]
    for where, terms, total, limit in (("device", plan.device, plan.device_total, device_gib),
                                       ("host", plan.host, plan.host_total, host_gib)):
        parts = ", ".join(f"{k} {v / GIB:,.2f}" for k, v in terms.items()) or "nothing"
        verdict = ""
        if limit:
            verdict = (f" -> fits {limit:.4g} GiB" if total <= limit * GIB
                       else f" -> does NOT fit {limit:.4g} GiB")
        lines.append(f"{where}: {total / GIB:,.2f} GiB ({parts}){verdict}")
    if device_gib:
        lines.append(f"largest batch per rank predicted to fit {device_gib:.4g} GiB: "
                     f"{plan.max_batch(int(device_gib * GIB)):,}")
    return "\n".join(lines)


def oom_advice(cfg: Any, world: int, precision: str, device_bytes: int | None) -> str:
    """What to change after running out of device memory: the plan of the run `cfg` and of the
    settings that would shrink it (activation checkpointing, ZeRO-3, offload, the fused loss
    where the logits are more than 2% of the peak), as config overrides with their predicted
    device peaks."""
    acts = measure_activations(cfg, precision_dtype(precision))
    plan = plan_memory(cfg, world, precision, acts)
    eng, batch = cfg.engine, cfg.data.batch_size
    lines = [f"`mmpretrain bench memory` predicts {plan.device_total / GIB:.1f} GiB per rank for "
             f"this run (batch {batch} per rank)"
             + (f"; the device has {device_bytes / GIB:.1f} GiB and the largest batch predicted"
                f" to fit is {plan.max_batch(device_bytes)}" if device_bytes else "")]
    steps: list[tuple[str, dict[str, Any]]] = []
    if not cfg.model.activation_checkpointing:
        steps.append(("model.activation_checkpointing=true",
                      {"model": replace(cfg.model, activation_checkpointing=True)}))
    if eng.zero_stage < 3 and world > 1:
        steps.append(("engine.zero_stage=3" + (" engine.compile=false" if eng.compile else ""),
                      {"engine": replace(eng, zero_stage=3, compile=False)}))
    if not eng.offload_optimizer:
        stage = max(1, eng.zero_stage)
        steps.append(("engine.offload_optimizer=true"
                      + ("" if eng.zero_stage else " engine.zero_stage=1"),
                      {"engine": replace(eng, offload_optimizer=True, zero_stage=stage)}))
    if plan.device.get("loss", 0) > 0.02 * plan.device_total:  # the logits are a visible share
        steps.append(("loss.fused=true", {"loss": replace(cfg.loss, fused=True)}))
    for override, change in steps:
        alt = plan_memory(replace(cfg, **change), world, precision, acts)
        lines.append(f"  {override}: {alt.device_total / GIB:.1f} GiB"
                     + (f", largest batch {alt.max_batch(device_bytes)}" if device_bytes else ""))
    lines.append(f"  data.batch_size=N engine.grad_accum=M: the same {batch} samples per rank and "
                 "step (N x M) with 1/M of the activations")
    return "\n".join(lines)
