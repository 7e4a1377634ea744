"""Deterministic random batches for tests and benchmarks (no files, no tokenizer).

Batch `n` of rank `r` depends only on `(seed, r, n)`, so a resumed stream continues exactly, and
the batches look like real ones: `image` uint8 (B, 3, S, S), `tokens` int64 (B, L) laid out like
the tokenizer's rows (start token 2, ids, end token 3, then 0-padding; random length per
row), `keys`, and `labels` (the latent class that links an image to its caption).
"""
from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

PAD_ID, SOT_ID, EOT_ID = 0, 2, 3
FIRST_REGULAR_ID = 4  # ids 0..3 are pad, unk, sot, eot, as in a tokenizer fitted by mmpretrain


NUM_CLASSES = 16  # latent classes shared by image and caption, so the pairs are learnable


@functools.lru_cache(maxsize=4)
def class_patterns(seed: int, image_size: int) -> torch.Tensor:
    """(NUM_CLASSES, 3, S, S) uint8: one fixed random image per latent class."""
    rng = np.random.default_rng([seed % (1 << 63), 0x5EED])
    return torch.from_numpy(rng.integers(0, 256, (NUM_CLASSES, 3, image_size, image_size),
                                         dtype=np.uint8))


def synthetic_batch(seed: int, rank: int, index: int, batch_size: int, image_size: int,
                    context_length: int, vocab_size: int) -> dict[str, Any]:
    """Batch `index` of `rank`: a pure function of its arguments.

    Each sample has a latent class c: its image is class c's fixed pattern blended with noise,
    and its caption starts with two tokens that name c, so a model can learn to match them
    (the contrastive loss falls) while every batch is new."""
    if vocab_size <= FIRST_REGULAR_ID + 2 * NUM_CLASSES or context_length < 4:
        raise ValueError(f"synthetic tokens need vocab_size > {FIRST_REGULAR_ID + 2 * NUM_CLASSES}"
                         f" and context_length >= 4, got {vocab_size} and {context_length}")
    state = np.random.SeedSequence([seed % (1 << 64), rank, index]).generate_state(2)
    gen = torch.Generator().manual_seed(int(state[0]))
    rng = np.random.default_rng(int(state[1]))
    labels = torch.from_numpy(rng.integers(0, NUM_CLASSES, size=batch_size))  # (B,)
    noise = torch.randint(0, 256, (batch_size, 3, image_size, image_size), generator=gen,
                          dtype=torch.uint8)  # (B, 3, S, S)
    images = (3 * class_patterns(seed, image_size)[labels].to(torch.int16) + noise) // 4
    # 2 class tokens + up to 4 filler tokens per caption
    lengths = rng.integers(2, min(6, context_length - 2) + 1, size=batch_size)
    tokens = np.zeros((batch_size, context_length), dtype=np.int64)  # (B, L)
    tokens[:, 0] = SOT_ID
    body = rng.integers(FIRST_REGULAR_ID + 2 * NUM_CLASSES, vocab_size,
                        size=(batch_size, context_length - 2))
    body[:, 0] = FIRST_REGULAR_ID + 2 * labels.numpy()
    body[:, 1] = FIRST_REGULAR_ID + 2 * labels.numpy() + 1
    for row, length in zip(range(batch_size), lengths):
        tokens[row, 1:length + 1] = body[row, :length]
        tokens[row, length + 1] = EOT_ID
    keys = [f"synthetic-r{rank}-b{index}-{i}" for i in range(batch_size)]
    return {"image": images.to(torch.uint8), "tokens": torch.from_numpy(tokens), "keys": keys,
            "labels": labels}


class SyntheticStream:
    """An endless stream of synthetic batches with the TrainStream state interface.

    There are no epochs: `batches_per_epoch` is None.
    """

    batches_per_epoch = None

    def __init__(self, cfg: Any, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.seed, self.rank, self.world_size = cfg.seed, rank, world_size
        self.batch_size = cfg.data.batch_size
        self.image_size = cfg.model.vision.image_size
        self.context_length = cfg.model.text.context_length
        self.vocab_size = cfg.model.text.vocab_size
        self._batches = 0

    def batch(self, index: int) -> dict[str, Any]:
        """Batch number `index` of this rank (does not move the stream)."""
        return synthetic_batch(self.seed, self.rank, index, self.batch_size, self.image_size,
                               self.context_length, self.vocab_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            batch = self.batch(self._batches)
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """The number of batches handed out."""
        return {"batches": self._batches, "seed": self.seed, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at batch `state["batches"]`."""
        self._batches = int(state["batches"])
