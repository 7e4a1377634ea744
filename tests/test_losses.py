"""Contrastive losses: against naive loops, gradcheck, and a 2-rank gloo run vs 1 rank."""
from __future__ import annotations

import math
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mmpretrain.config.schema import LossConfig
from mmpretrain.losses import ClipLoss, SigLipLoss, build_loss, gather_features


def naive_clip(img, txt, scale):
    """Float64 loops: mean of image->text and text->image cross-entropy."""
    n = img.shape[0]
    total = 0.0
    for a, b in ((img, txt), (txt, img)):
        for i in range(n):
            logits = [scale * float(a[i] @ b[j]) for j in range(n)]
            top = max(logits)
            lse = top + math.log(sum(math.exp(x - top) for x in logits))
            total += (lse - logits[i]) / n
    return total / 2


def naive_siglip(img, txt, scale, bias):
    """Float64 loops: -1/n sum_ij log sigmoid(z_ij (scale x_i.y_j + bias))."""
    n, m = img.shape[0], txt.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(m):
            z = 1.0 if i == j else -1.0
            x = z * (scale * float(img[i] @ txt[j]) + bias)
            total += math.log1p(math.exp(-x)) if x > 0 else -x + math.log1p(math.exp(x))
    return total / n


def _features(n=8, e=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, e, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(img + 0.8 * torch.randn(n, e, generator=g, dtype=torch.float64), dim=-1)
    return img, txt


@pytest.mark.parametrize("local_loss", [False, True])
def test_clip_loss_matches_naive(local_loss):
    img, txt = _features()
    scale = torch.tensor(14.3, dtype=torch.float64)
    loss = ClipLoss(local_loss=local_loss)(img, txt, scale)
    assert loss.dim() == 0
    assert math.isclose(loss.item(), naive_clip(img, txt, 14.3), rel_tol=1e-12)
    # A model-style shape-[1] scale and an (ignored) bias give the same value.
    same = ClipLoss()(img, txt, scale.view(1), torch.tensor([-3.0], dtype=torch.float64))
    assert same.dim() == 0 and math.isclose(same.item(), loss.item(), rel_tol=1e-12)


def test_siglip_loss_matches_naive():
    img, txt = _features()
    loss = SigLipLoss()(img, txt, torch.tensor(10.0, dtype=torch.float64),
                        torch.tensor([-10.0], dtype=torch.float64))
    assert loss.dim() == 0
    assert math.isclose(loss.item(), naive_siglip(img, txt, 10.0, -10.0), rel_tol=1e-12)
    unbiased = SigLipLoss()(img, txt, torch.tensor(3.0, dtype=torch.float64))
    assert math.isclose(unbiased.item(), naive_siglip(img, txt, 3.0, 0.0), rel_tol=1e-12)


def test_gradcheck_both_losses():
    img, txt = _features(n=4, e=3)
    img.requires_grad_()
    txt.requires_grad_()
    scale = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor([-1.5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ClipLoss(), (img, txt, scale))
    assert torch.autograd.gradcheck(ClipLoss(local_loss=True), (img, txt, scale))
    assert torch.autograd.gradcheck(SigLipLoss(), (img, txt, scale, bias))


def test_build_loss_and_single_process_gather():
    assert isinstance(build_loss(LossConfig(kind="clip", local_loss=True)), ClipLoss)
    assert build_loss(LossConfig(kind="clip", local_loss=True)).local_loss
    assert isinstance(build_loss(LossConfig(kind="siglip")), SigLipLoss)
    img, txt = _features()
    out = gather_features(img, txt, gather_with_grad=True, local_loss=False)
    assert out[0] is img and out[1] is txt
    with pytest.raises(ValueError, match="loss.kind"):
        build_loss(LossConfig(kind="triplet"))  # type: ignore[arg-type]


# ---- two ranks over gloo -------------------------------------------------------------------

# name -> (loss factory, uses bias)
DIST_CASES = {
    "clip": (lambda: ClipLoss(local_loss=False, gather_with_grad=True), False),
    "clip_local": (lambda: ClipLoss(local_loss=True, gather_with_grad=True), False),
    "clip_nograd": (lambda: ClipLoss(local_loss=False, gather_with_grad=False), False),
    "siglip": (lambda: SigLipLoss(gather_with_grad=True), True),
    "siglip_nograd": (lambda: SigLipLoss(gather_with_grad=False), True),
}
SCALE, BIAS = 7.0, -2.0


def _run_case(name: str, img: torch.Tensor, txt: torch.Tensor) -> dict[str, torch.Tensor]:
    factory, use_bias = DIST_CASES[name]
    img = img.clone().requires_grad_()
    txt = txt.clone().requires_grad_()
    scale = torch.tensor([SCALE], dtype=torch.float64, requires_grad=True)
    bias = torch.tensor([BIAS], dtype=torch.float64, requires_grad=True) if use_bias else None
    loss = factory()(img, txt, scale, bias)
    loss.backward()
    out = {"loss": loss.detach(), "img": img.grad, "txt": txt.grad, "scale": scale.grad}
    if bias is not None:
        out["bias"] = bias.grad
    return out


def _worker(rank: int, world: int, port: int, outdir: str, img: torch.Tensor,
            txt: torch.Tensor) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        b = img.shape[0] // world
        rows = slice(rank * b, (rank + 1) * b)
        results = {name: _run_case(name, img[rows], txt[rows]) for name in DIST_CASES}
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_results():
    world = 2
    img, txt = _features(n=8, e=6, seed=3)
    with tempfile.TemporaryDirectory() as outdir:
        mp.spawn(_worker, args=(world, _free_port(), outdir, img, txt), nprocs=world, join=True)
        ranks = [torch.load(os.path.join(outdir, f"rank{r}.pt")) for r in range(world)]
    single = {name: _run_case(name, img, txt) for name in DIST_CASES}
    return world, ranks, single


@pytest.mark.parametrize("name", sorted(DIST_CASES))
def test_two_ranks_loss_mean_equals_one_rank(two_rank_results, name):
    world, ranks, single = two_rank_results
    mean_loss = sum(r[name]["loss"] for r in ranks) / world
    torch.testing.assert_close(mean_loss, single[name]["loss"], rtol=1e-12, atol=1e-12)
    if name in ("clip", "clip_nograd"):  # without local_loss every rank computes the full loss
        for r in ranks:
            torch.testing.assert_close(r[name]["loss"], single[name]["loss"])


@pytest.mark.parametrize("name", ["clip", "clip_local", "siglip"])
def test_two_ranks_gradients_with_grad_gather(two_rank_results, name):
    """Each rank's local feature grad is W x the 1-rank grad of its slice (the gather's backward
    sums all ranks' contributions); DDP/DeepSpeed averaging over ranks then gives exact
    parameter grads. Replicated scalars (scale, bias): the mean over ranks equals 1-rank."""
    world, ranks, single = two_rank_results
    for key in ("img", "txt"):
        got = torch.cat([r[name][key] for r in ranks]) / world
        torch.testing.assert_close(got, single[name][key], rtol=1e-10, atol=1e-12)
    for key in [k for k in ("scale", "bias") if k in single[name]]:
        mean = sum(r[name][key] for r in ranks) / world
        torch.testing.assert_close(mean, single[name][key], rtol=1e-10, atol=1e-12)


def test_two_ranks_gradients_without_grad_gather(two_rank_results):
    """ClipLoss, local_loss=False, no-grad gather: each rank's local feature grad is exactly the
    1-rank grad of its slice (no factor W), so averaged parameter grads are dL/dθ / W."""
    _, ranks, single = two_rank_results
    for key in ("img", "txt"):
        got = torch.cat([r["clip_nograd"][key] for r in ranks])
        torch.testing.assert_close(got, single["clip_nograd"][key], rtol=1e-10, atol=1e-12)
