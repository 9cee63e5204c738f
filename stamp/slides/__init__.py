"""Whole-slide images: tissue tiling, feature bags from any zoo encoder, ABMIL evaluation.

Public API (loaded lazily, so ``import stamp.slides`` stays light):

* :func:`open_slide` (:mod:`stamp.slides.reader`): OpenSlide / tifffile reader with µm/px;
* :func:`embed_slides` (:mod:`stamp.slides.embed`): one ``FEATURES/<slide>.h5`` bag per slide;
* :func:`evaluate_mil` (:mod:`stamp.slides.mil`): ABMIL classification / survival with
  patient-level folds and a mean-pooling baseline;
* :func:`read_bag` / :func:`write_bag` (:mod:`stamp.slides.bags`): the bag layout.

See docs/slides.md.
"""
from __future__ import annotations

_LAZY = {
    "open_slide": "stamp.slides.reader",
    "Slide": "stamp.slides.reader",
    "TissueParams": "stamp.slides.tissue",
    "plan_tiles": "stamp.slides.tiling",
    "embed_slides": "stamp.slides.embed",
    "EmbedSlidesResult": "stamp.slides.embed",
    "evaluate_mil": "stamp.slides.mil",
    "MilResult": "stamp.slides.mil",
    "read_bag": "stamp.slides.bags",
    "write_bag": "stamp.slides.bags",
    "SlideError": "stamp.slides.errors",
    "BagError": "stamp.slides.errors",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'stamp.slides' has no attribute {name!r}")
