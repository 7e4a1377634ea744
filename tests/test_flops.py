"""Model FLOPs formula against torch's FlopCounterMode, and the peak-throughput table."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mmpretrain.config.schema import FusionConfig, ModelConfig, TextConfig, VisionConfig
from mmpretrain.logging.flops import (PEAK_TFLOPS_ENV, flops_metrics, forward_flops_per_sample,
                                      peak_tflops, peak_tflops_for_name, train_flops_per_sample)
from mmpretrain.model import build_model

BATCH = 2


def _configs() -> dict[str, ModelConfig]:
    tiny = ModelConfig(attention="reference")
    uneven = ModelConfig(
        embed_dim=48, attention="reference",
        vision=VisionConfig(image_size=24, patch_size=6, width=96, layers=3, heads=4,
                            mlp_ratio=2.0, pool="mean"),
        text=TextConfig(vocab_size=300, context_length=20, width=64, layers=2, heads=2,
                        mlp_ratio=3.0))
    coca = dataclasses.replace(tiny, fusion=FusionConfig(decoder=True, layers=2, heads=4))
    return {"tiny-cls": tiny,
            "coca-all-tokens": coca,
            "coca-pooler-wide": dataclasses.replace(uneven, fusion=FusionConfig(
                decoder=True, width=96, layers=3, heads=8, pool_queries=5, mlp_ratio=3.0)),
            "tiny-mean": dataclasses.replace(
                tiny, vision=dataclasses.replace(tiny.vision, pool="mean")),
            "uneven-mean": uneven,
            "uneven-cls": dataclasses.replace(
                uneven, vision=dataclasses.replace(uneven.vision, pool="cls"))}


def _inputs(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    size = cfg.vision.image_size
    images = torch.randn(BATCH, 3, size, size, generator=gen)  # (B, 3, S, S)
    tokens = torch.randint(1, cfg.text.vocab_size, (BATCH, cfg.text.context_length),
                           generator=gen)  # (B, L), full context
    return images, tokens


def _count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("name", list(_configs()))
def test_forward_flops_match_flop_counter(name: str) -> None:
    cfg = _configs()[name]
    torch.manual_seed(0)
    model = build_model(cfg)
    images, tokens = _inputs(cfg)
    counted = _count(lambda: model(images, tokens)) / BATCH
    formula = forward_flops_per_sample(cfg)
    assert abs(formula - counted) / counted < 0.01, (formula, counted)


@pytest.mark.parametrize("name", ["tiny-cls", "uneven-mean"])
def test_train_flops_are_three_forwards(name: str) -> None:
    cfg = _configs()[name]
    torch.manual_seed(0)
    model = build_model(cfg)
    images, tokens = _inputs(cfg)

    def fwd_bwd() -> None:
        out = model(images, tokens)
        loss = (out["image_features"] * out["text_features"]).sum() * out["logit_scale"]
        loss.backward()

    counted = _count(fwd_bwd) / BATCH
    forward = _count(lambda: model(images, tokens)) / BATCH
    assert abs(counted / forward - 3) < 0.03 * 3, counted / forward
    assert abs(train_flops_per_sample(cfg) - counted) / counted < 0.03


def test_fusion_decoder_adds_flops_only_when_on() -> None:
    base = ModelConfig()
    off = dataclasses.replace(base, fusion=dataclasses.replace(base.fusion, layers=7))
    on = dataclasses.replace(base, fusion=dataclasses.replace(base.fusion, decoder=True))
    pooled = dataclasses.replace(on, fusion=dataclasses.replace(on.fusion, pool_queries=8))
    assert forward_flops_per_sample(off) == forward_flops_per_sample(base)
    # The LM head alone is 2 * S * W * V per sample.
    lm_head = 2 * base.text.context_length * base.text.width * base.text.vocab_size
    assert forward_flops_per_sample(on) - forward_flops_per_sample(base) > lm_head
    # 8 pooled queries instead of 65 image tokens: cross-attention gets cheaper.
    assert forward_flops_per_sample(pooled) < forward_flops_per_sample(on)


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA L40S", 362.0),
    ("NVIDIA L4", 121.0), ("NVIDIA A10", 125.0), ("NVIDIA GeForce RTX 4090", 165.0),
    ("NVIDIA H100 NVL", None), ("NVIDIA H200 NVL", None), ("NVIDIA L40", None),
    ("NVIDIA A10G", None), ("Tesla V100-SXM2-16GB", None),
])
def test_peak_table(name: str, peak: float | None) -> None:
    assert peak_tflops_for_name(name) == peak


def test_peak_on_cpu_and_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PEAK_TFLOPS_ENV, raising=False)
    assert peak_tflops(torch.device("cpu")) is None
    monkeypatch.setenv(PEAK_TFLOPS_ENV, "2.5")
    assert peak_tflops(torch.device("cpu")) == 2.5
    monkeypatch.setenv(PEAK_TFLOPS_ENV, "fast")
    with pytest.raises(ValueError, match=PEAK_TFLOPS_ENV):
        peak_tflops(torch.device("cpu"))


def test_flops_metrics() -> None:
    # 1000 samples/s over 4 ranks of 1e12 FLOPs each: 250 TFLOP/s per rank, 25% of 1000.
    assert flops_metrics(1000.0, 10**12, 4, 1000.0) == {"tflops_per_s": 250.0, "mfu": 0.25}
    assert flops_metrics(1000.0, 10**12, 4, None) == {"tflops_per_s": 250.0}
