"""Bounded, ordered concurrency for fetch: across slices and across the files of a slice.

Why here: a corpus fetch is thousands of small slices, so ``--workers`` must spread over
slices, not only over the files of one. Two things keep that safe:

* ``download_slots(n)`` bounds the HTTP transfers in flight for one ``fetch`` call to ``n``,
  however slice- and file-level pools nest (``download.fetch_file`` takes a slot per attempt);
* ``run_ordered`` runs every item to the end, returns results in input order and then
  raises the first FetchError, so finished slices/files are kept for the next run.

Settings travel in ``contextvars`` (copied into every worker), so concurrent ``fetch``
calls in one process do not share limits or progress displays.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

from spavis.errors import FetchError
from spavis.format.progress import transfers

T = TypeVar("T")
R = TypeVar("R")

_SLOTS: contextvars.ContextVar[threading.BoundedSemaphore | None] = contextvars.ContextVar(
    "spavis_download_slots", default=None)


@contextlib.contextmanager
def download_slots(n: int) -> Iterator[None]:
    """At most ``n`` downloads in flight inside this block (and the workers it starts)."""
    if _SLOTS.get() is not None:  # an outer fetch already set the bound
        yield
        return
    token = _SLOTS.set(threading.BoundedSemaphore(max(1, int(n))))
    try:
        yield
    finally:
        _SLOTS.reset(token)


@contextlib.contextmanager
def slot() -> Iterator[None]:
    """Hold one download slot (no-op outside ``download_slots``)."""
    sem = _SLOTS.get()
    if sem is None:
        yield
        return
    with sem:
        yield


def run_ordered(func: Callable[[T], R], items: Sequence[T], workers: int, *,
                name: str = "spavis", on_done: Callable[[], None] | None = None) -> list[R]:
    """``[func(x) for x in items]`` on a bounded thread pool; every item runs to the end.

    Results keep input order. Afterwards the first FetchError (else the first error) is
    raised. ``on_done`` is called after each item (progress).
    """
    results: list[R | None] = [None] * len(items)
    errors: list[tuple[int, BaseException]] = []
    lock = threading.Lock()

    def run(i: int) -> None:
        try:
            results[i] = func(items[i])
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            with lock:
                errors.append((i, exc))
        finally:
            if on_done is not None:
                on_done()

    if workers <= 1 or len(items) <= 1:
        for i in range(len(items)):
            run(i)
    else:
        with ThreadPoolExecutor(max_workers=min(workers, len(items)), thread_name_prefix=name) as pool:
            futures = [pool.submit(contextvars.copy_context().run, run, i) for i in range(len(items))]
            for f in futures:
                f.result()
    if errors:
        errors.sort(key=lambda e: e[0])  # deterministic: the first failing item in input order
        fetch_errors = [e for _, e in errors if isinstance(e, FetchError)]
        raise fetch_errors[0] if fetch_errors else errors[0][1]
    return results  # type: ignore[return-value]


@dataclass(frozen=True)
class SliceTask:
    """One slice to fetch: ``run()`` takes the slice lock, downloads, writes slice.json."""

    slide_id: str
    run: Callable[[], Path]


def run_slices(tasks: Sequence[SliceTask], workers: int) -> list[Path]:
    """Fetch slices concurrently (``workers`` at a time) under one progress display.

    Returns the slice folders in task order, without repeats (two tasks naming one slice,
    e.g. from a SubSeries and its SuperSeries, serialize on the slice lock).
    """
    with download_slots(workers), transfers() as bars:
        task = bars.add(f"slices ({len(tasks)})", len(tasks), kind="count") if len(tasks) > 1 else None
        try:
            done = run_ordered(lambda t: t.run(), tasks, workers, name="spavis-slice",
                               on_done=lambda: bars.advance(task, 1, None))
        finally:
            bars.finish(task)
    return list(dict.fromkeys(done))
