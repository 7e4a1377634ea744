"""One input pair → one shard sample: verify and (re-)encode the image, read the caption.

Anything wrong with an input raises `SkipSample(kind, reason)`; `mmpretrain shards` counts and
lists those instead of failing. Kinds are listed in `sources.SKIP_KINDS`.

Images: JPEGs are copied byte for byte after a full verification decode, unless they must be
re-encoded (`max_size` smaller than the image, an EXIF rotation — our decoder ignores EXIF —, or
a CMYK/other colour space our fast decoder refuses). Everything else (PNG, WebP, BMP, ...) is
converted to RGB (palette and alpha composited on white, 16-bit scaled to 8) and saved as JPEG.
The pixel limit is ours (`max_pixels`), applied to the header's size before any pixel is
decoded; Pillow's own decompression-bomb check is off while we open the image, so its warning or
error cannot fire first at a different size (both are still caught, as `too_large`).
"""
from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's default decompression-bomb limit
_COPYABLE_MODES = ("RGB", "L")  # JPEG colour spaces simplejpeg decodes to RGB
_EXIF_ORIENTATION = 0x0112


class SkipSample(Exception):
    """An input that is skipped: `kind` (see sources.SKIP_KINDS) and a readable `reason`."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(f"{kind}: {reason}")
        self.kind = kind
        self.reason = reason


def read_image_bytes(path: str) -> bytes:
    """The bytes of an image file; SkipSample(missing_image / bad_image) when unreadable."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise SkipSample("missing_image", f"image file {path} does not exist") from None
    except OSError as exc:
        raise SkipSample("bad_image", f"cannot read {path}: {exc}") from None


def _check_caption(text: str, where: str) -> str:
    text = text.strip()
    if not text:
        raise SkipSample("empty_caption", f"{where} is empty")
    return text


def read_caption(caption: str | None, caption_path: str | None, where: str) -> str:
    """The stripped caption, given inline or as a UTF-8 file; SkipSample when it is missing,
    empty or not UTF-8 (inline captions carry bad bytes as surrogate escapes)."""
    if caption_path is not None:
        try:
            with open(caption_path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise SkipSample("missing_caption", f"no caption file {caption_path}") from None
        except OSError as exc:
            raise SkipSample("missing_caption", f"cannot read {caption_path}: {exc}") from None
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise SkipSample("non_utf8_caption", f"{caption_path} is not UTF-8 (byte "
                             f"0x{raw[exc.start]:02x} at offset {exc.start})") from None
        return _check_caption(text, f"caption file {caption_path}")
    if caption is None:
        raise SkipSample("missing_caption", f"{where} has no caption")
    try:
        caption.encode("utf-8")
    except UnicodeEncodeError:
        raise SkipSample("non_utf8_caption", f"the caption of {where} is not UTF-8") from None
    return _check_caption(caption, f"the caption of {where}")


def _fit(size: tuple[int, int], max_size: int | None) -> tuple[int, int] | None:
    """The (w, h) with the longer side `max_size`, or None when the image already fits."""
    w, h = size
    if not max_size or max(w, h) <= max_size:
        return None
    scale = max_size / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _open_verified(data: bytes, max_pixels: int | None,
                   target: Any) -> tuple[Image.Image, tuple[int, int]]:
    """Open and fully decode `data` (JPEGs at a reduced DCT scale when `target` allows);
    return the image and its original size. Raises SkipSample(too_large / bad_image)."""
    old_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # our check below replaces Pillow's (it could fire first)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            size = img.size
            if max_pixels and size[0] * size[1] > max_pixels:
                raise SkipSample("too_large", f"{size[0]}x{size[1]} = {size[0] * size[1]:,} "
                                 f"pixels is over the limit of {max_pixels:,} (--max-pixels)")
            wanted = target(img)
            if wanted is not None and img.format == "JPEG":
                img.draft(None, wanted)  # decodes every byte, at 1/2..1/8 scale: still verifies
            img.load()
            return img, size
    except SkipSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise SkipSample("too_large", str(exc)) from None
    except UnidentifiedImageError:
        raise SkipSample("bad_image", f"not an image in a known format ({len(data):,} bytes, "
                         f"starting {data[:8]!r})") from None
    except Exception as exc:  # Pillow raises many types: UnidentifiedImageError, OSError, ...
        raise SkipSample("bad_image", f"cannot decode ({len(data):,} bytes): "
                         f"{type(exc).__name__}: {exc}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = old_limit


def _8bit(img: Image.Image) -> Image.Image:
    """16/32-bit integer or float grayscale as 8-bit L (16-bit ranges scaled down)."""
    arr = np.asarray(img, dtype=np.float64)
    if arr.size and arr.max() > 255:
        arr = arr * (255.0 / 65535.0)
    return Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), "L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow image as RGB: palette/alpha composited on white, CMYK and grayscale
    converted, high bit depth scaled to 8 bits."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode.startswith("I") or img.mode == "F":
        img = _8bit(img)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def prepare_image(data: bytes, max_size: int | None, quality: int,
                  max_pixels: int | None) -> tuple[bytes, dict[str, Any]]:
    """(JPEG bytes, metadata) of one input image; see the module docstring. Metadata: the
    original `width`, `height`, `format`, and `resized` [w, h] when it was shrunk."""
    def target(img: Image.Image) -> tuple[int, int] | None:
        return _fit(img.size, max_size)

    img, (width, height) = _open_verified(data, max_pixels, target)
    meta: dict[str, Any] = {"width": width, "height": height, "format": img.format or ""}
    orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    new_size = _fit((width, height), max_size)
    if (img.format == "JPEG" and img.mode in _COPYABLE_MODES and orientation in (0, 1)
            and new_size is None):
        return data, meta
    try:
        if orientation not in (0, 1):
            img = ImageOps.exif_transpose(img)
            if new_size is not None and orientation in (5, 6, 7, 8):  # 90-degree turns
                new_size = new_size[::-1]
        img = to_rgb(img)
        if new_size is not None:
            meta["resized"] = list(new_size)
            if img.size != new_size:
                img = img.resize(new_size, Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
    except Exception as exc:  # e.g. a colour mode Pillow cannot convert to RGB
        raise SkipSample("bad_image", f"cannot convert to an RGB JPEG: "
                         f"{type(exc).__name__}: {exc}") from None
    return buf.getvalue(), meta
