"""The fused Triton attention: interpreter parity on CPU (subprocess), dispatch, GPU parity.

CPU parity runs `tests/triton_checks.py` under TRITON_INTERPRET=1 (it must be set before triton
is imported, so not in this process). GPU tests are marked `gpu` and skip without CUDA.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch

from helpers import REPO, clean_env, losses, run_train
from mmpretrain import kernels
from mmpretrain.config.schema import ModelConfig

pytest.importorskip("triton")

CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_interpreter_parity(dtype: str) -> None:
    """Output and dq/dk/dv within per-dtype bounds of the float64 reference (see the script)."""
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "triton_checks.py"), dtype],
                          cwd=REPO, env=clean_env(TRITON_INTERPRET="1"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["dtype"] == dtype and not report["failed"]
    assert max(report["max_err"].values()) <= report["tolerance"]
    # the resident backward ran: every @resident case, its extreme scores, one tile set
    assert report["resident_launches"] >= 14 + 3 + 5
    # the chunked plan summed several chunks: the cases with Sq > 32, two extreme-score
    # cases, the tile cases
    assert report["chunk_sums"] >= 8 + 2 + 5


def test_interpreter_compiled_blocks_have_no_graph_break() -> None:
    """Inside torch.compile the kernel is a custom op (kernels/ops.py): opcheck passes, the
    image, causal padded text and decoder blocks compile with fullgraph=True and match eager,
    and so does the tiny CoCa compiled as one graph through its compiled blocks."""
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "triton_compile_checks.py")],
                          cwd=REPO, env=clean_env(TRITON_INTERPRET="1"), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["opchecks"] == 12 and not report["failed"]
    assert sorted(report["blocks"]) == ["decoder_cross", "image", "text_causal_padded"]
    assert list(report["model"]) == ["coca_one_graph"]
    assert report["worst"] <= report["tolerance"]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="interpreter is on")
def test_cpu_without_interpreter_is_a_clear_error() -> None:
    q = torch.randn(1, 2, 4, 32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernels.attention(q, q, q, impl="triton")


def test_dispatch_registration() -> None:
    assert "triton" in kernels.available_impls()
    assert kernels.resolve_impl("triton", torch.randn(1, 1, 2, 32)) == "triton"
    assert kernels.resolve_impl("auto", torch.randn(1, 1, 2, 32)) == "reference"  # CPU
    assert ModelConfig(attention="triton").attention == "triton"


def test_auto_choice_on_cuda_tensors() -> None:
    """`supports` (what `auto` uses on CUDA) accepts only CUDA fp16/bf16 with D <= 128."""
    from mmpretrain.kernels.attention_triton import supports

    q = torch.empty(1, 1, 2, 64, device="meta", dtype=torch.bfloat16)
    assert not supports(q)  # not CUDA
    if CUDA:
        assert supports(torch.empty(1, 1, 2, 64, device="cuda", dtype=torch.bfloat16))
        assert not supports(torch.empty(1, 1, 2, 64, device="cuda", dtype=torch.float32))
        assert not supports(torch.empty(1, 1, 2, 256, device="cuda", dtype=torch.float16))


def test_bench_without_cuda_exits_cleanly() -> None:
    if CUDA:
        pytest.skip("CUDA present: the benchmark would really run")
    proc = subprocess.run([sys.executable, "-m", "mmpretrain.cli", "bench", "attention"],
                          cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "CUDA" in proc.stderr


# ---------------------------------------------------------------- GPU (skipped without CUDA)

GPU_SHAPES = [  # (B, H, Sq, Sk, D, causal, padded)
    (8, 12, 197, 197, 64, False, False),  # ViT-B/16: 5-row/key ragged tails (16-wide blocks)
    (4, 16, 257, 257, 64, False, False),  # ViT-L/14: 1-row tails
    (16, 8, 77, 77, 64, True, True),  # text tower, causal with padding
    (4, 8, 77, 257, 64, False, True),  # cross-attention
    (4, 8, 197, 197, 80, True, False),
    (4, 8, 257, 257, 128, False, True),
]
GPU_TOL = {torch.float16: 1e-2, torch.bfloat16: 3e-2}  # of max |ref|, vs float64 reference


HEURISTIC_SHAPES = [(64, 12, 197, 197, 64, False, False), (128, 8, 77, 77, 64, True, True)]


@pytest.fixture(scope="module", autouse=True)
def _gpu_kernels_compiled_first() -> Iterator[None]:
    """On a GPU, compile every GPU case's kernels in parallel processes before the tests run
    (`kernels/precompile.py`, as `bench attention` does): one after another they would take
    most of a short device session. Only a speed-up: a failure here leaves the JIT to it."""
    if CUDA:
        try:
            from mmpretrain.kernels.attention_triton import device_arch, device_sms
            from mmpretrain.kernels.precompile import case_jobs, default_workers, precompile

            arch, sms = device_arch(torch.device("cuda")), device_sms(torch.device("cuda"))
            jobs = case_jobs(GPU_SHAPES, list(GPU_TOL), ["split", "fused", "resident",
                                                         "chunked"], arch, sms)
            jobs += case_jobs(HEURISTIC_SHAPES, [torch.bfloat16], [""], arch, sms)
            print("precompiled:", precompile(jobs, default_workers()))
        except Exception as e:  # noqa: BLE001
            print(f"precompile skipped ({type(e).__name__}: {e})")
    yield


def _gpu_case(shape: tuple, dtype: torch.dtype, plan: str = "") -> dict[str, float]:
    """Errors of one case; `plan` "split" / "fused" / "resident" / "chunked" forces that
    backward ("": heuristic). A case the plan has no tile for (resident: Sq > 256 or D > 64;
    chunked: D > 64) is skipped."""
    from mmpretrain.kernels.attention_triton import device_arch, tile_override
    from mmpretrain.kernels.bench import plan_override

    try:
        override = plan_override(f"triton_{plan}", shape[4],
                                 device_arch(torch.device("cuda")), shape[2])
    except ValueError as e:
        pytest.skip(str(e))
    with tile_override(**override):
        return _gpu_errors(shape, dtype)


def _gpu_errors(shape: tuple, dtype: torch.dtype) -> dict[str, float]:
    from mmpretrain.kernels.attention_triton import attention_triton

    batch, heads, sq, sk, dim, causal, padded = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(batch, heads, s, dim, device="cuda", generator=gen).to(dtype)
               .requires_grad_() for s in (sq, sk, sk))
    kpm = None
    if padded:
        lengths = torch.randint(1, sk + 1, (batch,), device="cuda", generator=gen)
        kpm = torch.arange(sk, device="cuda")[None] < lengths[:, None]  # (B, Sk)
        kpm[0] = False  # a fully padded sample
    out = attention_triton(q, k, v, causal=causal, key_padding_mask=kpm)
    do = torch.randn(out.shape, device="cuda", generator=gen).to(dtype)  # seeded: repeatable
    out.backward(do)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = kernels.attention_reference(qd, kd, vd, causal=causal, key_padding_mask=kpm)
    ref.backward(do.double())
    pairs = zip(("out", "dq", "dk", "dv"), (out, q.grad, k.grad, v.grad),
                (ref, qd.grad, kd.grad, vd.grad))
    return {name: ((x.double() - r).abs().max() / r.abs().max().clamp_min(1e-2)).item()
            for name, x, r in pairs}


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s[:5])))
@pytest.mark.parametrize("plan", ["split", "fused", "resident", "chunked"])
def test_gpu_parity(shape: tuple, dtype: torch.dtype, plan: str) -> None:
    errs = _gpu_case(shape, dtype, plan)
    assert max(errs.values()) <= GPU_TOL[dtype], errs


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_heuristic_plan_at_model_batch() -> None:
    """ViT-B/16 and the causal padded text tower at training batch sizes: the heuristic's own
    choice (the resident backward on an H100/H200: both fit one query block) is run, bf16,
    and bitwise repeatable."""
    from mmpretrain.kernels.attention_triton import _use_fused, device_sms

    for shape in HEURISTIC_SHAPES:
        print(shape, "fused" if _use_fused(shape[2], shape[3], shape[0] * shape[1],
                                           device_sms(torch.device("cuda"))) else "split")
        first, again = _gpu_case(shape, torch.bfloat16), _gpu_case(shape, torch.bfloat16)
        assert max(first.values()) <= GPU_TOL[torch.bfloat16], first
        assert first == again  # no atomics: the same inputs give the same gradients


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_packed_matches_unpacked() -> None:
    qkv = torch.randn(4, 197, 3, 12, 64, device="cuda", dtype=torch.bfloat16,
                      requires_grad=True)
    out = kernels.attention_packed(qkv, impl="triton")  # (B, S, H, D)
    ref = kernels.attention_packed(qkv, impl="sdpa")
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    (g1,) = torch.autograd.grad(out.float().square().sum(), qkv)
    (g2,) = torch.autograd.grad(ref.float().square().sum(), qkv)
    torch.testing.assert_close(g1, g2, atol=5e-2, rtol=5e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_training_kernel_on_vs_off(tmp_path: Path) -> None:
    """A short bf16 run gives the same losses with the Triton kernel and with SDPA."""
    traces = {}
    for impl in ("triton", "sdpa"):
        run_train([f"output_dir={tmp_path}", f"name={impl}", "optim.steps=20",
                   "engine.zero_stage=0", "engine.device=cuda", "engine.precision=bf16",
                   "checkpoint.every=0", "logging.log_every=1", "logging.wandb_mode=disabled",
                   f"model.attention={impl}"])
        traces[impl] = losses(tmp_path / impl)
    assert sorted(traces["triton"]) == sorted(traces["sdpa"])
    for step, loss in traces["sdpa"].items():
        assert abs(traces["triton"][step] - loss) <= 0.05 * max(1.0, abs(loss)), (step, traces)
