"""The bundled real demo dataset: scikit-learn's handwritten digits as image–text shards.

`load_digits()` ships with scikit-learn (1,797 real 8x8 scans of handwritten digits, values
0..16), so the demo needs no download. Each scan becomes a dark-ink-on-white RGB JPEG of
`image_size` pixels (bicubic upscaling), paired with a caption drawn deterministically from
several templates that name the digit in words ("a scan of a handwritten seven"). A fixed,
stratified split keeps 297 scans for held-out evaluation (zero-shot classification).

`ensure_demo_shards` writes the shards once per cache directory and image size; concurrent
callers (several ranks on one machine) are safe: each writes a private temporary directory and
renames it into place, and a loser of the race just uses the winner's copy.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from .shards import MANIFEST_NAME, shard_pattern, write_json_atomic, write_shards

DEMO_VERSION = 1
DEMO_SEED = 20240517
NUM_VAL = 297
SAMPLES_PER_SHARD = 200  # 1,500 train samples -> 8 shards (7 x 200 + 100), uneven on purpose
JPEG_QUALITY = 95
CLASSNAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CAPTION_TEMPLATES = [
    "a photo of the handwritten digit {}",
    "a scan of a handwritten {}",
    "the digit {}, written by hand",
    "a small grayscale image of the number {}",
    "a handwritten {} on white paper",
    "a blurry low-resolution picture of a handwritten {}",
    "someone wrote the number {} by hand",
    "an image of the digit {}",
]
ZEROSHOT_TEMPLATES = [
    "a photo of the handwritten digit {}.",
    "a scan of a handwritten {}.",
    "an image of the digit {}.",
    "the number {}, written by hand.",
]
_DONE_FILE = "demo.json"


@dataclass
class DemoData:
    """Where the demo shards are and what zero-shot evaluation needs to know about them."""

    root: str
    train_pattern: str
    val_pattern: str
    num_train: int
    num_val: int
    classnames: list[str] = field(default_factory=lambda: list(CLASSNAMES))
    templates: list[str] = field(default_factory=lambda: list(ZEROSHOT_TEMPLATES))


def digit_image(pixels: np.ndarray, image_size: int) -> Image.Image:
    """An 8x8 scan (0..16, ink high) as an RGB image of `image_size` px, dark ink on white."""
    gray = 255.0 - np.clip(pixels.reshape(8, 8), 0, 16) * (255.0 / 16.0)
    # Pad one pixel of paper so the bicubic kernel does not smear ink into the border.
    small = Image.fromarray(np.pad(gray, 1, constant_values=255.0).round().astype(np.uint8))
    big = small.resize((image_size * 10 // 8, image_size * 10 // 8), Image.Resampling.BICUBIC)
    margin = (big.width - image_size) // 2
    big = big.crop((margin, margin, margin + image_size, margin + image_size))
    return big.convert("RGB")


def jpeg_bytes(image: Image.Image) -> bytes:
    """JPEG encoding (quality 95) of a PIL image."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def demo_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices): a fixed stratified split, 297 held out."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    train, val = train_test_split(index, test_size=NUM_VAL, stratify=labels,
                                  random_state=DEMO_SEED % (2**31))
    return np.asarray(train), np.asarray(val)


def demo_captions(labels: np.ndarray) -> list[str]:
    """One caption per scan, its template drawn by a fixed seed (same on every machine)."""
    rng = np.random.default_rng(DEMO_SEED)
    choice = rng.integers(0, len(CAPTION_TEMPLATES), size=len(labels))
    return [CAPTION_TEMPLATES[c].format(CLASSNAMES[y]) for c, y in zip(choice, labels)]


def _samples(images: np.ndarray, labels: np.ndarray, captions: list[str], indices: np.ndarray,
             split: str, image_size: int) -> Iterator[dict[str, Any]]:
    for i in indices:
        i = int(i)
        yield {"__key__": f"digits-{i:04d}",
               "jpg": jpeg_bytes(digit_image(images[i], image_size)),
               "txt": captions[i],
               "json": {"label": int(labels[i]), "index": i, "split": split,
                        "classname": CLASSNAMES[int(labels[i])]}}


def _write_dataset(root: str, image_size: int) -> dict[str, Any]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = np.asarray(digits.data), np.asarray(digits.target)
    captions = demo_captions(labels)
    train, val = demo_split(labels)
    info: dict[str, Any] = {"version": DEMO_VERSION, "image_size": image_size}
    for split, idx in (("train", train), ("val", val)):
        manifest = write_shards(_samples(images, labels, captions, idx, split, image_size),
                                os.path.join(root, split), split, SAMPLES_PER_SHARD)
        info[split] = {"num_shards": manifest["num_shards"],
                       "samples": manifest["total_samples"]}
    write_json_atomic(os.path.join(root, _DONE_FILE), info)  # last: marks the copy complete
    return info


def _read_complete(root: str, image_size: int) -> dict[str, Any] | None:
    """The dataset info if `root` holds a complete copy of this demo version, else None."""
    try:
        with open(os.path.join(root, _DONE_FILE), encoding="utf-8") as f:
            info = json.load(f)
        if info.get("version") != DEMO_VERSION or info.get("image_size") != image_size:
            return None
        for split in ("train", "val"):
            with open(os.path.join(root, split, MANIFEST_NAME), encoding="utf-8") as f:
                manifest = json.load(f)
            for shard in manifest["shards"]:
                path = os.path.join(root, split, shard["name"])
                if os.path.getsize(path) != shard["bytes"]:
                    return None
    except (OSError, ValueError, KeyError):
        return None
    return info


def _install(tmp: str, root: str, image_size: int) -> None:
    """Move the finished `tmp` copy to `root`, replacing a stale copy, tolerating a racing
    writer that got there first."""
    for _ in range(3):
        try:
            os.rename(tmp, root)
            return
        except OSError:
            if _read_complete(root, image_size) is not None:  # another process won the race
                shutil.rmtree(tmp, ignore_errors=True)
                return
            stale = f"{root}.stale-{uuid.uuid4().hex}"
            try:
                os.rename(root, stale)
            except OSError:
                continue
            shutil.rmtree(stale, ignore_errors=True)
    raise RuntimeError(f"could not install the demo dataset at {root}")


def ensure_demo_shards(cache_dir: str | None = None, image_size: int = 32) -> DemoData:
    """Write the demo shards under `(cache_dir or ~/.cache/mmpretrain)/demo-digits-{size}` once.

    Idempotent: a complete copy (right version and size, manifests matching the files) is reused.
    """
    base = os.path.expanduser(cache_dir or os.path.join("~", ".cache", "mmpretrain"))
    root = os.path.join(os.path.abspath(base), f"demo-digits-{image_size}")
    info = _read_complete(root, image_size)
    if info is None:
        os.makedirs(base, exist_ok=True)
        tmp = os.path.join(os.path.dirname(root),
                           f".{os.path.basename(root)}.tmp-{os.getpid()}-{uuid.uuid4().hex}")
        try:
            _write_dataset(tmp, image_size)
            _install(tmp, root, image_size)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        info = _read_complete(root, image_size)
        if info is None:
            raise RuntimeError(f"the demo dataset at {root} is incomplete after writing it")
    return DemoData(
        root=root,
        train_pattern=os.path.join(root, "train", shard_pattern("train",
                                                               info["train"]["num_shards"])),
        val_pattern=os.path.join(root, "val", shard_pattern("val", info["val"]["num_shards"])),
        num_train=info["train"]["samples"], num_val=info["val"]["samples"])
