"""Image decoding and the train/eval transforms, all in uint8.

Images stay uint8 from the JPEG decoder to the training device (a quarter of float32's bytes in
the worker → main process → device copies); the trainer converts them with `normalize()` on the
device. Measured on this machine (DESIGN.md): simplejpeg decodes ~1.45x faster than PIL, and
torch's uint8 bicubic antialiased resize of the crop costs ~0.3 ms at 224 px. `decode_train` draws
the crop from the JPEG header first and decodes at 1/2 (1/4, 1/8) scale when the crop still holds
at least the output size there: libjpeg's DCT-domain downscale is faster than a full decode
(its 3/8..7/8 scales are slower, so they are not used).

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
REDUCE_FACTORS = (8, 4, 2)  # JPEG decode downscales that are faster than a full decode


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG's header (no decoding), or None when it is not a JPEG that
    simplejpeg reads."""
    if simplejpeg is None or data[:2] != _JPEG_MAGIC:
        return None
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    except (ValueError, RuntimeError):
        return None
    return int(height), int(width)


def decode_rgb(data: bytes, reduce: int = 1, fast: bool = False) -> np.ndarray:
    """Decode image bytes to a uint8 RGB array `(H, W, 3)`.

    JPEGs go through simplejpeg when it is installed, at `1/reduce` scale (`reduce` in 1, 2, 4,
    8: ceil(H / reduce) x ceil(W / reduce)); `fast` selects libjpeg's fast integer IDCT and
    chroma upsampling (~25% faster, ~1/255 mean error after resize). Anything simplejpeg
    refuses (CMYK JPEGs, corrupt headers it is strict about) and every other format go through
    PIL at full size, converted to RGB (handles grayscale, palette, alpha, CMYK). Raises
    `ValueError` when no decoder can read the bytes.
    """
    if simplejpeg is not None and data[:2] == _JPEG_MAGIC:
        try:
            if reduce > 1:
                height, width, _, _ = simplejpeg.decode_jpeg_header(data)
                return simplejpeg.decode_jpeg(
                    data, colorspace="RGB", fastdct=fast, fastupsample=fast,
                    min_height=-(-height // reduce), min_width=-(-width // reduce),
                    min_factor=reduce)
            return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=fast,
                                          fastupsample=fast)
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


def reduce_factor(box: tuple[int, int, int, int], size: int) -> int:
    """The largest JPEG decode downscale after which the crop `box` still has at least `size`
    pixels on both sides (1: decode at full size)."""
    _, _, height, width = box
    return next((f for f in REDUCE_FACTORS if min(height, width) >= f * size), 1)


def scale_box(box: tuple[int, int, int, int], full: tuple[int, int],
              reduced: tuple[int, int]) -> tuple[int, int, int, int]:
    """The crop `box` of a (H, W) image mapped onto the same image decoded at (h, w)."""
    top, left, height, width = box
    sy, sx = reduced[0] / full[0], reduced[1] / full[1]
    y0, x0 = min(int(round(top * sy)), reduced[0] - 1), min(int(round(left * sx)), reduced[1] - 1)
    y1 = min(max(int(round((top + height) * sy)), y0 + 1), reduced[0])
    x1 = min(max(int(round((left + width) * sx)), x0 + 1), reduced[1])
    return y0, x0, y1 - y0, x1 - x0


def decode_train(data: bytes, size: int, scale_min: float, rng: np.random.Generator,
                 fast: bool = False) -> torch.Tensor:
    """Decode image bytes and RandomResizedCrop them to (3, size, size) uint8.

    Same crop draws as `train_transform(decode_rgb(data), ...)`; for JPEGs the crop is drawn
    from the header's size first and the image decoded at the largest `reduce_factor` the crop
    allows (the crop then covers the same region of the smaller image). Raises ValueError when
    the bytes do not decode. `fast`: see `decode_rgb`.
    """
    dims = jpeg_size(data)
    if dims is None:
        return train_transform(decode_rgb(data), size, scale_min, rng)
    box = random_resized_crop_box(dims[0], dims[1], (scale_min, 1.0), rng)
    image = decode_rgb(data, reduce_factor(box, size), fast)
    if image.shape[:2] != dims:
        box = scale_box(box, dims, (image.shape[0], image.shape[1]))
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
