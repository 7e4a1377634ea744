"""`mmpretrain bench data`: samples/s of the training data path per DataLoader worker.

Measures what a worker does per sample in training (tar read, shuffle buffer, JPEG decode,
RandomResizedCrop + resize to `image_size` in uint8, BPE tokenization, batching) through the real
`TrainStream` (resampled mode), with 1 and with 2 workers, plus a per-stage profile in this
process. Without `--shards` it writes photo-like JPEG shards first: smooth colour fields, shapes,
blur and sensor-like noise, 500 px on the long side (aspect ratios 4:3, 3:2, 16:9, 1:1, 5:4;
70% landscape), ~45 KB each at quality 90 (a pool of distinct images repeated under distinct keys;
decoding costs the same either way). For scale, it also runs an open_clip-style reference path
(PIL decode, PIL crop + bicubic resize, float normalize in the worker) on the same samples.
"""
from __future__ import annotations

import io
import json
import os
import platform
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .decode import crop_resize, decode_rgb, jpeg_size, random_resized_crop_box, \
    reduce_factor, scale_box
from .shardlist import read_shard, resolve_sources
from .shards import expand_pattern, write_json_atomic, write_shards

BENCH_VERSION = 2
ASPECTS = (4 / 3, 3 / 2, 16 / 9, 1.0, 5 / 4)  # long / short side of the generated "photos"
ASPECT_SHARES = (0.4, 0.3, 0.1, 0.1, 0.1)
WORDS = ("red", "green", "blue", "round", "square", "bright", "dark", "small", "large", "soft",
         "field", "sky", "stone", "water", "tree", "light", "shadow", "morning", "street", "wall")


def photo_like_jpeg(rng: np.random.Generator, long_side: int = 500, quality: int = 90) -> bytes:
    """A JPEG that compresses like a photo: gradients, shapes, slight blur and noise."""
    from PIL import Image, ImageDraw, ImageFilter

    aspect = ASPECTS[int(rng.choice(len(ASPECTS), p=ASPECT_SHARES))]
    short = int(round(long_side / aspect))
    h, w = (short, long_side) if rng.random() < 0.7 else (long_side, short)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)  # (H, W)
    field = np.empty((h, w, 3), np.float32)  # (H, W, 3)
    for c in range(3):
        a, b, phase = rng.uniform(-1, 1, 3)
        field[..., c] = 128 + 80 * np.sin(a * x / 60 + b * y / 45 + phase * 6)
    image = Image.fromarray(field.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(6, 14))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = [x0, y0, x0 + int(rng.integers(20, 200)), y0 + int(rng.integers(20, 200))]
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(1.2)), dtype=np.float32)
    pixels += rng.normal(0, 4, (h, w, 1)).astype(np.float32)  # luminance noise
    pixels += rng.normal(0, 2, (h, w, 3)).astype(np.float32)  # chroma noise
    buf = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG",
                                                               quality=quality)
    return buf.getvalue()


def _caption(rng: np.random.Generator, i: int) -> str:
    words = " ".join(WORDS[int(j)] for j in rng.integers(0, len(WORDS), int(rng.integers(6, 16))))
    return f"a photo of {words}, number {i}"


def make_bench_shards(out_dir: str, samples: int = 3072, long_side: int = 500,
                      unique: int = 128, per_shard: int = 256, seed: int = 0) -> dict[str, Any]:
    """Write (or reuse, when `out_dir` holds the same settings) the bench shards; returns
    `{"pattern", "samples", "mean_jpeg_bytes", ...}`."""
    settings = {"version": BENCH_VERSION, "samples": samples, "long_side": long_side,
                "unique": unique, "per_shard": per_shard, "seed": seed}
    info_path = os.path.join(out_dir, "bench.json")
    if os.path.isfile(info_path):
        with open(info_path, encoding="utf-8") as f:
            info = json.load(f)
        if info.get("settings") == settings:
            return info
    rng = np.random.default_rng(seed)
    pool = [photo_like_jpeg(rng, long_side) for _ in range(unique)]
    rows = ({"__key__": f"bench-{i:07d}", "jpg": pool[i % unique], "txt": _caption(rng, i)}
            for i in range(samples))
    manifest = write_shards(rows, out_dir, "bench", per_shard)
    info = {"settings": settings, "pattern": os.path.join(out_dir, manifest["pattern"]),
            "samples": samples, "mean_jpeg_bytes": float(np.mean([len(p) for p in pool]))}
    write_json_atomic(info_path, info)
    return info


def _raw(pattern: str, limit: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for url in expand_pattern(pattern):
        for sample in read_shard(url):
            out.append(sample)
            if len(out) >= limit:
                return out
    return out


def profile_stages(pattern: str, tokenizer: Any, image_size: int = 224, scale_min: float = 0.8,
                   context_length: int = 77, limit: int = 400) -> dict[str, float]:
    """Per-sample milliseconds of each stage, in this process (one thread)."""
    samples = [s for s in _raw(pattern, limit) if "jpg" in s]
    fast = time.perf_counter()
    for sample in samples:
        decode_rgb(sample["jpg"], fast=True)
    fast = time.perf_counter() - fast
    rng = np.random.default_rng(0)
    t = {"decode": 0.0, "crop_resize": 0.0}
    reduced = 0
    start = time.perf_counter()
    for sample in samples:
        t0 = time.perf_counter()
        dims = jpeg_size(sample["jpg"]) or decode_rgb(sample["jpg"]).shape[:2]
        box = random_resized_crop_box(dims[0], dims[1], (scale_min, 1.0), rng)
        factor = reduce_factor(box, image_size)
        reduced += factor > 1
        image = decode_rgb(sample["jpg"], factor)
        t1 = time.perf_counter()
        if image.shape[:2] != tuple(dims):
            box = scale_box(box, (dims[0], dims[1]), (image.shape[0], image.shape[1]))
        crop_resize(image, box, image_size)
        t["decode"] += t1 - t0
        t["crop_resize"] += time.perf_counter() - t1
    both = time.perf_counter() - start
    captions = [s["txt"].decode("utf-8") for s in samples]
    t0 = time.perf_counter()
    for i in range(0, len(captions), 64):
        tokenizer.encode(captions[i:i + 64], context_length)
    t["tokenize"] = time.perf_counter() - t0
    n = max(1, len(samples))
    out = {f"{k}_ms": 1e3 * v / n for k, v in t.items()}
    out["decode_full_fast_jpeg_ms"] = 1e3 * fast / n
    out.update(samples=n, reduced_decode_share=reduced / n,
               decode_crop_resize_per_s=n / both if both else 0.0,
               mean_jpeg_bytes=float(np.mean([len(s["jpg"]) for s in samples])))
    return out


def pil_reference_rate(pattern: str, tokenizer: Any, image_size: int = 224,
                       scale_min: float = 0.8, context_length: int = 77,
                       limit: int = 256) -> float:
    """Samples/s on one core of an open_clip-style path (the DESIGN.md reference): PIL decode
    to RGB, RandomResizedCrop as a PIL crop + bicubic resize, float32 normalize, batch of 64,
    tokenize."""
    from PIL import Image

    samples = [s for s in _raw(pattern, limit) if "jpg" in s]
    mean = torch.tensor([0.481, 0.458, 0.408]).view(3, 1, 1)
    std = torch.tensor([0.269, 0.261, 0.276]).view(3, 1, 1)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for i in range(0, len(samples), 64):
        chunk, images = samples[i:i + 64], []
        for sample in chunk:
            with Image.open(io.BytesIO(sample["jpg"])) as img:
                rgb = img.convert("RGB")
            top, left, h, w = random_resized_crop_box(rgb.height, rgb.width, (scale_min, 1.0),
                                                      rng)
            rgb = rgb.resize((image_size, image_size), Image.BICUBIC,
                             box=(left, top, left + w, top + h))
            x = torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float().div_(255)  # (3, S, S)
            images.append((x - mean) / std)
        torch.stack(images)  # (B, 3, S, S) float32
        tokenizer.encode([s["txt"].decode("utf-8") for s in chunk], context_length)
    return len(samples) / (time.perf_counter() - start)


def _bench_config(pattern: str, workers: int, batch_size: int, image_size: int,
                  context_length: int, fast_jpeg: bool) -> Any:
    from mmpretrain.config.schema import ExperimentConfig

    cfg = ExperimentConfig()
    cfg.data.source, cfg.data.train_shards, cfg.data.mode = "shards", pattern, "resampled"
    cfg.data.num_workers, cfg.data.batch_size = workers, batch_size
    cfg.data.epoch_samples, cfg.data.fast_jpeg = 10 ** 9, fast_jpeg
    cfg.model.vision.image_size, cfg.model.text.context_length = image_size, context_length
    return cfg


def _children_cpu_s() -> float:
    """CPU seconds (user + system) used so far by this process's live child processes."""
    pids: set[str] = set()
    try:
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/children", encoding="ascii") as f:
                pids.update(f.read().split())
    except OSError:
        return float("nan")  # not Linux: only wall-clock rates
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (clock ticks)
        except (OSError, IndexError, ValueError):
            continue
    return total / os.sysconf("SC_CLK_TCK")


def stream_rate(pattern: str, tokenizer: Any, workers: int, batch_size: int = 64,
                image_size: int = 224, context_length: int = 77, batches: int = 40,
                fast_jpeg: bool = False) -> dict[str, float]:
    """Steady-state samples/s of a TrainStream with `workers` DataLoader workers (0: in this
    process): by the wall clock, and per CPU-second of the workers (insensitive to other load
    on the machine). Batches prefetched before timing starts are not counted."""
    from .pipeline import TrainStream

    cfg = _bench_config(pattern, workers, batch_size, image_size, context_length, fast_jpeg)
    stream = TrainStream(cfg, tokenizer, pin_memory=False, prefetch_factor=2)
    skip = 2 * max(1, workers) + 2  # start-up and the prefetch backlog
    it: Iterator[dict[str, Any]] = iter(stream)
    try:
        for _ in range(skip):
            next(it)
        t0, c0, p0 = time.perf_counter(), _children_cpu_s(), time.process_time()
        for _ in range(batches):
            next(it)
        wall = time.perf_counter() - t0
        cpu = _children_cpu_s() - c0 if workers else time.process_time() - p0
    finally:
        it.close()  # type: ignore[attr-defined]
    samples = batches * batch_size
    return {"samples_per_s": samples / wall, "per_worker": samples / wall / max(1, workers),
            "per_worker_cpu_s": samples / cpu if cpu > 0 else float("nan")}


def machine() -> dict[str, Any]:
    """CPU model, core count, load and library versions (for the report)."""
    import PIL
    import simplejpeg
    import tokenizers

    model = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), model)
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "load_1min": os.getloadavg()[0],
            "python": platform.python_version(), "torch": torch.__version__,
            "simplejpeg": simplejpeg.__version__, "pillow": PIL.__version__,
            "tokenizers": tokenizers.__version__, "numpy": np.__version__}


def bench_data(shards: str = "", out_dir: str = "", workers: tuple[int, ...] = (1, 2),
               batch_size: int = 64, image_size: int = 224, context_length: int = 77,
               batches: int = 40, samples: int = 3072, long_side: int = 500,
               fast_jpeg: bool = False) -> dict[str, Any]:
    """Run the whole benchmark; returns a JSON-able report."""
    from .tokenize import train_tokenizer

    info: dict[str, Any] = {"pattern": shards}
    if not shards:
        out_dir = out_dir or os.path.join(os.path.expanduser("~/.cache/mmpretrain"),
                                          f"bench-data-{long_side}")
        info = make_bench_shards(out_dir, samples, long_side)
    pattern = info["pattern"]
    resolve_sources(pattern)  # fail early on missing shards
    captions = [s["txt"].decode("utf-8", "replace") for s in _raw(pattern, 2000) if "txt" in s]
    tokenizer = train_tokenizer(captions, 4096)
    torch.set_num_threads(1)
    report: dict[str, Any] = {"pattern": pattern, "batch_size": batch_size,
                              "fast_jpeg": fast_jpeg,
                              "image_size": image_size, "context_length": context_length,
                              "machine": machine()}
    report["profile"] = profile_stages(pattern, tokenizer, image_size,
                                       context_length=context_length)
    report["pil_reference_per_s"] = pil_reference_rate(pattern, tokenizer, image_size,
                                                       context_length=context_length)
    report["stream"] = {str(w): stream_rate(pattern, tokenizer, w, batch_size, image_size,
                                            context_length, batches, fast_jpeg)
                        for w in workers}
    report["machine"]["load_1min_after"] = os.getloadavg()[0]
    return report


def format_report(report: dict[str, Any]) -> str:
    """A few human-readable lines of `bench_data`'s report."""
    m, p = report["machine"], report["profile"]
    lines = [f"data bench on {m['cpu']} ({m['cores']} cores, load {m['load_1min']:.2f}); "
             f"torch {m['torch']}, simplejpeg {m['simplejpeg']}",
             f"shards {report['pattern']}: mean JPEG {p['mean_jpeg_bytes'] / 1e3:.1f} KB; "
             f"{report['image_size']} px crops, batch {report['batch_size']}",
             f"per sample: decode {p['decode_ms']:.3f} ms (reduced-size decode for "
             f"{100 * p['reduced_decode_share']:.0f}%), crop+resize {p['crop_resize_ms']:.3f} ms, "
             f"tokenize {p['tokenize_ms']:.3f} ms; full-size decode with data.fast_jpeg "
             f"{p['decode_full_fast_jpeg_ms']:.3f} ms"]
    lines.append(f"open_clip-style PIL reference path: {report['pil_reference_per_s']:.0f} "
                 "samples/s on one core")
    for w, r in report["stream"].items():
        lines.append(f"TrainStream{' (fast_jpeg)' if report['fast_jpeg'] else ''}, "
                     f"{w} worker(s): {r['samples_per_s']:.0f} samples/s, "
                     f"{r['per_worker']:.0f} per worker; {r['per_worker_cpu_s']:.0f} per "
                     "worker CPU-second")
    return "\n".join(lines)
