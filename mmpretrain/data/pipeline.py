"""The resumable training stream over WebDataset shards (epoch or resampled mode).

The unit of work is a *slot*, one (rank, worker) pair: `slot = rank * W + worker` of
`world_size * W` slots (W = max(num_workers, 1)). Every slot yields exactly `batches_per_slot`
batches per epoch, so no rank ever waits on another at the end of an epoch, and
`batches_per_epoch` is the same every epoch and on every rank. Which raw samples a slot reads
is decided in `sampling.py`: in epoch mode the (seed, epoch) shard permutation dealt to the
slots (`batches_per_slot` is a bound that holds for every permutation); in resampled mode
endless weighted shard draws (`batches_per_slot` comes from `data.epoch_samples`).

Inside a worker, raw samples (undecoded bytes) pass through a shuffle buffer; batches are formed
after it and only emitted samples are decoded, each augmented by a generator determined by
`(seed, epoch, slot, raw sample index)` (see `SampleRngs`). A bad sample (`badsamples.py`) is
skipped and the batch filled from the next samples, so batch counts never change. The
DataLoader interleaves workers round-robin, so a rank's global batch `g` comes from worker
`g % W`.

Resume: the main process counts the batches handed out and, per worker, the raw-sample position
its last batch reached in its epoch (bad samples make that differ from batches x batch size).
On resume at batch `n` each worker fast-forwards to its position by pulling raw samples through
the shuffle buffer without decoding them, and DataLoader worker `j` takes the role of worker
`(n + j) % W` so that round-robin continues at batch `n`; the role is the same in every later
epoch because `batches_per_epoch % W == 0`.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .badsamples import (BadSample, SkipCounter, SkipTally, caption_choices, describe,
                         image_bytes)
from .decode import decode_train
from .evalstream import EvalStream, eval_batches, sample_caption, sample_image, sample_label
from .sampling import AUG, SampleRngs, batches_per_slot, epoch_shards, epoch_stream, \
    resampled_stream, shuffle_buffer
from .shardlist import Shard, ShardSource, TruncatedShard, resolve_shards, resolve_sources
from .tokenize import Tokenizer

__all__ = ["EvalStream", "Shard", "StreamSpec", "TrainStream", "batches_per_slot",
           "epoch_shards", "eval_batches", "resolve_shards", "sample_caption", "sample_image",
           "sample_label", "shuffle_buffer"]

_LAYOUT_KEYS = ("mode", "batch_size", "world_size", "num_workers", "num_shards", "seed")


@dataclass(frozen=True)
class StreamSpec:
    """The per-sample settings a worker needs (small and picklable, unlike the whole config)."""

    batch_size: int
    image_size: int
    context_length: int
    shuffle_buffer: int
    crop_scale_min: float
    seed: int
    mode: str = "epoch"
    max_bad_in_a_row: int = 100
    fast_jpeg: bool = False

    @classmethod
    def from_config(cls, cfg: Any) -> StreamSpec:
        """Take the fields from an `ExperimentConfig`."""
        d = cfg.data
        return cls(batch_size=d.batch_size, image_size=cfg.model.vision.image_size,
                   context_length=cfg.model.text.context_length, shuffle_buffer=d.shuffle_buffer,
                   crop_scale_min=d.crop_scale_min, seed=cfg.seed, mode=d.mode,
                   max_bad_in_a_row=d.max_bad_in_a_row, fast_jpeg=d.fast_jpeg)


class _Reader:
    """A raw-sample stream with its position (samples pulled so far)."""

    def __init__(self, stream: Iterator[dict[str, Any]], where: str) -> None:
        self.stream, self.where, self.pos = stream, where, 0

    def next(self) -> dict[str, Any]:
        try:
            sample = next(self.stream)
        except StopIteration:
            raise RuntimeError(f"{self.where}: the raw sample stream ended") from None
        self.pos += 1
        return sample

    def skip(self, n: int) -> None:
        """Pull `n` samples without looking at them (fast-forward: no decoding)."""
        for _ in range(n):
            self.next()


class _TrainShardDataset(IterableDataset):
    """Worker side of TrainStream: one slot's endless, epoch after epoch, batch stream.

    `shards` are read in epoch mode, `sources` in resampled mode; `positions` maps a worker role
    to (epoch, raw position) of its last consumed batch (exact fast-forward past bad samples)."""

    def __init__(self, spec: StreamSpec, shards: list[Shard], tokenizer: Tokenizer, rank: int,
                 world_size: int, num_workers: int, per_slot: int, start: int,
                 sources: list[ShardSource] | None = None,
                 positions: dict[int, tuple[int, int]] | None = None) -> None:
        super().__init__()
        self.spec, self.shards, self.tokenizer = spec, shards, tokenizer
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.per_slot, self.start = per_slot, start
        self.sources = sources or [ShardSource("", 1.0, tuple(shards))]
        self.positions = positions or {}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        workers = max(1, self.num_workers)
        role = (self.start + (info.id if info is not None else 0)) % workers
        epoch, offset = divmod(self.start, self.per_slot * workers)
        skip = max(0, -(-(offset - role) // workers))  # this role's batches among the first offset
        saved = self.positions.get(role)
        raw_skip = saved[1] if skip and saved is not None and saved[0] == epoch else None
        while True:
            yield from self._epoch(self.rank * workers + role, epoch, skip, raw_skip)
            epoch, skip, raw_skip = epoch + 1, 0, None

    def _raw(self, slot: int, epoch: int, report: Any) -> Iterator[dict[str, Any]]:
        spec, workers = self.spec, max(1, self.num_workers)
        if spec.mode == "resampled":
            return resampled_stream(self.sources, spec.seed, slot // workers, slot % workers,
                                    epoch, spec.shuffle_buffer, report)
        shards = epoch_shards(self.shards, spec.seed, epoch, slot, self.world_size * workers)
        return epoch_stream(shards, spec.seed, epoch, slot, spec.shuffle_buffer, report)

    def _epoch(self, slot: int, epoch: int, skip: int,
               raw_skip: int | None = None) -> Iterator[dict[str, Any]]:
        """Batches `skip`.. of `slot` in `epoch`, after fast-forwarding `raw_skip` raw samples
        (None: `skip` full batches, exact when no bad sample was met)."""
        if skip >= self.per_slot:
            return  # this slot's epoch was consumed before the resume
        events: list[TruncatedShard] = []
        raw = self._raw(slot, epoch, events.append)
        reader = _Reader(raw, f"epoch {epoch} slot {slot}")
        try:
            reader.skip(skip * self.spec.batch_size if raw_skip is None else raw_skip)
            events.clear()  # met again while fast-forwarding: counted before the checkpoint
            tally = SkipTally(self.spec.max_bad_in_a_row)
            rngs = SampleRngs(self.spec.seed, AUG, epoch, slot)
            for _ in range(skip, self.per_slot):
                yield self._batch(reader, events, tally, rngs, epoch, slot)
        finally:
            raw.close()

    def _batch(self, reader: _Reader, events: list[TruncatedShard], tally: SkipTally,
               rngs: SampleRngs, epoch: int, slot: int) -> dict[str, Any]:
        spec, size = self.spec, self.spec.batch_size
        images = torch.empty((size, 3, spec.image_size, spec.image_size),
                             dtype=torch.uint8)  # (B, 3, S, S)
        captions: list[str] = []
        keys: list[str] = []
        while len(keys) < size:
            index = reader.pos
            sample = reader.next()
            for exc in events:
                tally.bad("truncated", f"shard {exc.url}, sample {exc.key or '?'}", str(exc))
            events.clear()
            try:
                choices = caption_choices(sample)
                rng = rngs(index)
                images[len(keys)] = decode_train(image_bytes(sample), spec.image_size,
                                                 spec.crop_scale_min, rng, spec.fast_jpeg)
                # several captions (json `captions`): one per visit, drawn after the crop
                caption = choices[int(rng.integers(len(choices)))] if len(choices) > 1 \
                    else choices[0]
            except BadSample as exc:
                tally.bad(exc.kind, describe(sample), str(exc))
                continue
            except (ValueError, OSError) as exc:
                tally.bad("corrupt_image", describe(sample), str(exc))
                continue
            tally.good()
            captions.append(caption)
            keys.append(sample["__key__"])
        tokens = self.tokenizer.encode(captions, spec.context_length)  # (B, L)
        meta = {"epoch": epoch, "slot": slot, "pos": reader.pos, "skipped": tally.take(),
                "last_bad": tally.last}
        return {"image": images, "tokens": tokens, "keys": keys, "_meta": meta}


def _worker_init(worker_id: int) -> None:
    torch.set_num_threads(1)  # one core per worker; the resize would otherwise oversubscribe


class TrainStream:
    """The resumable, endless training batch stream of one rank (epoch or resampled mode).

    Iterating yields dicts `image` uint8 (B, 3, S, S), `tokens` int64 (B, L), `keys` list[str],
    epoch after epoch. `state_dict()` records how many batches were handed out (and where each
    worker's raw stream stood); a new stream given that state continues with exactly the batches
    the uninterrupted stream would have produced next. `metrics()` gives the cumulative
    bad-sample counts. Iterate one iterator at a time; `load_state_dict` applies to the next
    `iter()`.
    """

    def __init__(self, cfg: Any, tokenizer: Tokenizer, rank: int = 0, world_size: int = 1,
                 pattern: str | None = None, pin_memory: bool | None = None,
                 prefetch_factor: int = 4) -> None:
        if tokenizer is None:
            raise ValueError("TrainStream needs a tokenizer (see prepare_tokenizer)")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        d = cfg.data
        self.spec = StreamSpec.from_config(cfg)
        self.mode = d.mode
        self.pattern = d.train_shards if pattern is None else pattern
        self.tokenizer, self.rank, self.world_size = tokenizer, rank, world_size
        self.num_workers = d.num_workers
        self.sources = resolve_sources(self.pattern, d.train_weights, d.train_manifests)
        self.shards = [s for src in self.sources for s in src.shards]
        self.num_slots = world_size * max(1, self.num_workers)
        if self.mode == "epoch":
            self.batches_per_slot = self._plan_epoch(d.train_weights)
        elif self.mode == "resampled":
            self.batches_per_slot = self._plan_resampled(d.epoch_samples)
        else:
            raise ValueError(f"data.mode must be 'epoch' or 'resampled', got {self.mode!r}")
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.prefetch_factor = prefetch_factor
        self.skips = SkipCounter(d.max_bad_fraction)
        self._batches = 0
        self._positions: dict[int, tuple[int, int]] = {}

    def _readers(self) -> str:
        return (f"{self.num_slots} readers (world_size {self.world_size} x "
                f"{max(1, self.num_workers)} workers)")

    def _plan_epoch(self, weights: list[float]) -> int:
        if weights:
            raise ValueError(
                "data.train_weights mixes sources only in data.mode=resampled: epoch mode reads "
                "every shard of every source once per epoch, so the mix follows the sources' "
                "sizes. Remove the weights or set data.mode=resampled")
        unknown = [s.url for s in self.shards if s.samples is None]
        if unknown:
            raise ValueError(
                f"the sample count of shard {unknown[0]!r} is unknown ({len(unknown)} such "
                "shards): epoch mode needs every count. Give the source's manifest.json in "
                "data.train_manifests, or set data.mode=resampled")
        if len(self.shards) < self.num_slots:
            raise ValueError(
                f"{len(self.shards)} shards cannot feed {self._readers()} in epoch mode: every "
                "reader needs a shard of its own: lower data.num_workers, write more, smaller "
                "shards, or set data.mode=resampled (shards drawn with replacement; no minimum)")
        per_slot = batches_per_slot([s.samples for s in self.shards],  # type: ignore[misc]
                                    self.num_slots, self.spec.batch_size)
        if per_slot == 0:
            raise ValueError(
                f"batch_size {self.spec.batch_size} is larger than what each of the "
                f"{self._readers()} is guaranteed per epoch; lower data.batch_size or "
                "data.num_workers")
        return per_slot

    def _plan_resampled(self, epoch_samples: int) -> int:
        total = sum(s.samples or 0 for s in self.shards)
        if not epoch_samples and any(s.samples is None for s in self.shards):
            raise ValueError(
                "resampled mode with shards of unknown sample counts needs data.epoch_samples "
                "(samples per epoch over all ranks; an epoch bounds the fast-forward of a "
                "resume), or the sources' manifest.json in data.train_manifests")
        samples = epoch_samples or total
        per_slot = samples // (self.num_slots * self.spec.batch_size)
        if per_slot == 0:
            raise ValueError(
                f"an epoch of {samples} samples is less than one batch of "
                f"{self.spec.batch_size} for each of the {self._readers()}; raise "
                "data.epoch_samples or lower data.batch_size")
        return per_slot

    @property
    def batches_per_epoch(self) -> int:
        """Batches this rank yields per epoch (the same on every rank and in every epoch)."""
        return self.batches_per_slot * max(1, self.num_workers)

    @property
    def epoch(self) -> int:
        """The epoch of the next batch."""
        return self._batches // self.batches_per_epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        dataset = _TrainShardDataset(self.spec, self.shards, self.tokenizer, self.rank,
                                     self.world_size, self.num_workers, self.batches_per_slot,
                                     start=self._batches, sources=self.sources,
                                     positions=dict(self._positions))
        loader = DataLoader(
            dataset, batch_size=None, num_workers=self.num_workers, persistent_workers=False,
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
            pin_memory=self.pin_memory, worker_init_fn=_worker_init)
        workers = max(1, self.num_workers)
        for batch in loader:
            meta = batch.pop("_meta")
            role = self._batches % workers
            assert meta["slot"] == self.rank * workers + role, "DataLoader order broken"
            self._positions[role] = (int(meta["epoch"]), int(meta["pos"]))
            self._batches += 1  # counted as handed out: a checkpoint now includes this batch
            self.skips.add(meta["skipped"], len(batch["keys"]), meta["last_bad"])
            yield batch

    def metrics(self) -> dict[str, int]:
        """Cumulative bad samples skipped by this rank: `{"data_skipped_<kind>": n}`."""
        return self.skips.metrics()

    def _rank_state(self) -> dict[str, Any]:
        workers = max(1, self.num_workers)
        return {"positions": [list(self._positions.get(r, (-1, 0))) for r in range(workers)],
                **self.skips.state_dict()}

    def _gather(self, mine: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Every rank's part of the state (a collective when torch.distributed runs this job:
        checkpoints keep one copy of the client state, so each rank's part travels in it)."""
        dist = torch.distributed
        if (self.world_size > 1 and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() == self.world_size):
            everyone: list[Any] = [None] * self.world_size
            dist.all_gather_object(everyone, mine)
            return {str(r): part for r, part in enumerate(everyone)}
        return {str(self.rank): mine}

    def state_dict(self) -> dict[str, Any]:
        """`batches` consumed, the layout that makes the count meaningful, and per rank each
        worker's raw position and the bad-sample counts (`per_rank`).

        When torch.distributed is initialized with this stream's world size this is a
        collective (every rank calls it at the same batch, as the trainer's checkpoint does):
        the per-rank parts of all ranks are gathered, because a checkpoint stores one copy.
        """
        n, bpe = self._batches, self.batches_per_epoch
        return {"mode": self.mode, "batches": n, "epoch": n // bpe, "batch_in_epoch": n % bpe,
                "batches_per_epoch": bpe, "batch_size": self.spec.batch_size,
                "world_size": self.world_size, "num_workers": self.num_workers,
                "num_shards": len(self.shards), "seed": self.spec.seed,
                "per_rank": self._gather(self._rank_state())}

    def _layout(self) -> dict[str, Any]:
        return {"mode": self.mode, "batch_size": self.spec.batch_size,
                "world_size": self.world_size, "num_workers": self.num_workers,
                "num_shards": len(self.shards), "seed": self.spec.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at batch `state["batches"]` (exact when the layout is unchanged).

        With a different layout (mode, world size, workers, batch size, shards) the position is
        mapped to the same epoch and fraction of an epoch, with a warning: not exact. Without
        this rank's part (`per_rank`) workers fast-forward whole batches: exact unless bad
        samples had been skipped.
        """
        n = int(state["batches"])
        layout = self._layout()
        changed = [k for k in _LAYOUT_KEYS if k in state and state[k] != layout[k]]
        old_bpe = int(state.get("batches_per_epoch", self.batches_per_epoch))
        part = state.get("per_rank", {}).get(str(self.rank), {})
        self._positions = {}
        if changed or old_bpe != self.batches_per_epoch:
            epoch, offset = divmod(n, old_bpe)
            n = epoch * self.batches_per_epoch + offset * self.batches_per_epoch // old_bpe
            warnings.warn(f"data stream layout changed ({', '.join(changed) or 'shards'}); "
                          f"resuming at epoch {epoch}, batch {n % self.batches_per_epoch} of "
                          f"{self.batches_per_epoch}: the batch order is not an exact "
                          "continuation", stacklevel=2)
        else:
            self._positions = {r: (int(e), int(p)) for r, (e, p) in
                               enumerate(part.get("positions", [])) if e >= 0}
        self._batches = n
        self.skips.load_state_dict(part)
