"""Checkpoints that are complete or invisible: save, find the newest, resume, keep the last K.

Layout of `run_dir/checkpoints/`:
    step_00000100/          one DeepSpeed checkpoint (every rank's ZeRO shards) plus
        rank_00000.pt       per-rank client state (RNG states), tensors and plain data only
        meta.json           written last before the rename: step, world size, config hash, ...
    latest                  the name of the newest complete checkpoint
A checkpoint is written under `.tmp-step_...` and renamed into place only after every rank has
finished, then `latest` is replaced atomically. A crash mid-save leaves a `.tmp-*` directory
that `resume` ignores and the next save removes.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger("mmpretrain.checkpoint")
TMP_PREFIX = ".tmp-"


def _failpoint(name: str, step: int) -> None:
    """Die like `kill -9` here when MMPRETRAIN_FAILPOINT=name:step (the fault tests use it to
    crash in the middle of a checkpoint write)."""
    if os.environ.get("MMPRETRAIN_FAILPOINT") == f"{name}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def saved_param_order(path: Path) -> list[list[str]] | None:
    """Parameter names per optimizer group, in the order of the flat partitions, as DeepSpeed
    recorded them in checkpoint `path` (`param_shapes`); None if it has no such record."""
    files = sorted(path.glob("*mp_rank_00_model_states.pt"))
    if not files:
        return None
    state = torch.load(files[0], map_location="cpu", mmap=True, weights_only=False)
    shapes = state.get("param_shapes") if isinstance(state, dict) else None
    return [list(group) for group in shapes] if shapes else None


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` via a temporary file, fsync and rename."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch, CUDA, numpy, python) as tensors and plain data."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].copy()),
                       "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                       "cached_gaussian": float(np_state[4])},
             "python": list(random.getstate()[1]),
             "python_gauss": random.getstate()[2]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy(), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate((3, tuple(state["python"]), state.get("python_gauss")))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class CheckpointManager:
    """Saves and finds checkpoints of one run; every rank calls `save`/`load` together."""

    def __init__(self, ckpt_dir: str | os.PathLike, keep_last: int, rank: int, world_size: int):
        self.dir = Path(ckpt_dir)
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size
        self.protected: str | None = None  # the checkpoint we resumed from is never pruned

    # ---- finding -------------------------------------------------------------------------
    def complete(self) -> list[Path]:
        """Complete checkpoints (with meta.json), oldest first."""
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.glob("step_*") if (p / "meta.json").is_file()]
        return sorted(found, key=lambda p: json.loads((p / "meta.json").read_text())["step"])

    def latest(self) -> Path | None:
        """The newest complete checkpoint: `latest` if it points at one, else a directory scan."""
        pointer = self.dir / "latest"
        if pointer.is_file():
            cand = self.dir / pointer.read_text().strip()
            if (cand / "meta.json").is_file():
                return cand
        done = self.complete()
        return done[-1] if done else None

    def has_step(self, step: int) -> bool:
        """Whether a complete checkpoint of `step` exists."""
        return (self.dir / f"step_{step:08d}" / "meta.json").is_file()

    # ---- saving --------------------------------------------------------------------------
    def save(self, engine: Any, step: int, client_state: dict[str, Any],
             meta: dict[str, Any]) -> Path:
        """Write checkpoint `step_{step}` from every rank; returns its final path."""
        name = f"step_{step:08d}"
        final, tmp = self.dir / name, self.dir / f"{TMP_PREFIX}{name}"
        t0 = time.perf_counter()
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._remove_stale_tmp()
        _barrier()
        engine.save_checkpoint(str(self.dir), tag=tmp.name, client_state=client_state,
                               save_latest=False)
        tmp.mkdir(parents=True, exist_ok=True)
        torch.save({"rng": rng_state(), "rank": self.rank}, tmp / f"rank_{self.rank:05d}.pt")
        _barrier()
        if self.rank == 0:
            _failpoint("checkpoint_before_rename", step)
            meta = {**meta, "step": step, "world_size": self.world_size, "time": time.time()}
            write_atomic(tmp / "meta.json", json.dumps(meta, indent=1))
            if final.exists():  # re-saving a step: keep the old copy until the new one is in place
                old = self.dir / f"{TMP_PREFIX}old-{name}"
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            write_atomic(self.dir / "latest", name)
            self._prune()
            log.info("saved checkpoint %s in %.1fs", final, time.perf_counter() - t0)
        _barrier()
        return final

    def _remove_stale_tmp(self) -> None:
        for p in self.dir.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        done = self.complete()
        for p in done[:-self.keep_last]:
            if p.name != self.protected:
                shutil.rmtree(p, ignore_errors=True)
                shutil.rmtree(self.dir / "universal" / p.name, ignore_errors=True)

    # ---- loading -------------------------------------------------------------------------
    def resolve(self, resume: str) -> Path | None:
        """Turn `checkpoint.resume` (`auto`, `none` or a path) into a checkpoint directory."""
        if resume == "none":
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if (path / "latest").is_file() and not (path / "meta.json").is_file():
            found = CheckpointManager(path, 0, self.rank, self.world_size).latest()
            path = found or path / (path / "latest").read_text().strip()  # a checkpoints/ dir
        if not (path / "meta.json").is_file():
            raise FileNotFoundError(f"checkpoint.resume={resume}: {path} is not a complete "
                                    "mmpretrain checkpoint (no meta.json)")
        return path

    def needs_universal(self, path: Path, param_order: list[list[str]] | None = None) -> bool:
        """Whether `path` (ZeRO 1-3) has to be re-cut through DeepSpeed's universal checkpoint
        format: saved by another number of ranks, or with its optimizer groups' parameters in
        another order than `param_order` (names per group). ZeRO's flat fp32 partitions are laid
        out in that order, so loading them directly would give parameters each other's values;
        checkpoints from before 2026-11-30 put the logit scale first."""
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("zero_stage", 0) < 1:
            return False
        if meta["world_size"] != self.world_size:
            return True
        saved = saved_param_order(path) if param_order is not None else None
        if saved is not None and saved != param_order:
            log.warning("%s lists its parameters in another order than this version groups "
                        "them; loading it through its universal conversion", path)
            return True
        return False

    def universal(self, path: Path) -> Path:
        """Convert `path` to a universal checkpoint once (rank 0; cached next to the others
        under `universal/`); every rank waits and gets its location."""
        out = self.dir / "universal" / path.name
        if self.rank == 0 and not (out / "meta.json").is_file():
            tmp = out.with_name(f"{TMP_PREFIX}{out.name}")
            shutil.rmtree(tmp, ignore_errors=True)
            t0 = time.perf_counter()
            cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                   "--input_folder", str(path), "--output_folder", str(tmp),
                   "--inject_missing_state", "--num_extract_workers", "1",
                   "--num_merge_workers", "1"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"converting {path} to a universal checkpoint failed "
                                   f"({' '.join(cmd)}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
            shutil.copy(path / "meta.json", tmp / "meta.json")
            os.replace(tmp, out)
            log.info("converted %s to a universal checkpoint in %.1fs", path,
                     time.perf_counter() - t0)
        _barrier()
        return out

    def load(self, engine: Any, path: Path,
             universal: Path | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """Load model, optimizer, scheduler and this rank's RNG state; returns (client, meta).

        A checkpoint of another world size loads from its `universal` conversion (ZeRO 1-3;
        the engine must have been built with `checkpoint.load_universal`) or directly (no
        ZeRO: nothing is partitioned). RNG states are then not restored: they were per rank."""
        meta = json.loads((path / "meta.json").read_text())
        same_world = meta["world_size"] == self.world_size
        if not same_world and universal is None and meta.get("zero_stage", 0) >= 1:
            raise RuntimeError(
                f"{path} was saved by {meta['world_size']} rank(s) but this run has "
                f"{self.world_size}: load it through its universal conversion")
        source = universal or path
        load_path, client = engine.load_checkpoint(str(source.parent), tag=source.name,
                                                   load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint at {source}")
        rank_file = path / f"rank_{self.rank:05d}.pt"
        if same_world and rank_file.is_file():
            set_rng_state(torch.load(rank_file, weights_only=True)["rng"])
        self.protected = path.name
        return client or {}, meta
