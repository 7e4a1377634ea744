"""Contrastive losses: against naive loops, gradcheck, the fused (chunked) losses against the
plain ones, and a 2-rank gloo run vs 1 rank."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from helpers import REPO, clean_env
from mmpretrain.config.schema import LossConfig
from mmpretrain.losses import ClipLoss, SigLipLoss, build_loss, gather_features
from mmpretrain.losses.fused import chunk_rows, infonce, siglip


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


# ---- fused (chunked) losses ----------------------------------------------------------------

def _loss_and_grads(loss_fn, img, txt, use_bias):
    img, txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    scale = torch.tensor([SCALE], dtype=img.dtype, device=img.device, requires_grad=True)
    bias = (torch.tensor([BIAS], dtype=img.dtype, device=img.device, requires_grad=True)
            if use_bias else None)
    loss = loss_fn(img, txt, scale, bias)
    loss.backward()
    out = {"loss": loss.detach(), "img": img.grad, "txt": txt.grad, "scale": scale.grad}
    return out | ({"bias": bias.grad} if use_bias else {})


FUSED_CASES = {  # name -> (plain, fused given a chunk, uses bias)
    "clip": (lambda: ClipLoss(), lambda c: ClipLoss(fused=True, chunk=c), False),
    "clip_local": (lambda: ClipLoss(local_loss=True),
                   lambda c: ClipLoss(local_loss=True, fused=True, chunk=c), False),
    "siglip": (lambda: SigLipLoss(), lambda c: SigLipLoss(fused=True, chunk=c), True),
    "siglip_nobias": (lambda: SigLipLoss(), lambda c: SigLipLoss(fused=True, chunk=c), False),
}


@pytest.mark.parametrize("chunk", [None, 3, 1])
@pytest.mark.parametrize("name", sorted(FUSED_CASES))
def test_fused_loss_matches_plain(name, chunk):
    """The chunked losses with their own backward: the plain loss's value and gradients (img,
    txt, scale, bias) in float64, whether the rows fit one chunk or take 4 or 10."""
    plain, fused, use_bias = FUSED_CASES[name]
    img, txt = _features(n=10, e=6, seed=5)
    want = _loss_and_grads(plain(), img, txt, use_bias)
    got = _loss_and_grads(fused(chunk), img, txt, use_bias)
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-12, atol=1e-14, msg=key)


def test_fused_loss_offset_rows_and_frozen_scale():
    """Rows against a longer column set with the positives offset (one rank's rows of a global
    batch), and a scale without gradient (a cached micro-batch after the first)."""
    g = torch.Generator().manual_seed(7)
    a = F.normalize(torch.randn(4, 5, generator=g, dtype=torch.float64), dim=-1)
    b = F.normalize(torch.randn(12, 5, generator=g, dtype=torch.float64), dim=-1)
    labels = torch.arange(4) + 8
    for chunk in (None, 3):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        scale = torch.tensor(SCALE, dtype=torch.float64)
        loss = infonce(x, y, scale, offset=8, chunk=chunk)
        loss.backward()
        x2, y2 = a.clone().requires_grad_(), b.clone().requires_grad_()
        ref = F.cross_entropy(SCALE * x2 @ y2.T, labels)
        ref.backward()
        torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
        torch.testing.assert_close(x.grad, x2.grad, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(y.grad, y2.grad, rtol=1e-12, atol=1e-14)
        x3 = a.clone().requires_grad_()
        z = -torch.ones(4, 12, dtype=torch.float64)
        z[torch.arange(4), labels] = 1.0
        ref = -F.logsigmoid(z * (SCALE * x3 @ b.T + BIAS)).sum() / 4
        got = siglip(a.clone().requires_grad_(), b, scale, torch.tensor(BIAS), 8, chunk)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="square"):
        infonce(a, b, torch.tensor(1.0), symmetric=True)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_fused_loss_fp32_against_fp64(kind):
    """fp32 features, a large scale and 7 chunks: within fp32 rounding of the fp64 loss."""
    img, txt = _features(n=300, e=64, seed=11)
    make = (lambda c: ClipLoss(fused=True, chunk=c)) if kind == "clip" else (
        lambda c: SigLipLoss(fused=True, chunk=c))
    want = _loss_and_grads(make(None), img, txt, kind == "siglip")
    got = _loss_and_grads(make(45), img.float(), txt.float(), kind == "siglip")
    for key in want:
        torch.testing.assert_close(got[key].double(), want[key], rtol=2e-5, atol=1e-7, msg=key)


def test_fused_loss_keeps_no_square_matrix():
    """What autograd keeps between forward and backward: the plain CLIP loss keeps (N, N)
    tensors, the fused one only the features, the scale and (N,) vectors."""
    n, e = 256, 16
    img, txt = (t.float().requires_grad_() for t in _features(n=n, e=e, seed=2))
    scale = torch.tensor(SCALE, requires_grad=True)
    for fused, chunk in ((False, None), (True, None), (True, 50)):
        shapes = []

        def pack(t):
            shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            ClipLoss(fused=fused, chunk=chunk)(img, txt, scale)
        square = [s for s in shapes if s == (n, n)]
        assert bool(square) is not fused, shapes
    assert chunk_rows(4096) == 4096 and chunk_rows(32768) == 512 and chunk_rows(1 << 30) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_fused_loss_on_cuda(kind):
    """On the GPU (fp32 features, 4 chunks): the fp64 loss and gradients to fp32 rounding,
    as the plain loss on the GPU is."""
    img, txt = _features(n=1200, e=128, seed=4)
    plain, fused, use_bias = FUSED_CASES[kind]
    want = _loss_and_grads(plain(), img, txt, use_bias)
    cuda = [t.float().cuda() for t in (img, txt)]
    for loss in (plain(), fused(300)):
        got = _loss_and_grads(loss, *cuda, use_bias)
        for key in want:
            torch.testing.assert_close(got[key].double().cpu(), want[key], rtol=2e-5,
                                       atol=1e-7, msg=key)


def test_bench_loss_cli(tmp_path):
    """`mmpretrain bench loss`: every (kind, batch, impl) cell; plain and fused agree on the
    loss, and the fused loss keeps almost nothing for its backward."""
    out = tmp_path / "loss.json"
    proc = subprocess.run([sys.executable, "-m", "mmpretrain.cli", "bench", "loss", "--batches",
                           "96,160", "--width", "32", "--warmup", "0", "--iters", "1",
                           "--device", "cpu", "--tf32", "--json", str(out)], cwd=REPO,
                          env=clean_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "ms fwd+bwd" in proc.stdout and "saved MiB" in proc.stdout
    assert "TF32 matmuls" in proc.stdout
    records = json.loads(out.read_text())
    assert all(r["tf32"] for r in records)
    cells = {(r["kind"], r["batch"], r["impl"]): r for r in records}
    assert len(cells) == 8
    for kind in ("clip", "siglip"):
        for n in (96, 160):
            plain, fused = cells[kind, n, "plain"], cells[kind, n, "fused"]
            assert math.isclose(plain["loss"], fused["loss"], rel_tol=1e-5)
            assert plain["ms"] > 0 and fused["ms"] > 0 and "peak_mib" not in plain
            assert fused["saved_mib"] < 0.01 < plain["saved_mib"]
    bad = subprocess.run([sys.executable, "-m", "mmpretrain.cli", "bench", "loss", "--kinds",
                          "triplet"], cwd=REPO, env=clean_env(), capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "unknown kind ['triplet']" in bad.stderr


def test_bench_loss_restores_the_tf32_flag():
    from mmpretrain.losses.bench import bench_loss

    before = torch.backends.cuda.matmul.allow_tf32
    records = bench_loss(["clip"], ["fused"], [8], 4, torch.device("cpu"), 0, 1,
                         tf32=not before)
    assert records[0]["tf32"] is (not before) and records[0]["ms"] > 0
    assert torch.backends.cuda.matmul.allow_tf32 is before


# ---- two ranks over gloo -------------------------------------------------------------------

# name -> (loss factory, uses bias)
DIST_CASES = {
    "clip": (lambda: ClipLoss(local_loss=False, gather_with_grad=True), False),
    "clip_local": (lambda: ClipLoss(local_loss=True, gather_with_grad=True), False),
    "clip_nograd": (lambda: ClipLoss(local_loss=False, gather_with_grad=False), False),
    "siglip": (lambda: SigLipLoss(gather_with_grad=True), True),
    "siglip_nograd": (lambda: SigLipLoss(gather_with_grad=False), True),
    # the fused losses, in chunks of 3 rows (so ranks' rows span chunks): equal to the above
    "clip_fused": (lambda: ClipLoss(fused=True, chunk=3), False),
    "clip_local_fused": (lambda: ClipLoss(local_loss=True, fused=True, chunk=3), False),
    "clip_nograd_fused": (lambda: ClipLoss(gather_with_grad=False, fused=True, chunk=3), False),
    "siglip_fused": (lambda: SigLipLoss(fused=True, chunk=3), True),
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


@pytest.mark.parametrize("name", ["clip", "clip_local", "clip_nograd", "siglip"])
def test_two_ranks_fused_equals_plain(two_rank_results, name):
    """On every rank the fused loss gives the plain loss's value and gradients."""
    _, ranks, single = two_rank_results
    for result in [*ranks, single]:
        want, got = result[name], result[name + "_fused"]
        assert want.keys() == got.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-12, atol=1e-14, msg=key)
