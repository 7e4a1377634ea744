"""`mmpretrain caption`: captions for image files from a trained fusion (CoCa) model."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from mmpretrain.data.decode import decode_rgb, eval_transform, normalize
from mmpretrain.eval.captioning import special_ids
from mmpretrain.model.generate import generate


@dataclass
class CaptionOptions:
    """Decoding options of `mmpretrain caption`."""

    beam_width: int = 1
    max_len: int = 0
    length_penalty: float = 1.0
    batch_size: int = 16
    device: str = "cpu"


def load_images(paths: list[str], size: int) -> torch.Tensor:
    """Image files -> uint8 (N, 3, size, size) (shorter side resized, center crop).

    Any format PIL reads; a missing or undecodable file is an error naming it."""
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)  # (N, 3, S, S)
    for i, path in enumerate(paths):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image not found: {path}")
        with open(path, "rb") as f:
            data = f.read()
        try:
            out[i] = eval_transform(decode_rgb(data), size)
        except ValueError as exc:
            raise ValueError(f"{path}: cannot decode image: {exc}") from exc
    return out


def caption_files(checkpoint: str, paths: list[str],
                  opts: CaptionOptions | None = None) -> list[dict[str, Any]]:
    """[{'image': path, 'caption': text}] for each image, from the model at `checkpoint` (a run,
    checkpoint or export directory)."""
    from mmpretrain.checkpoint.load import load_for_inference

    opts = opts or CaptionOptions()
    cfg, model, tokenizer = load_for_inference(checkpoint, opts.device)
    if not cfg.model.fusion.decoder:
        raise ValueError(f"{checkpoint}: the model has no caption decoder "
                         "(model.fusion.decoder is false); train a CoCa model (e.g. "
                         "model.size=coca_tiny) to caption images")
    if tokenizer is None:
        raise ValueError(f"{checkpoint}: no tokenizer found next to the checkpoint")
    images = load_images(paths, cfg.model.vision.image_size)
    special = special_ids(tokenizer)
    results = []
    for start in range(0, len(paths), opts.batch_size):
        batch = normalize(images[start:start + opts.batch_size].to(opts.device),
                          cfg.data.mean, cfg.data.std)  # (b, 3, S, S)
        ids = generate(model, batch, special, opts.beam_width, opts.max_len,
                       opts.length_penalty)
        results += [{"image": p, "caption": tokenizer.decode(seq)}
                    for p, seq in zip(paths[start:start + opts.batch_size], ids)]
    return results
