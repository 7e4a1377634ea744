"""WebDataset shards: writing them (atomically, with a manifest) and reading raw samples back.

A shard is a plain tar file whose members are `KEY.EXT` files; consecutive members with the same
KEY form one sample (`KEY.jpg`, `KEY.txt`, `KEY.json`). This is the WebDataset layout, so shards
written here are readable by `webdataset` and the other way round.

Every shard is written under a temporary name (`NAME.tmp`) and renamed when complete, so a shard
under its final name is never partial. A directory of shards carries `manifest.json` (also
written atomically) listing every shard with its number of samples and bytes; readers use it to
plan epochs without opening the tars.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from typing import IO, Any

from braceexpand import braceexpand

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
# Fixed member metadata makes shards byte-identical for identical input (cacheable, hashable).
_MTIME = 0
_MODE = 0o644


def shard_name(prefix: str, index: int) -> str:
    """File name of shard `index` of a shard set: `PREFIX-000042.tar`."""
    return f"{prefix}-{index:06d}.tar"


def shard_pattern(prefix: str, num_shards: int) -> str:
    """Brace pattern naming all `num_shards` shards of a set (relative to its directory)."""
    if num_shards == 1:
        return shard_name(prefix, 0)
    return f"{prefix}-{{{0:06d}..{num_shards - 1:06d}}}.tar"


def _encode_value(key: str, ext: str, value: Any) -> bytes:
    """Bytes stored for one field: bytes as is, str as UTF-8, dict/list as JSON."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8")
    raise TypeError(f"sample {key!r}: field {ext!r} has unsupported type {type(value).__name__} "
                    "(expected bytes, str, dict or list)")


def _check_key(key: Any) -> str:
    if not isinstance(key, str) or not key:
        raise ValueError(f"every sample needs a non-empty string '__key__', got {key!r}")
    if "." in os.path.basename(key):
        raise ValueError(f"sample key {key!r} contains '.': WebDataset splits the member name "
                         "at the first dot, so the key must not contain one")
    return key


class ShardWriter:
    """Writes samples into numbered WebDataset tar shards and a `manifest.json`.

    Use as a context manager or call `close()`; `close()` returns the manifest. A shard is closed
    and renamed from `NAME.tmp` to `NAME` once it holds `samples_per_shard` samples (or would
    exceed `max_shard_bytes`). If the `with` block raises, the open temporary shard is removed and
    no manifest is written. Shards are numbered from `start_index`; with `write_manifest=False`
    `close()` only returns the manifest (for writers of one part of a larger set).
    """

    def __init__(self, out_dir: str, prefix: str = "shard", samples_per_shard: int = 1000,
                 max_shard_bytes: int | None = None, start_index: int = 0,
                 write_manifest: bool = True) -> None:
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.out_dir = os.fspath(out_dir)
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.max_shard_bytes = max_shard_bytes
        self.start_index = start_index
        self.write_manifest = write_manifest
        self.shards: list[dict[str, Any]] = []
        self._tar: tarfile.TarFile | None = None
        self._tmp_path = ""
        self._count = 0
        self._bytes = 0
        self._keys: set[str] = set()
        self._closed = False
        os.makedirs(self.out_dir, exist_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, sample: dict[str, Any]) -> None:
        """Append one sample: `__key__` plus fields such as `jpg` (bytes), `txt`, `json`."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        key = _check_key(sample.get("__key__"))
        members = [(ext, _encode_value(key, ext, v)) for ext, v in sorted(sample.items())
                   if not ext.startswith("__")]
        if not members:
            raise ValueError(f"sample {key!r} has no fields besides '__key__'")
        size = sum(len(data) for _, data in members)
        if self._tar is not None and (self._count >= self.samples_per_shard or (
                self.max_shard_bytes and self._bytes + size > self.max_shard_bytes)):
            self._finish_shard()
        if self._tar is None:
            self._start_shard()
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r} in shard {self._tmp_path}")
        self._keys.add(key)
        for ext, data in members:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), _MTIME, _MODE
            self._tar.addfile(info, io.BytesIO(data))  # type: ignore[union-attr]
        self._count += 1
        self._bytes += size

    def _start_shard(self) -> None:
        name = shard_name(self.prefix, self.start_index + len(self.shards))
        self._tmp_path = os.path.join(self.out_dir, name + ".tmp")
        self._tar = tarfile.open(self._tmp_path, "w", format=tarfile.PAX_FORMAT)
        self._count, self._bytes, self._keys = 0, 0, set()

    def _finish_shard(self) -> None:
        assert self._tar is not None
        self._tar.close()
        self._tar = None
        final = self._tmp_path[: -len(".tmp")]
        os.replace(self._tmp_path, final)
        self.shards.append({"name": os.path.basename(final), "samples": self._count,
                            "bytes": os.path.getsize(final)})

    def abort(self) -> None:
        """Drop the shard being written (its temporary file); write no manifest."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            if os.path.exists(self._tmp_path):
                os.remove(self._tmp_path)
        self._closed = True

    def close(self) -> dict[str, Any]:
        """Finish the last shard and write `manifest.json` atomically; return the manifest."""
        if self._closed:
            raise RuntimeError("ShardWriter is already closed")
        if self._tar is not None:
            self._finish_shard()
        self._closed = True
        manifest = make_manifest(self.prefix, self.shards)
        if self.write_manifest:
            write_json_atomic(os.path.join(self.out_dir, MANIFEST_NAME), manifest)
        return manifest


def make_manifest(prefix: str, shards: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest of a shard set: every shard's name/samples/bytes plus totals."""
    return {
        "version": MANIFEST_VERSION,
        "prefix": prefix,
        "pattern": shard_pattern(prefix, len(shards)) if shards else "",
        "num_shards": len(shards),
        "total_samples": sum(s["samples"] for s in shards),
        "total_bytes": sum(s["bytes"] for s in shards),
        "shards": list(shards),
    }


def write_json_atomic(path: str, obj: Any) -> None:
    """Write JSON to `path` via a temporary file and `os.replace` (never a partial file)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_shards(samples: Iterable[dict[str, Any]], out_dir: str, prefix: str = "shard",
                 samples_per_shard: int = 1000) -> dict[str, Any]:
    """Write `samples` into `out_dir/PREFIX-NNNNNN.tar` shards; return the manifest."""
    writer = ShardWriter(out_dir, prefix, samples_per_shard)
    try:
        for sample in samples:
            writer.write(sample)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def expand_pattern(pattern: str) -> list[str]:
    """Shard paths named by a brace pattern; several patterns may be joined with `::`."""
    urls: list[str] = []
    for part in pattern.split("::"):
        if part.strip():
            urls.extend(braceexpand(part.strip()))
    return urls


def read_manifest(pattern_or_dir: str) -> dict[str, Any]:
    """Load the manifest of a shard directory, a `manifest.json` path, or a shard pattern's dir.

    Raises FileNotFoundError naming the path looked at when there is no manifest.
    """
    path = os.fspath(pattern_or_dir)
    if os.path.isdir(path):
        path = os.path.join(path, MANIFEST_NAME)
    elif os.path.basename(path) != MANIFEST_NAME:
        urls = expand_pattern(path)
        if not urls:
            raise ValueError(f"shard pattern {pattern_or_dir!r} names no files")
        path = os.path.join(os.path.dirname(urls[0]) or ".", MANIFEST_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no shard manifest at {path}")
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    if not isinstance(manifest, dict) or "shards" not in manifest:
        raise ValueError(f"{path} is not an mmpretrain shard manifest (no 'shards' list)")
    return manifest


def split_member_name(name: str) -> tuple[str, str]:
    """(`key`, `ext`) of a tar member name; the extension starts at the basename's first dot."""
    dirname, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (os.path.join(dirname, stem) if dirname else stem), ext


_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_FILE_TYPES = (b"0", b"\0", b"7")


def _tar_int(field: bytes) -> int:
    """A numeric tar header field: NUL/space-terminated octal, or GNU base-256."""
    if field[0] & 0x80:
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    return int(digits, 8) if digits else 0


def _pax_path(records: bytes) -> str | None:
    """The `path` of a pax extended header (records `LEN key=value\\n`), if any."""
    pos, path = 0, None
    while pos < len(records) and records[pos:pos + 1] != b"\0":
        space = records.index(b" ", pos)
        length = int(records[pos:space])
        key, _, value = records[space + 1:pos + length - 1].partition(b"=")
        if key == b"path":
            path = value.decode("utf-8", errors="replace")
        pos += length
    return path


def _member_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:263] == b"ustar\0":  # POSIX ustar: a directory prefix may hold the front
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", errors="replace")


def _read_exact(read: Any, size: int, url: str) -> bytes:
    data = read(size)
    while len(data) < size:  # short reads happen on pipes
        more = read(size - len(data))
        if not more:
            raise ValueError(f"{url or 'tar stream'}: truncated tar file (corrupt or partial "
                             "shard)")
        data += more
    return data


def iter_tar_members(stream: IO[bytes], url: str = "") -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file of a tar stream, in order, reading sequentially.

    A small parser of the ustar, pax and GNU formats (long names included); Python's `tarfile`
    spends ~80 us of header parsing per member, a large share of a sample's budget. Raises
    ValueError on a bad header checksum or a truncated file.
    """
    read, long_name = stream.read, None
    while True:
        header = read(_BLOCK)
        if not header or header == _ZERO_BLOCK:
            return  # end of archive (a missing end-of-archive marker is tolerated)
        header = _read_exact(read, _BLOCK, url) if len(header) < _BLOCK else header
        if _tar_int(header[148:156]) != sum(header) - sum(header[148:156]) + 8 * 32:
            raise ValueError(f"{url or 'tar stream'}: bad tar header checksum (corrupt shard)")
        size, kind = _tar_int(header[124:136]), header[156:157]
        data = _read_exact(read, size, url) if size else b""
        if size % _BLOCK:
            _read_exact(read, _BLOCK - size % _BLOCK, url)
        if kind == b"x":
            long_name = _pax_path(data) or long_name
        elif kind == b"L":
            long_name = data.split(b"\0", 1)[0].decode("utf-8", errors="replace")
        elif kind != b"g":
            if kind in _FILE_TYPES:
                yield long_name or _member_name(header), data
            long_name = None


class TarReadError(ValueError):
    """A tar stream ended inside a member or had a corrupt header; `key` is the sample being
    assembled when it broke (that partial sample is dropped), '' before the first."""

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message)
        self.key = key


def iter_tar_samples(stream: IO[bytes], url: str = "") -> Iterator[dict[str, Any]]:
    """Raw samples of a tar stream: dicts of `__key__`, `__url__` and `ext -> bytes`.

    Consecutive members with the same key form a sample (the WebDataset convention). Reads
    sequentially, so it works on pipes as well as files. Members whose name has no extension are
    skipped. A broken stream raises `TarReadError` naming the partial sample.
    """
    current: dict[str, Any] | None = None
    try:
        for name, data in iter_tar_members(stream, url):
            key, ext = split_member_name(name)
            if not ext:
                continue
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key, "__url__": url}
            current[ext] = data
    except TarReadError:
        raise
    except ValueError as exc:
        raise TarReadError(str(exc), current["__key__"] if current else "") from exc
    if current is not None:
        yield current


def iter_shard_samples(url: str) -> Iterator[dict[str, Any]]:
    """Raw samples of one local shard file (see `iter_tar_samples`)."""
    with open(url, "rb", buffering=1 << 20) as f:
        yield from iter_tar_samples(f, url)


def count_tar_samples(url: str) -> int:
    """Number of samples in a local shard, counted from its member headers (no data read)."""
    keys = 0
    last = None
    with tarfile.open(url, "r:*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = split_member_name(member.name)
            if ext and key != last:
                keys += 1
                last = key
    return keys
