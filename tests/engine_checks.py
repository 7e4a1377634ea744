"""Checks that need a real DeepSpeed engine in a fresh process; run by tests/test_engine.py.

    python tests/engine_checks.py accum OUT_DIR       # accumulation 4 x 8 == batch 32 (+ fused)
    python tests/engine_checks.py zero3_init OUT_DIR  # zero.Init builds the same weights
    python tests/engine_checks.py universal OUT_DIR STAGE NAME  # resume on another world size
    python tests/engine_checks.py align OUT_DIR       # bf16 flat buffers keep weights aligned
    python tests/engine_checks.py clip OUT_DIR        # foreach grad norm == DeepSpeed's
    python tests/engine_checks.py old_order OUT_DIR STAGE  # a checkpoint in the old group order
    python tests/engine_checks.py syncs OUT_DIR       # device synchronizations per step
    python tests/engine_checks.py contiguous OUT_DIR  # contiguous_gradients off == on
    torchrun --nproc_per_node 2 tests/engine_checks.py epilogue OUT_DIR  # overlap, no sync

Each prints one JSON line with its measurements.
"""
from __future__ import annotations

import contextlib
import json
import sys
from typing import Any, Iterator

import torch


@contextlib.contextmanager
def _swapped(module: Any, name: str, value: Any) -> Iterator[None]:
    """`module.name` replaced by `value` inside the block (e.g. the parameter order of old)."""
    keep = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, keep)


def _trainer(out: str, name: str, *overrides: str):
    from mmpretrain.config.load import load_config
    from mmpretrain.engine.trainer import Trainer

    cfg = load_config("experiments/tiny_synthetic.yaml", [
        f"output_dir={out}", f"name={name}", "logging.wandb_mode=disabled",
        "checkpoint.resume=none", "optim.warmup_steps=0", *overrides])
    return Trainer(cfg)


def _ours_and_deepspeeds(module: Any, install: str, out: str, name: str, *overrides: str
                         ) -> dict[str, Any]:
    """Two trainers of one config: "ours" built with `module.install` (one of our DeepSpeed
    patches) as it is, "deepspeed" with it a no-op (DeepSpeed's own code)."""
    trainers = {}
    for who in ("ours", "deepspeed"):
        patch = getattr(module, install) if who == "ours" else (lambda optimizer: False)
        with _swapped(module, install, patch):
            trainers[who] = _trainer(out, f"{name}_{who}", *overrides)
    return trainers


def _grab_grads(trainer) -> dict[str, torch.Tensor]:
    """Wrap engine.step so the averaged gradients are copied at the accumulation boundary."""
    grads: dict[str, torch.Tensor] = {}
    eng, step = trainer.engine, trainer.engine.step

    def wrapped(*a, **k):
        if eng.is_gradient_accumulation_boundary():
            grads.update({n: p.grad.detach().clone() for n, p in eng.module.named_parameters()
                          if p.grad is not None})
        return step(*a, **k)

    eng.step = wrapped
    return grads


def check_accum(out: str) -> dict:
    from mmpretrain.data.synthetic import synthetic_batch

    big = _trainer(out, "big", "data.batch_size=32", "engine.grad_accum=1", "engine.zero_stage=0")
    small = _trainer(out, "small", "data.batch_size=8", "engine.grad_accum=4",
                     "engine.zero_stage=0")
    fused = _trainer(out, "fused", "data.batch_size=8", "engine.grad_accum=4",
                     "engine.zero_stage=0", "loss.fused=true", "optim.impl=foreach",
                     "engine.tf32=true")
    tf32 = torch.backends.cuda.matmul.allow_tf32  # set by the last build
    batch = synthetic_batch(0, 0, 0, 32, 32, 32, 1024)
    micro = [{k: v[i * 8:(i + 1) * 8] for k, v in batch.items()} for i in range(4)]
    g_big, g_small, g_fused = _grab_grads(big), _grab_grads(small), _grab_grads(fused)
    loss_big = big.train_step([batch])["loss"].item()
    loss_small = small.train_step(micro)["loss"].item()
    loss_fused = fused.train_step(micro)["loss"].item()
    foreach = all(g["foreach"] for g in fused.engine.optimizer.param_groups)

    def rel(ref: torch.Tensor, got: torch.Tensor) -> float:
        return (ref - got).abs().max().item() / (ref.abs().max().item() + 1e-12)

    diffs = {n: rel(g_big[n], g_small[n]) for n in g_big}
    fused_diffs = {n: rel(g_big[n], g_fused[n]) for n in g_big}
    return {"loss_big": loss_big, "loss_small": loss_small, "n_grads": len(g_big),
            "n_grads_small": len(g_small), "max_rel_grad_diff": max(diffs.values()),
            "logit_scale_rel_diff": diffs["model.logit_scale"], "loss_fused": loss_fused,
            "n_grads_fused": len(g_fused), "max_rel_grad_diff_fused": max(fused_diffs.values()),
            "logit_scale_rel_diff_fused": fused_diffs["model.logit_scale"],
            "fused_run_optimizer_foreach": foreach, "fused_run_tf32": tf32}


def check_zero3_init(out: str) -> dict:
    import deepspeed

    z3 = _trainer(out, "z3", "engine.zero_stage=3")
    z0 = _trainer(out, "z0", "engine.zero_stage=0")
    ref = {n: p.detach().clone() for n, p in z0.engine.module.named_parameters()}
    params = list(z3.engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params]):
        diffs = {n: (p.detach() - ref[n]).abs().max().item() for n, p in params}
        partitioned = [n for n, p in params if getattr(p, "ds_numel", None) is not None]
    # one optimizer step on the same batch (weight decay included) moves both alike
    from deepspeed.utils import safe_get_full_fp32_param

    from mmpretrain.data.synthetic import synthetic_batch
    batch = synthetic_batch(0, 0, 0, 16, 32, 32, 1024)
    z0.train_step([batch])
    z3.train_step([batch])
    step_diff = max((safe_get_full_fp32_param(p) - dict(z0.engine.module.named_parameters())[n]
                     ).abs().max().item() for n, p in params)
    return {"n_params": len(params), "n_partitioned": len(partitioned),
            "max_abs_diff": max(diffs.values()), "worst": max(diffs, key=diffs.get),
            "max_diff_after_step": step_diff}


def check_align(out: str) -> dict:
    """Parameters 16-byte aligned after deepspeed.initialize in bf16, ZeRO 0-2 (cuBLAS's fast
    kernels need it), and how many are not with the odd-sized tensors left in place."""
    import mmpretrain.engine.optim as optim

    def misaligned(t) -> list[str]:
        return [n for n, p in t.task.named_parameters()
                if p.numel() % optim.ALIGN_NUMEL == 0 and p.data_ptr() % 16]

    result = {}
    for stage in (0, 1, 2):
        t = _trainer(out, f"align_{stage}", f"engine.zero_stage={stage}",
                     "engine.precision=bf16")
        result[stage] = {"misaligned": misaligned(t), "n_params": len(list(t.task.parameters())),
                         "dtype": str(next(t.task.parameters()).dtype)}
    with _swapped(optim, "_aligned_first", list):  # the order before the fix
        result["unsorted"] = len(misaligned(_trainer(out, "align_unsorted",
                                                     "engine.zero_stage=1",
                                                     "engine.precision=bf16")))
    return result


def check_clip(out: str) -> dict:
    """ZeRO-1 and ZeRO-2 (fp32), gradients clipped on every step: the norm from one
    `torch._foreach_norm` (engine/zero_norm.py) vs DeepSpeed's per-parameter loop, the logged
    norms and the final weights."""
    import mmpretrain.engine.zero_norm as zero_norm

    result = {}
    for stage in (1, 2):
        runs = {}
        trainers = _ours_and_deepspeeds(
            zero_norm, "install_foreach_grad_norm", out, f"clip_{stage}",
            f"engine.zero_stage={stage}", "optim.grad_clip=0.05", "optim.steps=4",
            "logging.log_every=1", "checkpoint.every=0", "checkpoint.save_final=false",
            "data.batch_size=8")
        for who, t in trainers.items():
            t.train()
            lines = (t.run_dir / "metrics.jsonl").read_text().splitlines() if t.rank == 0 else []
            method = getattr(t.engine.optimizer.get_grad_norm_direct, "__func__", None)
            runs[who] = {"weights": {n: p.detach().clone() for n, p in
                                     t.engine.module.named_parameters()},
                         "norms": [json.loads(x)["grad_norm"] for x in lines if "grad_norm" in x],
                         "installed": method is zero_norm._foreach_grad_norm}
        ours, ds = runs["ours"], runs["deepspeed"]
        scale = max(w.abs().max().item() for w in ds["weights"].values())
        result[stage] = {
            "max_weight_diff": max((ours["weights"][n] - w).abs().max().item()
                                   for n, w in ds["weights"].items()) / scale,
            "norms_foreach": ours["norms"], "norms_deepspeed": ds["norms"],
            "installed": [ours["installed"], ds["installed"]]}
    return result


def check_repoint(out: str) -> dict:
    """ZeRO-1 and ZeRO-2 in bf16: with the re-point check (engine/zero_repoint.py) DeepSpeed's
    `_update_model_bit16_weights` never runs after the first step, the weights equal those of
    a run without the check, and a parameter whose data is replaced mid-run (a copy outside
    the flat buffer) is pointed back at its slice at the next step."""
    import mmpretrain.engine.zero_repoint as zero_repoint
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    calls = []
    original = DeepSpeedZeroOptimizer._update_model_bit16_weights

    def counting(self, group_index):
        calls.append(group_index)
        return original(self, group_index)

    result = {}
    with _swapped(DeepSpeedZeroOptimizer, "_update_model_bit16_weights", counting):
        for stage in (1, 2):
            runs = {}
            trainers = _ours_and_deepspeeds(
                zero_repoint, "install_repoint_check", out, f"repoint_{stage}",
                f"engine.zero_stage={stage}", "engine.precision=bf16", "data.batch_size=8")
            for who, t in trainers.items():
                t.run_steps(1)
                calls.clear()
                t.run_steps(2)
                runs[who] = {"calls": len(calls), "weights": {
                    n: p.detach().clone() for n, p in t.engine.module.named_parameters()}}
            t = trainers["ours"]
            name, param = next(iter(t.engine.module.named_parameters()))
            group = next(i for i, g in enumerate(t.optimizer.bit16_groups)
                         if any(p is param for p in g))
            param.data = param.data.clone()  # now outside the flat buffer
            calls.clear()
            t.run_steps(1)
            flat = t.optimizer.bit16_groups_flat[group]
            end = flat.data_ptr() + flat.numel() * flat.element_size()
            ours, ds = runs["ours"], runs["deepspeed"]
            result[stage] = {
                "calls_check": ours["calls"], "calls_deepspeed": ds["calls"],
                "weights_equal": all(torch.equal(ours["weights"][n], w)
                                     for n, w in ds["weights"].items()),
                "moved_param": name, "moved_calls": calls.count(group),
                "moved_back_inside": flat.data_ptr() <= param.data_ptr() < end}
    return result


class _NoStream:
    """What a CUDA stream offers DeepSpeed's overlap path, as no-ops (`check_syncs`)."""

    def wait_stream(self, other: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def __hash__(self) -> int:
        return 0

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, _NoStream)


@contextlib.contextmanager
def _streams_like_cuda(acc: Any) -> Iterator[None]:
    """DeepSpeed's CPU accelerator says it resolves data dependencies itself, so DeepSpeed skips
    its stream bookkeeping and the synchronizes that guard it. Inside the block it answers as
    CUDA does (streams that do nothing, `record_stream` a no-op), so ZeRO-1/2 take the code
    path they take on a GPU."""
    cls = type(acc)
    with _swapped(cls, "is_synchronized_device", lambda self: False), \
            _swapped(cls, "Stream", property(lambda self: _NoStream)), \
            _swapped(cls, "current_stream", lambda self, device_index=None: _NoStream()), \
            _swapped(torch.Tensor, "record_stream", lambda self, stream: None):
        yield


def _sync_counter(acc: Any) -> tuple[list[int], Any]:
    """([n], a replacement for the accelerator's `synchronize` that counts into n)."""
    sync, count = type(acc).synchronize, [0]

    def counting(self, device_index=None):
        count[0] += 1
        return sync(self, device_index)

    return count, counting


def check_syncs(out: str) -> dict:
    """Device-wide synchronizes per training step of the real engine on 1 rank in bf16, with
    our DeepSpeed config and with the one we had before 2026-12-01 (DeepSpeed's throughput
    timer at its default, `overlap_comm` on as it was on every GPU, DeepSpeed's epilogue). ZeRO 0-2 run with
    CUDA-like streams (`_streams_like_cuda`); ZeRO-3 needs real streams, so it runs with the
    CPU's own, where only the timer's synchronizes show."""
    import mmpretrain.engine.trainer as trainer_mod
    from deepspeed.accelerator import get_accelerator

    acc, build_ours = get_accelerator(), trainer_mod.build_ds_config
    count, counting = _sync_counter(acc)

    def before(*args, **kwargs) -> dict:
        ds = build_ours(*args, **kwargs)
        ds.pop("timers")
        if ds["zero_optimization"]["stage"] > 0:
            ds["zero_optimization"].update(overlap_comm=True, contiguous_gradients=True)
        return ds

    result: dict = {}
    for stage in (0, 1, 2, 3):
        for who, build in (("ours", build_ours), ("before", before)):
            streams = _streams_like_cuda(acc) if stage < 3 else contextlib.nullcontext()
            with streams, _swapped(type(acc), "synchronize", counting), \
                    _swapped(trainer_mod, "build_ds_config", build):
                t = _trainer(out, f"syncs_{stage}_{who}", f"engine.zero_stage={stage}",
                             "engine.precision=bf16", "data.batch_size=8",
                             f"engine.epilogue_sync={who == 'before'}")
                t.run_steps(3)  # DeepSpeed's timer starts timing at its third step
                count[0] = 0
                t.run_steps(3)
                result[f"{stage}_{who}"] = count[0] / 3
    return result


def check_epilogue(out: str) -> dict:
    """2 ranks, ZeRO-1 and ZeRO-2 in bf16 with `overlap_comm` on (the several-rank default on
    a GPU) and CUDA-like streams: device-wide synchronizes per step and the weights after 3
    steps with the stream-ordered epilogue (engine/zero_epilogue.py) and with DeepSpeed's own
    (`engine.epilogue_sync=true`)."""
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from mmpretrain.engine.zero_epilogue import _stream_ordered_epilogue

    acc = get_accelerator()
    count, counting = _sync_counter(acc)

    result = {}
    for stage in (1, 2):
        runs = {}
        for who, keep in (("ours", "false"), ("deepspeed", "true")):
            with _streams_like_cuda(acc), _swapped(type(acc), "synchronize", counting):
                t = _trainer(out, f"epilogue_{stage}_{who}", f"engine.zero_stage={stage}",
                             "engine.precision=bf16", "data.batch_size=8",
                             "engine.overlap_comm=true", f"engine.epilogue_sync={keep}")
                start = {n: p.detach().float().clone() for n, p in t.task.named_parameters()}
                t.run_steps(2)
                count[0] = 0
                t.run_steps(3)
            method = t.optimizer.independent_gradient_partition_epilogue
            runs[who] = {"syncs": count[0] / 3, "start": start,
                         "installed": getattr(method, "__func__", None) is _stream_ordered_epilogue,
                         "end": {n: p.detach().float().clone()
                                 for n, p in t.task.named_parameters()}}
        ours, ds = runs["ours"], runs["deepspeed"]
        result[stage] = {
            "world": dist.get_world_size(), "syncs": [ours["syncs"], ds["syncs"]],
            "installed": [ours["installed"], ds["installed"]],
            "max_abs_diff": max(float((ours["end"][n] - w).abs().max())
                                for n, w in ds["end"].items()),
            "max_moved": max(float((ds["end"][n] - w).abs().max())
                             for n, w in ds["start"].items())}
    return result


def check_contiguous(out: str) -> dict:
    """One rank, ZeRO-1 and ZeRO-2 in fp32 and bf16, 2 micro-batches per step: 3 steps with
    `engine.contiguous_gradients` off (the one-rank default; ZeRO-1 then also skips the
    identity reduction, engine/zero_one_rank.py) and on give the same weights."""
    import mmpretrain.engine.zero_one_rank as zero_one_rank

    def weights(t) -> dict[str, torch.Tensor]:
        return {n: p.detach().float().clone() for n, p in t.engine.module.named_parameters()}

    result = {}
    for stage in (1, 2):
        for precision in ("fp32", "bf16"):
            runs = {}
            for contiguous in ("false", "true"):
                t = _trainer(out, f"contiguous_{stage}_{precision}_{contiguous}",
                             f"engine.zero_stage={stage}", f"engine.precision={precision}",
                             f"engine.contiguous_gradients={contiguous}", "data.batch_size=8",
                             "engine.grad_accum=2")
                start = weights(t)
                t.run_steps(3)
                skip = getattr(t.optimizer.reduce_gradients, "__func__", None)
                runs[contiguous] = {"seen": t.engine.zero_contiguous_gradients(),
                                    "skip": skip is zero_one_rank._epilogue_only,
                                    "start": start, "end": weights(t)}
            off, on = runs["false"], runs["true"]
            result[f"{stage}_{precision}"] = {
                "seen": [off["seen"], on["seen"]], "n": len(on["end"]),
                "reduce_skipped": [off["skip"], on["skip"]],
                "max_abs_diff": max(float((off["end"][n] - w).abs().max())
                                    for n, w in on["end"].items()),
                "max_moved": max(float((on["end"][n] - w).abs().max())
                                 for n, w in on["start"].items())}
    return result


def check_old_order(out: str, stage: str) -> dict:
    """Train 4 steps and checkpoint with the parameter order of before 2026-11-30 (the logit
    scale first in its group) as run 'run' under OUT_DIR, for `universal` to resume."""
    import mmpretrain.engine.optim as optim
    from mmpretrain.checkpoint.manager import saved_param_order

    with _swapped(optim, "_aligned_first", list):
        t = _trainer(out, "run", f"engine.zero_stage={stage}", "optim.steps=8",
                     "optim.stop_after=4", "checkpoint.every=4", "data.batch_size=8")
        summary = t.train()
        old = optim.param_group_names(t.task)
    path = t.ckpt.latest()
    return {"step": summary["step"], "first_in_groups": [g[0] for g in saved_param_order(path)],
            "recut_for_new_order": t.ckpt.needs_universal(path, optim.param_group_names(t.task)),
            "recut_for_same_order": t.ckpt.needs_universal(path, old)}


def check_universal(out: str, stage: str, saved: str) -> dict:
    """Resume run `saved` (written by another number of ranks) and compare the loaded fp32
    weights and Adam moments with the checkpoint's consolidated state."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    t = _trainer(out, saved, f"engine.zero_stage={stage}", "checkpoint.resume=auto",
                 "optim.steps=8")
    path = t._resume_path
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    loaded = t.resume()
    w_diff = m_diff = 0.0
    moments = 0
    for name, p in t.engine.module.named_parameters():
        w_diff = max(w_diff, (safe_get_full_fp32_param(p) - consolidated[name]).abs().max().item())
        m = safe_get_full_optimizer_state(p, "exp_avg")
        ref = torch.load(t._universal / "zero" / name / "exp_avg.pt", weights_only=False)
        ref = ref["param"] if isinstance(ref, dict) else ref
        m_diff = max(m_diff, (m - ref.view_as(m)).abs().max().item())
        moments += int(m.abs().sum().item() > 0)
    summary = t.train()
    return {"loaded": loaded, "step_after_load": 4, "world": dist.get_world_size(),
            "max_weight_diff": w_diff, "max_exp_avg_diff": m_diff,
            "params_with_moments": moments, "n_params": len(consolidated),
            "finished_step": summary["step"]}


if __name__ == "__main__":
    import os

    from mmpretrain.engine.dist import free_port

    os.environ.setdefault("MASTER_PORT", str(free_port()))
    what, out_dir, *rest = sys.argv[1:]
    result = {"accum": check_accum, "zero3_init": check_zero3_init,
              "universal": check_universal,
              "align": check_align, "clip": check_clip, "repoint": check_repoint,
              "old_order": check_old_order, "syncs": check_syncs,
              "contiguous": check_contiguous, "epilogue": check_epilogue}[what](out_dir, *rest)
    if os.environ.get("RANK", "0") == "0":
        print("RESULT " + json.dumps(result), flush=True)
