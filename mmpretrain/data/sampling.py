"""Which raw samples a reader slot gets, in which order: epoch mode and resampled mode.

A *slot* is one (rank, DataLoader worker) pair. Every order here is a pure function of the seed
and the slot's position, so a resumed stream can rebuild it and fast-forward through it.

Epoch mode: the shard list is permuted by `(seed, epoch)` and dealt round-robin to the slots; a
slot reads its shards through a shuffle buffer. Should it need more samples than they hold
(bad samples were skipped), it reads them again, reshuffled (another *pass*).

Resampled mode: an endless stream per slot. Each source draws its shards with replacement,
weighted by their sample counts (uniformly when unknown) so every sample of a source is equally
likely, from an RNG seeded by `(seed, rank, worker, epoch, source)`; each emitted sample comes
from a source picked with probability proportional to its weight, so the mix holds in samples
whatever the shard sizes. An "epoch" here is only a restart point of these RNGs and of the
shuffle buffer, which bounds the fast-forward of a resume.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .shardlist import Shard, ShardSource, TruncatedShard, read_shard

# RNG domains
ORDER, SHUFFLE, AUG, DRAW, MIX, RESAMPLED_SHUFFLE = 1, 2, 3, 4, 5, 6
MAX_EMPTY_DRAWS = 100  # consecutive shard draws without a sample before a source is declared dead

Report = Callable[[TruncatedShard], None]


def stream_rng(*parts: int) -> np.random.Generator:
    """A generator seeded by a tuple of integers (domain-separated by its first parts)."""
    return np.random.default_rng([int(p) % (1 << 64) for p in parts])


class SampleRngs:
    """Per-sample generators of one (seed, epoch, slot): Philox keyed by those, with the sample
    index as the counter's second word, so each sample has its own stream. Re-pointing one
    generator costs ~8 us; a fresh `default_rng([...])` per sample costs ~45 us."""

    def __init__(self, *parts: int) -> None:
        entropy = [int(p) % (1 << 64) for p in parts]
        self._key = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint64)
        self._bitgen = np.random.Philox(key=self._key)
        self._gen = np.random.Generator(self._bitgen)
        self._buffer = np.zeros(4, dtype=np.uint64)

    def __call__(self, index: int) -> np.random.Generator:
        """The generator of sample `index`, reset to the start of its stream."""
        self._bitgen.state = {
            "bit_generator": "Philox",
            "state": {"counter": np.array([0, index, 0, 0], dtype=np.uint64), "key": self._key},
            "buffer": self._buffer, "buffer_pos": 4, "has_uint32": 0, "uinteger": 0}
        return self._gen


def shuffle_buffer(samples: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """Shuffle a stream through a buffer of `size` items (fill, then emit a random item and put
    the incoming one in its place; shuffle and drain the rest at the end)."""
    buffer: list[Any] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        i = int(rng.integers(size))
        yield buffer[i]
        buffer[i] = sample
    rng.shuffle(buffer)  # type: ignore[arg-type]
    yield from buffer


def epoch_shards(shards: list[Shard], seed: int, epoch: int, slot: int,
                 num_slots: int) -> list[Shard]:
    """The shards `slot` reads in `epoch`: the (seed, epoch) permutation, dealt round-robin."""
    order = stream_rng(seed, ORDER, epoch).permutation(len(shards))
    return [shards[i] for i in order[slot::num_slots]]


def batches_per_slot(counts: list[int], num_slots: int, batch_size: int) -> int:
    """Batches every slot can yield in every epoch, whatever the shard permutation.

    A slot gets at least `len(counts) // num_slots` shards, holding at least as many samples as
    that many smallest shards.
    """
    least = len(counts) // num_slots
    return sum(sorted(counts)[:least]) // batch_size


def _pass(shards: list[Shard], buffer: int, rng: np.random.Generator,
          report: Report) -> Iterator[dict[str, Any]]:
    raw = (sample for shard in shards for sample in read_shard(shard.url, report))
    stream = shuffle_buffer(raw, buffer, rng)
    try:
        yield from stream
    finally:
        stream.close()
        raw.close()


def epoch_stream(shards: list[Shard], seed: int, epoch: int, slot: int, buffer: int,
                 report: Report) -> Iterator[dict[str, Any]]:
    """The raw samples of `slot` in `epoch` (epoch mode): its shards through a shuffle buffer,
    then again reshuffled for as long as it is pulled (only needed when bad samples were
    skipped). Raises RuntimeError when the shards hold fewer samples than their counts say."""
    expected = sum(s.samples or 0 for s in shards)
    for n_pass in itertools.count():
        truncated: list[TruncatedShard] = []

        def hook(exc: TruncatedShard, truncated: list[TruncatedShard] = truncated) -> None:
            truncated.append(exc)
            report(exc)

        extra = (n_pass,) if n_pass else ()
        n = 0
        for sample in _pass(shards, buffer, stream_rng(seed, SHUFFLE, epoch, slot, *extra), hook):
            n += 1
            yield sample
        where = f"epoch {epoch} slot {slot} ({', '.join(s.url for s in shards)})"
        if n == 0:
            raise RuntimeError(f"{where}: no readable samples")
        if n < expected and not truncated:
            raise RuntimeError(f"{where}: the shards ran out of samples early; their manifest "
                               "overstates the sample counts (rewrite it or delete it)")


def shard_probabilities(source: ShardSource) -> np.ndarray:
    """Draw probabilities of a source's shards: by sample count, uniform when unknown."""
    counts = [s.samples for s in source.shards]
    if any(c is None for c in counts) or sum(counts) == 0:  # type: ignore[arg-type]
        return np.full(len(counts), 1.0 / len(counts))
    weights = np.asarray(counts, dtype=np.float64)
    return weights / weights.sum()


def source_probabilities(sources: list[ShardSource]) -> np.ndarray:
    """Probabilities of each emitted sample coming from each source (normalized weights)."""
    weights = np.asarray([s.weight for s in sources], dtype=np.float64)
    return weights / weights.sum()


def source_stream(source: ShardSource, rng: np.random.Generator,
                  report: Report) -> Iterator[dict[str, Any]]:
    """Endless raw samples of one source: shards drawn with replacement, read in turn."""
    probs, empty = shard_probabilities(source), 0
    while True:
        for i in rng.choice(len(source.shards), size=64, p=probs):
            shard, n = source.shards[int(i)], 0
            for sample in read_shard(shard.url, report):
                n += 1
                yield sample
            empty = 0 if n else empty + 1
            if empty >= MAX_EMPTY_DRAWS:
                raise RuntimeError(f"source {source.pattern!r}: {empty} shard draws in a row "
                                   f"gave no samples (the last: {shard.url})")


def _mixed(streams: list[Iterator[dict[str, Any]]], probs: np.ndarray,
           rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    if len(streams) == 1:
        yield from streams[0]
        return
    while True:
        for i in rng.choice(len(streams), size=1024, p=probs):
            yield next(streams[int(i)])


def resampled_stream(sources: list[ShardSource], seed: int, rank: int, worker: int, epoch: int,
                     buffer: int, report: Report) -> Iterator[dict[str, Any]]:
    """The endless raw samples of one (rank, worker) slot in resampled mode (module docstring)."""
    streams = [source_stream(src, stream_rng(seed, DRAW, rank, worker, epoch, i), report)
               for i, src in enumerate(sources)]
    mixed = _mixed(streams, source_probabilities(sources), stream_rng(seed, MIX, rank, worker,
                                                                       epoch))
    stream = shuffle_buffer(mixed, buffer, stream_rng(seed, RESAMPLED_SHUFFLE, rank, worker,
                                                      epoch))
    try:
        yield from stream
    finally:
        stream.close()
        mixed.close()
        for s in streams:
            s.close()
