"""Inputs of `mmpretrain shards`: image–caption pairs listed from a folder, a table, or the demo.

Every input becomes an `Item`, in a deterministic order: item `i` of a listing is always item
`i`, whatever the machine or the number of worker processes, so it always lands in the same
shard. Rows that cannot be used (a malformed JSONL line, a row without an image path) are still
items, carrying the reason in `error`, so they keep their index and are reported, not dropped.

Folder: every image (`.jpg .jpeg .png .webp .bmp`, any case) under the folder, recursively
(hidden folders skipped), sorted by relative path, captioned by the same-stem `.txt` next to it.

Table: CSV, TSV or JSONL with an image path column (relative to the table's folder, or
absolute) and a caption column. Columns are named by the caller or found among common names.
Non-UTF-8 bytes are kept (as surrogate escapes) so the worker can report the caption as such.
An item's `row` is its line number in the table (for a CSV record spanning lines, its last).
"""
from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from typing import Any, NamedTuple

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
IMAGE_COLUMNS = ("image", "filepath", "image_path", "img_path", "path", "file", "filename")
CAPTION_COLUMNS = ("caption", "text", "title", "txt", "description", "alt")
TABLE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl",
                 ".ndjson": "jsonl"}
# Bad-input kinds, in the order the summary lists them.
SKIP_KINDS = ("missing_image", "bad_image", "too_large", "missing_caption", "empty_caption",
              "non_utf8_caption", "bad_row")


class SourceError(ValueError):
    """An input that cannot be converted at all (missing folder/table, unknown column)."""


class Item(NamedTuple):
    """One input pair. `image_path` is read unless `data` (image bytes) is given; the caption
    is `caption` or the contents of `caption_path`; `meta` goes into the sample's json."""

    source: str
    image_path: str | None = None
    data: bytes | None = None
    caption: str | None = None
    caption_path: str | None = None
    row: int | None = None
    meta: dict[str, Any] | None = None
    error: tuple[str, str] | None = None


def list_folder(root: str) -> list[Item]:
    """Every image under `root` (recursive, sorted) with its same-stem `.txt` caption."""
    if not os.path.isdir(root):
        raise SourceError(f"input folder {root} does not exist or is not a folder")
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                found.append(os.path.relpath(os.path.join(dirpath, name), root))
    items, base = [], os.path.abspath(root)
    for rel in sorted(p.replace(os.sep, "/") for p in found):
        path = os.path.join(base, rel)
        items.append(Item(source=rel, image_path=path,
                          caption_path=os.path.splitext(path)[0] + ".txt"))
    return items


def table_format(path: str, fmt: str | None = None) -> str:
    """`csv`, `tsv` or `jsonl`: `fmt` if given, else from the file's extension."""
    if fmt:
        if fmt not in ("csv", "tsv", "jsonl"):
            raise SourceError(f"unknown table format {fmt!r} (use csv, tsv or jsonl)")
        return fmt
    ext = os.path.splitext(path)[1].lower()
    if ext not in TABLE_FORMATS:
        raise SourceError(f"{path}: cannot tell the table format from the extension {ext!r} "
                          f"(expected one of {', '.join(sorted(TABLE_FORMATS))}); "
                          "pass --format csv|tsv|jsonl")
    return TABLE_FORMATS[ext]


def pick_column(path: str, columns: list[str], wanted: str | None,
                fallbacks: tuple[str, ...], what: str) -> str:
    """The column to use: `wanted` (must exist), else the first fallback present (exact name,
    then case-insensitive). Raises SourceError naming the file and the columns it has."""
    if wanted:
        if wanted in columns:
            return wanted
        raise SourceError(f"{path}: no {what} column {wanted!r}; it has {columns}")
    for name in fallbacks:
        if name in columns:
            return name
    lower = {c.lower().strip(): c for c in columns}
    for name in fallbacks:
        if name in lower:
            return lower[name]
    raise SourceError(f"{path}: found no {what} column (looked for {', '.join(fallbacks)}); "
                      f"it has {columns}; name it with --{what}-column")


def _row_item(base: str, row: int, image: Any, caption: Any, meta: dict[str, Any]) -> Item:
    """The item of one table row; bad values become `error`/missing captions."""
    if image is None or (isinstance(image, str) and not image.strip()):
        return Item(source="", row=row, meta=meta,
                    error=("missing_image", f"line {row} has no image path"))
    if not isinstance(image, str):
        return Item(source=str(image), row=row, meta=meta,
                    error=("bad_row", f"line {row}: image path is a {type(image).__name__}"))
    if isinstance(caption, (int, float)) and not isinstance(caption, bool):
        caption = str(caption)
    elif caption is not None and not isinstance(caption, str):
        return Item(source=image, row=row, meta=meta,
                    error=("bad_row", f"line {row}: caption is a {type(caption).__name__}, "
                                       "expected a string"))
    return Item(source=image, image_path=os.path.join(base, image.strip()), caption=caption,
                row=row, meta=meta)


def _iter_delimited(path: str, delimiter: str, image_col: str | None,
                    caption_col: str | None) -> Iterator[Item]:
    base = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if not header:
            raise SourceError(f"{path}: empty table (no header row)")
        header = [h.strip() for h in header]
        img = header.index(pick_column(path, header, image_col, IMAGE_COLUMNS, "image"))
        cap = header.index(pick_column(path, header, caption_col, CAPTION_COLUMNS, "caption"))
        for values in reader:
            if not any(v.strip() for v in values):
                continue  # blank line: not an input
            row = reader.line_num
            image = values[img] if img < len(values) else None
            caption = values[cap] if cap < len(values) else None
            yield _row_item(base, row, image, caption, {"table": os.path.basename(path)})


def _iter_jsonl(path: str, image_col: str | None, caption_col: str | None) -> Iterator[Item]:
    base = os.path.dirname(os.path.abspath(path))
    columns: tuple[str, str] | None = None
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
        for row, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError(f"expected a JSON object, got {type(record).__name__}")
            except ValueError as exc:
                yield Item(source="", row=row, error=("bad_row", f"line {row}: {exc}"))
                continue
            if columns is None:  # decided by the first good record
                keys = list(record)
                columns = (pick_column(f"{path} line {row}", keys, image_col, IMAGE_COLUMNS,
                                       "image"),
                           pick_column(f"{path} line {row}", keys, caption_col,
                                       CAPTION_COLUMNS, "caption"))
            yield _row_item(base, row, record.get(columns[0]), record.get(columns[1]),
                            {"table": os.path.basename(path)})


def iter_table(path: str, image_column: str | None = None, caption_column: str | None = None,
               fmt: str | None = None) -> Iterator[Item]:
    """The items of a CSV/TSV/JSONL table, in row order (see the module docstring)."""
    if not os.path.isfile(path):
        raise SourceError(f"input table {path} does not exist")
    kind = table_format(path, fmt)
    if kind == "jsonl":
        return _iter_jsonl(path, image_column, caption_column)
    return _iter_delimited(path, "\t" if kind == "tsv" else ",", image_column, caption_column)


def demo_items(split: str = "train", image_size: int = 32) -> list[Item]:
    """The bundled digits dataset (`split`: train, val or all) as items of rendered JPEGs."""
    from sklearn.datasets import load_digits

    from .demo import CLASSNAMES, demo_captions, demo_split, digit_image, jpeg_bytes

    digits = load_digits()
    images, labels = digits.data, digits.target
    captions = demo_captions(labels)
    train, val = demo_split(labels)
    parts = {"train": [("train", train)], "val": [("val", val)],
             "all": [("train", train), ("val", val)]}
    if split not in parts:
        raise SourceError(f"unknown demo split {split!r} (use train, val or all)")
    items = []
    for name, indices in parts[split]:
        for i in sorted(int(j) for j in indices):
            label = int(labels[i])
            items.append(Item(
                source=f"sklearn-digits/{i}", data=jpeg_bytes(digit_image(images[i], image_size)),
                caption=captions[i],
                meta={"label": label, "classname": CLASSNAMES[label], "index": i,
                      "split": name}))
    return items
