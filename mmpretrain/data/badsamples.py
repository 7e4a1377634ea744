"""Bad samples met while streaming: what counts as bad, the per-worker tally, the error budget.

A bad sample is skipped and the batch is filled from the next samples, so a rank's number of
batches per epoch never changes. Kinds (the metric is `data_skipped_<kind>`):

- `corrupt_image`: the image bytes do not decode;
- `missing_image`: no `jpg`/`jpeg`/`png`/`webp` member;
- `missing_caption`: no `txt` member (and no json `captions` list);
- `bad_caption`: the caption is not UTF-8, or the json `captions` list is malformed;
- `truncated`: the tar ends inside a member or has a corrupt header (the sample being read is
  lost and the rest of that shard skipped).

Two limits stop a run with `DataErrorBudgetExceeded` naming the shard and sample key: more than
`data.max_bad_fraction` of the samples a rank has read (counted from the start of training, over
at least 1,000 samples so the first bad sample never stops a run), or `data.max_bad_in_a_row`
consecutive bad samples in one worker (100,000 when that limit is 0, so an all-bad stream never
hangs).
"""
from __future__ import annotations

import json

from typing import Any

SKIP_KINDS = ("corrupt_image", "missing_image", "missing_caption", "bad_caption", "truncated")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MIN_BUDGET_SAMPLES = 1000  # the bad fraction is taken of at least this many samples
STUCK_IN_A_ROW = 100_000  # a worker with no good sample in this many stops even without limits


class BadSample(ValueError):
    """A sample that cannot be used; `kind` is one of SKIP_KINDS."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class DataErrorBudgetExceeded(RuntimeError):
    """Too many bad samples: the data (or its path) is broken; the message names the shard and
    sample key of the last bad sample."""


def describe(sample: dict[str, Any]) -> str:
    """`shard URL, sample KEY` of a raw sample."""
    return f"shard {sample.get('__url__') or '?'}, sample {sample.get('__key__') or '?'}"


def image_bytes(sample: dict[str, Any]) -> bytes:
    """The image member of a raw sample; BadSample `missing_image` when there is none."""
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    raise BadSample("missing_image", f"no image member (looked for {', '.join(IMAGE_EXTS)}; "
                                     f"has {sorted(k for k in sample if not k.startswith('__'))})")


def caption_choices(sample: dict[str, Any]) -> list[str]:
    """The captions a training sample may use: its json `captions` list (non-empty strings)
    when it has one, else `[txt]`. BadSample (`bad_caption`) for an unreadable json or a
    malformed list; `missing_caption` / `bad_caption` from `caption_text` otherwise."""
    raw = sample.get("json")
    if raw is not None and b'"captions"' in raw:  # parse only when a list may be there
        try:
            captions = json.loads(raw).get("captions")
        except (ValueError, AttributeError) as exc:
            raise BadSample("bad_caption", f"json with `captions` is not a JSON object "
                                           f"({exc})") from None
        if (not isinstance(captions, list) or not captions
                or not all(isinstance(c, str) and c.strip() for c in captions)):
            raise BadSample("bad_caption", "json `captions` must be a non-empty list of "
                                           f"non-empty strings, got {captions!r:.120}")
        return captions
    return [caption_text(sample)]


def caption_text(sample: dict[str, Any]) -> str:
    """The UTF-8 caption (`txt`) of a raw sample; BadSample when missing or not UTF-8."""
    if "txt" not in sample:
        raise BadSample("missing_caption", "no caption member (txt)")
    try:
        return sample["txt"].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadSample("bad_caption", f"caption is not UTF-8 ({exc})") from None


class SkipTally:
    """One worker's bad samples: counts by kind since the last `take()`, the last bad sample,
    and the consecutive-bad limit (`max_in_a_row`, 0: none)."""

    def __init__(self, max_in_a_row: int) -> None:
        self.max_in_a_row = max_in_a_row
        self.counts: dict[str, int] = {}
        self.in_a_row = 0
        self.last = ""

    def good(self) -> None:
        """A usable sample: the run of bad ones is broken."""
        self.in_a_row = 0

    def bad(self, kind: str, where: str, reason: str) -> None:
        """Count one bad sample at `where` (`shard ..., sample ...`); raise past the limit."""
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.in_a_row += 1
        self.last = f"{kind} at {where}: {reason}"
        limit = self.max_in_a_row or STUCK_IN_A_ROW
        if self.in_a_row >= limit:
            raise DataErrorBudgetExceeded(
                f"{self.in_a_row} bad samples in a row (data.max_bad_in_a_row="
                f"{self.max_in_a_row}); the last: {self.last}") from None

    def take(self) -> dict[str, int]:
        """The counts since the last call (and reset them)."""
        counts, self.counts = self.counts, {}
        return counts


class SkipCounter:
    """A rank's cumulative bad-sample counts and samples read, with the fraction budget."""

    def __init__(self, max_fraction: float) -> None:
        self.max_fraction = max_fraction
        self.counts = dict.fromkeys(SKIP_KINDS, 0)
        self.seen = 0

    def add(self, skipped: dict[str, int], good: int, last: str) -> None:
        """Add one batch's `good` samples and `skipped` counts; raise past the budget."""
        for kind, n in skipped.items():
            self.counts[kind] = self.counts.get(kind, 0) + n
        self.seen += good + sum(skipped.values())
        bad = sum(self.counts.values())
        if skipped and bad > self.max_fraction * max(self.seen, MIN_BUDGET_SAMPLES):
            raise DataErrorBudgetExceeded(
                f"{bad} of {self.seen} samples read were bad, more than data.max_bad_fraction="
                f"{self.max_fraction} ({self.metrics()}); the last: {last}")

    def metrics(self) -> dict[str, int]:
        """`{"data_skipped_<kind>": n}` for every kind."""
        return {f"data_skipped_{k}": n for k, n in self.counts.items()}

    def state_dict(self) -> dict[str, Any]:
        """Counts and samples read (they survive a resume)."""
        return {"skipped": dict(self.counts), "seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`'s counts (missing kinds count 0)."""
        self.counts = dict.fromkeys(SKIP_KINDS, 0)
        self.counts.update({k: int(v) for k, v in state.get("skipped", {}).items()})
        self.seen = int(state.get("seen", 0))
