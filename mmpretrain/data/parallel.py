"""Run a function over a stream of tasks in worker processes, a bounded number in flight.

Used by the offline data tools (`mmpretrain shards`, `mmpretrain inspect`), whose tasks are
whole shards. Results come back in completion order; callers key them by the task's index.
"""
from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any, TypeVar

T = TypeVar("T")


def _context() -> Any:
    # fork is fast (no re-import of torch in every worker) and the tasks are plain data;
    # elsewhere (macOS, Windows) fork is unsafe or missing.
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def imap_unordered(fn: Callable[[Any], T], tasks: Iterable[Any], workers: int,
                   window: int | None = None) -> Iterator[T]:
    """`fn(task)` for every task, in `workers` processes (in this one when `workers` <= 1).

    At most `window` (default 2 x workers) tasks are submitted but unfinished, so a long task
    stream is never held in memory at once. An exception in a task is raised here, after the
    tasks not yet started are cancelled.
    """
    if workers <= 1:
        for task in tasks:
            yield fn(task)
        return
    window = window or 2 * workers
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=_context())
    pending: set[Future] = set()
    try:
        for task in tasks:
            pending.add(pool.submit(fn, task))
            if len(pending) >= window:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield future.result()
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
