"""CheckpointManager with a fake DeepSpeed engine: layout, atomicity, finding, pruning, loading
and the RNG round trip. torch.distributed is never initialized, so the manager's barrier is a
no-op (except in the two-rank test, which replaces it by a threading barrier)."""
from __future__ import annotations

import json
import random
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mmpretrain.checkpoint import manager as mgr_mod
from mmpretrain.checkpoint.manager import (TMP_PREFIX, CheckpointManager, rng_state,
                                           set_rng_state, write_atomic)

ENGINE_FILE = "mp_rank_00_model_states.pt"


class FakeEngine:
    """Mimics the two DeepSpeedEngine methods the manager uses."""

    def __init__(self, weights: dict[str, torch.Tensor] | None = None) -> None:
        self.weights = weights or {"w": torch.zeros(3)}
        self.saves: list[dict[str, Any]] = []
        self.loads: list[dict[str, Any]] = []

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict[str, Any],
                        save_latest: bool = True) -> bool:
        self.saves.append({"save_dir": save_dir, "tag": tag, "save_latest": save_latest})
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"module": self.weights, "client": client_state}, d / ENGINE_FILE)
        return True

    def load_checkpoint(self, load_dir: str, tag: str, load_optimizer_states: bool = True,
                        load_lr_scheduler_states: bool = True) -> tuple[Any, Any]:
        self.loads.append({"load_dir": load_dir, "tag": tag, "opt": load_optimizer_states,
                           "sched": load_lr_scheduler_states})
        f = Path(load_dir) / tag / ENGINE_FILE
        if not f.is_file():
            return None, None
        data = torch.load(f, weights_only=True)
        self.weights = data["module"]
        return str(f.parent), data["client"]


def names(d: Path) -> set[str]:
    return {p.name for p in d.iterdir()}


def save_steps(mgr: CheckpointManager, *steps: int) -> list[Path]:
    eng = FakeEngine()
    return [mgr.save(eng, s, {"step": s}, {"config_hash": "h"}) for s in steps]


@pytest.fixture
def ckdir(tmp_path: Path) -> Path:
    return tmp_path / "run" / "checkpoints"


# ---- saving --------------------------------------------------------------------------------------
def test_save_layout(ckdir: Path) -> None:
    mgr = CheckpointManager(ckdir, keep_last=3, rank=0, world_size=1)
    eng = FakeEngine({"w": torch.arange(4.0)})
    meta_in = {"config_hash": "abc123", "zero_stage": 2}
    client = {"step": 100, "samples_seen": 6400, "data": {"epoch": 1}}
    path = mgr.save(eng, 100, client, meta_in)

    assert path == ckdir / "step_00000100" and path.is_dir()
    assert names(ckdir) == {"step_00000100", "latest"}  # no .tmp-* left anywhere
    assert (ckdir / "latest").read_text().strip() == "step_00000100"
    assert names(path) == {"meta.json", "rank_00000.pt", ENGINE_FILE}
    meta = json.loads((path / "meta.json").read_text())
    assert meta["step"] == 100 and meta["world_size"] == 1
    assert meta["config_hash"] == "abc123" and meta["zero_stage"] == 2
    assert isinstance(meta["time"], float)
    assert meta_in == {"config_hash": "abc123", "zero_stage": 2}  # caller's dict untouched
    rank_file = torch.load(path / "rank_00000.pt", weights_only=True)
    assert rank_file["rank"] == 0 and {"torch", "numpy", "python"} <= set(rank_file["rng"])
    # DeepSpeed writes under the temporary tag and must not write its own `latest` file
    assert eng.saves == [{"save_dir": str(ckdir), "tag": f"{TMP_PREFIX}step_00000100",
                          "save_latest": False}]
    assert torch.load(path / ENGINE_FILE, weights_only=True)["client"] == client

    assert mgr.latest() == path and mgr.complete() == [path]
    assert mgr.has_step(100) and not mgr.has_step(200)


def test_successive_saves_move_latest(ckdir: Path) -> None:
    mgr = CheckpointManager(ckdir, keep_last=0, rank=0, world_size=1)
    paths = save_steps(mgr, 10, 20, 30)
    assert (ckdir / "latest").read_text() == "step_00000030"
    assert mgr.latest() == paths[-1]
    assert mgr.complete() == paths
    assert not [p for p in ckdir.iterdir() if p.name.startswith(TMP_PREFIX)]


def test_resave_same_step_replaces_it(ckdir: Path) -> None:
    mgr = CheckpointManager(ckdir, keep_last=3, rank=0, world_size=1)
    mgr.save(FakeEngine({"w": torch.zeros(2)}), 50, {"v": 1}, {})
    path = mgr.save(FakeEngine({"w": torch.ones(2)}), 50, {"v": 2}, {})
    assert mgr.complete() == [path]
    eng = FakeEngine()
    client, meta = mgr.load(eng, path)
    assert client == {"v": 2} and meta["step"] == 50
    assert torch.equal(eng.weights["w"], torch.ones(2))


def test_complete_sorts_by_step_not_name(ckdir: Path) -> None:
    mgr = CheckpointManager(ckdir, keep_last=0, rank=0, world_size=1)
    save_steps(mgr, 99_999_999, 100_000_000)  # the 9-digit name sorts first as a string
    (ckdir / "latest").unlink()
    assert [p.name for p in mgr.complete()] == ["step_99999999", "step_100000000"]
    assert mgr.latest().name == "step_100000000"


def test_stale_tmp_removed_by_next_save(ckdir: Path) -> None:
    mgr = CheckpointManager(ckdir, keep_last=3, rank=0, world_size=1)
    save_steps(mgr, 100)
    crashed = ckdir / f"{TMP_PREFIX}step_00000200"  # a crash mid-save of step 200
    crashed.mkdir()
    (crashed / ENGINE_FILE).write_bytes(b"partial")
    (crashed / "meta.json").write_text(json.dumps({"step": 200, "world_size": 1}))
    (ckdir / f"{TMP_PREFIX}latest.12345").write_text("step_00000200")  # a torn pointer write
    assert mgr.latest() == ckdir / "step_00000100"
    assert [p.name for p in mgr.complete()] == ["step_00000100"]

    save_steps(mgr, 300)
    assert names(ckdir) == {"step_00000100", "step_00000300", "latest"}


def test_write_atomic(tmp_path: Path) -> None:
    target = tmp_path / "latest"
    target.write_text("old")
    write_atomic(target, "step_00000007")
    assert target.read_text() == "step_00000007"
    assert names(tmp_path) == {"latest"}


# ---- finding -------------------------------------------------------------------------------------
def test_latest_on_missing_or_empty_dir(ckdir: Path) -> None:
    mgr = CheckpointManager(ckdir, keep_last=3, rank=0, world_size=1)
    assert mgr.latest() is None and mgr.complete() == [] and mgr.resolve("auto") is None
    ckdir.mkdir(parents=True)
    assert mgr.latest() is None


def test_latest_ignores_incomplete_checkpoints(ckdir: Path) -> None:
    mgr = CheckpointManager(ckdir, keep_last=0, rank=0, world_size=1)
    save_steps(mgr, 100)
    # crash mid-save: the temporary directory of a newer step ...
    tmp = ckdir / f"{TMP_PREFIX}step_00000300"
    tmp.mkdir()
    (tmp / "meta.json").write_text(json.dumps({"step": 300, "world_size": 1}))
    # ... and a step directory that never got its meta.json
    (ckdir / "step_00000200").mkdir()
    (ckdir / "step_00000200" / ENGINE_FILE).write_bytes(b"x")
    assert mgr.latest() == ckdir / "step_00000100"
    # even if the pointer names the incomplete one
    (ckdir / "latest").write_text("step_00000200")
    assert mgr.latest() == ckdir / "step_00000100"
    assert mgr.resolve("auto") == ckdir / "step_00000100"
    assert not mgr.has_step(200) and mgr.has_step(100)


def test_latest_falls_back_to_scan_when_pointer_is_stale(ckdir: Path) -> None:
    mgr = CheckpointManager(ckdir, keep_last=0, rank=0, world_size=1)
    save_steps(mgr, 100, 200)
    (ckdir / "latest").write_text("step_00000900\n")  # points at a directory that is gone
    assert mgr.latest() == ckdir / "step_00000200"
    (ckdir / "latest").write_text("")
    assert mgr.latest() == ckdir / "step_00000200"
    (ckdir / "latest").unlink()
    assert mgr.latest() == ckdir / "step_00000200"


def test_latest_trusts_a_valid_pointer(ckdir: Path) -> None:
    mgr = CheckpointManager(ckdir, keep_last=0, rank=0, world_size=1)
    save_steps(mgr, 100, 200)
    (ckdir / "latest").write_text("step_00000100\n")
    assert mgr.latest() == ckdir / "step_00000100"


def test_resolve(ckdir: Path, tmp_path: Path) -> None:
    mgr = CheckpointManager(ckdir, keep_last=0, rank=0, world_size=1)
    p100, p200 = save_steps(mgr, 100, 200)
    assert mgr.resolve("none") is None
    assert mgr.resolve("auto") == p200
    assert mgr.resolve(str(p100)) == p100                    # a checkpoint directory
    assert mgr.resolve(str(ckdir)) == p200                   # a checkpoints/ directory
    other = CheckpointManager(tmp_path / "elsewhere", 3, 0, 1)
    assert other.resolve(str(p100)) == p100                  # from another run's directory
    assert other.resolve("auto") is None


@pytest.mark.parametrize("what", ["missing", "empty_dir", "file", "no_meta", "run_dir"])
def test_resolve_rejects_non_checkpoints(ckdir: Path, tmp_path: Path, what: str) -> None:
    mgr = CheckpointManager(ckdir, keep_last=0, rank=0, world_size=1)
    save_steps(mgr, 100)
    target = {"missing": tmp_path / "nope", "empty_dir": tmp_path / "empty",
              "file": tmp_path / "model.pt", "no_meta": ckdir / "step_00000200",
              "run_dir": ckdir.parent}[what]
    if what == "empty_dir":
        target.mkdir()
    elif what == "file":
        target.write_bytes(b"weights")
    elif what == "no_meta":
        target.mkdir()
        (target / ENGINE_FILE).write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="not a complete mmpretrain checkpoint") as e:
        mgr.resolve(str(target))
    assert str(target) in str(e.value) and "meta.json" in str(e.value)


def test_resolve_checkpoints_dir_with_stale_pointer(ckdir: Path) -> None:
    mgr = CheckpointManager(ckdir, keep_last=0, rank=0, world_size=1)
    _, p200 = save_steps(mgr, 100, 200)
    (ckdir / "latest").write_text("step_00000300")
    assert mgr.resolve("auto") == p200
    assert mgr.resolve(str(ckdir)) == p200


# ---- pruning -------------------------------------------------------------------------------------
def test_keep_last_prunes_oldest(ckdir: Path) -> None:
    mgr = CheckpointManager(ckdir, keep_last=2, rank=0, world_size=1)
    save_steps(mgr, 100, 200)
    assert len(mgr.complete()) == 2
    save_steps(mgr, 300, 400)
    assert [p.name for p in mgr.complete()] == ["step_00000300", "step_00000400"]
    assert names(ckdir) == {"step_00000300", "step_00000400", "latest"}


def test_keep_last_zero_keeps_all(ckdir: Path) -> None:
    mgr = CheckpointManager(ckdir, keep_last=0, rank=0, world_size=1)
    save_steps(mgr, *range(1, 8))
    assert len(mgr.complete()) == 7


def test_keep_last_never_prunes_the_loaded_checkpoint(ckdir: Path) -> None:
    first = CheckpointManager(ckdir, keep_last=0, rank=0, world_size=1)
    save_steps(first, 100, 200)
    resumed = CheckpointManager(ckdir, keep_last=1, rank=0, world_size=1)
    resumed.load(FakeEngine(), resumed.resolve(str(ckdir / "step_00000100")))
    assert resumed.protected == "step_00000100"
    save_steps(resumed, 300, 400, 500)
    assert [p.name for p in resumed.complete()] == ["step_00000100", "step_00000500"]
    assert resumed.latest().name == "step_00000500"


# ---- loading -------------------------------------------------------------------------------------
def test_load_round_trip(ckdir: Path) -> None:
    mgr = CheckpointManager(ckdir, keep_last=3, rank=0, world_size=1)
    weights = {"w": torch.randn(5), "b": torch.arange(3)}
    client = {"step": 42, "samples_seen": 42 * 64, "data": {"shard": 3, "offset": 17}}
    path = mgr.save(FakeEngine(weights), 42, client, {"config_hash": "cafe"})

    fresh = CheckpointManager(ckdir, keep_last=3, rank=0, world_size=1)
    eng = FakeEngine()
    got_client, meta = fresh.load(eng, fresh.resolve("auto"))
    assert got_client == client
    assert meta["step"] == 42 and meta["config_hash"] == "cafe" and meta["world_size"] == 1
    assert set(eng.weights) == {"w", "b"}
    assert all(torch.equal(eng.weights[k], weights[k]) for k in weights)
    assert eng.loads == [{"load_dir": str(ckdir), "tag": path.name, "opt": True, "sched": True}]
    assert fresh.protected == path.name


def test_load_world_size_mismatch(ckdir: Path) -> None:
    """ZeRO shards of another world size are never loaded directly (only via universal)."""
    saver = CheckpointManager(ckdir, keep_last=3, rank=0, world_size=4)
    path = saver.save(FakeEngine(), 10, {"step": 10}, {"zero_stage": 2})
    loader = CheckpointManager(ckdir, keep_last=3, rank=0, world_size=2)
    assert loader.needs_universal(path)
    assert not CheckpointManager(ckdir, 3, 0, 4).needs_universal(path)
    eng = FakeEngine()
    with pytest.raises(RuntimeError, match=r"saved by 4 rank.*has 2") as e:
        loader.load(eng, path)
    assert str(path) in str(e.value)
    assert eng.loads == [] and loader.protected is None


def test_load_reports_engine_failure(ckdir: Path) -> None:
    mgr = CheckpointManager(ckdir, keep_last=3, rank=0, world_size=1)
    path = mgr.save(FakeEngine(), 10, {"step": 10}, {})
    (path / ENGINE_FILE).unlink()  # DeepSpeed finds nothing: returns (None, None)
    with pytest.raises(RuntimeError, match="could not load"):
        mgr.load(FakeEngine(), path)
    assert mgr.protected is None


def test_load_returns_empty_client_when_engine_gives_none(ckdir: Path) -> None:
    mgr = CheckpointManager(ckdir, keep_last=3, rank=0, world_size=1)
    path = mgr.save(FakeEngine(), 10, None, {})  # type: ignore[arg-type]
    client, _ = mgr.load(FakeEngine(), path)
    assert client == {}


def test_two_ranks_save_and_load(ckdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both ranks call save together (a threading barrier stands in for dist.barrier)."""
    barrier = threading.Barrier(2, timeout=20)
    monkeypatch.setattr(mgr_mod, "_barrier", barrier.wait)
    results: dict[int, Any] = {}

    def run(rank: int) -> None:
        try:
            mgr = CheckpointManager(ckdir, keep_last=2, rank=rank, world_size=2)
            results[rank] = mgr.save(FakeEngine(), 7, {"step": 7}, {"who": "rank0"})
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            results[rank] = exc
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    final = ckdir / "step_00000007"
    assert results == {0: final, 1: final}
    assert {"rank_00000.pt", "rank_00001.pt", "meta.json"} <= names(final)
    assert torch.load(final / "rank_00001.pt", weights_only=True)["rank"] == 1
    assert json.loads((final / "meta.json").read_text())["world_size"] == 2
    assert names(ckdir) == {"step_00000007", "latest"}
    monkeypatch.setattr(mgr_mod, "_barrier", lambda: None)
    rank1 = CheckpointManager(ckdir, keep_last=2, rank=1, world_size=2)
    client, meta = rank1.load(FakeEngine(), rank1.resolve("auto"))
    assert client == {"step": 7} and meta["who"] == "rank0"


# ---- RNG state -----------------------------------------------------------------------------------
def _draw() -> tuple[torch.Tensor, np.ndarray, list[float]]:
    return torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)]


def _assert_same(a: tuple, b: tuple) -> None:
    assert torch.equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2] == b[2]


def test_rng_round_trip_through_checkpoint(ckdir: Path) -> None:
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    _draw()  # move away from the freshly seeded state
    mgr = CheckpointManager(ckdir, keep_last=3, rank=0, world_size=1)
    path = mgr.save(FakeEngine(), 5, {"step": 5}, {})
    expected = _draw()  # what a run that never stopped draws next
    for _ in range(3):  # the run goes on (or a new process starts with other seeds)
        _draw()
    torch.manual_seed(999)
    np.random.seed(999)
    random.seed(999)
    assert not torch.equal(_draw()[0], expected[0])
    CheckpointManager(ckdir, keep_last=3, rank=0, world_size=1).load(FakeEngine(), path)
    _assert_same(_draw(), expected)


def test_rng_state_functions_round_trip(tmp_path: Path) -> None:
    np.random.seed(7)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")  # must survive a weights_only load
    expected = (*_draw(), np.random.randn(3))
    _draw()
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (*_draw(), np.random.randn(3))
    _assert_same(got[:3], expected[:3])
    np.testing.assert_array_equal(got[3], expected[3])


def test_rng_round_trip_python_gauss() -> None:
    random.seed(3)
    random.gauss(0.0, 1.0)  # random.gauss draws pairs and caches the second value
    state = rng_state()
    expected = [random.gauss(0.0, 1.0) for _ in range(3)]
    set_rng_state(state)
    assert [random.gauss(0.0, 1.0) for _ in range(3)] == expected
