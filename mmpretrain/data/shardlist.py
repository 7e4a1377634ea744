"""Where training shards come from: shard specs, `pipe:` commands, mixed sources, sample counts.

A shard spec (`data.train_shards`) is one or more *sources* joined by `::`. A source is a brace
pattern of either local tar paths (`data/a-{000000..000099}.tar`) or shell commands that write
one tar to stdout (`pipe:aws s3 cp s3://bucket/a-{000000..000099}.tar -`; the command is
brace-expanded, one command per shard). Each source has a mixing weight (`data.train_weights`,
used in resampled mode) and may have a `manifest.json` giving its shards' sample counts
(`data.train_manifests`); local sources also find the manifest next to their shards.

Reading is sequential (tar members in order), so a pipe reads exactly like a file. A `pipe:`
command that exits with a non-zero status raises `ShardReadError` naming the command. A tar
that ends early or has a corrupt header is reported through `on_truncated` (the rest of that
shard is skipped) or raised as `TruncatedShard`.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from .shards import (MANIFEST_NAME, TarReadError, count_tar_samples, expand_pattern,
                     iter_tar_samples)

PIPE = "pipe:"


@dataclass(frozen=True)
class Shard:
    """One shard: a local path or a `pipe:` command, its sample count (None: unknown) and the
    index of the source it belongs to."""

    url: str
    samples: int | None = None
    source: int = 0


@dataclass(frozen=True)
class ShardSource:
    """One source of a shard spec: its brace pattern, mixing weight and shards."""

    pattern: str
    weight: float
    shards: tuple[Shard, ...]

    @property
    def total_samples(self) -> int | None:
        """Samples in all its shards, or None when some count is unknown."""
        counts = [s.samples for s in self.shards]
        return None if any(c is None for c in counts) else sum(counts)  # type: ignore[misc]


class ShardReadError(RuntimeError):
    """A shard could not be read at all (a `pipe:` command failed)."""


class TruncatedShard(ValueError):
    """A tar stream ended inside a member or had a corrupt header; `key` is the sample being read
    (or the last complete one)."""

    def __init__(self, message: str, url: str = "", key: str = "") -> None:
        super().__init__(message)
        self.url, self.key = url, key


def split_sources(spec: str) -> list[str]:
    """The source patterns of a shard spec (`a-{0..9}.tar::pipe:cat b-{0..3}.tar`)."""
    return [part.strip() for part in spec.split("::") if part.strip()]


def is_pipe(url: str) -> bool:
    """True for a `pipe:` shard (a shell command writing the tar to stdout)."""
    return url.startswith(PIPE)


def shard_file_name(url: str) -> str:
    """The file name a manifest lists a shard under: the basename of a local path, or of the
    last argument of a `pipe:` command that names a `.tar` (query strings dropped)."""
    if not is_pipe(url):
        return os.path.basename(url)
    for token in reversed(url[len(PIPE):].split()):
        base = os.path.basename(token.split("?", 1)[0].rstrip("/"))
        if ".tar" in base:
            return base
    return url


def manifest_counts(path: str) -> dict[str, tuple[int, int | None]]:
    """{shard file name: (samples, bytes or None)} of a `manifest.json`; errors name the file."""
    if os.path.isdir(path):
        path = os.path.join(path, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"shard manifest {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)["shards"]
        return {e["name"]: (int(e["samples"]), e.get("bytes")) for e in entries}
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a shard manifest (expected 'shards': [{{'name', "
                         f"'samples'}}, ...]): {exc}") from exc


def _local_manifest(directory: str) -> dict[str, tuple[int, int | None]]:
    try:
        return manifest_counts(os.path.join(directory or ".", MANIFEST_NAME))
    except (OSError, ValueError):
        return {}  # none or unreadable: count the tars instead


def count_local(url: str) -> int:
    """Samples in a local shard from its member headers; a truncated or corrupt shard is read
    and its complete samples counted."""
    try:
        return count_tar_samples(url)
    except (tarfile.TarError, OSError, ValueError, EOFError):
        return sum(1 for _ in read_shard(url, on_truncated=lambda exc: None))


def resolve_shards(pattern: str, manifest: str = "", source: int = 0) -> list[Shard]:
    """The shards named by one source pattern, with sample counts.

    Counts come from `manifest` when given (looked up by `shard_file_name`), else for local
    shards from their directory's `manifest.json` when it lists the shard with its current size
    in bytes, else from the tar's member headers; `pipe:` shards not in `manifest` have unknown
    counts. Raises FileNotFoundError naming the first missing local shard.
    """
    urls = expand_pattern(pattern)
    if not urls:
        raise ValueError(f"shard pattern {pattern!r} names no shards")
    given = manifest_counts(manifest) if manifest else {}
    local: dict[str, dict[str, tuple[int, int | None]]] = {}
    shards = []
    for url in urls:
        entry = given.get(shard_file_name(url))
        if is_pipe(url):
            shards.append(Shard(url, entry[0] if entry else None, source))
            continue
        if not os.path.isfile(url):
            raise FileNotFoundError(f"shard {url} does not exist (from pattern {pattern!r})")
        directory = os.path.dirname(url)
        if entry is None:
            if directory not in local:
                local[directory] = _local_manifest(directory)
            entry = local[directory].get(os.path.basename(url))
        fresh = entry is not None and entry[1] in (None, os.path.getsize(url))
        shards.append(Shard(url, entry[0] if fresh else count_local(url), source))  # type: ignore
    return shards


def _check_weights(weights: list[float], num: int) -> list[float] | None:
    if not weights:
        return None
    if len(weights) != num:
        raise ValueError(f"data.train_weights has {len(weights)} weights for {num} sources in "
                         "data.train_shards (sources are joined by '::'); give one per source")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"data.train_weights must be >= 0 with a positive sum, got {weights}")
    return [float(w) for w in weights]


def resolve_sources(spec: str, weights: list[float] | None = None,
                    manifests: list[str] | None = None) -> list[ShardSource]:
    """The sources of a shard spec with their weights and shards (see the module docstring).

    `weights` has one weight per source; empty means "as if the sources were one": each weighs
    its number of samples (its number of shards when some count is unknown). `manifests` has one
    path per source ('' for none) or is empty. Both are checked against the number of sources.
    """
    patterns = split_sources(spec)
    if not patterns:
        raise ValueError("no training shards: set data.train_shards to a brace pattern such as "
                         "data/train-{000000..000099}.tar")
    checked = _check_weights(list(weights or []), len(patterns))
    manifests = list(manifests or [])
    if manifests and len(manifests) != len(patterns):
        raise ValueError(f"data.train_manifests has {len(manifests)} entries for "
                         f"{len(patterns)} sources; give one per source ('' for none)")
    shards = [resolve_shards(p, manifests[i] if manifests else "", i)
              for i, p in enumerate(patterns)]
    if checked is None:
        known = all(s.samples is not None for group in shards for s in group)
        checked = [float(sum(s.samples for s in group) if known else len(group))  # type: ignore
                   for group in shards]
    return [ShardSource(p, w, tuple(group)) for p, w, group in zip(patterns, checked, shards)]


def _tar_samples(stream: IO[bytes], url: str) -> Iterator[dict[str, Any]]:
    """Samples of a tar stream (`iter_tar_samples`); a broken stream raises TruncatedShard."""
    try:
        yield from iter_tar_samples(stream, url)
    except TarReadError as exc:  # the partial sample being read is dropped
        raise TruncatedShard(str(exc), url, exc.key) from exc


def _pipe_error(command: str, status: int, stderr: IO[bytes]) -> ShardReadError:
    stderr.seek(0)
    tail = stderr.read()[-800:].decode("utf-8", errors="replace").strip()
    return ShardReadError(f"shard command {command!r} failed with exit status {status}"
                          + (f": {tail}" if tail else ""))


def _read_pipe(url: str) -> Iterator[dict[str, Any]]:
    command = url[len(PIPE):]
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=stderr,
                                bufsize=1 << 20, start_new_session=True)
        assert proc.stdout is not None
        try:
            try:
                yield from _tar_samples(proc.stdout, url)
            except TruncatedShard:
                proc.stdout.read()  # let the command finish; a failed command is the error
                if proc.wait() != 0:
                    raise _pipe_error(command, proc.returncode, stderr) from None
                raise
            proc.stdout.read()  # the end-of-archive padding
            if proc.wait() != 0:
                raise _pipe_error(command, proc.returncode, stderr)
        finally:
            if proc.poll() is None:  # closed early: stop the command and its children
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            proc.stdout.close()


def read_shard(url: str, on_truncated: Callable[[TruncatedShard], None] | None = None
               ) -> Iterator[dict[str, Any]]:
    """Raw samples (`__key__`, `__url__`, `ext -> bytes`) of one shard, local or `pipe:`.

    A truncated or corrupt tar goes to `on_truncated` (and the rest of the shard is skipped)
    when given, else raises TruncatedShard. A failed `pipe:` command raises ShardReadError.
    """
    try:
        if is_pipe(url):
            yield from _read_pipe(url)
        else:
            with open(url, "rb", buffering=1 << 20) as f:
                yield from _tar_samples(f, url)
    except TruncatedShard as exc:
        if on_truncated is None:
            raise
        on_truncated(exc)
