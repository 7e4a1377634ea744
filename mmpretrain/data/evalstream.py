"""The held-out evaluation stream: every sample of some shards exactly once, no augmentation."""
from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
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


def sample_json(sample: dict[str, Any]) -> dict[str, Any]:
    """The sample's json metadata as a dict ({} when it has none); errors name the sample."""
    if "json" not in sample:
        return {}
    try:
        meta = json.loads(sample["json"])
    except ValueError as exc:
        raise ValueError(f"sample {sample['__key__']} in {sample.get('__url__')}: its json is "
                         f"not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"sample {sample['__key__']} in {sample.get('__url__')}: its json is "
                         f"a {type(meta).__name__}, expected an object")
    return meta


def sample_captions(sample: dict[str, Any]) -> list[str]:
    """All captions of a raw sample: the json `captions` list (strings) when present, else
    `[txt]`. Errors name the sample."""
    captions = sample_json(sample).get("captions")
    if captions is None:
        return [sample_caption(sample)]
    if (not isinstance(captions, list) or not captions
            or not all(isinstance(c, str) for c in captions)):
        raise ValueError(f"sample {sample['__key__']} in {sample.get('__url__')}: json "
                         f"`captions` must be a non-empty list of strings, got {captions!r:.200}")
    return captions


def sample_label(sample: dict[str, Any], classnames: Sequence[str] | None = None) -> int:
    """The json `label` of a sample as a class index, or -1 when it has none.

    Without `classnames`: an integer label as is, anything else -1. With `classnames`
    (zero-shot): the label is required, an int must index `classnames` and a string must be
    one of them (mapped to its index); errors name the sample."""
    label = sample_json(sample).get("label")
    where = f"sample {sample['__key__']} in {sample.get('__url__')}"
    is_number = isinstance(label, (int, float)) and not isinstance(label, bool)
    if classnames is None:
        return int(label) if is_number else -1
    if is_number and float(label).is_integer() and 0 <= int(label) < len(classnames):
        return int(label)
    if isinstance(label, str) and label in classnames:
        return list(classnames).index(label)
    if label is None:
        raise ValueError(f"{where} has no json `label` (zero-shot evaluation needs one: a class "
                         "index or class name)")
    raise ValueError(f"{where}: json `label` {label!r} is neither a class index in "
                     f"0..{len(classnames) - 1} nor one of the {len(classnames)} class names "
                     f"(e.g. {list(classnames[:3])})")


@dataclass(frozen=True)
class EvalSpec:
    """What an evaluation worker needs to make batches."""

    batch_size: int
    image_size: int
    context_length: int
    classnames: tuple[str, ...] | None = None


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
        captions = [sample_captions(s) for s in raw]
        tokens = self.tokenizer.encode([c[0] for c in captions],
                                       self.spec.context_length)  # (B, L)
        labels = torch.tensor([sample_label(s, self.spec.classnames) for s in raw],
                              dtype=torch.long)  # (B,)
        return {"image": images, "tokens": tokens, "labels": labels, "captions": captions,
                "keys": [s["__key__"] for s in raw]}


def _worker_init(worker_id: int) -> None:
    torch.set_num_threads(1)  # one core per worker; the resize would otherwise oversubscribe


class EvalStream:
    """Held-out batches of one rank: every sample exactly once across ranks, no augmentation.

    Shards (local or `pipe:`) are dealt to ranks (`shards[rank::world_size]`), so ranks may hold
    different numbers of samples; the last batch may be smaller. Batches: `image` uint8
    (B, 3, S, S) (resize the shorter side + center crop), `tokens` int64 (B, L) (each sample's
    first caption), `captions` (B lists of str: the json `captions` list, else `[txt]`),
    `labels` int64 (B,) (json `label`, -1 if absent; with `classnames` required, and a class
    name is mapped to its index), `keys`.
    """

    def __init__(self, pattern: str, tokenizer: Tokenizer, cfg: Any, rank: int = 0,
                 world_size: int = 1, batch_size: int | None = None,
                 num_workers: int | None = None,
                 classnames: Sequence[str] | None = None) -> None:
        spec = EvalSpec(cfg.data.batch_size if batch_size is None else batch_size,
                        cfg.model.vision.image_size, cfg.model.text.context_length,
                        None if classnames is None else tuple(classnames))
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
                 world_size: int = 1, batch_size: int | None = None,
                 classnames: Sequence[str] | None = None) -> EvalStream:
    """The held-out stream of `pattern` for one rank (iterate it once per evaluation)."""
    return EvalStream(pattern, tokenizer, cfg, rank, world_size, batch_size,
                      classnames=classnames)
