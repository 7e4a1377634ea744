"""CoCa fusion: cross-attention, the decoder's masking, the caption loss, KV-cache decoding,
greedy and beam search, fusion heads."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmpretrain.config.load import load_config
from mmpretrain.losses import CaptionLoss
from mmpretrain.model import CoCa, build_model
from mmpretrain.model.fusion import CrossAttention
from mmpretrain.model.generate import Special, beam_search, generate, greedy
from mmpretrain.model.task import build_task

SPECIAL = Special(sot=2, eot=3, pad=0)


def _cfg(*overrides: str):
    base = ["model.size=coca_tiny", "model.vision.image_size=16", "model.text.context_length=12",
            "model.text.vocab_size=40", "model.attention=reference"]
    return load_config(None, [*base, *overrides])


def _model(*overrides: str, seed: int = 0) -> CoCa:
    torch.manual_seed(seed)
    model = build_model(_cfg(*overrides).model)
    assert isinstance(model, CoCa)
    return model.eval()


def _tokens(b: int, s: int, lengths: list[int], vocab: int = 40) -> torch.Tensor:
    """Rows: sot, random ids, eot, padding (as the tokenizer writes them)."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.zeros(b, s, dtype=torch.long)
    for row, n in enumerate(lengths):
        tokens[row, 0] = SPECIAL.sot
        tokens[row, 1:n + 1] = torch.randint(4, vocab, (n,), generator=g)
        tokens[row, n + 1] = SPECIAL.eot
    return tokens


def test_cross_attention_matches_naive_per_head_softmax() -> None:
    torch.manual_seed(0)
    attn = CrossAttention(width=32, memory_width=24, heads=4, attention_impl="reference")
    x, mem = torch.randn(3, 5, 32), torch.randn(3, 7, 24)  # (B, S, Wd), (B, M, Wm)
    out = attn(x, mem)
    assert out.shape == (3, 5, 32)
    q = attn.q(x).view(3, 5, 4, 8)  # (B, S, H, Dh)
    k, v = attn.kv(mem).view(3, 7, 2, 4, 8).unbind(2)  # (B, M, H, Dh) each
    weights = torch.einsum("bshd,bmhd->bhsm", q, k).div(math.sqrt(8)).softmax(-1)
    naive = torch.einsum("bhsm,bmhd->bshd", weights, v).reshape(3, 5, 32)
    torch.testing.assert_close(out, attn.proj(naive), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pool", [0, 6], ids=["all-tokens", "pooler"])
def test_decoder_shapes_causality_and_padding(pool: int) -> None:
    model = _model(f"model.fusion.pool_queries={pool}", "model.fusion.width=48")
    images, tokens = torch.randn(2, 3, 16, 16), _tokens(2, 12, [4, 7])
    logits = model(images, tokens)["caption_logits"]
    assert logits.shape == (2, 12, 40)
    # causal: changing token 5 changes no logits before position 5
    changed = tokens.clone()
    changed[:, 5] = 30
    other = model(images, changed)["caption_logits"]
    torch.testing.assert_close(other[:, :5], logits[:, :5])
    assert not torch.allclose(other[:, 5:], logits[:, 5:])
    # the image matters (cross-attention reads the memory)
    assert not torch.allclose(model(images.flip(0), tokens)["caption_logits"], logits)


def test_caption_loss_matches_naive_loop_over_unpadded_rows() -> None:
    """Batched, padded loss == mean over every real target token of -log p, each row run alone
    at its own length (so padding and causal masking cannot leak into the loss)."""
    model = _model()
    images, tokens = torch.randn(3, 3, 16, 16), _tokens(3, 12, [2, 9, 5])
    batched = CaptionLoss()(model(images, tokens)["caption_logits"], tokens)
    total, count = 0.0, 0
    for row in range(3):
        n = int((tokens[row] != 0).sum())  # sot .. eot
        alone = tokens[row:row + 1, :n]
        logits = model(images[row:row + 1], alone)["caption_logits"][0]  # (n, V)
        for t in range(n - 1):
            total += -F.log_softmax(logits[t].double(), -1)[alone[0, t + 1]].item()
            count += 1
    assert count == (2 + 1) + (9 + 1) + (5 + 1)  # words + eot per row, sot never a target
    assert abs(batched.item() - total / count) < 1e-5


def test_caption_loss_rejects_all_padding() -> None:
    """All-padding targets are an error, checked on host tokens only: on a GPU the answer
    would make the host wait, so the trainer checks each batch before copying it (a device
    tensor, here on the meta device, is never read)."""
    with pytest.raises(ValueError, match="padding"):
        CaptionLoss()(torch.randn(2, 4, 10), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="padding"):
        CaptionLoss().check(torch.zeros(2, 4, dtype=torch.long))
    CaptionLoss().check(torch.zeros(2, 4, dtype=torch.long, device="meta"))


@pytest.mark.parametrize("pool", [0, 5], ids=["all-tokens", "pooler"])
def test_kv_cache_decoding_equals_full_forward(pool: int) -> None:
    model = _model(f"model.fusion.pool_queries={pool}")
    images, tokens = torch.randn(2, 3, 16, 16), _tokens(2, 12, [8, 8])
    full = model(images, tokens)["caption_logits"]  # (B, S, V)
    from mmpretrain.model.generate import _Decoder

    with torch.no_grad():
        dec = _Decoder(model, images)
        steps = [dec.step(tokens[:, t:t + 1]) for t in range(10)]  # (B, V) log-probs each
    torch.testing.assert_close(torch.stack(steps, 1), F.log_softmax(full[:, :10], -1),
                               rtol=1e-4, atol=1e-5)


def test_greedy_follows_argmax_of_full_forward() -> None:
    model = _model(seed=3)
    images = torch.randn(3, 3, 16, 16)
    for row, ids in enumerate(greedy(model, images, SPECIAL)):
        seq = torch.tensor([[SPECIAL.sot, *ids]])
        logits = model(images[row:row + 1], seq)["caption_logits"][0]  # (n, V)
        assert logits.argmax(-1)[:-1].tolist() == ids
        last = int(logits[-1].argmax())
        assert last == SPECIAL.eot or len(ids) == 12 - 1  # stopped at eot or at the limit


def test_beam_width_one_is_greedy_and_beams_score_at_least_greedy() -> None:
    model = _model(seed=5)
    images = torch.randn(4, 3, 16, 16)
    g = greedy(model, images, SPECIAL)
    assert beam_search(model, images, SPECIAL, beam_width=1) == g
    assert generate(model, images, SPECIAL, beam_width=1) == g

    def logp(row: int, ids: list[int]) -> float:
        seq = torch.tensor([[SPECIAL.sot, *ids, SPECIAL.eot]])
        lp = F.log_softmax(model(images[row:row + 1], seq)["caption_logits"][0].double(), -1)
        return float(sum(lp[t, seq[0, t + 1]] for t in range(seq.shape[1] - 1)))

    beams = beam_search(model, images, SPECIAL, beam_width=4, length_penalty=0.0, max_len=6)
    short = greedy(model, images, SPECIAL, max_len=6)
    for row in range(4):
        assert all(0 <= i < 40 and i not in (SPECIAL.sot, SPECIAL.eot) for i in beams[row])
        if len(short[row]) < 5:  # greedy finished with eot inside the limit
            assert logp(row, beams[row]) >= logp(row, short[row]) - 1e-6


def test_generation_needs_a_decoder() -> None:
    cfg = load_config(None, ["model.size=tiny"])
    with pytest.raises(ValueError, match="fusion.decoder"):
        greedy(build_model(cfg.model), torch.randn(1, 3, 32, 32), SPECIAL)


def test_task_weights_and_accumulation_share() -> None:
    """loss = wc * contrastive + wcap * caption; with a feature cache each micro-batch carries
    1/accum of its caption loss."""
    cfg = _cfg("loss.contrastive_weight=0.5", "loss.caption_weight=3.0")
    torch.manual_seed(0)
    task = build_task(cfg, build_model(cfg.model))
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    tokens = _tokens(4, 12, [3, 4, 5, 6])
    out = task(images, tokens)
    expect = 0.5 * out["contrastive_loss"] + 3.0 * out["caption_loss"]
    torch.testing.assert_close(out["loss"].detach(), expect)
    from mmpretrain.model.task import FeatureCache

    with torch.no_grad():
        halves = [task(images[i:i + 2], tokens[i:i + 2], features_only=True) for i in (0, 2)]
    assert "caption_loss" not in halves[0] and "loss" not in halves[0]
    cache = FeatureCache([h["image_features"] for h in halves],
                         [h["text_features"] for h in halves])
    part = task(images[:2], tokens[:2], cache=cache, index=0)
    torch.testing.assert_close(part["loss"].detach(), 0.5 * part["contrastive_loss"]
                               + 3.0 * part["caption_loss"] / 2)
    torch.testing.assert_close(part["contrastive_loss"], out["contrastive_loss"],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head,dim", [("concat", 256), ("weighted_sum", 128), ("gated", 128)])
def test_fusion_heads(head: str, dim: int) -> None:
    cfg = load_config(None, ["model.size=tiny", f"model.fusion.head={head}",
                             "model.attention=reference"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    images, tokens = torch.randn(3, 3, 32, 32), _tokens(3, 32, [3, 4, 5])
    fused = model.fuse(images, tokens)
    assert fused.shape == (3, dim)
    img, txt = model.encode_image(images), model.encode_text(tokens)
    if head == "concat":
        torch.testing.assert_close(fused, torch.cat([img, txt], -1))
    else:  # both start as the plain average, and their parameters get gradients
        torch.testing.assert_close(fused, (img + txt) / 2)
        fused.pow(2).sum().backward()
        grads = [p.grad for p in model.fusion_head.parameters()]
        assert grads and all(g is not None for g in grads)


def test_fuse_without_head_is_an_error() -> None:
    model = build_model(load_config(None, ["model.size=tiny"]).model)
    with pytest.raises(ValueError, match="fusion.head"):
        model.fuse(torch.randn(1, 3, 32, 32), _tokens(1, 32, [2]))


def test_fusion_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="model.fusion.heads"):
        build_model(_cfg("model.fusion.width=50", "model.fusion.heads=4").model)


@pytest.mark.parametrize("size,params", [
    ("coca_vit_b16", 226_826_753), ("coca_vit_l14", 581_960_449),
    # two-tower sizes: the parameter counts of OpenCLIP 3.3.0's ViT-H-14, ViT-g-14, ViT-bigG-14
    ("vit_h14", 986_109_441), ("vit_g14", 1_366_678_273), ("vit_bigg14", 2_539_567_105),
    # EVA-CLIP E/14-plus dimensions in plain blocks (no OpenCLIP twin): 4.35 B image tower
    ("vit_e14", 5_045_004_545)])
def test_registry_sizes(size: str, params: int) -> None:
    cfg = load_config(None, [f"model.size={size}"])
    with torch.device("meta"):
        model = build_model(cfg.model)
    assert isinstance(model, CoCa) == size.startswith("coca")
    assert sum(p.numel() for p in model.parameters()) == params


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("impl", ["sdpa", "triton"])
def test_gpu_coca_bf16_matches_fp32_reference_and_cached_decoding(impl: str) -> None:
    """On the GPU in bf16 (the training dtype) with a fast attention path: caption logits
    match the fp32 reference model, and KV-cache decoding matches the bf16 full forward."""
    ref = _model("model.fusion.pool_queries=5").cuda()
    fast = _model("model.fusion.pool_queries=5", f"model.attention={impl}").cuda()
    fast.load_state_dict(ref.state_dict())
    fast = fast.to(torch.bfloat16)
    images, tokens = torch.randn(4, 3, 16, 16, device="cuda"), _tokens(4, 12, [3, 9, 6, 8]).cuda()
    with torch.no_grad():
        want = F.log_softmax(ref(images, tokens)["caption_logits"].float(), -1)
        got = F.log_softmax(fast(images.bfloat16(), tokens)["caption_logits"].float(), -1)
        torch.testing.assert_close(got, want, atol=0.1, rtol=0.05)
        from mmpretrain.model.generate import _Decoder

        dec = _Decoder(fast, images.bfloat16())
        steps = torch.stack([dec.step(tokens[:, t:t + 1]) for t in range(10)], 1)
        torch.testing.assert_close(steps, got[:, :10], atol=0.1, rtol=0.05)
    assert len(greedy(fast, images.bfloat16(), SPECIAL)) == 4
