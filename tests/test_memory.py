"""The memory plan (`engine/memory.py`, `mmpretrain bench memory`) and bench train's limits."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from helpers import REPO, clean_env
from mmpretrain.config.load import load_config
from mmpretrain.config.schema import LossConfig
from mmpretrain.engine.memory import (BUCKET_ELEMENTS, GIB, _depths, _saved_bytes, cap_device_memory,
                                      contrastive_loss_bytes, loss_memory_warning,
                                      measure_activations, model_state_bytes, plan_memory,
                                      saved_storages)
from mmpretrain.kernels import get_default_impl
from mmpretrain.losses import build_loss
from mmpretrain.model import build_model
from mmpretrain.model.task import build_task

P, LARGEST = 1_000_000, 10_000


def _cfg(size: str, *extra: str):  # noqa: ANN202
    return load_config(None, [f"model.size={size}", "model.attention=sdpa", *extra])


@pytest.mark.parametrize("size, dtype", [("tiny", torch.float32), ("coca_tiny", torch.float32),
                                         ("tiny", torch.bfloat16)])
def test_activations_extrapolate_to_full_depth_and_batch(size: str, dtype: torch.dtype) -> None:
    """Per-block bytes measured with 1- and 2-block towers at batches 1 and 2, times the real
    depth and batch, equal what the full model saves at batch 3 (the logits are the only
    non-linear term)."""
    cfg = _cfg(size)
    acts = measure_activations(cfg, dtype)
    towers = _depths(cfg.model)
    assert set(acts) == {"base", "fixed", *towers} and min(acts[t] for t in towers) > 0
    assert (acts["fixed"] > 0) == (dtype == torch.bfloat16)  # fp32 copies of LN weights
    predicted = 3 * (acts["base"] + sum(n * acts[t] for t, n in towers.items())) + acts["fixed"]
    torch.manual_seed(0)
    task = build_task(cfg, build_model(cfg.model, cfg.loss.kind)).to(dtype).train()
    s, ctx = cfg.model.vision.image_size, cfg.model.text.context_length
    measured = _saved_bytes(task, torch.randint(0, 256, (3, 3, s, s), dtype=torch.uint8),
                            torch.randint(1, cfg.model.text.vocab_size, (3, ctx)))
    assert measured == pytest.approx(predicted, rel=1e-3)


def test_measuring_leaves_the_process_as_it_was() -> None:
    before_impl = get_default_impl()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    measure_activations(_cfg("tiny", "model.attention=reference"), torch.float32)
    assert torch.equal(torch.rand(3), expected)  # the random stream is untouched
    assert get_default_impl() == before_impl


def test_block_activations_follow_the_block_formula() -> None:
    """A pre-norm block with SDPA saves ~20 W + 4 M bytes per token in bf16 (fp32 LayerNorm
    inputs 2 x 4W, the QKV and MLP inputs 2 x 2W, q/k/v 6W, the attention output 2W, the GELU
    input and output 2 x 2M) and never a sequence-squared matrix."""
    cfg = _cfg("vit_b16")
    acts = measure_activations(cfg, torch.bfloat16)
    w, m, tokens = 768, 3072, 197
    assert acts["vision"] / tokens == pytest.approx(20 * w + 4 * m, rel=0.01)
    w, tokens = 512, 77
    assert acts["text"] / tokens == pytest.approx(20 * w + 4 * 4 * w, rel=0.01)


def test_checkpointing_keeps_block_inputs_and_one_block() -> None:
    full = plan_memory(_cfg("tiny", "data.batch_size=8"), 1, "fp32")
    acts = measure_activations(_cfg("tiny"), torch.float32)
    ckpt = plan_memory(_cfg("tiny", "data.batch_size=8", "model.activation_checkpointing=true"),
                       1, "fp32", measured=acts)
    m = _cfg("tiny").model
    kept = 4 * (m.vision.layers * ((m.vision.image_size // m.vision.patch_size) ** 2 + 1)
                * m.vision.width + m.text.layers * m.text.context_length * m.text.width)
    assert ckpt.activation_bytes_per_sample == acts["base"] + kept + max(acts["vision"],
                                                                         acts["text"])
    assert ckpt.activation_bytes_per_sample < full.activation_bytes_per_sample
    assert full.params == ckpt.params == 1_769_473


@pytest.mark.parametrize("stage, offload, params_off, device, host", [
    (0, False, False, {"optimizer": 16, "weights": 2, "gradients": 2}, {}),
    (1, False, False, {"optimizer": 4, "weights": 2, "gradients": 2}, {}),
    (2, False, False, {"optimizer": 4, "weights": 2, "gradients": 0.5}, {}),
    (3, False, False, {"optimizer": 4, "weights": 0.5, "gradients": 0.5}, {}),
    (2, True, False, {"weights": 2, "gradients": 0.5}, {"optimizer": 4}),
    (3, True, False, {"weights": 0.5}, {"optimizer": 4, "gradients": 0.5}),
    (3, True, True, {}, {"optimizer": 4, "weights": 0.5, "gradients": 0.5}),
])
def test_model_states_per_parameter(stage: int, offload: bool, params_off: bool,
                                    device: dict, host: dict) -> None:
    """bf16 on 4 ranks: bytes per parameter where each state lives (ZeRO partitions by 4)."""
    dev, hst = model_state_bytes(P, LARGEST, stage, 4, "bf16", offload, params_off)
    per_param = {k: v / P for k, v in dev.items() if k not in ("buckets", "gathered_layer")}
    assert per_param == device and {k: v / P for k, v in hst.items()} == host
    assert ("gathered_layer" in dev) == (stage == 3) and ("buckets" in dev) == (stage >= 1)
    total = sum(v for k, v in {**dev, **hst}.items() if k not in ("buckets", "gathered_layer"))
    assert total == P * {0: 20, 1: 8, 2: 6.5, 3: 5}[stage]


def test_fp32_without_zero_has_no_master_copy() -> None:
    dev, _ = model_state_bytes(P, LARGEST, 0, 1, "fp32")
    assert dev == {"optimizer": 8 * P, "weights": 4 * P, "gradients": 4 * P}
    dev, _ = model_state_bytes(P, LARGEST, 1, 2, "fp32")  # ZeRO's optimizer copies its share
    assert dev["optimizer"] == 8 * P and dev["weights"] == dev["gradients"] == 4 * P


def test_max_batch_and_offload_make_a_large_model_fit() -> None:
    """ViT-e/14-sized (5.05 B) ZeRO-3 on one 80 GB device: 100 GiB of model states do not fit
    without offload; with the optimizer offloaded the device keeps the 16-bit weights."""
    base = ["data.batch_size=64", "engine.zero_stage=3", "model.activation_checkpointing=true"]
    acts = {"base": 5 << 20, "vision": 30 << 20, "text": 5 << 20, "fixed": 0}  # made up
    on_device = plan_memory(_cfg("vit_e14", *base), 1, "bf16", measured=acts)
    assert on_device.params == 5_045_004_545
    assert on_device.device_total > 80 * GIB and on_device.max_batch(80 * GIB) == 0
    offloaded = plan_memory(_cfg("vit_e14", *base, "engine.offload_optimizer=true"), 1, "bf16",
                            measured=acts)
    assert offloaded.device["weights"] == 2 * offloaded.params
    assert offloaded.host_total == 18 * offloaded.params
    fits = offloaded.max_batch(80 * GIB)
    for batch, fit in ((fits, True), (fits + 1, False)):  # the plan at that batch agrees
        at = plan_memory(_cfg("vit_e14", *base, "engine.offload_optimizer=true",
                              f"data.batch_size={batch}"), 1, "bf16", measured=acts)
        assert (at.device_total <= 80 * GIB) is fit
    # the plain CLIP loss's (N, N) logits make the limit quadratic in the batch: 8 ranks of
    # batch b without local_loss keep 8·(8b)² bytes on each
    many = plan_memory(_cfg("vit_e14", *base, "engine.offload_optimizer=true"), 8, "bf16",
                       measured=acts)
    assert many.loss_bytes_per_sample2 == 8 * 64
    b = many.max_batch(80 * GIB)
    assert b > 0
    for batch, fit in ((b, True), (b + 1, False)):
        at = plan_memory(_cfg("vit_e14", *base, "engine.offload_optimizer=true",
                              f"data.batch_size={batch}"), 8, "bf16", measured=acts)
        assert (at.device_total <= 80 * GIB) is fit
    fused = plan_memory(_cfg("vit_e14", *base, "engine.offload_optimizer=true", "loss.fused=true"),
                        8, "bf16", measured=acts)
    assert fused.loss_bytes_per_sample2 == 0 and fused.max_batch(80 * GIB) > b


@pytest.mark.parametrize("kind, local, fused", [("clip", False, False), ("clip", True, False),
                                                ("siglip", False, False), ("clip", False, True),
                                                ("siglip", False, True)])
def test_contrastive_loss_bytes_are_what_autograd_keeps(kind: str, local: bool,
                                                        fused: bool) -> None:
    """The plan's loss term is what the loss saves for its backward beyond copies the size of
    the features (the plain losses save the scaled features for the matmul's backward; the
    fused ones (N,) vectors): inputs excluded, within two feature copies and 1 KiB."""
    cfg = LossConfig(kind=kind, local_loss=local, fused=fused)
    rows, width = 96, 16
    feats = [torch.randn(rows, width, requires_grad=True) for _ in range(2)]
    scale, bias = (torch.tensor(v, requires_grad=True) for v in (10.0, -5.0))
    with saved_storages((*feats, scale, bias)) as seen:
        build_loss(cfg)(*feats, scale, bias)
    predicted = contrastive_loss_bytes(cfg, rows, 1)
    slack = 2 * rows * width * 4 + 1024
    assert predicted <= sum(seen.values()) <= predicted + slack, (seen, predicted)
    assert (predicted == 0) is fused
    # over W ranks, the global matrix without local_loss, one rank's rows otherwise
    n = rows * 4
    assert contrastive_loss_bytes(cfg, rows, 4) == (
        0 if fused else 12 * rows * n if kind == "siglip" else 8 * (rows if local else n) * n)


def test_loss_memory_warning_names_the_fix() -> None:
    """Over 1 GiB kept by the plain loss per rank: a warning naming loss.fused (and
    loss.local_loss for CLIP over the whole matrix); nothing for small or fused runs."""
    cfg = _cfg("tiny", "data.batch_size=512")
    assert loss_memory_warning(cfg, 8) is None  # N = 4,096: 128 MiB
    text = loss_memory_warning(cfg, 32)  # N = 16,384: 2 GiB on every rank
    assert text is not None and "keeps 2.0 GiB per rank" in text
    assert "(16384, 16384) logits of the global batch, on every rank" in text
    assert "loss.fused=true" in text and "loss.local_loss=true" in text
    siglip = loss_memory_warning(_cfg("tiny", "data.batch_size=4096", "loss.kind=siglip"), 16)
    assert siglip is not None and "(4096, 65536) logits of this rank's rows" in siglip
    assert "local_loss" not in siglip
    assert loss_memory_warning(_cfg("tiny", "data.batch_size=512", "loss.fused=true"), 32) is None


def test_cap_device_memory_needs_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("checks the error without CUDA")
    with pytest.raises(ValueError, match="--gpu-memory needs a CUDA device"):
        cap_device_memory(79.6, torch.device("cuda", 0))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmpretrain.cli", "bench", *args], cwd=REPO,
                          env=clean_env(), capture_output=True, text=True, timeout=300)


def test_bench_memory_cli() -> None:
    out = _cli("memory", "--model", "vit_bigg14", "--batch", "32", "--zero", "3",
               "--host-memory", "128", "engine.offload_optimizer=true",
               "model.activation_checkpointing=true")
    assert out.returncode == 0, out.stderr
    assert "parameters 2,539.6 M" in out.stdout
    assert "-> fits 79.1 GiB" in out.stdout and "-> fits 128 GiB" in out.stdout
    assert "largest batch per rank predicted to fit 79.1 GiB" in out.stdout
    js = _cli("memory", "--model", "tiny", "--batch", "4", "--json")
    record = json.loads(js.stdout)
    assert record["params"] == 1_769_473 and record["device_total"] == sum(
        record["device"].values())
    assert record["gpu_memory_gib"] == 79.1 and record["max_batch"] > 10_000
    own = json.loads(_cli("memory", "-c", "experiments/clip_vit_b16.yaml", "--world", "8",
                          "--batch", "128", "--json").stdout)
    assert (own["model"], own["zero"], own["batch"], own["precision"]) == ("vit_b16", 2, 128,
                                                                          "bf16")
    assert own["device"]["gradients"] == own["params"] * 2 // 8  # ZeRO-2 over 8 ranks
    bad = _cli("memory", "--model", "tiny", "engine.offload_params=true")
    assert bad.returncode == 2 and "engine.offload_params" in bad.stderr


def test_bench_train_gpu_memory_needs_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("checks the error without CUDA")
    out = _cli("train", "--model", "tiny", "--batch", "4", "--steps", "1", "--warmup", "0",
               "--gpu-memory", "10")
    assert out.returncode == 2 and "--gpu-memory needs a CUDA device" in out.stderr


@pytest.mark.gpu
def test_gpu_prediction_is_close_to_the_measured_peak() -> None:
    """ViT-B/16 at batch 64, ZeRO-1, bf16: the plan within 25% of the allocator's peak."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    out = _cli("train", "--model", "vit_b16", "--batch", "64", "--steps", "2", "--warmup", "1",
               "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    ours = json.loads(out.stdout.splitlines()[-1])["mmpretrain"]
    assert ours["predicted_peak_gb"] == pytest.approx(ours["peak_mem_gb"], rel=0.25)


def test_train_out_of_memory_says_what_would_fit(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    import mmpretrain.engine.trainer as trainer_mod
    from mmpretrain.cli import main

    def oom(*args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB.\nmore")

    monkeypatch.setattr(trainer_mod, "Trainer", oom)
    rc = main(["train", "-c", "experiments/tiny_synthetic.yaml", "engine.zero_stage=0"])
    err = capsys.readouterr().err
    assert rc == 3
    assert "error: rank 0 ran out of device memory: CUDA out of memory. Tried to allocate" in err
    assert "`mmpretrain bench memory` predicts" in err
    assert "model.activation_checkpointing=true: " in err  # each option with its prediction
    assert "engine.offload_optimizer=true engine.zero_stage=1: " in err
    assert "engine.zero_stage=3" not in err  # one rank: nothing to partition
    assert "loss.fused=true" not in err  # the logits of a small batch are too small to matter
    rc = main(["train", "-c", "experiments/tiny_synthetic.yaml", "data.batch_size=16384"])
    assert rc == 3 and "  loss.fused=true: " in capsys.readouterr().err


def test_buckets_double_only_with_overlap_comm() -> None:
    """ZeRO-1/2 allocate a second gradient bucket (ping-pong) only on `overlap_comm`'s path;
    the plan resolves `engine.overlap_comm=auto` as for a GPU (one rank: off)."""
    for stage in (1, 2):
        on, _ = model_state_bytes(P, LARGEST, stage, 1, "bf16", overlap_comm=True)
        off, _ = model_state_bytes(P, LARGEST, stage, 1, "bf16", overlap_comm=False)
        assert on["buckets"] == 2 * off["buckets"] == 2 * BUCKET_ELEMENTS * 2
    cfg = load_config(None, ["model.size=tiny", "engine.zero_stage=1"])
    acts = measure_activations(cfg, torch.bfloat16)
    one, two = (plan_memory(cfg, world, "bf16", measured=acts) for world in (1, 2))
    assert one.device["buckets"] == BUCKET_ELEMENTS * 2 == two.device["buckets"] // 2
