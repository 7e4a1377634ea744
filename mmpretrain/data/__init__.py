"""Data: shards → resumable batch streams of uint8 images and token ids.

Entry points for the trainer: `prepare_tokenizer(cfg, run_dir)` then
`build_train_stream(cfg, tokenizer, rank, world_size)`; `EvalStream` for held-out shards;
`normalize` turns the uint8 images into model input on the device.

Where things live: `shardlist.py` (shard specs: local, `pipe:`, mixed sources, counts, reading),
`sampling.py` (epoch and resampled sample orders), `badsamples.py` (skipping and the error
budget), `pipeline.py` (TrainStream: workers, batches, exact resume), `evalstream.py`,
`decode.py`, `tokenize.py`, `shards.py` (writing shards), `bench.py` (`mmpretrain bench data`).
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from .badsamples import SKIP_KINDS, DataErrorBudgetExceeded
from .decode import normalize
from .demo import DemoData, ensure_demo_shards
from .evalstream import EvalStream, eval_batches
from .pipeline import TrainStream
from .shardlist import ShardReadError, expand_pattern, read_shard, resolve_sources
from .shards import ShardWriter, read_manifest, write_shards
from .synthetic import SyntheticStream
from .tokenize import Tokenizer, iter_captions, load_tokenizer, train_tokenizer

__all__ = [
    "SKIP_KINDS", "DataErrorBudgetExceeded", "DemoData", "EvalStream", "ShardReadError",
    "ShardWriter", "SyntheticStream", "Tokenizer", "TrainStream", "build_train_stream",
    "ensure_demo_shards", "eval_batches", "iter_captions", "iter_shard_captions",
    "load_tokenizer", "normalize", "prepare_tokenizer", "read_manifest", "resolve_sources",
    "train_pattern", "train_tokenizer", "val_pattern", "write_shards",
]

MAX_TOKENIZER_CAPTIONS = 200_000  # captions read to fit a tokenizer (the first shards' worth)


def _demo(cfg: Any) -> DemoData:
    return ensure_demo_shards(cfg.data.cache_dir or None, cfg.model.vision.image_size)


def train_pattern(cfg: Any) -> str:
    """The training shard pattern of `cfg` (writing the demo shards first for `demo`)."""
    if cfg.data.source == "demo":
        return _demo(cfg).train_pattern
    if cfg.data.source == "shards":
        if not cfg.data.train_shards:
            raise ValueError("data.source is 'shards' but data.train_shards is empty")
        return cfg.data.train_shards
    raise ValueError(f"data.source {cfg.data.source!r} has no training shards")


def val_pattern(cfg: Any) -> str:
    """The held-out shard pattern of `cfg` ('' when there is none)."""
    if cfg.data.source == "demo":
        return cfg.data.val_shards or _demo(cfg).val_pattern
    return cfg.data.val_shards


def build_train_stream(cfg: Any, tokenizer: Tokenizer | None, rank: int = 0,
                       world_size: int = 1) -> TrainStream | SyntheticStream:
    """The training stream chosen by `cfg.data.source` (`demo`, `shards` or `synthetic`).

    Both kinds iterate endlessly and have `state_dict()`/`load_state_dict()`. `synthetic` needs
    no tokenizer (pass None).
    """
    if cfg.data.source == "synthetic":
        return SyntheticStream(cfg, rank, world_size)
    if tokenizer is None:
        raise ValueError(f"data.source {cfg.data.source!r} needs a tokenizer "
                         "(see prepare_tokenizer)")
    return TrainStream(cfg, tokenizer, rank, world_size, pattern=train_pattern(cfg))


def iter_shard_captions(spec: str, limit: int | None = None) -> Iterator[str]:
    """Captions (`txt`, UTF-8 with undecodable bytes replaced) of a shard spec's shards in
    order: local or `pipe:`, sources joined by `::`; truncated shards are read up to the break."""
    count = 0
    for url in expand_pattern(spec):
        for sample in read_shard(url, on_truncated=lambda exc: None):
            if "txt" in sample:
                yield sample["txt"].decode("utf-8", errors="replace")
                count += 1
                if limit is not None and count >= limit:
                    return


def _check_vocab(tokenizer: Tokenizer, cfg: Any) -> Tokenizer:
    if tokenizer.vocab_size > cfg.model.text.vocab_size:
        raise ValueError(f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} tokens but "
                         f"model.text.vocab_size is {cfg.model.text.vocab_size}; raise "
                         "model.text.vocab_size to at least the tokenizer's size")
    return tokenizer


def prepare_tokenizer(cfg: Any, run_dir: str) -> Tokenizer | None:
    """The run's tokenizer; None for `synthetic` data (tokens are generated directly).

    `data.tokenizer` set: load it. Else `run_dir/tokenizer/tokenizer.json` exists (a resumed
    run): load it. Else fit a byte-level BPE of `model.text.vocab_size` tokens on (up to
    200,000 of) the training captions and save it to `run_dir/tokenizer`. Fitting is
    deterministic, so ranks that each fit one get the same tokenizer; the save is atomic.
    """
    if cfg.data.source == "synthetic":
        return None
    if cfg.data.tokenizer:
        return _check_vocab(load_tokenizer(cfg.data.tokenizer), cfg)
    saved = os.path.join(run_dir, "tokenizer")
    if os.path.isfile(os.path.join(saved, "tokenizer.json")):
        return _check_vocab(load_tokenizer(saved), cfg)
    captions = iter_shard_captions(train_pattern(cfg), limit=MAX_TOKENIZER_CAPTIONS)
    return _check_vocab(train_tokenizer(captions, cfg.model.text.vocab_size, saved), cfg)
