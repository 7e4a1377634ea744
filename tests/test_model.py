"""The two-tower model: shapes, norms, parameter counts of the named sizes, pooling, errors."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from mmpretrain import kernels
from mmpretrain.config.schema import ModelConfig, TextConfig, VisionConfig
from mmpretrain.model import CLIP, build_model, count_parameters
from mmpretrain.model.registry import MODEL_SIZES, preset
from mmpretrain.model.text import TextTransformer, eot_index
from mmpretrain.model.vision import VisionTransformer


def model_config(size: str, **overrides) -> ModelConfig:
    """A ModelConfig filled from the registry preset `size` (what the config loader does)."""
    p = preset(size)
    cfg = ModelConfig(size=size, embed_dim=p["embed_dim"], vision=VisionConfig(**p["vision"]),
                      text=TextConfig(**p["text"]))
    return dataclasses.replace(cfg, **overrides)


@pytest.fixture(autouse=True)
def _restore_default_attention():
    yield
    kernels.set_default_impl("auto")


def _tokens(batch: int, ctx: int, lengths: list[int], vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(batch, ctx, dtype=torch.long)
    for b, n in enumerate(lengths):
        tokens[b, :n] = torch.randint(1, vocab, (n,), generator=g)
    return tokens


def test_tiny_forward_shapes_norms_and_scale():
    torch.manual_seed(0)
    cfg = model_config("tiny")
    model = build_model(cfg)
    images = torch.randn(3, 3, 32, 32)
    tokens = _tokens(3, 32, [5, 32, 1], cfg.text.vocab_size)
    out = model(images, tokens)
    assert out["image_features"].shape == (3, cfg.embed_dim)
    assert out["text_features"].shape == (3, cfg.embed_dim)
    for key in ("image_features", "text_features"):
        torch.testing.assert_close(out[key].norm(dim=-1), torch.ones(3))
    assert model.logit_scale.shape == (1,)
    assert out["logit_scale"].dim() == 0
    assert math.isclose(out["logit_scale"].detach().item(), math.exp(cfg.init_logit_scale), rel_tol=1e-6)
    assert out["logit_bias"] is None and model.logit_bias is None
    assert model.encode_image(images, normalize=False).norm(dim=-1).ne(1).all()
    out["image_features"].sum().add(out["text_features"].sum()).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n != "logit_scale")


def test_siglip_bias_and_scale_clamp():
    cfg = model_config("tiny", init_logit_scale=math.log(10.0), init_logit_bias=-10.0)
    model = build_model(cfg, loss_kind="siglip")
    assert model.logit_bias is not None and model.logit_bias.shape == (1,)
    with torch.no_grad():
        scale, bias = model.scale_and_bias()
    assert math.isclose(scale.item(), 10.0, rel_tol=1e-6) and bias.item() == -10.0
    with torch.no_grad():
        model.logit_scale.fill_(10.0)  # exp(10) > max_logit_scale
        assert model.scale_and_bias()[0].item() == cfg.max_logit_scale
    with pytest.raises(ValueError, match="loss.kind"):
        build_model(cfg, loss_kind="triplet")


@pytest.mark.parametrize("size", sorted(MODEL_SIZES))
def test_every_size_on_meta_device(size):
    cfg = model_config(size)
    with torch.device("meta"):
        model = build_model(cfg, loss_kind="siglip")
        images = torch.empty(2, 3, cfg.vision.image_size, cfg.vision.image_size)
        tokens = torch.zeros(2, cfg.text.context_length, dtype=torch.long)
        out = model(images, tokens)
        grid = cfg.vision.image_size // cfg.vision.patch_size
        tok = model.visual.forward_tokens(images)
    assert all(p.is_meta for p in model.parameters())
    assert out["image_features"].shape == (2, cfg.embed_dim)
    assert out["text_features"].shape == (2, cfg.embed_dim)
    assert out["logit_scale"].shape == () and out["logit_bias"].shape == ()
    assert tok.shape == (2, 1 + grid * grid, cfg.vision.width)


# OpenAI CLIP parameter counts (logit_scale included).
PUBLISHED = {"vit_b32": 151_277_313, "vit_b16": 149_620_737, "vit_l14": 427_616_513}


@pytest.mark.parametrize("size", sorted(PUBLISHED))
def test_parameter_counts_match_published_clip(size):
    with torch.device("meta"):
        model = build_model(model_config(size))
    n = count_parameters(model)
    assert abs(n - PUBLISHED[size]) <= 0.01 * PUBLISHED[size]
    assert n == PUBLISHED[size]  # same layout as OpenAI CLIP: the counts agree exactly


def test_eot_pooling_uses_last_non_pad_token():
    torch.manual_seed(0)
    cfg = model_config("tiny")
    text = TextTransformer(cfg.text, cfg.embed_dim).eval()
    tokens = _tokens(3, 32, [6, 32, 10], cfg.text.vocab_size)
    assert eot_index(tokens).tolist() == [5, 31, 9]
    assert eot_index(torch.zeros(1, 4, dtype=torch.long)).tolist() == [0]
    with torch.no_grad():
        base = text(tokens)
        hidden = text.forward_tokens(tokens)
        torch.testing.assert_close(base, text.proj(hidden[torch.arange(3), eot_index(tokens)]))
        # Shorter padding (fewer trailing pads) does not change features.
        torch.testing.assert_close(text(tokens[:1, :8]), base[:1], rtol=1e-5, atol=1e-6)
        # Tokens after the EOT position cannot influence it (causal attention).
        changed = tokens.clone()
        changed[0, 6:] = 7
        torch.testing.assert_close(text.forward_tokens(changed)[0, :6], hidden[0, :6])
        # A token before EOT, or the EOT token itself, changes the features.
        for pos in (2, 5):
            changed = tokens.clone()
            changed[0, pos] = (changed[0, pos] % (cfg.text.vocab_size - 1)) + 1
            out = text(changed)
            assert not torch.allclose(out[0], base[0], atol=1e-4)
            torch.testing.assert_close(out[1:], base[1:])


def test_mean_pooling_option():
    torch.manual_seed(0)
    vcfg = dataclasses.replace(model_config("tiny").vision, pool="mean")
    visual = VisionTransformer(vcfg, embed_dim=16).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = visual.forward_tokens(images)
        assert tokens.shape == (2, 1 + 64, vcfg.width)
        torch.testing.assert_close(visual(images), visual.proj(tokens[:, 1:].mean(dim=1)))
        assert not torch.allclose(visual(images), visual.proj(tokens[:, 0]))


def test_bad_configs_raise_clear_errors():
    cfg = model_config("tiny")
    with pytest.raises(ValueError, match="model.vision.patch_size"):
        VisionTransformer(dataclasses.replace(cfg.vision, patch_size=5), 16)
    with pytest.raises(ValueError, match="model.vision.heads"):
        VisionTransformer(dataclasses.replace(cfg.vision, heads=3), 16)
    with pytest.raises(ValueError, match="model.vision.pool"):
        VisionTransformer(dataclasses.replace(cfg.vision, pool="max"), 16)
    with pytest.raises(ValueError, match="model.text.heads"):
        TextTransformer(dataclasses.replace(cfg.text, heads=5), 16)
    with pytest.raises(ValueError, match="model.embed_dim"):
        CLIP(dataclasses.replace(cfg, embed_dim=0))
    model = build_model(cfg)
    with pytest.raises(ValueError, match="model.text.context_length"):
        model.encode_text(torch.ones(1, cfg.text.context_length + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="model.vision.image_size"):
        model.encode_image(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="model.attention"):
        build_model(dataclasses.replace(cfg, attention="flash"))


def test_sdpa_model_matches_reference_and_checkpointing_grads_match():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    tokens = _tokens(2, 32, [7, 20], 1024)
    results = []
    for impl, ckpt in (("reference", False), ("sdpa", False), ("reference", True)):
        torch.manual_seed(1)
        model = build_model(model_config("tiny", attention=impl, activation_checkpointing=ckpt))
        out = model(images, tokens)
        loss = (out["image_features"] @ out["text_features"].T).sum() * out["logit_scale"]
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-5, atol=1e-5)
        for g, g0 in zip(grads, results[0][1]):
            # fp32 summation order differs between the implementations: absolute errors
            # scale with the gradient (up to ~25 here; 2e-5 measured on the largest)
            torch.testing.assert_close(g, g0, rtol=1e-4, atol=1e-5 * max(1.0, g0.abs().max()))


def test_initialization_statistics_and_bf16_forward():
    torch.manual_seed(0)
    model = build_model(model_config("tiny"))
    assert abs(model.text.token_embedding.weight.std().item() - 0.02) < 0.002
    assert abs(model.text.positional_embedding.std().item() - 0.01) < 0.001
    block = model.text.transformer.blocks[0]
    width, layers = 128, 4
    assert abs(block.attn.qkv.weight.std().item() - width ** -0.5) < 0.01
    assert abs(block.mlp.fc2.weight.std().item() - width ** -0.5 * (2 * layers) ** -0.5) < 0.005
    assert torch.all(block.attn.qkv.bias == 0)
    model = model.to(torch.bfloat16)
    out = model(torch.randn(2, 3, 32, 32, dtype=torch.bfloat16), _tokens(2, 32, [3, 9], 1024))
    assert out["image_features"].dtype == torch.bfloat16
    assert torch.isfinite(out["image_features"].float()).all()


@pytest.mark.parametrize("patch, size, bias", [(16, 64, False), (14, 42, True), (4, 12, False)])
def test_patch_embed_matmul_equals_the_convolution(patch, size, bias):
    """PatchEmbed computes the stride = kernel Conv2d as unfold + one matmul: same outputs and
    weight gradients as cuDNN's/ATen's convolution (fp64), tokens in row-major grid order."""
    from mmpretrain.model.vision import PatchEmbed

    torch.manual_seed(0)
    embed = PatchEmbed(3, 24, kernel_size=patch, stride=patch, bias=bias).double()
    images = torch.randn(2, 3, size, size, dtype=torch.float64)
    out = embed(images)  # (B, N, W)
    conv = torch.nn.functional.conv2d(images, embed.weight, embed.bias, stride=patch)
    ref = conv.flatten(2).transpose(1, 2)  # (B, N, W)
    assert out.shape == (2, (size // patch) ** 2, 24)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    (dw,) = torch.autograd.grad(out, embed.weight, grad)
    (dw_ref,) = torch.autograd.grad(ref, embed.weight, grad)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-10, atol=1e-10)
    assert list(embed.state_dict()) == (["weight", "bias"] if bias else ["weight"])


def test_task_normalizes_with_fp32_stats_copied_once_per_device() -> None:
    """The task's mean/std reach a device once (a copy from pageable memory would wait for the
    GPU in every forward), stay fp32 under a bf16 model, and normalize as (x - mean) / std."""
    from mmpretrain.config.load import load_config
    from mmpretrain.model.task import build_task

    cfg = load_config(None, ["model.size=tiny"])
    task = build_task(cfg, build_model(cfg.model)).to(torch.bfloat16)
    cpu = torch.device("cpu")
    mean, std = task.stats(cpu)
    again = task.stats(cpu)
    assert again[0] is mean and again[1] is std  # cached, not copied again
    assert mean.dtype == std.dtype == torch.float32 and mean.shape == (1, 3, 1, 1)
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    want = (images.float() - torch.tensor(cfg.data.mean).view(1, 3, 1, 1) * 255) / (
        torch.tensor(cfg.data.std).view(1, 3, 1, 1) * 255)
    out = task.normalize(images)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want.to(torch.bfloat16).float())
