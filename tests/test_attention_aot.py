"""The Triton attention kernels compile for Hopper (sm_90) and Ampere (sm_80) without a GPU.

The interpreter tests (test_attention_triton.py) check the arithmetic; they cannot see what
only the real compiler enforces: tl.dot shapes, shared-memory size, register pressure. Here
every launch the tile heuristics pick for the model's shapes is captured from the real launch
code and compiled by Triton + ptxas for the GPU target (kernels/aot.py), in a fresh Triton
cache so nothing is reused from earlier runs.

Bounds for sm_90 (the tuned target): shared memory within the per-block opt-in maximum, the
matmul kernels on warpgroup MMA (wgmma), and register spills of at most 32 bytes per
thread (measured here: 0-12 bytes, and none in most launches; with the ragged-tail loops
(2026-12-01) 0 in every heuristic launch, Triton 3.6 and 3.9; the candidate kv64x128 at D=128
spills ~650 bytes, which is what this bound is for). On sm_80 the launches must compile and fit
in shared memory; the tiles are not tuned for Ampere (its dK/dV launch spills, see the
PERFORMANCE.md kernel section).
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch

triton = pytest.importorskip("triton")
aot = pytest.importorskip("mmpretrain.kernels.aot")

MAX_SPILL_BYTES = 32
SPLIT = ["fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dq"]
FUSED = ["fwd", "bwd_preprocess", "bwd_fused"]
RESIDENT = ["fwd", "bwd_resident"]  # computes delta itself: no preprocess launch
# a ragged query tail that fits a smaller block: a second forward launch for it
SPLIT_TAIL, FUSED_TAIL, RESIDENT_TAIL = ["fwd", *SPLIT], ["fwd", *FUSED], ["fwd", *RESIDENT]
# (label, (B, H, Sq, Sk, D), dtype, causal, masked, packed, launched kernels): with fewer
# (batch, head) programs than the 132 multiprocessors assumed, or long sequences, the backward
# is split; at the model's batch sizes it is fused, resident (every query row in one block)
# where Sq <= 256 and D <= 64
CASES = [
    ("vit_b16", (2, 12, 197, 197, 64), torch.bfloat16, False, False, True, SPLIT_TAIL),
    ("vit_b32_d32", (2, 16, 50, 50, 32), torch.bfloat16, False, False, True, SPLIT),
    ("vit_h14_d80", (2, 16, 257, 257, 80), torch.bfloat16, False, False, True, SPLIT_TAIL),
    ("text_causal_padded", (2, 8, 77, 77, 64), torch.bfloat16, True, True, True, SPLIT_TAIL),
    ("fusion_cross_padded", (2, 8, 76, 197, 64), torch.bfloat16, False, True, False,
     SPLIT_TAIL),
    ("long_d128_fp16", (2, 16, 4096, 4096, 128), torch.float16, False, False, True, SPLIT),
    ("vit_b16_b256", (256, 12, 197, 197, 64), torch.bfloat16, False, False, True,
     RESIDENT_TAIL),
    ("vit_b32_d32_b512", (512, 16, 50, 50, 32), torch.bfloat16, False, False, True, RESIDENT),
    ("vit_h14_d80_b64", (64, 16, 257, 257, 80), torch.bfloat16, False, False, True,
     FUSED_TAIL),
    ("vit_l14_336_b64", (64, 16, 577, 577, 64), torch.bfloat16, False, False, True,
     FUSED_TAIL),
    ("text_causal_padded_b512", (512, 8, 77, 77, 64), torch.bfloat16, True, True, True,
     RESIDENT_TAIL),
    ("fusion_cross_padded_b64", (64, 8, 76, 197, 64), torch.bfloat16, False, True, False,
     RESIDENT_TAIL),
    ("vit_l14_b128", (128, 16, 257, 257, 64), torch.bfloat16, False, False, True, FUSED_TAIL),
]


@pytest.fixture(autouse=True)
def _fresh_triton_cache(tmp_path_factory: pytest.TempPathFactory,
                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path_factory.mktemp("triton-cache")))
    from triton.backends.nvidia.compiler import get_ptxas
    try:
        ptxas = get_ptxas(90).path
    except Exception as e:  # noqa: BLE001 - a Triton build without the NVIDIA backend's tools
        pytest.skip(f"no ptxas in this Triton: {e}")
    if not (os.path.isfile(ptxas) or shutil.which(ptxas)):
        pytest.skip(f"no ptxas at {ptxas}")


@pytest.mark.parametrize("label,shape,dtype,causal,masked,packed,kernels", CASES,
                         ids=[c[0] for c in CASES])
def test_heuristic_launches_compile_for_hopper(label: str, shape: tuple, dtype: torch.dtype,
                                               causal: bool, masked: bool, packed: bool,
                                               kernels: list[str]) -> None:
    launches = aot.capture_launches(*shape, dtype=dtype, causal=causal, masked=masked,
                                    packed=packed)
    assert [launch.name for launch in launches] == kernels
    builds = {f"{launch.name}@{launch.kwargs['BLOCK_M']}": aot.compile_launch(launch, 90)
              for launch in launches}
    for name, b in builds.items():
        assert b.constants["HEAD_D"] == shape[4] and b.constants.get("CAUSAL", causal) == causal
        assert 0 < b.registers <= 255, (name, b)
        assert b.shared_bytes <= aot.SMEM_LIMIT[90], (name, b)
        assert b.spill_stores + b.spill_loads <= MAX_SPILL_BYTES, (label, name, b)
    # wgmma needs 64-row tiles: a 16-row forward tail runs on mma.sync
    assert all(b.wgmma for k, b in builds.items()
               if not k.startswith("bwd_preprocess") and b.constants["BLOCK_M"] >= 64
               ), builds


@pytest.mark.parametrize("seq, block, tail", [(197, 64, 16), (197, 32, 16), (257, 64, 16),
                                               (150, 64, 32), (180, 128, 64), (77, 64, 16),
                                               (256, 64, 64), (5, 64, 16), (50, 32, 32)])
def test_tail_block_is_the_smallest_tile_holding_the_rest(seq: int, block: int,
                                                          tail: int) -> None:
    from mmpretrain.kernels.attention_triton import tail_block

    assert tail_block(seq, block) == tail


def test_ragged_tails_launch_small_tiles() -> None:
    """ViT-B/16 (197 tokens): the forward's 64x32 tiles and the backward's 32-key (resident)
    or 64-key (fused) blocks leave 5 queries / keys, run as 16-wide tails (the forward's query
    tail in a launch of its own). A causal padded text call (77 tokens) gets the forward's
    query tail too (rows 64-76 in one 16-row block), but keeps whole key blocks (its kernels
    ignore TAIL_N, so they are not specialised on it)."""
    from mmpretrain.kernels.attention_triton import Blocks, tile_override

    launches = aot.capture_launches(256, 12, 197, 197, 64)
    fwd = [(a.kwargs["BLOCK_M"], a.args[a.fn.arg_names.index("ROW0")], a.kwargs["TAIL_N"])
           for a in launches if a.name == "fwd"]
    assert fwd == [(64, 0, 16), (16, 192, 16)]  # rows 0-191 in 64-blocks, 192-196 in one 16
    resident = {launch.name: launch.kwargs for launch in launches}["bwd_resident"]
    assert (resident["BLOCK_M"], resident["BLOCK_N"], resident["TAIL_N"]) == (256, 32, 16)
    with tile_override(bwd_fused=Blocks(64, 64, 4, 2)):
        launches = aot.capture_launches(256, 12, 197, 197, 64)
    fused = {launch.name: launch.kwargs for launch in launches}["bwd_fused"]
    assert (fused["BLOCK_M"], fused["BLOCK_N"], fused["TAIL_N"]) == (64, 64, 16)
    split = {launch.name: launch.kwargs for launch in aot.capture_launches(2, 12, 197, 197, 64)}
    assert split["bwd_dq"]["TAIL_N"] == 16
    launches = aot.capture_launches(512, 8, 77, 77, 64, causal=True, masked=True)
    fwd = [(a.kwargs["BLOCK_M"], a.args[a.fn.arg_names.index("ROW0")], a.kwargs["TAIL_N"])
           for a in launches if a.name == "fwd"]
    assert fwd == [(64, 0, 32), (16, 64, 32)]
    text = {launch.name: launch.kwargs for launch in launches}
    assert text["bwd_resident"]["TAIL_N"] == text["bwd_resident"]["BLOCK_N"]


@pytest.mark.parametrize("shape, causal, dv_t, dk_t", [
    ((512, 8, 77, 77, 64), True, True, True),  # text: 128-row tile, both products transposed
    ((256, 12, 197, 197, 64), False, True, False),  # ViT-B/16: 256 rows, dV only (registers)
    ((512, 16, 50, 50, 32), False, False, False),  # D = 32: M = 32 either way
])
def test_resident_backward_transposes_products_for_wgmma(shape: tuple, causal: bool,
                                                         dv_t: bool, dk_t: bool) -> None:
    """The resident backward computes dV (and for tiles of <= 128 rows dK) transposed, with the
    head dim as the matmul's M, so that Hopper's wgmma (M >= 64) runs it instead of mma.sync;
    with both transposed, text's kernel has no mma.sync left."""
    launches = aot.capture_launches(*shape, causal=causal, masked=causal)
    resident = [a for a in launches if a.name == "bwd_resident"]
    assert len(resident) == 1
    assert (resident[0].kwargs["DV_T"], resident[0].kwargs["DK_T"]) == (dv_t, dk_t)
    if dv_t and dk_t:
        build = aot.compile_launch(resident[0], 90)
        assert build.wgmma and build.mma_sync == 0 and not build.spills, build
    from mmpretrain.kernels.tiles import resident_transposed, resident_untransposed

    with resident_untransposed():  # version 6's products, for A/B timing
        launches = aot.capture_launches(*shape, causal=causal, masked=causal)
    assert resident_transposed()
    v6 = [a.kwargs for a in launches if a.name == "bwd_resident"][0]
    assert (v6["DV_T"], v6["DK_T"]) == (False, False)
    from mmpretrain.kernels.attention_triton import Blocks, tile_override

    tile = Blocks(resident[0].kwargs["BLOCK_M"], 32, 8, 2)
    with tile_override(bwd_fused=tile):  # forced on Ampere: no wgmma, nothing to transpose
        launches = aot.capture_launches(*shape, causal=causal, masked=causal, arch=80)
    ampere = [a.kwargs for a in launches if a.name == "bwd_resident"][0]
    assert (ampere["DV_T"], ampere["DK_T"]) == (False, False)


def test_chunked_plan_launches_chunks_then_their_sum() -> None:
    """`bwd_chunked` (256-row chunks): ViT-L/14's 257 queries are one 256-row chunk and a
    16-row one, ViT-L/14@336's 577 two and a 128-row one, each chunk numbered (CHUNK0) and
    starting at its row (ROW0); then one kernel sums the chunks' dK/dV shares. All compile
    for sm_90 without spills."""
    from mmpretrain.kernels.attention_triton import Blocks, tile_override

    for sq, chunks in ((257, [(256, 0, 0), (16, 256, 1)]), (577, [(256, 0, 0), (128, 512, 2)])):
        with tile_override(bwd_chunked=Blocks(256, 32, 8, 2)):
            launches = aot.capture_launches(64, 16, sq, sq, 64)
        names = [launch.name for launch in launches]
        assert names == ["fwd", "fwd", "bwd_resident", "bwd_resident", "bwd_sum_chunks"]
        resident = [a for a in launches if a.name == "bwd_resident"]
        assert [(a.kwargs["BLOCK_M"], a.args[a.fn.arg_names.index("ROW0")],
                 a.args[a.fn.arg_names.index("CHUNK0")]) for a in resident] == chunks
        for launch in launches[2:]:
            build = aot.compile_launch(launch, 90)
            assert build.spill_stores + build.spill_loads == 0, build


def test_launches_compile_for_ampere() -> None:
    for shape, causal in (((2, 12, 197, 197, 64), False), ((2, 8, 77, 77, 128), True),
                          ((256, 12, 197, 197, 64), False), ((512, 8, 77, 77, 64), True)):
        builds = {b.name: b for b in aot.build_attention(*shape, arch=80, causal=causal,
                                                         masked=causal)}
        for b in builds.values():
            assert b.arch == 80 and not b.wgmma  # wgmma is Hopper-only
            assert b.shared_bytes <= aot.SMEM_LIMIT[80], b
        if "bwd_fused" in builds:  # the Hopper tile (64 queries) would spill ~170 bytes
            assert builds["bwd_fused"].constants["BLOCK_M"] == 32
        if shape[4] <= 64:  # the Hopper dK/dV tile (128 keys) would spill ~500 bytes here
            assert builds.get("bwd_dkdv", builds.get("bwd_fused")).constants["BLOCK_N"] == 64
            assert all(b.spill_stores + b.spill_loads <= MAX_SPILL_BYTES
                       for b in builds.values()), builds


def test_arguments_are_specialised_as_the_jit_does() -> None:
    from triton.compiler.compiler import make_backend
    from triton.backends.compiler import GPUTarget

    launch = aot.capture_launches(2, 12, 197, 197, 64)[0]  # forward, packed (B, S, 3, H, D)
    signature, constexprs, attrs, options = aot._specialise(
        launch, make_backend(GPUTarget("cuda", 90, 32)))
    index = {name: (i,) for i, name in enumerate(launch.fn.arg_names)}
    assert signature["Q"] == "*bf16" and signature["LSE"] == "*fp32"
    assert signature["sqd"] == "constexpr" and constexprs[index["sqd"]] == 1  # unit stride
    assert signature["sqs"] == "i32" and index["sqs"] in attrs  # 3*H*D: divisible by 16
    assert signature["SEQ_Q"] == "i32" and attrs[index["SEQ_Q"]] == []  # 197: no attribute
    assert index["Q"] in attrs  # 16-byte aligned pointer
    assert signature["sm_scale"] == "fp32"
    assert constexprs[index["HEAD_D"]] == 64 and constexprs[index["CAUSAL"]] is False
    assert (options["num_warps"], options["num_stages"]) == (launch.kwargs["num_warps"],
                                                             launch.kwargs["num_stages"])
    assert options["debug"] is False


def test_tile_overrides_reach_the_compiled_kernel() -> None:
    from mmpretrain.kernels.attention_triton import Blocks

    fwd, tail = aot.build_attention(2, 12, 197, 197, 64, tiles={"fwd": Blocks(64, 32, 4, 2)},
                                    kernels=("fwd",))
    assert (fwd.constants["BLOCK_M"], fwd.constants["BLOCK_N"]) == (64, 32)
    assert (tail.constants["BLOCK_M"], tail.constants["BLOCK_N"]) == (16, 32)  # rows 192-196
    assert (fwd.warps, fwd.stages) == (tail.warps, tail.stages) == (4, 2)


def test_interpreter_mode_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        aot.capture_launches(2, 12, 197, 197, 64)


def test_cross_attention_cannot_be_packed() -> None:
    with pytest.raises(ValueError, match="sq == sk"):
        aot.capture_launches(2, 8, 76, 197, 64, packed=True)


def test_cli_prints_and_saves_the_table(tmp_path, capsys: pytest.CaptureFixture) -> None:
    import json

    from mmpretrain.cli import main

    out = tmp_path / "aot.json"
    assert main(["bench", "attention", "--aot", "--shapes", "text_causal", "--arch", "80",
                 "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "bwd_fused" in table and "text_causal" in table
    saved = json.loads(out.read_text())
    assert saved["meta"]["target"] == "cuda sm_80"
    assert [r["name"] for r in saved["records"]] == FUSED_TAIL  # batch 512 x 8 heads
    assert all(r["shape"] == "text_causal" and r["arch"] == 80 for r in saved["records"])
    assert main(["bench", "attention", "--aot", "--shapes", "nope"]) == 2


# ---------------------------------------------------------------- precompile (kernels/precompile.py)

def test_precompile_fills_the_cache_a_launch_reads() -> None:
    """Worker processes compile the benchmark's launches into Triton's cache; compiling the
    same launches again here (the key a GPU launch computes: same specialisation code) only
    reads it."""
    from mmpretrain.kernels import precompile
    from mmpretrain.kernels.attention_triton import tile_override
    from mmpretrain.kernels.bench import plan_override

    jobs = precompile.bench_jobs(["text_causal"], ["triton", "triton_split", "sdpa_flash"],
                                 torch.bfloat16, 90, 132)
    assert [dict(j.tiles) for j in jobs] == [{}, plan_override("triton_split", 64, 90)]
    report = precompile.precompile(jobs, workers=2)
    assert report["failed"] == 0 and report["kernels"] == 3 + 5, report  # resident, split
    # fwd and its 16-row tail shared; the resident backward; split: preprocess, dK/dV, dQ
    assert report["cache_entries_added"] == 6, report
    before = precompile.cache_entries()
    for job in jobs:
        with tile_override(**dict(job.tiles)):
            launches = aot.capture_launches(512, 8, 77, 77, 64, causal=True, contiguous=True)
        for launch in launches:
            aot.compile_kernel(launch, 90)
    assert precompile.cache_entries() == before


def test_case_jobs_compile_what_the_gpu_parity_cases_launch() -> None:
    """Explicit shapes with a padding mask (the GPU parity cases): compiled by the jobs, then
    found in the cache by the same capture."""
    from mmpretrain.kernels import precompile
    from mmpretrain.kernels.attention_triton import tile_override

    case = (4, 8, 77, 257, 64, False, True)  # cross-attention, padded keys
    jobs = precompile.case_jobs([case], [torch.float16], ["split", "fused"], 90, 132)
    assert [j.launch_dims() for j in jobs] == [case, case] and jobs[0].dtype == "float16"
    report = precompile.precompile(jobs, workers=0)
    assert report["failed"] == 0 and report["kernels"] == 5 + 4, report  # fwd + 16-row tail
    before = precompile.cache_entries()
    for job in jobs:
        with tile_override(**dict(job.tiles)):
            launches = aot.capture_launches(*case[:5], dtype=torch.float16, masked=True,
                                            contiguous=True)
        assert {x.name for x in launches} >= {"fwd", "bwd_preprocess"}
        for launch in launches:
            aot.compile_kernel(launch, 90)
    assert precompile.cache_entries() == before


def test_model_jobs_are_the_towers_packed_launches() -> None:
    """`bench train` with the Triton attention precompiles each tower's packed self-attention
    at the run's batch; the text tower's is causal."""
    from mmpretrain.config.load import load_config
    from mmpretrain.kernels import precompile

    cfg = load_config(None, ["model.size=vit_b16", "model.attention=triton"])
    jobs = precompile.model_jobs(cfg.model, 256, torch.bfloat16, 90, 132)
    assert [j.launch_dims() for j in jobs] == [(256, 12, 197, 197, 64, False, False),
                                               (256, 8, 77, 77, 64, True, False)]
    assert all(j.packed and j.table == "" and j.tiles == () for j in jobs)
    done, _, error = precompile.compile_job(jobs[1])
    assert error == "" and done == 3  # fwd, its 16-row tail, resident backward (B*H >= 132)


def test_sweep_jobs_cover_every_candidate() -> None:
    from mmpretrain.kernels import bench, precompile, sweep

    jobs = precompile.sweep_jobs(["vit_b16", "long"], torch.bfloat16, 90, 132)
    by_shape = {s: [j for j in jobs if j.shape == s] for s in ("vit_b16", "long")}
    for shape, block_d, fused in (("vit_b16", 64, 22), ("long", 128, 0)):  # 6 resident
        kinds = [j.kernels for j in by_shape[shape]]
        assert kinds.count(("fwd",)) == len(sweep.fwd_candidates(bench.SHAPES[shape][2],
                                                                  block_d))
        assert kinds.count(precompile.BWD_SPLIT) == len(sweep.bwd_candidates(block_d))
        assert kinds.count(precompile.BWD_FUSED) == fused  # long sequences: never fused
    assert len({j.tiles for j in jobs}) > 40 and all(j.arch == 90 for j in jobs)
