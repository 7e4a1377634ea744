"""Tile tables (`kernels/tiles.py`, `model.attention_tiles`): a sweep's fastest tiles and
backward plan become what the Triton kernel launches for calls of the same shape class.

The launch itself is checked under the interpreter in test_attention_tiles.py ("table" case);
here: reading the sweep JSON, the choice it gives, precedence, and clear errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmpretrain.kernels import attention_triton as at
from mmpretrain.kernels import bench, sweep, tiles
from mmpretrain.kernels.attention_triton import Blocks, tile_override


@pytest.fixture(autouse=True)
def _no_table(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN202
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the GPU heuristics
    tiles.clear_tile_table()
    yield
    tiles.clear_tile_table()


def _sweep_file(tmp_path: Path, fused_ms: float) -> Path:
    """A sweep JSON for vit_b16 and text_causal: timings from a fake timer (fwd fastest at
    m64 n32 w4 s2, split at its 64x64 pair, fused always `fused_ms`, fastest at m128)."""
    def timer(kernel: str, override: dict) -> float:
        if kernel == "fwd":
            f = override["fwd"]
            return 1.0 + abs(f.m - 64) / 64 + abs(f.n - 32) / 32 + f.stages / 10 + f.warps / 100
        if kernel == "bwd_fused":
            return fused_ms - override["bwd_fused"].m / 1000
        return 5.0 - (override["bwd_kv"].m == 64) + override["bwd_q"].stages / 10
    recs = []
    for shape in ("vit_b16", "text_causal"):
        recs += sweep.sweep_shape(shape, sweep.fwd_candidates(197, 64), sweep.bwd_candidates(64),
                                  timer, fused_cands=sweep.fused_candidates(64))
    path = tmp_path / "tiles.json"
    path.write_text(json.dumps({"meta": {"gpu": "NVIDIA H200"}, "records": recs}))
    return path


def test_table_gives_the_measured_tiles_and_plan(tmp_path: Path) -> None:
    table = tiles.load_tile_table(_sweep_file(tmp_path, fused_ms=3.0))
    assert set(table) == {(197, 197, 64, False), (77, 77, 64, True)}
    choice = tiles.lookup(197, 197, 64, False)
    assert choice.fwd == Blocks(64, 32, 4, 2)
    assert choice.split == (Blocks(64, 64, 4, 2), Blocks(64, 64, 4, 2))
    assert choice.fused == Blocks(128, 64, 8, 1) and choice.fused_faster
    assert tiles.lookup(197, 197, 128, False) is None and tiles.lookup(257, 257, 64, False) is None
    assert at._fwd_tiles(197, 64, choice) == choice.fwd
    assert at._bwd_tiles(64, 90, choice) == choice.split
    assert at._use_fused(197, 197, 3072, 132, choice)
    assert not at._use_fused(197, 197, 64, 132, choice)  # too few programs to fill the GPU
    with tile_override(fwd=Blocks(32, 32), bwd_kv=Blocks(32, 32)):  # overrides come first
        assert at._fwd_tiles(197, 64, choice) == Blocks(32, 32)
        assert not at._use_fused(197, 197, 3072, 132, choice)
        assert at._bwd_tiles(64, 90, choice) == (Blocks(32, 32), choice.split[1])


def test_slower_fused_backward_is_not_chosen(tmp_path: Path) -> None:
    tiles.load_tile_table(_sweep_file(tmp_path, fused_ms=9.0))
    choice = tiles.lookup(77, 77, 64, True)
    assert choice.fused is not None and not choice.fused_faster
    assert not at._use_fused(77, 77, 4096, 132, choice)
    tiles.clear_tile_table()
    assert tiles.lookup(77, 77, 64, True) is None


@pytest.mark.parametrize("content, match", [
    (None, "No such file"),
    ("not json", "not a `bench attention --sweep --json` file"),
    ({"records": [{"shape": "vit_b99", "kernel": "fwd", "best": True, "ms": 1.0,
                   "config": {"fwd": {"m": 64, "n": 64, "warps": 4, "stages": 2}}}]},
     "record 0: unknown shape 'vit_b99'"),
    ({"records": [{"shape": "vit_b16", "kernel": "fwd", "best": True, "ms": 1.0,
                   "config": {"fwd": {"m": 24, "n": 64, "warps": 4, "stages": 2}}}]},
     r"vit_b16: tile override fwd\.m must be a power of two"),
    ({"records": [{"kernel": "fwd"}]}, "record 0 has no shape/kernel"),
])
def test_bad_tables_name_the_file_and_record(tmp_path: Path, content: object,
                                             match: str) -> None:
    path = tmp_path / "t.json"
    if content is not None:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ValueError, match=match) as err:
        tiles.load_tile_table(path)
    assert str(path) in str(err.value)
    assert tiles.lookup(197, 197, 64, False) is None  # nothing half-loaded


def test_model_config_loads_the_table(tmp_path: Path) -> None:
    from mmpretrain.config import load_config
    from mmpretrain.model import build_model

    path = _sweep_file(tmp_path, fused_ms=3.0)
    cfg = load_config(None, ["model.size=tiny", f"model.attention_tiles={path}"])
    build_model(cfg.model)
    assert tiles.lookup(197, 197, 64, False) is not None
    cfg = load_config(None, ["model.size=tiny", f"model.attention_tiles={tmp_path / 'no.json'}"])
    with pytest.raises(ValueError, match="no.json"):
        build_model(cfg.model)


def test_sweep_cut_short_leaves_a_usable_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    """`bench attention --sweep --json F` rewrites F after every timed config: killed after
    the first shape (the GPU session's time limits), F still loads, for that shape; and
    `bench attention --tiles F` times the `triton` column with it."""
    import torch

    from mmpretrain.cli import main

    def fake_sweep(shapes, dtype, warmup, iters, progress):  # noqa: ANN001, ANN202
        sweep.sweep_shape("vit_b16", [Blocks(64, 64, 4, 2), Blocks(128, 64, 4, 3)],
                          [(Blocks(32, 128, 4, 2), Blocks(128, 32, 4, 2))],
                          lambda kernel, override: 1.0 + (override.get("fwd") or
                                                          Blocks(1, 1)).m / 1000,
                          progress=progress, fused_cands=[Blocks(64, 64, 4, 1)])
        raise RuntimeError("killed at the time limit")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(sweep, "sweep_tiles", fake_sweep)
    path = tmp_path / "tiles.json"
    assert main(["bench", "attention", "--sweep", "--shapes", "vit_b16,text_causal",
                 "--json", str(path), "--precompile-workers", "0"]) == 2
    assert "killed" in capsys.readouterr().err
    tiles.load_tile_table(path)
    choice = tiles.lookup(197, 197, 64, False)
    assert choice.fwd == Blocks(64, 64, 4, 2) and tiles.lookup(77, 77, 64, True) is None
    tiles.clear_tile_table()

    seen = []
    monkeypatch.setattr(bench, "bench_one", lambda impl, shape, *a: seen.append(
        tiles.lookup(197, 197, 64, False)) or {"impl": impl, "shape": shape, "error": "x"})
    assert main(["bench", "attention", "--shapes", "vit_b16", "--impls", "triton",
                 "--tiles", str(path), "--precompile-workers", "0"]) == 0
    assert seen == [choice]
