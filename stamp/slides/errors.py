"""Error classes of ``stamp.slides``: one-line messages that name the slide/file and the fix."""
from __future__ import annotations

from stamp.errors import StampError


class SlideError(StampError):
    """A slide cannot be read or tiled (unknown format, no scale, truncated file, no tissue)."""


class BagError(StampError):
    """A feature bag folder or a labels table cannot be used (unknown slides, empty bags, bad folds)."""


__all__ = ["SlideError", "BagError"]
