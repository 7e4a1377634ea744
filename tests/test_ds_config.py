"""The DeepSpeed config our schema becomes (`engine/ds_config.py`, a pure function)."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from mmpretrain.config.load import ConfigError, load_config
from mmpretrain.engine.ds_config import build_ds_config, slow_path_warning

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # constructing a cuda device needs no GPU


def _cfg(*overrides: str):
    return load_config(None, list(overrides))


@pytest.mark.parametrize("device", [CPU, CUDA], ids=["cpu", "cuda"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_ds_config_zero_stages(stage: int, device: torch.device) -> None:
    cfg = _cfg(f"engine.zero_stage={stage}")
    ds = build_ds_config(cfg, world_size=1, precision="fp32", device=device)
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage
    assert "offload_optimizer" not in zero and "offload_param" not in zero
    if stage == 0:
        assert zero == {"stage": 0}
    else:
        assert zero["overlap_comm"] is False  # one rank, nothing offloaded: nothing to hide
        assert zero["contiguous_gradients"] is (stage == 3)  # one rank: nothing to scatter
        assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 50_000_000
    has_stage3 = any(k.startswith("stage3_") for k in zero)
    assert has_stage3 is (stage == 3)
    if stage == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is False
    assert ds["zero_allow_untested_optimizer"] is True
    json.dumps(ds)  # plain data only


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_ds_config_overlap_comm_only_where_a_transfer_hides(stage: int) -> None:
    def overlap(world: int, device: torch.device, *overrides: str) -> bool:
        cfg = _cfg(f"engine.zero_stage={stage}", *overrides)
        return build_ds_config(cfg, world, "bf16", device)["zero_optimization"]["overlap_comm"]

    assert overlap(1, CUDA) is False
    assert overlap(2, CUDA) is True
    assert overlap(1, CUDA, "engine.offload_optimizer=true") is True
    assert overlap(8, CPU) is False and overlap(1, CPU, "engine.offload_optimizer=true") is False
    assert overlap(1, CUDA, "engine.overlap_comm=true") is True
    assert overlap(1, CPU, "engine.overlap_comm=true") is True
    assert overlap(8, CUDA, "engine.overlap_comm=false") is False


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_ds_config_contiguous_gradients_where_a_reduction_needs_them(stage: int) -> None:
    def contiguous(world: int, *overrides: str) -> bool:
        cfg = _cfg(f"engine.zero_stage={stage}", *overrides)
        return build_ds_config(cfg, world, "bf16", CUDA)["zero_optimization"][
            "contiguous_gradients"]

    assert contiguous(1) is (stage == 3)
    assert contiguous(2) is True
    assert contiguous(1, "engine.offload_optimizer=true") is True
    assert contiguous(1, "engine.contiguous_gradients=true") is True
    assert contiguous(4, "engine.contiguous_gradients=false") is False


def test_ds_config_throughput_timer_off() -> None:
    """DeepSpeed's throughput timer synchronizes the device twice a step when on (its default);
    tests/engine_checks.py `syncs` counts them through the real engine."""
    for device in (CPU, CUDA):
        ds = build_ds_config(_cfg(), 1, "bf16", device)
        assert ds["timers"] == {"throughput": {"enabled": False, "synchronized": False}}


def test_overlap_comm_config_values() -> None:
    assert _cfg().engine.overlap_comm == "auto"
    assert _cfg("engine.overlap_comm=true").engine.overlap_comm is True
    with pytest.raises(ConfigError, match="engine.overlap_comm"):
        _cfg("engine.overlap_comm=sometimes")


@pytest.mark.parametrize("precision, bf16, fp16", [("fp32", False, False), ("bf16", True, False),
                                                   ("fp16", False, True)])
def test_ds_config_precision(precision: str, bf16: bool, fp16: bool) -> None:
    ds = build_ds_config(_cfg(), 1, precision, CUDA)
    assert ds["bf16"]["enabled"] is bf16
    assert ds["fp16"]["enabled"] is fp16
    assert ds["fp16"]["loss_scale"] == 0  # dynamic loss scaling when fp16 is on


@pytest.mark.parametrize("micro, accum, world", [(64, 1, 1), (8, 4, 1), (16, 2, 4), (3, 5, 7)])
def test_ds_config_batch_sizes(micro: int, accum: int, world: int) -> None:
    cfg = _cfg(f"data.batch_size={micro}", f"engine.grad_accum={accum}")
    ds = build_ds_config(cfg, world, "fp32", CPU)
    assert ds["train_micro_batch_size_per_gpu"] == micro
    assert ds["gradient_accumulation_steps"] == accum
    assert ds["train_batch_size"] == micro * accum * world


@pytest.mark.parametrize("device, pin", [(CPU, False), (CUDA, True)], ids=["cpu", "cuda"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_ds_config_offload_only_when_asked(stage: int, device: torch.device, pin: bool) -> None:
    off = build_ds_config(_cfg(f"engine.zero_stage={stage}"), 2, "bf16", device)
    assert "offload_optimizer" not in off["zero_optimization"]
    on = build_ds_config(_cfg(f"engine.zero_stage={stage}", "engine.offload_optimizer=true"),
                         2, "bf16", device)
    assert on["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": pin}
    assert "offload_param" not in on["zero_optimization"]


@pytest.mark.parametrize("device, pin", [(CPU, False), (CUDA, True)], ids=["cpu", "cuda"])
def test_ds_config_offload_params(device: torch.device, pin: bool) -> None:
    cfg = _cfg("engine.zero_stage=3", "engine.offload_optimizer=true", "engine.offload_params=true")
    zero = build_ds_config(cfg, 1, "bf16", device)["zero_optimization"]
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": pin}
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": pin}


@pytest.mark.parametrize("clip", [0.0, 0.5, 1.0, 3])
def test_ds_config_gradient_clipping(clip: float) -> None:
    ds = build_ds_config(_cfg(f"optim.grad_clip={clip}"), 1, "fp32", CPU)
    assert ds["gradient_clipping"] == clip


def test_ds_config_is_pure() -> None:
    cfg = _cfg("engine.zero_stage=2", "engine.offload_optimizer=true")
    before = copy.deepcopy(cfg)
    a = build_ds_config(cfg, 4, "bf16", CUDA)
    b = build_ds_config(cfg, 4, "bf16", CUDA)
    assert a == b and a is not b
    a["zero_optimization"]["stage"] = 99
    a["zero_optimization"]["offload_optimizer"]["device"] = "nvme"
    again = build_ds_config(cfg, 4, "bf16", CUDA)
    assert again["zero_optimization"]["stage"] == 2
    assert again["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg == before


@pytest.mark.parametrize("stage", [1, 2])
def test_ds_config_refuses_unreduced_cpu_gradients(stage: int) -> None:
    """DeepSpeed 0.19.7's plain (non-contiguous) ZeRO-1/2 path reduces nothing on several CPU
    ranks; asking for it there is an error naming the key, and the same config is fine on one
    rank, on CUDA, or with the contiguous path."""
    cfg = _cfg(f"engine.zero_stage={stage}", "engine.contiguous_gradients=false")
    with pytest.raises(ValueError, match="engine.contiguous_gradients=false"):
        build_ds_config(cfg, world_size=2, precision="fp32", device=CPU)
    for world, device in ((1, CPU), (2, CUDA)):
        build_ds_config(cfg, world_size=world, precision="fp32", device=device)
    auto = _cfg(f"engine.zero_stage={stage}")
    ds = build_ds_config(auto, world_size=2, precision="fp32", device=CPU)
    assert ds["zero_optimization"]["contiguous_gradients"] is True


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("device", [CPU, CUDA], ids=["cpu", "cuda"])
@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_slow_path_warning_only_for_zero0_bf16_on_gpu(stage: int, device: torch.device,
                                                       precision: str) -> None:
    """DeepSpeed's BF16_Optimizer (ZeRO-0 in bf16) waits for the GPU every step: warned, with
    the key to change; no other combination is."""
    warning = slow_path_warning(_cfg(f"engine.zero_stage={stage}"), precision, device)
    if (stage, device.type, precision) == (0, "cuda", "bf16"):
        assert "engine.zero_stage=1" in warning and "BF16_Optimizer" in warning
    else:
        assert warning == ""
