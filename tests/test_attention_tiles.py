"""Tile overrides of the Triton attention kernel and the tile sweep of `bench attention --sweep`.

* Overrides on CPU: this file doubles as a script run under TRITON_INTERPRET=1 (it must be set
  before triton is imported, so in a subprocess); it launches forward + backward with several
  overrides, records the launched tiles and compares with the float64 reference using the
  tolerances of `tests/triton_checks.py`.
* Validation, candidate generation, best selection and the table run in-process with a fake
  timer (no CUDA, no Triton launch); the CLI without CUDA must fail with a clear message.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import REPO, clean_env
from mmpretrain.kernels import attention_triton as at
from mmpretrain.kernels import bench, sweep
from mmpretrain.kernels.attention_triton import Blocks, set_tile_override, tile_override

pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
B, H, SQ, SK, D = 1, 2, 40, 40, 32  # tiny: the interpreter is slow
# name -> (tile_override kwargs, expected launched (BLOCK_M, BLOCK_N) of fwd, dkdv, dq or
# fused; at B * H = 2 the heuristic plan is the split one, `bwd_fused` forces the fused one)
OVERRIDES: dict[str, tuple[dict, dict]] = {
    "default": ({}, {"fwd": (32, 32), "dkdv": (32, 32), "dq": (32, 32)}),
    "16x16": ({"fwd": Blocks(16, 16), "bwd_kv": Blocks(16, 16, warps=2),
               "bwd_q": Blocks(16, 16, stages=3)},
              {"fwd": (16, 16), "dkdv": (16, 16), "dq": (16, 16)}),
    "32x64": ({"fwd": Blocks(32, 64, warps=8), "bwd_kv": Blocks(16, 64),
               "bwd_q": Blocks(64, 32)},
              {"fwd": (32, 64), "dkdv": (16, 64), "dq": (64, 32)}),
    "fused16x32": ({"fwd": Blocks(16, 16), "bwd_fused": Blocks(16, 32, warps=8, stages=1)},
                   {"fwd": (16, 16), "fused": (16, 32)}),
}
KERNEL_KEYS = {"fwd": "fwd", "bwd_kv": "dkdv", "bwd_q": "dq", "bwd_fused": "fused"}
# A tile table entry for the (SQ, SK, D, causal) calls below; B * H = 2 programs are too few
# for the fused plan even though it "measured" faster, so the split tiles are launched.
TABLE_CHOICE = at._tiles.TileChoice(fwd=Blocks(16, 32), split=(Blocks(16, 32), Blocks(32, 16)),
                                    fused=Blocks(16, 16), fused_faster=True)


# ---------------------------------------------------------------- interpreter (subprocess)

class _Spy:
    """Stands in for a `@triton.jit` kernel: records each launch's grid and tiles, then runs it."""

    def __init__(self, kernel: object, calls: list[dict]) -> None:
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid: tuple):  # noqa: ANN204
        def launch(*args: object, **kwargs: object) -> object:
            self.calls.append({"grid": list(grid), **{k: kwargs.get(k) for k in (
                "BLOCK_M", "BLOCK_N", "num_warps", "num_stages")}})
            return self.kernel[grid](*args, **kwargs)
        return launch


def _run_case(override: dict, dtype: torch.dtype, packed: bool) -> dict:
    """Causal, padded forward + backward under `override`; launched tiles and errors."""
    from mmpretrain.kernels import attention, attention_packed, triton_bwd, triton_fwd
    from triton_checks import _reference, _rel_err

    calls: dict[str, list[dict]] = {}
    names = {"fwd": (triton_fwd, "_attn_fwd"), "dkdv": (triton_bwd, "_attn_bwd_dkdv"),
             "dq": (triton_bwd, "_attn_bwd_dq"), "pre": (triton_bwd, "_attn_bwd_preprocess"),
             "fused": (triton_bwd, "_attn_bwd_fused")}
    originals = {key: getattr(mod, attr) for key, (mod, attr) in names.items()}
    for key, (mod, attr) in names.items():
        setattr(mod, attr, _Spy(originals[key], calls.setdefault(key, [])))
    gen = torch.Generator().manual_seed(0)
    kpm = torch.arange(SK)[None] < torch.tensor([SK - 7])[:, None]  # (B, Sk): 7 padded keys
    try:
        with tile_override(**override):
            if packed:
                qkv = torch.randn(B, SQ, 3, H, D, generator=gen).to(dtype).requires_grad_()
                out = attention_packed(qkv, causal=True, key_padding_mask=kpm,
                                       impl="triton").transpose(1, 2)  # (B, H, S, D)
                q, k, v = qkv.detach().permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, S, D)
            else:
                q, k, v = (torch.randn(B, H, s, D, generator=gen).to(dtype).requires_grad_()
                           for s in (SQ, SK, SK))
                out = attention(q, k, v, causal=True, key_padding_mask=kpm, impl="triton")
            do = torch.randn(out.shape, generator=gen).to(dtype)  # (B, H, Sq, D)
            out.backward(do)
    finally:
        for key, (mod, attr) in names.items():
            setattr(mod, attr, originals[key])
    grads = (qkv.grad.permute(2, 0, 3, 1, 4).unbind(0) if packed
             else (q.grad, k.grad, v.grad))
    ref = _reference(q, k, v, do, True, kpm)
    errs = {n: _rel_err(x, r) for n, x, r in zip(("out", "dq", "dk", "dv"), (out, *grads), ref)}
    return {"calls": calls, "errs": errs,
            "restored": at._override == dict.fromkeys(at._tiles._OVERRIDE_KEYS)}


def _interpreter_main() -> int:
    """Print one JSON line {dtype: {case: {calls, errs, restored}}, "tolerance": {...}}."""
    from triton_checks import TOLERANCE

    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    report: dict = {"tolerance": TOLERANCE}
    for dtype_name in ("float32", "float16"):
        dtype = getattr(torch, dtype_name)
        report[dtype_name] = {name: _run_case(ov, dtype, False)
                              for name, (ov, _) in OVERRIDES.items()}
        report[dtype_name]["32x64_packed"] = _run_case(OVERRIDES["32x64"][0], dtype, True)
        report[dtype_name]["fused_packed"] = _run_case(OVERRIDES["fused16x32"][0], dtype, True)
        # a loaded tile table for this shape class (kernels/tiles.py), no override
        at._tiles._table[(SQ, SK, D, True)] = TABLE_CHOICE
        try:
            report[dtype_name]["table"] = _run_case({}, dtype, False)
        finally:
            at._tiles.clear_tile_table()
    print(json.dumps(report))
    return 0


@pytest.fixture(scope="module")
def interp_report() -> dict:
    proc = subprocess.run([sys.executable, __file__], cwd=REPO,
                          env=clean_env(TRITON_INTERPRET="1"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_override_changes_launched_tiles(interp_report: dict, dtype: str) -> None:
    cases = interp_report[dtype]
    table = ({}, {"fwd": (16, 32), "dkdv": (16, 32), "dq": (32, 16)})
    for name, (override, expected) in [*OVERRIDES.items(), ("32x64_packed", OVERRIDES["32x64"]),
                                       ("fused_packed", OVERRIDES["fused16x32"]),
                                       ("table", table)]:
        calls = cases[name]["calls"]
        launched = {k for k in ("fwd", "dkdv", "dq", "fused") if calls[k]}
        assert launched == set(expected), (name, launched)  # one backward plan, not both
        for kernel, (m, n) in expected.items():
            if kernel == "fwd":  # the whole query blocks, then the ragged rows' own block
                fwd = [(c["BLOCK_M"], c["BLOCK_N"], c["grid"]) for c in calls["fwd"]]
                assert fwd == [(bm, n, [blocks, B * H]) for bm, _, blocks
                               in at._query_launches(SQ, m)], (name, fwd)
                continue
            assert len(calls[kernel]) == 1, (name, kernel, calls)
            launch = calls[kernel][0]
            assert (launch["BLOCK_M"], launch["BLOCK_N"]) == (m, n), (name, kernel, launch)
            rows, blk = (SK, n) if kernel == "dkdv" else (SQ, m)  # dkdv: grid over key blocks
            grid = [B * H] if kernel == "fused" else [-(-rows // blk), B * H]
            assert launch["grid"] == grid, (name, kernel, launch)
        # delta uses the query block of the dQ (or fused) kernel
        assert calls["pre"][0]["BLOCK_M"] == expected.get("dq", expected.get("fused"))[0]
        for key, kernel in KERNEL_KEYS.items():
            if key in override:
                assert calls[kernel][0]["num_warps"] == override[key].warps
                assert calls[kernel][0]["num_stages"] == override[key].stages
        assert cases[name]["restored"], f"{name}: override not restored after the with block"


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_override_matches_reference(interp_report: dict, dtype: str) -> None:
    tol = interp_report["tolerance"][dtype]
    for name, case in interp_report[dtype].items():
        assert max(case["errs"].values()) <= tol, (name, case["errs"])


# ---------------------------------------------------------------- validation (in-process)

@pytest.mark.parametrize("kwargs, field", [
    ({"fwd": Blocks(24, 32)}, "fwd.m"),
    ({"fwd": Blocks(8, 32)}, "fwd.m"),
    ({"bwd_kv": Blocks(32, 48)}, "bwd_kv.n"),
    ({"bwd_q": Blocks(32, 32, warps=3)}, "bwd_q.warps"),
    ({"bwd_q": Blocks(32, 32, warps=32)}, "bwd_q.warps"),
    ({"fwd": Blocks(32, 32, stages=0)}, "fwd.stages"),
    ({"fwd": Blocks(32, 32, stages=2.0)}, "fwd.stages"),  # type: ignore[arg-type]
    ({"bwd_kv": Blocks(True, 32)}, "bwd_kv.m"),  # type: ignore[arg-type]
    ({"fwd": (64, 64)}, "fwd"),
])
def test_invalid_override_names_the_field(kwargs: dict, field: str) -> None:
    before = dict(at._override)
    with pytest.raises(ValueError, match=rf"tile override {field}\b"):
        set_tile_override(**{"bwd_q": Blocks(16, 16), **kwargs})  # a valid one is not set
    with pytest.raises(ValueError, match=rf"{field}\b"):
        with tile_override(**kwargs):
            pass
    assert at._override == before


def test_override_state_and_restore() -> None:
    fwd = Blocks(64, 32, warps=2, stages=1)
    assert at._fwd_tiles(197, 64) == at._fwd_blocks(197, 64)
    with tile_override(fwd=fwd, bwd_q=Blocks(16, 16)):
        assert at._fwd_tiles(197, 64) == fwd
        assert at._bwd_tiles(64) == (at._bwd_blocks(64)[0], Blocks(16, 16))
        with tile_override():  # nested, all None: the heuristics again
            assert at._fwd_tiles(197, 64) == at._fwd_blocks(197, 64)
        assert at._fwd_tiles(197, 64) == fwd
    assert at._override == dict.fromkeys(at._tiles._OVERRIDE_KEYS)
    previous = set_tile_override(bwd_kv=Blocks(16, 32))
    try:
        assert at._bwd_tiles(128)[0] == Blocks(16, 32)
    finally:
        set_tile_override(**previous)
    assert at._bwd_tiles(128) == at._bwd_blocks(128)


def test_backward_plan_choice() -> None:
    """Fused for short sequences with at least one program per multiprocessor; the overrides
    force a plan; both plans at once is an error that sets nothing."""
    assert at._use_fused(197, 197, 256 * 12, 132)  # ViT-B/16 at batch 256
    assert at._use_fused(77, 77, 132, 132) and not at._use_fused(77, 77, 131, 132)
    assert at._use_fused(1024, 1024, 1000, 132) and not at._use_fused(1025, 77, 1000, 132)
    assert not at._use_fused(4096, 4096, 8 * 16, 132)
    with tile_override(bwd_fused=Blocks(32, 64)):
        assert at._use_fused(4096, 4096, 1, 132)
    with tile_override(bwd_q=Blocks(32, 64)):
        assert not at._use_fused(197, 197, 3072, 132)
    for plans in ({"bwd_kv": Blocks(32, 64), "bwd_fused": Blocks(32, 64)},
                  {"bwd_fused": Blocks(32, 64), "bwd_chunked": Blocks(64, 32)},
                  {"bwd_q": Blocks(32, 64), "bwd_chunked": Blocks(64, 32)}):
        with pytest.raises(ValueError, match="exclude each other"):
            set_tile_override(**plans)
    assert at._override == dict.fromkeys(at._tiles._OVERRIDE_KEYS)


@pytest.mark.usefixtures("no_interpreter")
def test_fused_tiles_by_architecture() -> None:
    """Hopper with D <= 64: 64x64 in 2 stages (no spills compiled for sm_90; the H200
    sweep's best), or the resident tile where Sq fits one block; otherwise 32x64 on 8 warps
    (64x64 spills ~170 bytes on sm_80)."""
    assert at._fused_blocks(64, 90) == Blocks(64, 64, 4, 2)
    assert at._fused_blocks(64, 80) == at._fused_blocks(128, 90) == Blocks(32, 64, 8, 1)
    # given Sq: every query row in one block where it fits (the resident kernel)
    assert at._fused_blocks(64, 90, 197) == Blocks(256, 32, 8, 2)  # ViT-B/16
    assert at._fused_blocks(64, 90, 77) == Blocks(128, 32, 8, 2)  # text
    assert at._fused_blocks(32, 90, 50) == Blocks(64, 32, 4, 2)  # ViT-B/32
    assert at._fused_blocks(64, 90, 257) == Blocks(64, 64, 4, 2)  # ViT-L/14: 512 rows, no
    assert at._fused_blocks(128, 90, 197) == at._fused_blocks(64, 80, 197) == \
        Blocks(32, 64, 8, 1)  # D > 64 or before Hopper: no resident tile
    # the forward for D <= 64: 64x32, 4 warps, 3 stages (the H200 sweep's best geometric mean)
    assert at._fwd_blocks(197, 64) == at._fwd_blocks(77, 32) == Blocks(64, 32, 4, 3)


# ---------------------------------------------------------------- sweep logic (fake timer)

@pytest.fixture
def no_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU heuristics as defaults (the interpreter's are 32x32)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.mark.usefixtures("no_interpreter")
@pytest.mark.parametrize("block_d, n_fwd, n_bwd", [(64, 24, 10), (128, 19, 8)])
def test_candidates(block_d: int, n_fwd: int, n_bwd: int) -> None:
    """Counts as stated in the docstrings; the default first; every one fits and is valid."""
    fwd, bwd = sweep.fwd_candidates(197, block_d), sweep.bwd_candidates(block_d)
    assert (len(fwd), len(bwd)) == (n_fwd, n_bwd)
    assert fwd[0] == at._fwd_blocks(197, block_d) and bwd[0] == at._bwd_blocks(block_d)
    assert len(set(fwd)) == len(fwd) and len(set(bwd)) == len(bwd)
    for b in fwd:
        at._validate_blocks("fwd", b)
        assert sweep.fwd_fits(b, block_d) and b.m in sweep.FWD_M and b.n in sweep.FWD_N
        assert b.m // b.warps >= 16
    for kv, q in bwd:
        at._validate_blocks("bwd_kv", kv)
        at._validate_blocks("bwd_q", q)
        assert sweep.bwd_fits(kv, q, block_d)


@pytest.mark.usefixtures("no_interpreter")
@pytest.mark.parametrize("block_d, count", [(64, 16), (128, 8)])
def test_fused_candidates(block_d: int, count: int) -> None:
    fused = sweep.fused_candidates(block_d)
    assert len(fused) == count == len(set(fused)) and fused[0] == at._fused_blocks(block_d)
    for b in fused:
        at._validate_blocks("bwd_fused", b)
        assert sweep.fused_fits(b, block_d)
    assert not sweep.fused_fits(Blocks(128, 128, 4, 1), 64)  # 320 fp32 values per thread
    assert not sweep.fused_fits(Blocks(128, 128, 8, 2), 128)  # 256 KiB of shared memory


@pytest.mark.usefixtures("no_interpreter")
def test_resident_candidates_and_plan() -> None:
    """Given Sq, the fused candidates add the resident tiles (query block = next_pow2(Sq)),
    judged with Q and dO resident in shared memory; `triton_resident` forces the heuristic's
    resident tile and refuses a shape that has none."""
    fused = sweep.fused_candidates(64, sq=197)
    resident = [b for b in fused if b.m >= 197]
    assert fused[0] == Blocks(256, 32, 8, 2) and len(fused) == len(set(fused)) == 22
    assert {b.m for b in resident} == {256} and len(resident) == 6
    assert all(sweep.fused_fits(b, 64, sq=197) for b in fused)
    # the same tile as a query-blocked one streams Q/dO stages, as a resident one K/V stages
    assert sweep.fused_fits(Blocks(256, 64, 8, 2), 64, sq=197)
    assert sweep.fused_candidates(64, sq=257) == sweep.fused_candidates(64)  # 512 rows: none
    assert bench.plan_override("triton_resident", 64, 90, 77) == {
        "bwd_fused": Blocks(128, 32, 8, 2)}
    assert bench.plan_override("triton_resident_v6", 64, 90, 77) == bench.plan_override(
        "triton_resident", 64, 90, 77)
    assert bench.plan_override("triton_fused", 64, 90, 77) == {"bwd_fused": Blocks(64, 64, 4, 2)}
    for sq, dim in ((257, 64), (197, 80)):
        with pytest.raises(ValueError, match="no resident tile"):
            bench.plan_override("triton_resident", dim, 90, sq)
    assert bench.plan_override("triton_chunked", 64, 90, 577) == {"bwd_chunked": bench.CHUNK}
    with pytest.raises(ValueError, match="no chunked tile"):
        bench.plan_override("triton_chunked", 80, 90, 197)


def test_fits_prunes_what_cannot_fit() -> None:
    assert not sweep.fwd_fits(Blocks(128, 128, 8, 4), 128)  # 288 KiB of shared memory
    assert sweep.fwd_fits(Blocks(128, 128, 8, 4), 64)  # 144 KiB
    assert not sweep.fwd_fits(Blocks(128, 128, 4, 2), 128)  # 256 fp32 values per thread
    assert not sweep.fwd_fits(Blocks(64, 32, 8, 2), 64)  # 8 rows per warp
    assert not sweep.bwd_fits(Blocks(32, 128, 4, 2), Blocks(128, 32, 4, 2), 128)  # dk, dv regs
    assert sweep.bwd_fits(Blocks(32, 128, 8, 2), Blocks(128, 32, 8, 2), 128)
    # fp32 doubles the shared memory: a config that fits in bf16 may not
    assert sweep.fwd_fits(Blocks(128, 64, 8, 4), 128) and \
        not sweep.fwd_fits(Blocks(128, 64, 8, 4), 128, elt=4)


def _fake_timer(calls: list[tuple[str, dict]]):  # noqa: ANN202
    """ms from the tiles; n == 128 forward tiles run out of resources, warps 8 bwd fails."""
    from triton.runtime.errors import OutOfResources

    def timer(kernel: str, override: dict) -> float:
        calls.append((kernel, override))
        if kernel == "fwd":
            fwd = override["fwd"]
            if fwd.n == 128:
                raise OutOfResources(300000, 232448, "shared memory")
            return 1.0 + abs(fwd.m - 128) / 64 + abs(fwd.n - 32) / 32 + fwd.stages / 10
        if kernel == "bwd_fused":
            return 4.0 - override["bwd_fused"].m / 64
        kv, q = override["bwd_kv"], override["bwd_q"]
        if kv.warps == 8:
            raise RuntimeError("PassManager::run failed\nmore lines")
        return 5.0 - kv.n / 64 + q.stages / 10
    return timer


@pytest.mark.usefixtures("no_interpreter")
def test_sweep_shape_with_fake_timer() -> None:
    calls: list[tuple[str, dict]] = []
    fwd, bwd = sweep.fwd_candidates(197, 64), sweep.bwd_candidates(64)
    fused = sweep.fused_candidates(64)
    seen: list[dict] = []
    recs = sweep.sweep_shape("vit_b16", fwd, bwd, _fake_timer(calls), progress=seen.append,
                             fused_cands=fused)
    assert seen == recs and len(recs) == len(fwd) + len(bwd) + len(fused) == len(calls)
    by_kernel = {k: [r for r in recs if r["kernel"] == k] for k in ("fwd", "bwd", "bwd_fused")}
    for kernel, key, expected in (
            ("fwd", "fwd", {"m": 128, "n": 32, "warps": 4, "stages": 2}),
            ("bwd", "bwd_kv", {"m": 32, "n": 128, "warps": 4, "stages": 2}),
            ("bwd_fused", "bwd_fused", {"m": 128, "n": 64, "warps": 8, "stages": 1})):
        best = [r for r in by_kernel[kernel] if r["best"]]
        assert len(best) == 1
        timed = [r["ms"] for r in by_kernel[kernel] if r["ms"] is not None]
        assert best[0]["ms"] == min(timed)
        got = best[0]["config"][key]
        assert got == expected, (kernel, got)  # ties: the first candidate wins
    assert all("bwd_kv" not in r["config"] for r in by_kernel["bwd_fused"])  # one plan each
    skipped = [r for r in recs if r["ms"] is None]
    assert skipped and all(r["skipped"] in ("OutOfResources", "RuntimeError") for r in skipped)
    assert {r["skipped"] for r in by_kernel["fwd"] if r["ms"] is None} == {"OutOfResources"}
    assert all(r["config"]["bwd_kv"]["warps"] == 8 for r in by_kernel["bwd"] if r["ms"] is None)
    assert all("\n" not in r["error"] for r in skipped)
    assert all(by_kernel[k][0]["default"] for k in by_kernel)
    assert sum(r["default"] for r in recs) == 3
    # every backward run used the best forward tile
    best_fwd = Blocks(**next(r for r in by_kernel["fwd"] if r["best"])["config"]["fwd"])
    assert all(ov["fwd"] == best_fwd for kernel, ov in calls if kernel == "bwd")
    json.dumps(recs)  # JSON-serializable as written by --json
    table = sweep.format_best(recs)
    assert table.count("\n") == 4 and "vit_b16" in table and "OutOfResources" not in table
    assert sweep.config_label(next(r for r in by_kernel["bwd"] if r["best"])) in table
    assert "kv32x128 q128x32 w4 s2" in table and "fused128x64 w8 s1" in table


def test_sweep_when_every_forward_fails() -> None:
    """No forward tile timed: backward runs with the heuristic forward (override None)."""
    calls: list[tuple[str, dict]] = []

    def timer(kernel: str, override: dict) -> float:
        calls.append((kernel, override))
        if kernel == "fwd":
            raise ValueError("boom")
        return 2.0
    recs = sweep.sweep_shape("long", [Blocks(64, 64)], [(Blocks(32, 64), Blocks(64, 32))], timer)
    assert recs[0]["skipped"] == "ValueError" and not recs[0]["best"]
    assert recs[1]["best"] and calls[1][1]["fwd"] is None and recs[1]["config"]["fwd"] is None
    assert "n/a: every config skipped (ValueError)" in sweep.format_best(recs)


def test_mark_best_ties_and_reruns() -> None:
    recs = [{"shape": "s", "kernel": "fwd", "ms": ms, "best": True} for ms in (2.0, 1.0, 1.0)]
    recs.append({"shape": "t", "kernel": "fwd", "ms": None, "best": True})
    sweep.mark_best(recs)
    assert [r["best"] for r in recs] == [False, True, False, False]


# ---------------------------------------------------------------- without CUDA

@pytest.mark.skipif(CUDA, reason="CUDA present: the sweep would really run")
def test_sweep_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="CUDA GPU is required"):
        sweep.sweep_tiles(["vit_b16"], torch.float16)
    proc = subprocess.run([sys.executable, "-m", "mmpretrain.cli", "bench", "attention",
                           "--sweep", "--shapes", "vit_b16", "--json", os.devnull], cwd=REPO,
                          env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "CUDA GPU is required" in proc.stderr and "Traceback" not in proc.stderr


def test_comparison_reports_each_cell_as_it_is_measured(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    """A run cut short (the GPU session's time limits) keeps the rows it measured: each goes to
    `progress` (the CLI prints it on stderr) before the next cell starts."""
    from mmpretrain.cli import main

    measured: list[str] = []

    def fake_cell(impl: str, shape: str, dtype: torch.dtype, warmup: int, iters: int) -> dict:
        measured.append(f"{shape}/{impl}")
        if impl == "flex":
            return {"impl": impl, "shape": shape, "error": "RuntimeError: unsupported"}
        return {"impl": impl, "shape": shape, "fwd_ms": 1.0, "fwd_tflops": 2.0,
                "fwd_bwd_ms": 3.0, "fwd_bwd_tflops": 4.0}

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench, "bench_one", fake_cell)
    seen: list[tuple[str, int]] = []
    records = bench.bench_attention(["vit_b16", "text_causal"], ["triton", "flex"],
                                    progress=lambda r: seen.append((r["impl"], len(measured))))
    assert seen == [("triton", 1), ("flex", 2), ("triton", 3), ("flex", 4)]
    assert [r["shape"] for r in records] == ["vit_b16", "vit_b16", "text_causal", "text_causal"]
    assert main(["bench", "attention", "--shapes", "text_causal", "--impls", "triton,flex",
                 "--precompile-workers", "0"]) == 0  # no real GPU to compile for
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("text_causal") and "1.000" in err[0]
    assert "n/a (RuntimeError: unsupported)" in err[1]


def test_cli_precompiles_what_it_will_time(monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture) -> None:
    """On a GPU the Triton columns' kernels are compiled first (jobs for the device's
    architecture and multiprocessors), and the JIT's compiles while timing are reported."""
    from mmpretrain.cli import main
    from mmpretrain.kernels import precompile

    jobs_seen: list = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(at, "device_arch", lambda dev: 90)
    monkeypatch.setattr(at, "device_sms", lambda dev: 132)
    monkeypatch.setattr(precompile, "precompile",
                        lambda jobs, workers: jobs_seen.append((jobs, workers)) or {"jobs": 2})
    # timing FlexAttention makes Inductor point Triton at its own cache (seen on the H200:
    # the count came out as -195); the count must stay with the first directory
    cache = {"dir": "/triton-cache"}
    monkeypatch.setattr(precompile, "cache_dir", lambda: cache["dir"])
    monkeypatch.setattr(precompile, "cache_entries",
                        lambda path=None: {"/triton-cache": 7, "/inductor": 2}[path])

    def bench_one(impl: str, shape: str, *a: object) -> dict:
        cache["dir"] = "/inductor"
        return {"impl": impl, "shape": shape, "fwd_ms": 1.0, "fwd_tflops": 2.0,
                "fwd_bwd_ms": 3.0, "fwd_bwd_tflops": 4.0}

    monkeypatch.setattr(bench, "bench_one", bench_one)
    assert main(["bench", "attention", "--shapes", "text_causal", "--impls",
                 "triton,triton_fused,sdpa_cudnn", "--precompile-workers", "3"]) == 0
    (jobs, workers), = jobs_seen
    assert workers == 3 and [j.shape for j in jobs] == ["text_causal"] * 2
    assert all(j.arch == 90 and j.sms == 132 for j in jobs)
    err = capsys.readouterr().err
    assert 'precompile: {"jobs": 2}' in err and "JIT compiled while timing: 0" in err


if __name__ == "__main__":
    sys.exit(_interpreter_main())
