"""The resumable training stream over WebDataset shards, and the held-out evaluation stream.

Epoch mode (the only mode so far). The unit of work is a *slot*, one (rank, worker) pair:
`slot = rank * W + worker` of `world_size * W` slots (W = max(num_workers, 1)). For epoch `e`
the shard list is permuted by `(seed, e)` and dealt `shards[slot::num_slots]`. Every slot yields
exactly `batches_per_slot` batches per epoch, a bound that holds for every permutation (the
samples of the `num_shards // num_slots` smallest shards, divided by the batch size), so no rank
ever waits on another at the end of an epoch, and `batches_per_epoch` is the same every epoch.

Inside a worker, raw samples (undecoded bytes) of the slot's shards pass through a shuffle buffer
seeded by `(seed, e, slot)`; batches are formed there and only emitted samples are decoded, each
augmented by a generator determined by `(seed, e, slot, sample index)` (see `SampleRngs`). The
DataLoader interleaves workers round-robin, so a rank's global batch `g` comes from worker
`g % W`.

Resume: the only state is the number of batches the trainer has consumed (counted in the main
process as they are handed out). On resume at batch `n` each worker fast-forwards its share of
the consumed batches by pulling raw samples through the shuffle buffer without decoding them, and
DataLoader worker `j` takes the role of worker `(n + j) % W` so that round-robin continues at
batch `n`; the role is the same in every later epoch because `batches_per_epoch % W == 0`.
"""
from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .decode import decode_rgb, eval_transform, train_transform
from .shards import MANIFEST_NAME, count_tar_samples, expand_pattern, iter_shard_samples
from .tokenize import Tokenizer

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_ORDER, _SHUFFLE, _AUG = 1, 2, 3  # RNG domains: shard order, shuffle buffer, augmentation
_LAYOUT_KEYS = ("batch_size", "world_size", "num_workers", "num_shards", "seed")


@dataclass(frozen=True)
class Shard:
    """One shard file and its number of samples."""

    url: str
    samples: int


@dataclass(frozen=True)
class StreamSpec:
    """The per-sample settings a worker needs (small and picklable, unlike the whole config)."""

    batch_size: int
    image_size: int
    context_length: int
    shuffle_buffer: int
    crop_scale_min: float
    seed: int

    @classmethod
    def from_config(cls, cfg: Any) -> StreamSpec:
        """Take the fields from an `ExperimentConfig`."""
        return cls(batch_size=cfg.data.batch_size, image_size=cfg.model.vision.image_size,
                   context_length=cfg.model.text.context_length,
                   shuffle_buffer=cfg.data.shuffle_buffer,
                   crop_scale_min=cfg.data.crop_scale_min, seed=cfg.seed)


def _rng(*parts: int) -> np.random.Generator:
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


def _manifest_counts(directory: str) -> dict[str, tuple[int, int]]:
    path = os.path.join(directory, MANIFEST_NAME)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return {s["name"]: (int(s["samples"]), int(s["bytes"]))
                    for s in json.load(f)["shards"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # unreadable manifest: count the tars instead


def resolve_shards(pattern: str) -> list[Shard]:
    """The shards named by a brace pattern, with sample counts.

    Counts come from each directory's `manifest.json` when it lists the shard with its current
    size in bytes; otherwise the tar's member headers are counted. Raises FileNotFoundError
    naming the first missing shard.
    """
    urls = expand_pattern(pattern)
    if not urls:
        raise ValueError(f"shard pattern {pattern!r} names no shards")
    manifests: dict[str, dict[str, tuple[int, int]]] = {}
    shards = []
    for url in urls:
        if not os.path.isfile(url):
            raise FileNotFoundError(f"shard {url} does not exist (from pattern {pattern!r})")
        directory, name = os.path.split(url)
        if directory not in manifests:
            manifests[directory] = _manifest_counts(directory or ".")
        entry = manifests[directory].get(name)
        if entry is not None and entry[1] == os.path.getsize(url):
            shards.append(Shard(url, entry[0]))
        else:
            shards.append(Shard(url, count_tar_samples(url)))
    return shards


def epoch_shards(shards: list[Shard], seed: int, epoch: int, slot: int,
                 num_slots: int) -> list[Shard]:
    """The shards `slot` reads in `epoch`: the (seed, epoch) permutation, dealt round-robin."""
    order = _rng(seed, _ORDER, epoch).permutation(len(shards))
    return [shards[i] for i in order[slot::num_slots]]


def batches_per_slot(counts: list[int], num_slots: int, batch_size: int) -> int:
    """Batches every slot can yield in every epoch, whatever the shard permutation.

    A slot gets at least `len(counts) // num_slots` shards, holding at least as many samples as
    that many smallest shards.
    """
    least = len(counts) // num_slots
    return sum(sorted(counts)[:least]) // batch_size


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


def _iter_raw(shards: list[Shard]) -> Iterator[dict[str, Any]]:
    for shard in shards:
        yield from iter_shard_samples(shard.url)


def _take(stream: Iterator[Any], n: int, where: str, keep: bool = True) -> list[Any]:
    """The next `n` items of `stream` (or just skip them when `keep` is False)."""
    out = []
    for _ in range(n):
        try:
            item = next(stream)
        except StopIteration:
            raise RuntimeError(f"{where}: the shards ran out of samples early; their manifest "
                               "overstates the sample counts (rewrite it or delete it)") from None
        if keep:
            out.append(item)
    return out


def sample_image(sample: dict[str, Any]) -> np.ndarray:
    """The decoded RGB image (H, W, 3) uint8 of a raw sample; errors name the sample."""
    data = next((sample[ext] for ext in IMAGE_EXTS if ext in sample), None)
    if data is None:
        raise ValueError(f"sample {sample['__key__']} in {sample.get('__url__')} has no image "
                         f"(looked for {', '.join(IMAGE_EXTS)}; has {sorted(sample)})")
    try:
        return decode_rgb(data)
    except ValueError as exc:
        raise ValueError(f"sample {sample['__key__']} in {sample.get('__url__')}: {exc}") from exc


def sample_caption(sample: dict[str, Any]) -> str:
    """The caption of a raw sample (`txt`, UTF-8)."""
    if "txt" not in sample:
        raise ValueError(f"sample {sample['__key__']} in {sample.get('__url__')} has no caption "
                         f"(txt); has {sorted(sample)}")
    return sample["txt"].decode("utf-8", errors="replace")


def sample_label(sample: dict[str, Any]) -> int:
    """The integer `label` of the sample's json metadata, or -1."""
    if "json" not in sample:
        return -1
    label = json.loads(sample["json"]).get("label", -1)
    return int(label) if isinstance(label, (int, float)) else -1


class _TrainShardDataset(IterableDataset):
    """Worker side of TrainStream: one slot's endless, epoch after epoch, batch stream."""

    def __init__(self, spec: StreamSpec, shards: list[Shard], tokenizer: Tokenizer, rank: int,
                 world_size: int, num_workers: int, per_slot: int, start: int) -> None:
        super().__init__()
        self.spec, self.shards, self.tokenizer = spec, shards, tokenizer
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.per_slot, self.start = per_slot, start

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        workers = max(1, self.num_workers)
        role = (self.start + (info.id if info is not None else 0)) % workers
        slot = self.rank * workers + role
        epoch, offset = divmod(self.start, self.per_slot * workers)
        skip = max(0, -(-(offset - role) // workers))  # this role's batches among the first offset
        while True:
            yield from self._epoch(slot, epoch, skip)
            epoch, skip = epoch + 1, 0

    def _epoch(self, slot: int, epoch: int, skip: int) -> Iterator[dict[str, Any]]:
        spec, size = self.spec, self.spec.batch_size
        num_slots = self.world_size * max(1, self.num_workers)
        shards = epoch_shards(self.shards, spec.seed, epoch, slot, num_slots)
        stream = shuffle_buffer(_iter_raw(shards), spec.shuffle_buffer,
                                _rng(spec.seed, _SHUFFLE, epoch, slot))
        where = f"epoch {epoch} slot {slot} ({', '.join(s.url for s in shards)})"
        try:
            # Fast-forward past batches consumed before a resume: raw bytes only, no decoding.
            _take(stream, skip * size, where, keep=False)
            for b in range(skip, self.per_slot):
                yield self._batch(_take(stream, size, where), epoch, slot, b * size)
        finally:
            stream.close()

    def _batch(self, raw: list[dict[str, Any]], epoch: int, slot: int,
               first: int) -> dict[str, Any]:
        spec = self.spec
        images = torch.empty((len(raw), 3, spec.image_size, spec.image_size),
                             dtype=torch.uint8)  # (B, 3, S, S)
        rngs = SampleRngs(spec.seed, _AUG, epoch, slot)
        for k, sample in enumerate(raw):
            rng = rngs(first + k)
            images[k] = train_transform(sample_image(sample), spec.image_size,
                                        spec.crop_scale_min, rng)
        tokens = self.tokenizer.encode([sample_caption(s) for s in raw],
                                       spec.context_length)  # (B, L)
        return {"image": images, "tokens": tokens, "keys": [s["__key__"] for s in raw]}


def _worker_init(worker_id: int) -> None:
    torch.set_num_threads(1)  # one core per worker; the resize would otherwise oversubscribe


class TrainStream:
    """The resumable, endless training batch stream of one rank (epoch mode).

    Iterating yields dicts `image` uint8 (B, 3, S, S), `tokens` int64 (B, L), `keys` list[str],
    epoch after epoch. `state_dict()` records how many batches were handed out; a new stream
    given that state continues with exactly the batches the uninterrupted stream would have
    produced next. Iterate one iterator at a time; `load_state_dict` applies to the next `iter()`.
    """

    def __init__(self, cfg: Any, tokenizer: Tokenizer, rank: int = 0, world_size: int = 1,
                 pattern: str | None = None, pin_memory: bool | None = None,
                 prefetch_factor: int = 4) -> None:
        if tokenizer is None:
            raise ValueError("TrainStream needs a tokenizer (see prepare_tokenizer)")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.spec = StreamSpec.from_config(cfg)
        self.pattern = cfg.data.train_shards if pattern is None else pattern
        if not self.pattern:
            raise ValueError("no training shards: set data.train_shards to a brace pattern such "
                             "as data/train-{000000..000099}.tar")
        self.tokenizer, self.rank, self.world_size = tokenizer, rank, world_size
        self.num_workers = cfg.data.num_workers
        self.shards = resolve_shards(self.pattern)
        self.num_slots = world_size * max(1, self.num_workers)
        if len(self.shards) < self.num_slots:
            raise ValueError(
                f"{len(self.shards)} shards cannot feed {self.num_slots} readers (world_size "
                f"{world_size} x {max(1, self.num_workers)} workers): every reader needs a shard "
                "of its own; lower data.num_workers or write more, smaller shards")
        self.batches_per_slot = batches_per_slot([s.samples for s in self.shards],
                                                 self.num_slots, self.spec.batch_size)
        if self.batches_per_slot == 0:
            raise ValueError(
                f"batch_size {self.spec.batch_size} is larger than what each of the "
                f"{self.num_slots} readers is guaranteed per epoch; lower data.batch_size or "
                "data.num_workers")
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.prefetch_factor = prefetch_factor
        self._batches = 0

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
                                     start=self._batches)
        loader = DataLoader(
            dataset, batch_size=None, num_workers=self.num_workers, persistent_workers=False,
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
            pin_memory=self.pin_memory, worker_init_fn=_worker_init)
        for batch in loader:
            self._batches += 1  # counted as handed out: a checkpoint now includes this batch
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """`batches` consumed, plus the layout that makes the count meaningful."""
        n, bpe = self._batches, self.batches_per_epoch
        return {"batches": n, "epoch": n // bpe, "batch_in_epoch": n % bpe,
                "batches_per_epoch": bpe, "batch_size": self.spec.batch_size,
                "world_size": self.world_size, "num_workers": self.num_workers,
                "num_shards": len(self.shards), "seed": self.spec.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at batch `state["batches"]` (exact when the layout is unchanged).

        With a different layout (world size, workers, batch size, shards) the position is
        mapped to the same epoch and fraction of an epoch, with a warning: not exact.
        """
        n = int(state["batches"])
        changed = [k for k in _LAYOUT_KEYS if k in state and state[k] != self.state_dict()[k]]
        old_bpe = int(state.get("batches_per_epoch", self.batches_per_epoch))
        if changed or old_bpe != self.batches_per_epoch:
            epoch, offset = divmod(n, old_bpe)
            n = epoch * self.batches_per_epoch + offset * self.batches_per_epoch // old_bpe
            warnings.warn(f"data stream layout changed ({', '.join(changed) or 'shards'}); "
                          f"resuming at epoch {epoch}, batch {n % self.batches_per_epoch} of "
                          f"{self.batches_per_epoch}: the batch order is not an exact "
                          "continuation", stacklevel=2)
        self._batches = n


class _EvalShardDataset(IterableDataset):
    """Worker side of EvalStream: each worker reads its share of the rank's shards in order."""

    def __init__(self, spec: StreamSpec, shards: list[Shard], tokenizer: Tokenizer) -> None:
        super().__init__()
        self.spec, self.shards, self.tokenizer = spec, shards, tokenizer

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        mine = self.shards[info.id::info.num_workers] if info is not None else self.shards
        batch: list[dict[str, Any]] = []
        for sample in _iter_raw(mine):
            batch.append(sample)
            if len(batch) == self.spec.batch_size:
                yield self._batch(batch)
                batch = []
        if batch:
            yield self._batch(batch)

    def _batch(self, raw: list[dict[str, Any]]) -> dict[str, Any]:
        size = self.spec.image_size
        images = torch.empty((len(raw), 3, size, size), dtype=torch.uint8)  # (B, 3, S, S)
        for k, sample in enumerate(raw):
            images[k] = eval_transform(sample_image(sample), size)
        tokens = self.tokenizer.encode([sample_caption(s) for s in raw],
                                       self.spec.context_length)  # (B, L)
        labels = torch.tensor([sample_label(s) for s in raw], dtype=torch.long)  # (B,)
        return {"image": images, "tokens": tokens, "labels": labels,
                "keys": [s["__key__"] for s in raw]}


class EvalStream:
    """Held-out batches of one rank: every sample exactly once across ranks, no augmentation.

    Shards are dealt to ranks (`shards[rank::world_size]`), so ranks may hold different numbers
    of samples; the last batch may be smaller. Batches: `image` uint8 (B, 3, S, S) (resize the
    shorter side + center crop), `tokens` int64 (B, L), `labels` int64 (B,) (json `label`, -1 if
    absent), `keys`.
    """

    def __init__(self, pattern: str, tokenizer: Tokenizer, cfg: Any, rank: int = 0,
                 world_size: int = 1, batch_size: int | None = None,
                 num_workers: int | None = None) -> None:
        spec = StreamSpec.from_config(cfg)
        if batch_size is not None:
            spec = StreamSpec(batch_size, spec.image_size, spec.context_length,
                              spec.shuffle_buffer, spec.crop_scale_min, spec.seed)
        self.spec, self.tokenizer = spec, tokenizer
        self.shards = resolve_shards(pattern)[rank::world_size]
        workers = cfg.data.num_workers if num_workers is None else num_workers
        self.num_workers = min(workers, len(self.shards))
        self.pin_memory = torch.cuda.is_available()

    @property
    def num_samples(self) -> int:
        """Samples this rank will yield."""
        return sum(s.samples for s in self.shards)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if not self.shards:
            return iter(())
        dataset = _EvalShardDataset(self.spec, self.shards, self.tokenizer)
        return iter(DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                               pin_memory=self.pin_memory, worker_init_fn=_worker_init))


def eval_batches(pattern: str, tokenizer: Tokenizer, cfg: Any, rank: int = 0,
                 world_size: int = 1, batch_size: int | None = None) -> EvalStream:
    """The held-out stream of `pattern` for one rank (iterate it once per evaluation)."""
    return EvalStream(pattern, tokenizer, cfg, rank, world_size, batch_size)
