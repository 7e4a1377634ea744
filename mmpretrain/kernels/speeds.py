"""Measured dispatch for ``impl="auto"`` on CUDA (`model.attention_speeds`).

`mmpretrain bench attention --json F` times, per shape (B, H, Sq, Sk, D, causal) and dtype, the
forward and forward+backward of each implementation. `load_speed_table(F)` keeps, per shape
class (Sq, Sk, D, causal, dtype: batch and heads only scale the launch grid), whether the
`triton` column beat the fastest `sdpa_*` column measured: separately for calls that need the
backward (fwd+bwd ms) and for calls that do not (fwd ms). `prefers_triton` answers for one call.

Only what was measured changes: a shape class the file lacks, a class where either side
failed, and calls with a key padding mask (the benchmark's shapes have none) keep SDPA.
Where a class appears more than once (several batch sizes), Triton must win every time.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger("mmpretrain.kernels")

SpeedKey = tuple[int, int, int, bool, str]  # (Sq, Sk, D, causal, dtype name)


@dataclass(frozen=True)
class SpeedChoice:
    """One shape class's measurements: the Triton kernel's and the fastest SDPA backend's
    forward and fwd+bwd milliseconds (summed over the file's shapes of that class), and
    whether Triton won on every one of them, with and without the backward."""

    triton_fwd: float
    triton_fwd_bwd: float
    sdpa_fwd: float
    sdpa_fwd_bwd: float
    sdpa_names: str  # the SDPA backends that were fastest, e.g. "sdpa_cudnn"
    train: bool
    infer: bool


_table: dict[SpeedKey, SpeedChoice] = {}


def clear_speed_table() -> None:
    """Forget the loaded table: ``auto`` means SDPA on CUDA everywhere again."""
    _table.clear()


def lookup(sq: int, sk: int, dim: int, causal: bool, dtype: torch.dtype) -> SpeedChoice | None:
    """The loaded table's entry for this shape class, or None."""
    return _table.get((sq, sk, dim, bool(causal), _dtype_name(dtype)))


def prefers_triton(q: torch.Tensor, sk: int, causal: bool, padded: bool) -> bool:
    """True when the loaded table measured the Triton kernel faster than every SDPA backend
    for this call's class: q (B, H, Sq, D) on CUDA, `sk` keys; fwd+bwd when q needs a grad."""
    if padded or not _table:
        return False
    choice = lookup(q.shape[2], sk, q.shape[3], causal, q.dtype)
    if choice is None:
        return False
    return choice.train if torch.is_grad_enabled() and q.requires_grad else choice.infer


def load_speed_table(path: str | Path) -> dict[SpeedKey, SpeedChoice]:
    """Load a `bench attention --json` file as the process's table; logs each class's choice.
    Raises ValueError naming the file (and the record) for anything it cannot use; the
    previous table is kept then."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        records, meta = data["records"], data.get("meta") or {}
        if not isinstance(records, list):
            raise TypeError("records is not a list")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"attention speeds {path}: not a `mmpretrain bench attention --json` "
                         f"file ({type(e).__name__}: {e})") from e
    cells: dict[SpeedKey, dict[tuple[int, int], dict[str, tuple[float, float]]]] = {}
    for i, rec in enumerate(records):
        key, size, times = _record_key(path, i, rec)
        if times is not None:
            cells.setdefault(key, {}).setdefault(size, {})[rec["impl"]] = times
    table = {key: choice for key, shapes in cells.items()
             if (choice := _choice(shapes)) is not None}
    _table.clear()
    _table.update(table)
    _log_table(path, meta, table)
    return table


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _record_key(path: Path, i: int,
                rec: object) -> tuple[SpeedKey, tuple[int, int], tuple[float, float] | None]:
    """(shape class, (B, H), (fwd ms, fwd+bwd ms) or None for a failed cell) of record `i`;
    ValueError if it is not a bench attention cell (a `--sweep` file's records have `kernel`
    and `config` instead)."""
    hint = " (a --sweep file? use it as model.attention_tiles)" if \
        isinstance(rec, dict) and "kernel" in rec else ""
    error = ValueError(f"attention speeds {path}: record {i} is not a bench attention cell "
                       f"with impl, dims, causal, dtype, fwd_ms and fwd_bwd_ms{hint}")
    if not isinstance(rec, dict) or not isinstance(rec.get("impl"), str):
        raise error
    try:
        batch, heads, sq, sk, dim = (int(x) for x in rec["dims"])
        key = (sq, sk, dim, bool(rec["causal"]), str(rec["dtype"]))
        times = None if "error" in rec else (float(rec["fwd_ms"]), float(rec["fwd_bwd_ms"]))
    except (KeyError, TypeError, ValueError) as e:
        raise error from e
    return key, (batch, heads), times


def _choice(shapes: dict[tuple[int, int], dict[str, tuple[float, float]]]) -> SpeedChoice | None:
    """The class's SpeedChoice from its shapes' cells; None unless some shape has both a
    `triton` and an `sdpa_*` measurement (only such shapes count)."""
    sums = [0.0, 0.0, 0.0, 0.0]
    train = infer = True
    names: set[str] = set()
    for cells in shapes.values():
        sdpa = [name for name in cells if name.startswith("sdpa_")]
        triton = cells.get("triton")
        if triton is None or not sdpa:
            continue
        best_fwd = min(sdpa, key=lambda name: cells[name][0])
        best = min(sdpa, key=lambda name: cells[name][1])
        names |= {best, best_fwd}
        times = (*triton, cells[best_fwd][0], cells[best][1])
        sums = [s + t for s, t in zip(sums, times)]
        infer &= times[0] < times[2]
        train &= times[1] < times[3]
    if not names:
        return None
    return SpeedChoice(*sums, ",".join(sorted(names)), train, infer)


def _log_table(path: Path, meta: dict, table: dict[SpeedKey, SpeedChoice]) -> None:
    """One line for the file, one per shape class; a warning when measured on another GPU."""
    gpu = meta.get("gpu", "an unnamed GPU")
    logger.info("attention speeds from %s (measured on %s): %d shape classes", path, gpu,
                len(table))
    if torch.cuda.is_available() and meta.get("gpu") not in (None, torch.cuda.get_device_name()):
        logger.warning("attention speeds %s were measured on %s, this is %s: the choices may "
                       "not hold here", path, gpu, torch.cuda.get_device_name())
    for (sq, sk, dim, causal, dtype), c in table.items():
        logger.info("attention speeds: Sq=%d Sk=%d D=%d causal=%s %s: training %s (triton "
                    "%.3f ms vs %.3f fwd+bwd), no grad %s (triton %.3f ms vs %.3f fwd), "
                    "against %s", sq, sk, dim, causal, dtype,
                    "triton" if c.train else "sdpa", c.triton_fwd_bwd, c.sdpa_fwd_bwd,
                    "triton" if c.infer else "sdpa", c.triton_fwd, c.sdpa_fwd, c.sdpa_names)
