"""The ``embed-slides`` progress bar: slides done, and the current slide's tiles with tiles/s
(the shared counter of :mod:`spavis.format.progress`, on stderr)."""
from __future__ import annotations

from spavis.format.progress import counter


class SlideProgress:
    def __init__(self, n_slides: int, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.n = n_slides
        self._p = None

    def __enter__(self) -> "SlideProgress":
        if self.enabled:
            self._p = counter("{task.fields[rate]}")
            self._p.start()
            self._slides = self._p.add_task("slides", total=self.n, rate="")
            self._tiles = self._p.add_task("tiles", total=0, rate="")
        return self

    def start_slide(self, name: str, n_tiles: int) -> None:
        if self._p:
            self._p.reset(self._tiles, total=n_tiles, description=f"tiles of {name}", rate="")

    def tiles(self, k: int) -> None:
        if self._p:
            self._p.advance(self._tiles, k)
            speed = self._p.tasks[self._tiles].speed
            if speed:
                self._p.update(self._tiles, rate=f"{speed:,.0f} tiles/s")

    def slide_done(self, name: str, what: str) -> None:
        if self._p:
            self._p.update(self._slides, advance=1, description=f"slides ({name}: {what})")

    def __exit__(self, *exc) -> None:
        if self._p:
            self._p.stop()
