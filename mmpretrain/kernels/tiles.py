"""Tile tables: the fastest tiles a `bench attention --sweep` measured, for the Triton kernel.

`mmpretrain bench attention --sweep --json FILE` times every tile candidate of the forward, the
split backward and the fused backward per benchmark shape and marks the fastest of each
(`best`). `load_tile_table(FILE)` (config: `model.attention_tiles`) turns those records into a
table keyed by (Sq, Sk, head-dim block, causal); `attention_triton` then launches, for calls of
a matching shape, the measured tiles, and the backward plan that was faster, where no
`tile_override` is set. Other shapes keep the built-in heuristics. The table is process-wide.

Also here: the tile overrides (`Blocks`, `tile_override`, `set_tile_override`), which come
before the table and the heuristics, and the geometry of ragged sequence tails (`tail_block`,
`_query_launches`): the positions after the last whole block of a tile run in a smaller block
of their own.
"""
from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

logger = logging.getLogger("mmpretrain.kernels")


@dataclass(frozen=True)
class _Blocks:
    """Tile sizes and launch options of one kernel."""

    m: int
    n: int
    warps: int = 4
    stages: int = 2


Blocks = _Blocks  # public name, for `tile_override` callers
VALID_WARPS = (1, 2, 4, 8, 16)
_OVERRIDE_KEYS = ("fwd", "bwd_kv", "bwd_q", "bwd_fused", "bwd_chunked")
_override: dict[str, _Blocks | None] = dict.fromkeys(_OVERRIDE_KEYS)
_POW2 = (lambda v: v >= 16 and v & (v - 1) == 0, "a power of two >= 16 (tl.dot minimum)")
_CHECKS = {"m": _POW2, "n": _POW2, "warps": (lambda v: v in VALID_WARPS, f"one of {VALID_WARPS}"),
           "stages": (lambda v: v >= 1, "an int >= 1")}


def _validate_blocks(name: str, blocks: object) -> None:
    """Raise ValueError naming the bad field (e.g. `fwd.m`) unless `blocks` is launchable."""
    if not isinstance(blocks, _Blocks):
        raise ValueError(f"tile override {name} must be a Blocks(m, n, warps, stages) or None, "
                         f"got {type(blocks).__name__}")
    for field, (ok, what) in _CHECKS.items():
        val = getattr(blocks, field)
        if isinstance(val, bool) or not isinstance(val, int) or not ok(val):
            raise ValueError(f"tile override {name}.{field} must be {what}, got {val!r}")


def set_tile_override(fwd: _Blocks | None = None, bwd_kv: _Blocks | None = None,
                      bwd_q: _Blocks | None = None, bwd_fused: _Blocks | None = None,
                      bwd_chunked: _Blocks | None = None) -> dict[str, _Blocks | None]:
    """Replace the tile heuristics: `fwd` (forward), `bwd_kv` (dK/dV kernel: n = key block,
    m = inner query block), `bwd_q` (dQ kernel and the delta preprocess: m = query block) of
    the split backward, `bwd_fused` (the one-pass backward: n = key block, m = query block;
    m >= Sq: the resident kernel), or `bwd_chunked` (the resident kernel on chunks of m query
    rows, their dK/dV shares summed after; never chosen by the heuristics).

    Setting `bwd_kv` or `bwd_q` forces the split backward, `bwd_fused` the fused one,
    `bwd_chunked` the chunked one (one plan: ValueError otherwise). None restores the
    heuristic for that kernel. All are validated before any is set (ValueError naming the
    field). Returns the previous overrides (to restore them later).
    """
    new = dict(zip(_OVERRIDE_KEYS, (fwd, bwd_kv, bwd_q, bwd_fused, bwd_chunked)))
    for name in (n for n, b in new.items() if b is not None):
        _validate_blocks(name, new[name])
    plans = [bwd_kv is not None or bwd_q is not None, bwd_fused is not None,
             bwd_chunked is not None]
    if sum(plans) > 1:
        raise ValueError("tile override: bwd_kv / bwd_q (split backward), bwd_fused (fused) "
                         "and bwd_chunked (chunked) exclude each other; set one plan")
    previous = dict(_override)
    _override.update(new)
    return previous


@contextlib.contextmanager
def tile_override(fwd: _Blocks | None = None, bwd_kv: _Blocks | None = None,
                  bwd_q: _Blocks | None = None, bwd_fused: _Blocks | None = None,
                  bwd_chunked: _Blocks | None = None) -> Iterator[None]:
    """`set_tile_override` inside a `with` block (forward and backward); restores on exit."""
    previous = set_tile_override(fwd, bwd_kv, bwd_q, bwd_fused, bwd_chunked)
    try:
        yield
    finally:
        _override.update(previous)


_resident = {"transpose": True}


@contextlib.contextmanager
def resident_untransposed() -> Iterator[None]:
    """Inside the block, the resident backward computes dK and dV as kernel version 6 did
    (dV = Pᵀ dO, dK = dSᵀ Q: the key block as the matmuls' M, mma.sync on Hopper) instead of
    transposed (the head dim as M: wgmma); the rest, store order included, is version 8's.
    For A/B timing: `bench attention`'s `triton_resident_v6` column. Read at each backward
    launch."""
    previous = _resident["transpose"]
    _resident["transpose"] = False
    try:
        yield
    finally:
        _resident["transpose"] = previous


def resident_transposed() -> bool:
    """Whether resident backward launches may transpose dK, dV (False in
    `resident_untransposed`)."""
    return _resident["transpose"]


TileKey = tuple[int, int, int, bool]  # (Sq, Sk, BLOCK_D, causal)


@dataclass(frozen=True)
class TileChoice:
    """Measured tiles for one shape class: forward, split backward (dK/dV, dQ), fused
    backward (each None if not measured) and whether the fused backward was the faster."""

    fwd: Blocks | None = None
    split: tuple[Blocks, Blocks] | None = None
    fused: Blocks | None = None
    fused_faster: bool = False


_table: dict[TileKey, TileChoice] = {}


def lookup(sq: int, sk: int, block_d: int, causal: bool) -> TileChoice | None:
    """The loaded table's choice for this call's shape class, or None."""
    return _table.get((sq, sk, block_d, causal)) if _table else None


def clear_tile_table() -> None:
    """Forget the loaded table (the heuristics apply everywhere again)."""
    _table.clear()


def load_tile_table(path: str | Path) -> dict[TileKey, TileChoice]:
    """Load a sweep JSON (`bench attention --sweep --json`) as the process's tile table.
    Raises ValueError naming the file and the record for anything it cannot use."""
    from mmpretrain.kernels.bench import SHAPES

    path = Path(path)
    try:
        data = json.loads(path.read_text())
        records, meta = data["records"], data.get("meta", {})
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"attention tile table {path}: not a `bench attention --sweep "
                         f"--json` file ({type(e).__name__}: {e})") from e
    best: dict[str, dict[str, dict]] = {}
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or "shape" not in rec or "kernel" not in rec:
            raise ValueError(f"attention tile table {path}: record {i} has no shape/kernel")
        if rec.get("best") and rec.get("ms") is not None:
            if rec["shape"] not in SHAPES:
                raise ValueError(f"attention tile table {path}: record {i}: unknown shape "
                                 f"{rec['shape']!r} (known: {list(SHAPES)})")
            best.setdefault(rec["shape"], {})[rec["kernel"]] = rec
    table = {_key(SHAPES[name]): _choice(path, name, recs) for name, recs in best.items()}
    _table.clear()
    _table.update(table)
    logger.info("attention tiles from %s (measured on %s) for %s", path,
                meta.get("gpu", "an unnamed GPU"), ", ".join(best) or "no shape")
    return table


def _key(shape: tuple) -> TileKey:
    _, _, sq, sk, dim, causal = shape
    return sq, sk, _next_pow2(dim), bool(causal)


def _blocks(path: Path, shape: str, name: str, cfg: object) -> Blocks:
    """A validated Blocks from a record's config entry."""
    try:
        blocks = Blocks(**cfg)  # type: ignore[arg-type]
    except TypeError as e:
        raise ValueError(f"attention tile table {path}: {shape} {name}: {cfg!r} ({e})") from e
    try:
        _validate_blocks(name, blocks)
    except ValueError as e:
        raise ValueError(f"attention tile table {path}: {shape}: {e}") from e
    return blocks


def _choice(path: Path, shape: str, recs: dict[str, dict]) -> TileChoice:
    """The TileChoice of one shape's best records (kernels fwd, bwd, bwd_fused)."""
    fwd = split = fused = None
    if "fwd" in recs:
        fwd = _blocks(path, shape, "fwd", recs["fwd"]["config"]["fwd"])
    if "bwd" in recs:
        cfg = recs["bwd"]["config"]
        split = (_blocks(path, shape, "bwd_kv", cfg["bwd_kv"]),
                 _blocks(path, shape, "bwd_q", cfg["bwd_q"]))
    if "bwd_fused" in recs:
        fused = _blocks(path, shape, "bwd_fused", recs["bwd_fused"]["config"]["bwd_fused"])
    faster = fused is not None and (split is None
                                    or recs["bwd_fused"]["ms"] < recs["bwd"]["ms"])
    return TileChoice(fwd, split, fused, faster)


def _next_pow2(x: int) -> int:
    return 1 << max(4, (x - 1).bit_length())  # at least 16 (tl.dot minimum)


def tail_block(seq: int, block: int) -> int:
    """The block size the kernels use for the `seq % block` positions after the last whole
    `block`: the next power of two >= 16 that holds them (`block` when nothing is left over).

    A ragged last block otherwise costs a whole tile: ViT-B/16's 197 tokens in 64-blocks are
    3 whole blocks and 5 tokens, so the last block computes 64 positions for 5; a 16-wide
    tail block, 16.
    """
    rest = seq % block
    return block if rest == 0 else min(block, _next_pow2(rest))


def _tail(seq: int, block: int, causal: bool, kpm: object | None) -> int:
    """TAIL_M / TAIL_N of a launch: `tail_block`, except for causal or padded calls, whose
    kernels ignore it (their masked loops keep whole blocks); `block` there, so they compile
    once per tile, as before."""
    return block if causal or kpm is not None else tail_block(seq, block)


def _query_launches(sq: int, block_m: int) -> list[tuple[int, int, int]]:
    """The forward's launches as (BLOCK_M, first row, query blocks): one over every block, or
    (a ragged tail that fits a smaller block: `tail_block`) the whole blocks, then the tail
    rows in one block of their own, so that ViT-B/16's last 5 of 197 rows cost a 16-row block,
    not 64, and text's last 13 of 77 likewise. Causal and padded calls too: the forward kernel
    starts each block at its own first row, so a tail block needs no code of its own."""
    tail = tail_block(sq, block_m)
    whole = sq // block_m
    if tail == block_m:
        return [(block_m, 0, (sq + block_m - 1) // block_m)]
    return [(block_m, 0, whole)] * (whole > 0) + [(tail, whole * block_m, 1)]
