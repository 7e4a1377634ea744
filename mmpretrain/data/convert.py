"""`mmpretrain shards`: image–caption inputs → WebDataset shards, resumable and parallel.

Sharding is fixed before any input is looked at: input item `i` (see `sources`) goes to shard
`i // samples_per_shard` and gets the key `%09d % i`. Each shard is one task, written by one
process (`--workers`) from its own items only, so re-runs and parallel runs produce identical
shards. Bad inputs are skipped inside their shard, which may then hold fewer samples than the
nominal count (or none: an empty tar keeps the shard names contiguous).

A shard is written as `NAME.tmp` and renamed; then a small record of it (sample count, bytes,
a fingerprint of its inputs and options, its skipped inputs) is saved under `OUT/.shards/`. A
re-run reuses a shard whose record matches its inputs and whose file still has the recorded
bytes and samples, and deletes leftover `.tmp` files of a crashed run. At the end come
`OUT/skipped.jsonl` (one line per skipped input: kind, source, reason, row, item) and
`OUT/manifest.json` (every shard's samples and bytes, totals, skip counts), in that order.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .parallel import imap_unordered
from .prepare import DEFAULT_MAX_PIXELS, SkipSample, prepare_image, read_caption, read_image_bytes
from .shards import (MANIFEST_NAME, ShardWriter, count_tar_samples, make_manifest, shard_name,
                     write_json_atomic)
from .sources import SKIP_KINDS, Item, SourceError, demo_items, iter_table, list_folder

STATE_DIR = ".shards"
SKIPPED_NAME = "skipped.jsonl"
FORMAT_VERSION = 1  # bump when the bytes written for the same input change


@dataclass(frozen=True)
class ShardOptions:
    """How `convert` writes shards (the `mmpretrain shards` options)."""

    out_dir: str
    prefix: str = "shard"
    samples_per_shard: int = 1000
    max_size: int | None = None
    quality: int = 95
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    workers: int = 1
    overwrite: bool = False
    progress: bool = False

    def check(self) -> None:
        """Raise SourceError on an impossible setting."""
        if self.samples_per_shard < 1:
            raise SourceError(f"--samples-per-shard must be >= 1, got {self.samples_per_shard}")
        if self.max_size is not None and self.max_size < 1:
            raise SourceError(f"--max-size must be >= 1, got {self.max_size}")
        if not 1 <= self.quality <= 100:
            raise SourceError(f"--quality must be in 1..100, got {self.quality}")
        if self.workers < 1:
            raise SourceError(f"--workers must be >= 1, got {self.workers}")
        if not self.prefix or "/" in self.prefix or "." in self.prefix:
            raise SourceError(f"--prefix must be a plain name without '/' or '.', "
                              f"got {self.prefix!r}")


@dataclass
class ConvertResult:
    """What `convert` did: the manifest written, shards written vs reused, skipped inputs."""

    out_dir: str
    manifest: dict[str, Any]
    num_items: int
    written: int
    reused: int
    removed_tmp: list[str]
    skipped: dict[str, int]
    stale_shards: list[str] = field(default_factory=list)

    @property
    def skipped_path(self) -> str:
        """Where the skipped inputs are listed."""
        return os.path.join(self.out_dir, SKIPPED_NAME)


@dataclass(frozen=True)
class _Task:
    shard: int
    first: int
    items: list[Item]
    opts: ShardOptions
    fingerprint: str


def sample_key(index: int) -> str:
    """The key of input item `index` (no dots, sorts in input order)."""
    return f"{index:09d}"


def make_sample(index: int, item: Item, opts: ShardOptions) -> dict[str, Any]:
    """The shard sample of one input item; raises SkipSample when it is unusable."""
    if item.error is not None:
        raise SkipSample(*item.error)
    where = f"line {item.row} ({item.source})" if item.row is not None else item.source
    data = item.data if item.data is not None else read_image_bytes(item.image_path or "")
    caption = read_caption(item.caption, item.caption_path, where)
    jpg, meta = prepare_image(data, opts.max_size, opts.quality, opts.max_pixels)
    info: dict[str, Any] = {"source": printable(item.source), **meta}
    if item.row is not None:
        info["row"] = item.row
    info.update(item.meta or {})
    return {"__key__": sample_key(index), "jpg": jpg, "txt": caption, "json": info}


def printable(text: str) -> str:
    """`text` with undecodable file-name bytes (surrogate escapes) as U+FFFD, so it can be
    stored as UTF-8."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _skip_entry(index: int, item: Item, exc: SkipSample) -> dict[str, Any]:
    entry = {"item": index, "kind": exc.kind, "source": item.image_path or item.source,
             "reason": exc.reason}
    if item.row is not None:
        entry["row"] = item.row
    return entry


def _write_empty(path: str) -> None:
    tmp = path + ".tmp"
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT):
        pass
    os.replace(tmp, path)


def write_shard(task: _Task) -> dict[str, Any]:
    """Write one shard from its items (in a worker process); save and return its record."""
    opts, skipped = task.opts, []
    name = shard_name(opts.prefix, task.shard)
    with ShardWriter(opts.out_dir, opts.prefix, max(1, len(task.items)), start_index=task.shard,
                     write_manifest=False) as writer:
        for offset, item in enumerate(task.items):
            index = task.first + offset
            try:
                sample = make_sample(index, item, opts)
            except SkipSample as exc:
                skipped.append(_skip_entry(index, item, exc))
                continue
            except Exception as exc:  # a bug, not a bad input: stop, naming the input
                raise RuntimeError(f"{name}: failed on input item {index} ({item.source}): "
                                   f"{type(exc).__name__}: {exc}") from exc
            writer.write(sample)
    path = os.path.join(opts.out_dir, name)
    if not writer.shards:  # every input of this shard was skipped
        _write_empty(path)
    record = {"name": name, "samples": len(task.items) - len(skipped),
              "bytes": os.path.getsize(path), "first_item": task.first,
              "num_items": len(task.items), "fingerprint": task.fingerprint, "skipped": skipped}
    write_json_atomic(_record_path(opts.out_dir, name), record)
    return record


def _record_path(out_dir: str, name: str) -> str:
    return os.path.join(out_dir, STATE_DIR, name + ".json")


def _fingerprint(first: int, items: list[Item], opts: ShardOptions) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([FORMAT_VERSION, first, opts.max_size, opts.quality,
                         opts.max_pixels]).encode())
    for item in items:
        fields = item._asdict()
        data = fields.pop("data")
        fields["data"] = hashlib.sha256(data).hexdigest() if data is not None else None
        h.update(json.dumps(fields, sort_keys=True, default=str,
                            ensure_ascii=True).encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _reusable(out_dir: str, name: str, fingerprint: str) -> dict[str, Any] | None:
    """The saved record of shard `name` if the shard on disk is complete for these inputs."""
    try:
        with open(_record_path(out_dir, name), encoding="utf-8") as f:
            record = json.load(f)
        if record.get("fingerprint") != fingerprint or record.get("name") != name:
            return None
        path = os.path.join(out_dir, name)
        if os.path.getsize(path) != record["bytes"] or count_tar_samples(path) != record[
                "samples"]:
            return None
    except (OSError, ValueError, KeyError, TypeError, tarfile.TarError):
        return None
    return record


def _chunks(items: Iterable[Item], size: int) -> Iterator[tuple[int, list[Item]]]:
    chunk: list[Item] = []
    shard = 0
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield shard, chunk
            shard, chunk = shard + 1, []
    if chunk:
        yield shard, chunk


def remove_tmp_files(out_dir: str, prefix: str) -> list[str]:
    """Delete the temporary files a crashed run left in `out_dir`; return their paths."""
    removed = []
    for pattern in (f"{glob.escape(prefix)}-*.tar.tmp", f"{MANIFEST_NAME}.tmp-*",
                    f"{SKIPPED_NAME}.tmp-*", os.path.join(STATE_DIR, "*.json.tmp-*")):
        for path in sorted(glob.glob(os.path.join(glob.escape(out_dir), pattern))):
            os.remove(path)
            removed.append(path)
    return removed


class _Run:
    """Bookkeeping of one conversion: tasks out, records in, the progress bar."""

    def __init__(self, opts: ShardOptions, total: int | None) -> None:
        self.opts = opts
        self.records: dict[int, dict[str, Any]] = {}
        self.num_items = 0
        self.reused = 0
        self.bar = None
        if opts.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", desc="shards", dynamic_ncols=True)

    def tasks(self, items: Iterable[Item]) -> Iterator[_Task]:
        """The shards to write; complete ones are recorded here and not handed out."""
        for shard, chunk in _chunks(items, self.opts.samples_per_shard):
            first = shard * self.opts.samples_per_shard
            self.num_items = first + len(chunk)
            fingerprint = _fingerprint(first, chunk, self.opts)
            name = shard_name(self.opts.prefix, shard)
            record = None if self.opts.overwrite else _reusable(self.opts.out_dir, name,
                                                                  fingerprint)
            if record is not None:
                self.reused += 1
                self.done(shard, record)
                continue
            yield _Task(shard, first, chunk, self.opts, fingerprint)

    def done(self, shard: int, record: dict[str, Any]) -> None:
        """Take the record of a finished (or reused) shard."""
        self.records[shard] = record
        if self.bar is not None:
            self.bar.update(record["num_items"])
            self.bar.set_postfix(skipped=sum(len(r["skipped"]) for r in self.records.values()),
                                 refresh=False)

    def close(self) -> None:
        """Close the progress bar."""
        if self.bar is not None:
            self.bar.close()


def _stale_shards(out_dir: str, prefix: str, num_shards: int) -> list[str]:
    """Shard files of this prefix beyond the set (from an earlier, larger run); their state
    records are removed, the files are left for the user to delete."""
    stale = []
    for path in sorted(glob.glob(os.path.join(glob.escape(out_dir),
                                              f"{glob.escape(prefix)}-*.tar"))):
        stem = os.path.basename(path)[len(prefix) + 1:-len(".tar")]
        if stem.isdigit() and int(stem) >= num_shards:
            stale.append(path)
            record = _record_path(out_dir, os.path.basename(path))
            if os.path.exists(record):
                os.remove(record)
    return stale


def _finish(run: _Run, removed: list[str], source: str) -> ConvertResult:
    opts = run.opts
    records = [run.records[i] for i in sorted(run.records)]
    skipped = [entry for r in records for entry in r["skipped"]]
    counts = Counter(entry["kind"] for entry in skipped)
    ordered = {k: counts[k] for k in SKIP_KINDS if counts[k]}
    ordered.update({k: v for k, v in sorted(counts.items()) if k not in ordered})
    lines = "".join(json.dumps(e, ensure_ascii=False, sort_keys=True) + "\n" for e in skipped)
    tmp = os.path.join(opts.out_dir, f"{SKIPPED_NAME}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8", errors="backslashreplace") as f:
        f.write(lines)
    os.replace(tmp, os.path.join(opts.out_dir, SKIPPED_NAME))
    manifest = make_manifest(opts.prefix, [{k: r[k] for k in ("name", "samples", "bytes")}
                                           for r in records])
    manifest["inputs"] = {"source": source, "items": run.num_items,
                          "skipped": sum(ordered.values()), "skipped_by_kind": ordered}
    write_json_atomic(os.path.join(opts.out_dir, MANIFEST_NAME), manifest)
    return ConvertResult(opts.out_dir, manifest, run.num_items, len(records) - run.reused,
                         run.reused, removed, ordered,
                         _stale_shards(opts.out_dir, opts.prefix, len(records)))


def convert(items: Iterable[Item], opts: ShardOptions, total: int | None = None,
            source: str = "") -> ConvertResult:
    """Write `items` as shards under `opts.out_dir` (see the module docstring)."""
    opts.check()
    os.makedirs(os.path.join(opts.out_dir, STATE_DIR), exist_ok=True)
    removed = remove_tmp_files(opts.out_dir, opts.prefix)
    run = _Run(opts, total)
    try:
        for record in imap_unordered(write_shard, run.tasks(items), opts.workers):
            run.done(int(record["name"][len(opts.prefix) + 1:-len(".tar")]), record)
    finally:
        run.close()
    if not run.records:
        raise SourceError(f"no inputs found in {source or 'the input'}")
    return _finish(run, removed, source)


def convert_source(opts: ShardOptions, input_path: str | None = None, demo: bool = False,
                   image_column: str | None = None, caption_column: str | None = None,
                   fmt: str | None = None, demo_split: str = "train") -> ConvertResult:
    """`convert` from a folder or table at `input_path`, or from the bundled digits (`demo`);
    demo images are rendered at `max_size` px (32 when unset)."""
    if demo == bool(input_path):
        raise SourceError("give either an input folder/table or --demo")
    if demo:
        items: Iterable[Item] = demo_items(demo_split, opts.max_size or 32)
        return convert(items, opts, len(items), f"demo:digits/{demo_split}")  # type: ignore
    assert input_path is not None
    if not os.path.exists(input_path):
        raise SourceError(f"input {input_path} does not exist (expected a folder of images "
                          "with .txt captions, or a .csv/.tsv/.jsonl table)")
    if os.path.isdir(input_path):
        listed = list_folder(input_path)
        return convert(listed, opts, len(listed), os.path.abspath(input_path))
    return convert(iter_table(input_path, image_column, caption_column, fmt), opts, None,
                   os.path.abspath(input_path))


def format_summary(result: ConvertResult) -> str:
    """The human-readable report printed at the end of `mmpretrain shards`."""
    m = result.manifest
    out = result.out_dir
    lines = [f"wrote {m['num_shards']} shards ({result.written} written, {result.reused} "
             f"already complete) holding {m['total_samples']:,} samples from "
             f"{result.num_items:,} inputs, {m['total_bytes']:,} bytes",
             f"shards: {os.path.join(out, m['pattern'])}",
             f"manifest: {os.path.join(out, MANIFEST_NAME)}"]
    total = sum(result.skipped.values())
    if total:
        kinds = ", ".join(f"{n} {kind}" for kind, n in result.skipped.items())
        lines.append(f"skipped {total:,} inputs ({kinds}); listed in {result.skipped_path}")
    else:
        lines.append("skipped no inputs")
    empty = [s["name"] for s in m["shards"] if s["samples"] == 0]
    if empty:
        lines.append(f"warning: {len(empty)} shards hold no samples (all their inputs were "
                     f"skipped): {', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''}")
    if result.removed_tmp:
        lines.append(f"removed {len(result.removed_tmp)} temporary files of an interrupted run")
    if result.stale_shards:
        lines.append(f"warning: {len(result.stale_shards)} shard files beyond this set are not "
                     f"in the manifest (from an earlier run?): {result.stale_shards[0]} ...")
    return "\n".join(lines)


__all__ = ["ConvertResult", "ShardOptions", "SourceError", "convert", "convert_source",
           "format_summary", "make_sample", "remove_tmp_files", "write_shard"]
