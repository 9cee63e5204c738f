"""The one progress display of both packages: rich bars, always on stderr.

Why one module: eight hand-built bars had drifted (three wrote to stdout, mixing with results a
user pipes on; each chose its own columns). Every long loop now asks here:

* :func:`counter` - a counting bar (``description  ━━━  n/total  <fields>  time``) for build-shards,
  tokenize, pretrain, embed, embed-slides and evaluate;
* :func:`transfers` - fetch's one display shared by every thread of a fetch (bytes per file and
  the slice counter), re-entrant so nested calls reuse it.

``SPAVIS_NO_PROGRESS=1`` hides every bar. Fetch's transfer bars show only on a terminal (a log
would get one line per refresh) unless ``SPAVIS_PROGRESS=1``. It lives in ``spavis.format``
because ``stamp`` may import only ``spavis.format(.*)`` and ``spavis.errors``; rich is imported
on first use.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import threading
from typing import Any, Iterator

__all__ = ["counter", "transfers", "hidden", "stderr_console"]

NO_PROGRESS_ENV = "SPAVIS_NO_PROGRESS"
FORCE_PROGRESS_ENV = "SPAVIS_PROGRESS"
_CONSOLE: Any = None


def stderr_console():
    """The one rich console the bars draw on (stderr: stdout is for results)."""
    global _CONSOLE
    if _CONSOLE is None:
        from rich.console import Console

        _CONSOLE = Console(stderr=True)
    return _CONSOLE


def hidden() -> bool:
    """True when ``SPAVIS_NO_PROGRESS`` asks for no bars at all."""
    return os.environ.get(NO_PROGRESS_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def counter(*fields: str, enabled: bool = True, elapsed: bool = False, transient: bool = False):
    """A rich ``Progress`` counting items: ``[bold]{description}``, the bar, ``n/total``, then ``fields``
    (rich format strings such as ``"spots"`` or ``"loss {task.fields[loss]}"``), then the time left
    (``elapsed``: the time spent). ``enabled=False`` (or ``SPAVIS_NO_PROGRESS``) draws nothing; the
    object still takes ``add_task`` / ``advance`` / ``update``."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    clock = TimeElapsedColumn() if elapsed else TimeRemainingColumn()
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    *(TextColumn(f) for f in fields), clock, console=stderr_console(),
                    disable=not enabled or hidden(), transient=transient)


# ----------------------------------------------------------------------------- fetch: one display per run
class Bars:
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


CURRENT: contextvars.ContextVar[Bars | None] = contextvars.ContextVar("spavis_progress", default=None)


@contextlib.contextmanager
def transfers(show: bool | None = None) -> Iterator[Bars]:
    """Transfer bars on stderr (bytes per file, ``n/total`` for counters); off when not a terminal
    (unless ``SPAVIS_PROGRESS=1``) or when ``SPAVIS_NO_PROGRESS`` is set.

    Re-entrant: inside an open display (also in worker threads started with a copied context) the
    same display is reused, so a whole fetch shows one set of bars.
    """
    outer = CURRENT.get()
    if outer is not None:
        yield outer
        return
    from rich.progress import (BarColumn, DownloadColumn, Progress, ProgressColumn, TextColumn,
                               TimeRemainingColumn, TransferSpeedColumn)

    class _Amount(ProgressColumn):
        """Bytes for files, 'n/total' for the slice counter."""

        _bytes = DownloadColumn()

        def render(self, task):
            if task.fields.get("count"):
                return f"{int(task.completed)}/{int(task.total or 0)}"
            return self._bytes.render(task)

    console = stderr_console()
    if show is None:
        show = (console.is_terminal or os.environ.get(FORCE_PROGRESS_ENV) == "1") and not hidden()
    with contextlib.ExitStack() as stack:
        prog = None
        if show:
            prog = stack.enter_context(Progress(TextColumn("{task.description}"), BarColumn(), _Amount(),
                                                TransferSpeedColumn(), TimeRemainingColumn(),
                                                console=console, transient=True))
        bars = Bars(prog)
        token = CURRENT.set(bars)
        try:
            yield bars
        finally:
            CURRENT.reset(token)
