"""`mmpretrain inspect`: read every shard of a set, check every sample, compare with the manifest.

A set is named by a directory holding `manifest.json`, a `manifest.json` path, or a brace
pattern (`data/train-{000000..000099}.tar`, several joined with `::`). Each shard is read in
full with the training reader; a shard is *broken* when it is missing, unreadable, truncated
(cut inside a member, or with no end-of-archive marker) or corrupt. A sample is *bad* when its
image (jpg/jpeg/png/webp) is missing or does not decode with the training decoder, its caption
(`txt`) is missing, not UTF-8 or empty, its `json` does not parse, or its key repeats in the
shard. The manifest *disagrees* when a shard it lists is missing or its sample count or bytes
differ from the file. `report["ok"]` is False when any of these happened.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from .decode import decode_rgb
from .parallel import imap_unordered
from .shards import MANIFEST_NAME, expand_pattern, iter_tar_samples

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_BLOCK = 512


def _check_sample(sample: dict[str, Any], seen: set[str], stats: dict[str, list[int]]) -> str:
    """Problems of one raw sample ('' when good); records its sizes and caption lengths."""
    key, problems = sample["__key__"], []
    if key in seen:
        problems.append("duplicate key in this shard")
    seen.add(key)
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        fields = sorted(k for k in sample if not k.startswith("__"))
        problems.append(f"no image ({'/'.join(IMAGE_EXTS)}); has {fields}")
    else:
        try:
            height, width = decode_rgb(sample[ext]).shape[:2]
            stats["width"].append(int(width))
            stats["height"].append(int(height))
        except ValueError as exc:
            problems.append(f"image ({ext}) does not decode: {exc}")
    if "txt" not in sample:
        problems.append("no caption (txt)")
    else:
        try:
            text = sample["txt"].decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            problems.append(f"caption is not UTF-8 (byte offset {exc.start})")
        else:
            if not text:
                problems.append("caption is empty")
            else:
                stats["caption_chars"].append(len(text))
                stats["caption_words"].append(len(text.split()))
    if "json" in sample:
        try:
            json.loads(sample["json"])
        except ValueError as exc:
            problems.append(f"json metadata does not parse: {exc}")
    return "; ".join(problems)


def _ends_cleanly(f: Any, size: int) -> bool:
    """Whether the reader stopped at a zero block (end-of-archive), not at the end of data."""
    pos = f.tell()
    if pos < _BLOCK or pos > size:
        return False
    f.seek(pos - _BLOCK)
    return f.read(_BLOCK) == bytes(_BLOCK)


def check_shard(path: str) -> dict[str, Any]:
    """Read one shard in full: its samples, bad samples, error (or None) and statistics."""
    result: dict[str, Any] = {"path": path, "name": os.path.basename(path), "samples": 0,
                              "bytes": None, "error": None, "bad": []}
    stats: dict[str, list[int]] = {"width": [], "height": [], "caption_chars": [],
                                   "caption_words": []}
    result["stats"] = stats
    seen: set[str] = set()
    try:
        result["bytes"] = size = os.path.getsize(path)
        with open(path, "rb", buffering=1 << 20) as f:
            for sample in iter_tar_samples(f, path):
                result["samples"] += 1
                problem = _check_sample(sample, seen, stats)
                if problem:
                    result["bad"].append({"shard": result["name"], "key": sample["__key__"],
                                          "reason": problem})
            if size == 0:
                result["error"] = f"{path}: empty file, not a tar archive"
            elif not _ends_cleanly(f, size):
                result["error"] = (f"{path}: truncated tar file (ends without the "
                                   "end-of-archive marker)")
    except FileNotFoundError:
        result["error"] = f"{path}: shard file does not exist"
    except (OSError, ValueError) as exc:
        result["error"] = str(exc) if path in str(exc) else f"{path}: {exc}"
    return result


def _load_manifest(directory: str) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest, error): the directory's manifest if it has one."""
    path = os.path.join(directory, MANIFEST_NAME)
    if not os.path.isfile(path):
        return None, None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
            return None, f"{path}: not a shard manifest (no 'shards' list)"
        return manifest, None
    except (OSError, ValueError) as exc:
        return None, f"{path}: unreadable manifest: {exc}"


def resolve_set(spec: str) -> tuple[list[str], dict[str, dict[str, Any]], list[str], list[str]]:
    """(shard paths, manifest entry by path, manifests used, problems) of a set name."""
    if os.path.isdir(spec) or os.path.basename(spec) == MANIFEST_NAME:
        directory = spec if os.path.isdir(spec) else os.path.dirname(spec) or "."
        manifest, error = _load_manifest(directory)
        if manifest is None:
            raise FileNotFoundError(error or f"no {MANIFEST_NAME} in {directory}; name the "
                                    "shards with a brace pattern instead")
        entries = {os.path.join(directory, s["name"]): s for s in manifest["shards"]}
        return list(entries), entries, [os.path.join(directory, MANIFEST_NAME)], []
    paths = expand_pattern(spec)
    if not any(os.path.exists(p) for p in paths):
        raise FileNotFoundError(f"{spec!r} names no existing shard (expected a directory with "
                                f"{MANIFEST_NAME} or a brace pattern of .tar files)")
    entries: dict[str, dict[str, Any]] = {}  # by normalized path
    used, problems = [], []
    for directory in dict.fromkeys(os.path.dirname(p) or "." for p in paths):
        manifest, error = _load_manifest(directory)
        if error:
            problems.append(error)
        if manifest is not None:
            used.append(os.path.join(directory, MANIFEST_NAME))
            entries.update({os.path.normpath(os.path.join(directory, s["name"])): s
                            for s in manifest["shards"]})
    return paths, {p: entries[os.path.normpath(p)] for p in paths
                   if os.path.normpath(p) in entries}, used, problems


def _manifest_problems(shard: dict[str, Any], entry: dict[str, Any] | None) -> list[str]:
    if entry is None:
        return []
    name = shard["name"]
    if shard["bytes"] is None:
        return [f"{name}: listed in the manifest but missing"]
    problems = []
    if shard["bytes"] != entry.get("bytes"):
        problems.append(f"{name}: {shard['bytes']:,} bytes but the manifest says "
                        f"{entry.get('bytes')}")
    if shard["error"] is None and shard["samples"] != entry.get("samples"):
        problems.append(f"{name}: {shard['samples']:,} samples but the manifest says "
                        f"{entry.get('samples')}")
    return problems


def _totals_problems(manifests: Iterable[str]) -> list[str]:
    problems = []
    for path in manifests:
        manifest, _ = _load_manifest(os.path.dirname(path) or ".")
        if manifest is None:
            continue
        shards = manifest["shards"]
        for key, field in (("total_samples", "samples"), ("total_bytes", "bytes")):
            listed = sum(int(s.get(field, 0)) for s in shards)
            if key in manifest and manifest[key] != listed:
                problems.append(f"{path}: {key} is {manifest[key]} but its shards add up to "
                                f"{listed}")
    return problems


def _summary(values: list[int], centre: str) -> dict[str, float] | None:
    if not values:
        return None
    arr = np.asarray(values)
    mid = float(np.median(arr)) if centre == "median" else round(float(arr.mean()), 2)
    return {"min": int(arr.min()), centre: mid, "max": int(arr.max())}


def inspect_shards(spec: str, workers: int = 1, progress: bool = False) -> dict[str, Any]:
    """Check a shard set (see the module docstring); returns the report (`ok` and details).

    Raises FileNotFoundError when `spec` names no shards or a directory has no manifest.
    """
    paths, entries, manifests, problems = resolve_set(spec)
    results: dict[str, dict[str, Any]] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(paths), unit="shard", desc="inspect", dynamic_ncols=True)
    try:
        for result in imap_unordered(check_shard, paths, workers):
            results[result["path"]] = result
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    shards = [results[p] for p in paths]
    errors = [s["error"] for s in shards if s["error"]] + problems
    for shard in shards:
        errors.extend(_manifest_problems(shard, entries.get(shard["path"])))
    errors.extend(_totals_problems(manifests))
    stats: dict[str, list[int]] = {k: [] for k in shards[0]["stats"]}
    for shard in shards:
        for k, v in shard.pop("stats").items():
            stats[k].extend(v)
    bad: list[dict[str, Any]] = []
    for shard in shards:
        bad.extend(shard["bad"])
        shard["bad"] = len(shard["bad"])
    total = sum(s["samples"] for s in shards)
    return {"ok": not errors and not bad, "source": spec, "manifests": manifests,
            "num_shards": len(shards), "total_samples": total, "good_samples": total - len(bad),
            "total_bytes": sum(s["bytes"] or 0 for s in shards), "bad_samples": bad,
            "errors": errors, "shards": shards,
            "stats": {"width": _summary(stats["width"], "median"),
                      "height": _summary(stats["height"], "median"),
                      "caption_chars": _summary(stats["caption_chars"], "mean"),
                      "caption_words": _summary(stats["caption_words"], "mean")}}


def _line(label: str, s: dict[str, float] | None, centre: str, unit: str = "") -> str:
    if s is None:
        return f"{label}: -"
    return f"{label}: min {s['min']:g} / {centre} {s[centre]:g} / max {s['max']:g}{unit}"


def format_report(report: dict[str, Any], max_listed: int = 50) -> str:
    """The human-readable form of an `inspect_shards` report."""
    st = report["stats"]
    lines = [f"inspected {report['num_shards']} shards: {report['total_samples']:,} samples "
             f"({report['good_samples']:,} good, {len(report['bad_samples']):,} bad), "
             f"{report['total_bytes']:,} bytes",
             _line("image width", st["width"], "median", " px"),
             _line("image height", st["height"], "median", " px"),
             _line("caption chars", st["caption_chars"], "mean"),
             _line("caption words", st["caption_words"], "mean")]
    for title, rows in (("bad samples", [f"{b['shard']} {b['key']}: {b['reason']}"
                                         for b in report["bad_samples"]]),
                        ("errors", report["errors"])):
        if rows:
            lines.append(f"{title} ({len(rows)}):")
            lines.extend(f"  {r}" for r in rows[:max_listed])
            if len(rows) > max_listed:
                lines.append(f"  ... and {len(rows) - max_listed} more (--json lists all)")
    lines.append("OK" if report["ok"] else "FAILED")
    return "\n".join(lines)
