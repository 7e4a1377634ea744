"""Engine behaviour that needs a real DeepSpeed engine (each check in a fresh process)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import gpu_losses_agree, run_check, run_train

_check = run_check


def test_accumulation_matches_one_big_batch(tmp_path: Path) -> None:
    """4 micro-batches of 8 with cached features == one batch of 32: loss and every gradient
    (the logit scale's gradient counted once, not four times); the same with `loss.fused`."""
    r = _check("accum", tmp_path)
    assert r["loss_small"] == r["loss_big"]
    assert r["n_grads"] == r["n_grads_small"] > 100
    assert r["max_rel_grad_diff"] < 1e-5, r
    assert r["logit_scale_rel_diff"] < 1e-6, r
    # the fused loss over the same cached micro-batches (scale detached after the first)
    assert abs(r["loss_fused"] - r["loss_big"]) <= 1e-6 * abs(r["loss_big"]), r
    assert r["n_grads_fused"] == r["n_grads"], r
    assert r["max_rel_grad_diff_fused"] < 1e-5, r
    assert r["logit_scale_rel_diff_fused"] < 1e-6, r
    assert r["fused_run_optimizer_foreach"], r  # optim.impl reaches DeepSpeed's optimizer
    assert r["fused_run_tf32"], r  # engine.tf32 reaches torch's CUDA matmul flag


def test_zero3_builds_partitioned_model_with_the_same_init(tmp_path: Path) -> None:
    """zero.Init partitions every parameter at construction, and the initialization that
    parents apply to child modules still lands (same weights as a plain build)."""
    r = _check("zero3_init", tmp_path)
    assert r["n_partitioned"] == r["n_params"] > 100
    assert r["max_abs_diff"] == 0.0, r
    # weight decay reaches ZeRO-3's partitioned matrices too (it once saw only 1-d placeholders)
    assert r["max_diff_after_step"] < 1e-5, r


def test_nonfinite_steps_are_skipped_then_the_run_stops(tmp_path: Path) -> None:
    """A NaN loss skips the update (weights unchanged, counted); more than
    optim.max_skipped_steps in a row stop the run with a checkpoint (ZeRO 0 and 2 in fp32,
    ZeRO 1 in bf16, where the optimizer's check stands alone)."""
    r = _check("nonfinite", tmp_path, script="loop_checks.py")
    for stage in ("0_fp32", "2_fp32", "1_bf16", "0_bf16"):  # bf16 ZeRO-1: DeepSpeed's check off
        s = r[stage]
        assert s["skipped"] == 1 and s["unchanged_on_skip"] and s["moved_after"], s
        assert s["ds_overflow_check"] in ((False,) if stage == "1_bf16" else (False, None)), s
        assert s["finite"], s
        assert s["stopped"] and "optim.max_skipped_steps=2" in s["stopped"], s
        # NaN from step 3: the third skip in a row (step 5) passes the limit. Flags are read
        # a step late except on save/eval/last steps: step 6 reads step 5's, stops there
        assert "up to step 5" in s["stopped"] and s["stop_step"] == 6, s
        assert s["checkpoint"], s
        # a line every step, written a step late (they used to drain the GPU's queue and
        # stop the run at step 5), skipped steps counted up to their step; the stopping
        # step's line is written on the way out of the error
        assert s["logged"] == {"one_nan": [[1, 0], [2, 0], [3, 1], [4, 1], [5, 1], [6, 1], [7, 1]],
                               "all_nan": [[1, 0], [2, 0], [3, 1], [4, 2], [5, 3], [6, 4]]}, s


def test_bf16_flat_buffers_keep_weights_aligned(tmp_path: Path) -> None:
    """After deepspeed.initialize in bf16 (ZeRO 0-2) every parameter whose size allows it
    starts on a 16-byte boundary; with the (1,) logit scale first most would not."""
    r = _check("align", tmp_path)
    for stage in ("0", "1", "2"):
        assert r[stage]["dtype"] == "torch.bfloat16" and r[stage]["n_params"] > 100, r[stage]
        assert r[stage]["misaligned"] == [], r[stage]
    assert r["unsorted"] > 50, r  # the check can see the fault it guards against


def test_foreach_grad_norm_matches_deepspeed(tmp_path: Path) -> None:
    """ZeRO-1/2 on 2 ranks with the gradient clipped on every step: the norm taken with one
    `torch._foreach_norm` gives DeepSpeed's per-parameter norm and the same weights."""
    r = _check("clip", tmp_path, nproc=2)
    for stage in ("1", "2"):
        s = r[stage]
        assert s["installed"] == [True, False], s
        assert len(s["norms_foreach"]) == len(s["norms_deepspeed"]) == 4, s
        assert min(s["norms_deepspeed"]) > 0.05, s  # every step clipped
        for a, b in zip(s["norms_foreach"], s["norms_deepspeed"]):
            assert a == pytest.approx(b, rel=1e-6), s
        assert s["max_weight_diff"] < 1e-6, s


def test_repoint_check_skips_only_what_changes_nothing(tmp_path: Path) -> None:
    """ZeRO-1/2 bf16 on 2 ranks: DeepSpeed's per-step re-pointing of every parameter runs
    once per group and step without the check, never with it, to the same weights; a
    parameter moved out of the flat buffer is re-pointed at the next step."""
    r = _check("repoint", tmp_path, nproc=2)
    for stage in ("1", "2"):
        s = r[stage]
        assert s["calls_deepspeed"] == 2 * 2 and s["calls_check"] == 0, s  # 2 steps, 2 groups
        assert s["weights_equal"], s
        assert s["moved_calls"] == 1 and s["moved_back_inside"], s


def test_no_device_sync_inside_a_step(tmp_path: Path) -> None:
    """One rank, bf16, ZeRO 0-3: our DeepSpeed config makes no device-wide synchronize in a
    step (so the host can queue the next step while the GPU works). The config we had before
    made two per step from DeepSpeed's throughput timer and a third, with ZeRO-1/2, from the
    end of backward on `overlap_comm`'s path."""
    r = _check("syncs", tmp_path)
    for stage in range(4):
        assert r[f"{stage}_ours"] == 0, r
    assert r["0_before"] == r["3_before"] == 2, r
    assert r["1_before"] == r["2_before"] == 3, r


def test_overlapped_backward_ends_without_a_device_sync_on_several_ranks(tmp_path: Path) -> None:
    """ZeRO-1/2 bf16 on 2 ranks with `overlap_comm` (the several-rank default on a GPU) and
    CUDA-like streams: DeepSpeed ends every backward with a device-wide synchronize; with the
    stream-ordered epilogue (the default) a step makes none and trains to the same weights."""
    r = _check("epilogue", tmp_path, nproc=2)
    for stage in ("1", "2"):
        s = r[stage]
        assert s["world"] == 2 and s["installed"] == [True, False], s
        assert s["syncs"] == [0, 1], s
        assert s["max_abs_diff"] == 0.0 and s["max_moved"] > 1e-3, s


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_zero1_without_the_one_rank_reduction_trains_as_deepspeeds(tmp_path: Path) -> None:
    """One GPU, bf16, ZeRO-1: the plain path without DeepSpeed's identity reduction
    (`engine/zero_one_rank.py`; on a GPU, unlike on a CPU, that reduction really flattens,
    all-reduces and copies back every gradient) gives the losses of DeepSpeed's contiguous
    path over 20 steps."""
    gpu_losses_agree(tmp_path, ["engine.zero_stage=1"],
                     ["engine.zero_stage=1", "engine.contiguous_gradients=true"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("stage", [1, 2])
def test_gpu_stream_ordered_epilogue_trains_as_deepspeeds(tmp_path: Path, stage: int) -> None:
    """One GPU, bf16, `overlap_comm` and contiguous gradients forced on (the several-rank path:
    the reduction runs on DeepSpeed's side stream even on one rank), the plain attention: the
    stream-ordered epilogue gives the losses of DeepSpeed's synchronizing one over 20 steps. A
    read of the gradients before the side stream wrote them would train on stale ones."""
    common = [f"engine.zero_stage={stage}", "engine.overlap_comm=true",
              "engine.contiguous_gradients=true"]
    gpu_losses_agree(tmp_path, [*common, "engine.epilogue_sync=false"],
                     [*common, "engine.epilogue_sync=true"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_step_never_drains_the_stream(tmp_path: Path) -> None:
    """One GPU, bf16, ZeRO-1 (eager, compiled, CoCa, and with the loop's logging: a line every
    step) and ZeRO-2 on the overlap path: in 4 steps nothing synchronizes a stream
    (`torch.cuda.set_sync_debug_mode`): no `.item()`, `.tolist()` or blocking copy in our code
    or DeepSpeed's, each listed by the line that called it. The previous step's flags and log
    line are read through events recorded behind them (`engine/host_read.py`), which wait for
    that step only and are not such a synchronize; until 2026-12-02 the flags' `.tolist()`
    drained the stream once a step, and each log line's reads once more."""
    r = _check("host_syncs", tmp_path, script="gpu_checks.py")
    for name, s in r.items():
        if name.endswith("_info"):
            continue
        assert not s["syncs"], (name, r)


def test_zero_on_several_ranks_trains_as_data_parallel(tmp_path: Path) -> None:
    """2 ranks, fp32: ZeRO-1 and ZeRO-2, on the gradient path `auto` picks and on the overlap
    path, end 3 steps at ZeRO-0's weights; the plain path (no reduction on CPU in DeepSpeed
    0.19.7) is refused by name."""
    r = _check("dp_equal", tmp_path, nproc=2, script="rank_checks.py")
    assert r["world"] == 2 and r["moved"] > 1e-3, r
    assert set(r["max_abs_diff"]) == {"zero1", "zero1_overlap", "zero2", "zero2_overlap"}, r
    assert max(r["max_abs_diff"].values()) < 1e-5, r
    assert "engine.contiguous_gradients=false" in r["plain_refused"], r


def test_contiguous_gradients_off_trains_the_same(tmp_path: Path) -> None:
    """One rank, ZeRO-1/2, fp32 and bf16, accumulation over 2 micro-batches: the plain
    gradient path (the one-rank default; under ZeRO-1 without DeepSpeed's identity reduction)
    ends 3 steps with bitwise the weights of DeepSpeed's contiguous path, and the weights did
    move."""
    r = _check("contiguous", tmp_path)
    for key in ("1_fp32", "1_bf16", "2_fp32", "2_bf16"):
        s = r[key]
        assert s["seen"] == [False, True] and s["n"] > 100, s
        assert s["reduce_skipped"] == [key.startswith("1_"), False], s  # ZeRO-1, plain path
        assert s["max_abs_diff"] == 0.0 and s["max_moved"] > 1e-3, s


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_resume_with_the_old_parameter_order(tmp_path: Path, stage: int) -> None:
    """A checkpoint whose optimizer groups list the parameters in another order (before
    2026-11-30 the logit scale came first) resumes through the universal conversion, by name:
    fp32 weights and Adam moments equal the checkpoint's (its flat partitions loaded directly
    would hand parameters each other's values). The same order needs no conversion."""
    saved = _check("old_order", tmp_path, str(stage))
    assert saved["step"] == 4 and "model.logit_scale" in saved["first_in_groups"], saved
    assert saved["recut_for_new_order"] and not saved["recut_for_same_order"], saved
    r = _check("universal", tmp_path, str(stage), "run")
    assert r["loaded"] and r["world"] == 1
    assert r["max_weight_diff"] == 0.0 and r["max_exp_avg_diff"] == 0.0, r
    assert r["params_with_moments"] == r["n_params"] > 100
    assert r["finished_step"] == 8


@pytest.mark.slow
@pytest.mark.parametrize("stage, saved_world, resumed_world",
                         [(1, 2, 1), (2, 1, 2), (3, 2, 1), (3, 1, 2)])
def test_resume_on_another_world_size(tmp_path: Path, stage: int, saved_world: int,
                                      resumed_world: int) -> None:
    """A ZeRO checkpoint of N ranks resumed on M: converted to DeepSpeed's universal format
    automatically; fp32 weights and Adam moments equal the checkpoint's consolidated state."""
    run_train([f"output_dir={tmp_path}", "name=run", f"engine.zero_stage={stage}",
               "optim.steps=8", "optim.stop_after=4", "checkpoint.every=4",
               "logging.wandb_mode=disabled", "data.batch_size=8"], nproc=saved_world)
    r = _check("universal", tmp_path, str(stage), "run", nproc=resumed_world)
    assert r["loaded"] and r["world"] == resumed_world
    assert r["max_weight_diff"] == 0.0 and r["max_exp_avg_diff"] == 0.0, r
    assert r["params_with_moments"] == r["n_params"] > 100  # moments continue, not zeros
    assert r["finished_step"] == 8
