"""One progress display per fetch: rich bars on stderr shared by every thread of the fetch.

Its own module so that ``parallel`` (slice pools) and ``download`` (file transfers) both use
it without importing each other.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import threading
from typing import Iterator

__all__ = ["progress_display"]


class _Bars:
    """A thread-safe façade over one rich Progress (or nothing when quiet)."""

    def __init__(self, progress):
        self._p = progress
        self._lock = threading.Lock()

    def add(self, name: str, total: int | None, *, kind: str = "bytes"):
        if self._p is None:
            return None
        with self._lock:
            return self._p.add_task(name, total=total, count=(kind == "count"))

    def advance(self, task, advance: int, total: int | None) -> None:
        if self._p is None or task is None:
            return
        with self._lock:
            if total is not None:
                self._p.update(task, total=total)
            self._p.advance(task, advance)

    def finish(self, task) -> None:
        if self._p is None or task is None:
            return
        with self._lock:
            self._p.remove_task(task)


_BARS: contextvars.ContextVar[_Bars | None] = contextvars.ContextVar("spavis_progress", default=None)


@contextlib.contextmanager
def progress_display(show: bool | None = None) -> Iterator[_Bars]:
    """Rich progress bars on stderr; off when not a terminal (unless SPAVIS_PROGRESS=1) or
    when SPAVIS_NO_PROGRESS is set.

    Re-entrant: inside an open display (also in worker threads started with a copied
    context) the same display is reused, so a whole fetch shows one set of bars.
    """
    outer = _BARS.get()
    if outer is not None:
        yield outer
        return
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, ProgressColumn, TextColumn,
                               TimeRemainingColumn, TransferSpeedColumn)

    class _Amount(ProgressColumn):
        """Bytes for files, 'n/total' for the slice counter."""

        _bytes = DownloadColumn()

        def render(self, task):
            if task.fields.get("count"):
                return f"{int(task.completed)}/{int(task.total or 0)}"
            return self._bytes.render(task)

    console = Console(stderr=True)
    if show is None:  # SPAVIS_PROGRESS=1 forces bars (e.g. CI logs); SPAVIS_NO_PROGRESS=1 hides them
        show = ((console.is_terminal or os.environ.get("SPAVIS_PROGRESS") == "1")
                and not os.environ.get("SPAVIS_NO_PROGRESS"))
    with contextlib.ExitStack() as stack:
        prog = None
        if show:
            prog = stack.enter_context(Progress(TextColumn("{task.description}"), BarColumn(), _Amount(),
                                                TransferSpeedColumn(), TimeRemainingColumn(),
                                                console=console, transient=True))
        bars = _Bars(prog)
        token = _BARS.set(bars)
        try:
            yield bars
        finally:
            _BARS.reset(token)
