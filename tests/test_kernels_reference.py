"""Attention kernels: the reference against an explicit float64 loop, and the dispatcher."""
from __future__ import annotations

import logging
import math

import pytest
import torch

from mmpretrain import kernels
from mmpretrain.kernels import attention, attention_packed, attention_reference, causal_mask


def naive_attention(q, k, v, causal=False, key_padding_mask=None, scale=None):
    """Float64 triple loop with the documented semantics (bottom-right causal, empty row -> 0)."""
    b_, h_, sq, d = q.shape
    sk = k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros(b_, h_, sq, d, dtype=torch.float64)
    for b in range(b_):
        for h in range(h_):
            for i in range(sq):
                keys = [j for j in range(sk)
                        if (not causal or j <= i + sk - sq)
                        and (key_padding_mask is None or bool(key_padding_mask[b, j]))]
                if not keys:
                    continue
                s = torch.stack([(q[b, h, i] * k[b, h, j]).sum() * scale for j in keys])
                p = torch.softmax(s, dim=0)
                out[b, h, i] = sum(p[n] * v[b, h, j] for n, j in enumerate(keys))
    return out


def _qkv(b=2, h=3, sq=5, sk=5, d=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, s, d, generator=g, dtype=dtype) for s in (sq, sk, sk))


def _padding(b, sk, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, sk, generator=g) > 0.4
    mask[0] = False  # a fully padded batch row: every query of it sees no key
    mask[1, 0] = True
    return mask


CASES = [
    # (sq, sk, causal, padded)
    (5, 5, False, False), (5, 5, True, False), (3, 7, True, False), (7, 3, True, False),
    (5, 5, False, True), (5, 5, True, True), (3, 7, True, True), (4, 6, False, True),
]


def test_causal_mask_is_bottom_right():
    assert torch.equal(causal_mask(3, 3), torch.ones(3, 3, dtype=torch.bool).tril())
    m = causal_mask(2, 4)  # last query sees every key
    assert m.tolist() == [[True, True, True, False], [True, True, True, True]]
    m = causal_mask(4, 2)  # first two queries see no key
    assert m.tolist() == [[False, False], [False, False], [True, False], [True, True]]


@pytest.mark.parametrize("sq,sk,causal,padded", CASES)
def test_reference_matches_naive_loop(sq, sk, causal, padded):
    q, k, v = _qkv(sq=sq, sk=sk, dtype=torch.float64)
    mask = _padding(2, sk) if padded else None
    out = attention_reference(q, k, v, causal=causal, key_padding_mask=mask)
    expected = naive_attention(q, k, v, causal, mask)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    fp32 = attention_reference(q.float(), k.float(), v.float(), causal=causal,
                               key_padding_mask=mask)
    assert fp32.dtype == torch.float32
    torch.testing.assert_close(fp32.double(), expected, rtol=1e-5, atol=1e-5)


def test_custom_scale_and_low_precision_dtype():
    q, k, v = _qkv(dtype=torch.float64)
    out = attention_reference(q, k, v, scale=0.3)
    torch.testing.assert_close(out, naive_attention(q, k, v, scale=0.3), rtol=1e-10, atol=1e-12)
    out16 = attention_reference(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.double(), naive_attention(q, k, v), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("impl", ["reference", "sdpa"])
def test_fully_masked_rows_are_zero_with_finite_grads(impl):
    q, k, v = (t.requires_grad_() for t in _qkv(sq=6, sk=4))
    mask = _padding(2, 4)
    out = attention(q, k, v, causal=True, key_padding_mask=mask, impl=impl)
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all()  # batch row 0 is fully padded
    assert (out[:, :, :2] == 0).all()  # Sq > Sk: the first Sq - Sk queries see no key
    out.square().sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[0] == 0).all() and (k.grad[0] == 0).all() and (v.grad[0] == 0).all()


@pytest.mark.parametrize("sq,sk,causal,padded", CASES)
def test_sdpa_matches_reference(sq, sk, causal, padded):
    q, k, v = _qkv(sq=sq, sk=sk)
    mask = _padding(2, sk) if padded else None
    ref = attention(q, k, v, causal=causal, key_padding_mask=mask, impl="reference")
    out = attention(q, k, v, causal=causal, key_padding_mask=mask, impl="sdpa")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "sdpa"])
@pytest.mark.parametrize("causal", [False, True])
def test_packed_equals_unpacked(impl, causal):
    b, s, h, d = 2, 6, 3, 8
    qkv = torch.randn(b, s, 3, h, d)
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[1, 4:] = False
    out = attention_packed(qkv, causal=causal, key_padding_mask=mask, impl=impl)
    assert out.shape == (b, s, h, d)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, S, D)
    ref = attention_reference(q, k, v, causal=causal, key_padding_mask=mask)
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_dispatch_auto_default_and_errors(caplog):
    q, k, v = _qkv()
    try:
        assert kernels.resolve_impl("auto", q) == "reference"  # CPU
        assert kernels.resolve_impl("sdpa", q) == "sdpa"
        kernels.set_default_impl("sdpa")
        assert kernels.resolve_impl("auto", q) == "sdpa"
        assert kernels.resolve_impl("reference", q) == "reference"  # explicit wins
    finally:
        kernels.set_default_impl("auto")
    with pytest.raises(ValueError, match="model.attention"):
        kernels.set_default_impl("flash")
    with pytest.raises(ValueError, match="unknown attention implementation"):
        attention(q, k, v, impl="flash")
    with pytest.raises(ValueError, match="key_padding_mask"):
        attention(q, k, v, key_padding_mask=torch.ones(2, 4, dtype=torch.bool))
    kernels._logged.clear()
    with caplog.at_level(logging.INFO, logger="mmpretrain.kernels"):
        for _ in range(3):
            attention(q, k, v, impl="sdpa", causal=True)
        attention(q, k, v, impl="sdpa", causal=False)
    lines = [r.getMessage() for r in caplog.records if r.name == "mmpretrain.kernels"]
    assert len(lines) == 2 and all("sdpa" in line for line in lines)


def test_uniform_attention_sanity():
    # Identical keys: attention is the plain mean of the visible values.
    q = torch.randn(1, 1, 4, 2)
    k = torch.zeros(1, 1, 4, 2)
    v = torch.arange(4.0).view(1, 1, 4, 1).expand(1, 1, 4, 2)
    out = attention_reference(q, k, v, causal=True)
    expected = torch.tensor([0.0, 0.5, 1.0, 1.5]).view(1, 1, 4, 1).expand(1, 1, 4, 2)
    torch.testing.assert_close(out, expected)
    assert math.isclose(float(out.sum()), 2 * 3.0)
