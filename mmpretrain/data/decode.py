"""Image decoding and the train/eval transforms, all in uint8.

Images stay uint8 from the JPEG decoder to the training device (a quarter of float32's bytes in
the worker → main process → device copies); the trainer converts them with `normalize()` on the
device. Measured on this machine (DESIGN.md): simplejpeg decodes ~1.45x faster than PIL, and
torch's uint8 bicubic antialiased resize of the crop costs ~0.3 ms at 224 px.

Randomness comes only from an explicit `numpy.random.Generator`, never from global state, so a
sample's augmentation is reproducible from its seed alone (exact data-stream resume).
"""
from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

try:  # libjpeg-turbo through simplejpeg: the fast path for JPEG
    import simplejpeg
except ImportError:  # pragma: no cover - optional dependency
    simplejpeg = None

_JPEG_MAGIC = b"\xff\xd8"
RATIO = (3.0 / 4.0, 4.0 / 3.0)


def decode_rgb(data: bytes) -> np.ndarray:
    """Decode image bytes to a uint8 RGB array `(H, W, 3)`.

    JPEGs go through simplejpeg when it is installed; anything it refuses (CMYK JPEGs, corrupt
    headers it is strict about) and every other format go through PIL, converted to RGB (handles
    grayscale, palette, alpha, CMYK). Raises `ValueError` when no decoder can read the bytes.
    """
    if simplejpeg is not None and data[:2] == _JPEG_MAGIC:
        try:
            return simplejpeg.decode_jpeg(data, colorspace="RGB")
        except (ValueError, RuntimeError):
            pass  # fall back to PIL below
    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"))
    except Exception as exc:  # PIL raises many types (UnidentifiedImageError, OSError, ...)
        raise ValueError(f"cannot decode image ({len(data)} bytes): {exc}") from exc


def random_resized_crop_box(height: int, width: int, scale: tuple[float, float],
                            rng: np.random.Generator,
                            ratio: tuple[float, float] = RATIO) -> tuple[int, int, int, int]:
    """(top, left, crop_h, crop_w) of a RandomResizedCrop, torchvision's algorithm.

    Ten tries at a random area fraction in `scale` and log-uniform aspect ratio in `ratio`;
    if none fits, a center crop clamped to `ratio`.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * rng.random())
        aspect = math.exp(log_lo + (log_hi - log_lo) * rng.random())
        crop_w = int(round(math.sqrt(target * aspect)))
        crop_h = int(round(math.sqrt(target / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            return top, left, crop_h, crop_w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_w, crop_h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        crop_h, crop_w = height, int(round(height * ratio[1]))
    else:
        crop_h, crop_w = height, width
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def center_square_box(height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, side, side) of the largest centered square: resize-shorter-side + center-crop
    done in one resize."""
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def crop_resize(image: np.ndarray, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """Crop `image` (H, W, 3) uint8 to `box` and resize to (3, size, size) uint8.

    Uses torch's uint8 bicubic antialiased interpolation (fastest on channels-last input).
    """
    top, left, h, w = box
    crop = np.ascontiguousarray(image[top:top + h, left:left + w])  # (h, w, 3)
    if not crop.flags.writeable:  # e.g. PIL's read-only buffer; torch wants writable memory
        crop = crop.copy()
    x = torch.from_numpy(crop).permute(2, 0, 1).unsqueeze(0)  # (1, 3, h, w) channels-last
    if (h, w) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True,
                          align_corners=False)  # (1, 3, size, size) uint8
    return x[0].contiguous()  # (3, size, size)


def train_transform(image: np.ndarray, size: int, scale_min: float,
                    rng: np.random.Generator) -> torch.Tensor:
    """RandomResizedCrop(scale=(scale_min, 1), ratio=(3/4, 4/3)) to (3, size, size) uint8."""
    box = random_resized_crop_box(image.shape[0], image.shape[1], (scale_min, 1.0), rng)
    return crop_resize(image, box, size)


def eval_transform(image: np.ndarray, size: int) -> torch.Tensor:
    """Resize the shorter side to `size` and center-crop: (3, size, size) uint8."""
    return crop_resize(image, center_square_box(image.shape[0], image.shape[1]), size)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 images (B, 3, H, W) in 0..255 → (x / 255 - mean) / std as `dtype`, on their device.

    The arithmetic runs in float32 (then casts), so bf16/fp16 outputs are correctly rounded.
    """
    if images.dim() != 4 or images.shape[1] != len(mean) or len(mean) != len(std):
        raise ValueError(f"expected images (B, {len(mean)}, H, W), got {tuple(images.shape)}")
    scale = torch.tensor(std, dtype=torch.float32, device=images.device).mul_(255.0)
    shift = torch.tensor(mean, dtype=torch.float32, device=images.device).mul_(255.0)
    x = images.to(torch.float32)  # (B, 3, H, W)
    x = (x - shift.view(1, -1, 1, 1)) / scale.view(1, -1, 1, 1)
    return x.to(dtype)
