"""The held-out evaluation stream: every sample of some shards exactly once, no augmentation."""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .badsamples import IMAGE_EXTS
from .decode import decode_rgb, eval_transform
from .shardlist import Shard, read_shard, resolve_shards
from .tokenize import Tokenizer


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
    """The caption of a raw sample (`txt`, UTF-8; undecodable bytes replaced)."""
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


@dataclass(frozen=True)
class EvalSpec:
    """What an evaluation worker needs to make batches."""

    batch_size: int
    image_size: int
    context_length: int


class _EvalShardDataset(IterableDataset):
    """Worker side of EvalStream: each worker reads its share of the rank's shards in order."""

    def __init__(self, spec: EvalSpec, shards: list[Shard], tokenizer: Tokenizer) -> None:
        super().__init__()
        self.spec, self.shards, self.tokenizer = spec, shards, tokenizer

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        mine = self.shards[info.id::info.num_workers] if info is not None else self.shards
        batch: list[dict[str, Any]] = []
        for sample in (s for shard in mine for s in read_shard(shard.url)):
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


def _worker_init(worker_id: int) -> None:
    torch.set_num_threads(1)  # one core per worker; the resize would otherwise oversubscribe


class EvalStream:
    """Held-out batches of one rank: every sample exactly once across ranks, no augmentation.

    Shards (local or `pipe:`) are dealt to ranks (`shards[rank::world_size]`), so ranks may hold
    different numbers of samples; the last batch may be smaller. Batches: `image` uint8
    (B, 3, S, S) (resize the shorter side + center crop), `tokens` int64 (B, L), `labels` int64
    (B,) (json `label`, -1 if absent), `keys`.
    """

    def __init__(self, pattern: str, tokenizer: Tokenizer, cfg: Any, rank: int = 0,
                 world_size: int = 1, batch_size: int | None = None,
                 num_workers: int | None = None) -> None:
        spec = EvalSpec(cfg.data.batch_size if batch_size is None else batch_size,
                        cfg.model.vision.image_size, cfg.model.text.context_length)
        self.spec, self.tokenizer = spec, tokenizer
        self.shards = resolve_shards(pattern)[rank::world_size]
        workers = cfg.data.num_workers if num_workers is None else num_workers
        self.num_workers = min(workers, len(self.shards))
        self.pin_memory = torch.cuda.is_available()

    @property
    def num_samples(self) -> int | None:
        """Samples this rank will yield (None when a `pipe:` shard's count is unknown)."""
        counts = [s.samples for s in self.shards]
        return None if any(c is None for c in counts) else sum(counts)  # type: ignore[misc]

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
