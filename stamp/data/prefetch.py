"""Read ahead on a background thread, so reading overlaps the consumer's work.

Reading (Parquet decompression, PNG decoding) and the consumer's work (tokenizing, a model
step) both release the GIL for most of their time, so a thread is enough. Order is kept; an
error in the reader is raised at the consumer; closing the consumer stops the reader within
0.5 s (bounded queue, never a blocked thread).
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Iterable, Iterator, TypeVar

T = TypeVar("T")

_POLL_S = 0.5


def prefetch(items: Iterable[T], depth: int = 2, *, name: str = "stamp-prefetch") -> Iterator[T]:
    """Yield ``items`` in order while a daemon thread reads up to ``depth`` ahead."""
    q: "queue.Queue[tuple[str, Any]]" = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(entry: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
            put(("end", None))
        except BaseException as exc:  # noqa: BLE001  (handed to the consumer)
            put(("error", exc))

    thread = threading.Thread(target=work, name=name, daemon=True)
    thread.start()
    try:
        while True:
            kind, item = q.get()
            if kind == "item":
                yield item
            elif kind == "error":
                raise item
            else:
                return
    finally:
        stop.set()
