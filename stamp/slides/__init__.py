"""Whole-slide images: reading, tissue detection, tiling and feature bags from any zoo encoder.

Public API (loaded lazily, so ``import stamp.slides`` stays light):

* :func:`open_slide` (:mod:`stamp.slides.reader`): OpenSlide / tifffile reader with µm/px;
* :func:`embed_slides` (:mod:`stamp.slides.embed`): one ``FEATURES/<slide>.h5`` bag per slide;
* :func:`read_bag` / :func:`write_bag` / :func:`list_bags` (:mod:`stamp.slides.bags`): the bag layouts
  (TRIDENT's, CLAM's) and finding the bags of a folder in either.

Their evaluation (ABMIL classification / survival) is :func:`stamp.evaluate.mil.evaluate_mil`;
the ABMIL model is :class:`stamp.models.abmil.GatedABMIL`.

See docs/slides.md.
"""
from __future__ import annotations

from spavis.format.lazy import lazy_exports

_LAZY = {
    "open_slide": "stamp.slides.reader",
    "Slide": "stamp.slides.reader",
    "TissueParams": "stamp.slides.tissue",
    "plan_tiles": "stamp.slides.tiling",
    "embed_slides": "stamp.slides.embed",
    "EmbedSlidesResult": "stamp.slides.embed",
    "read_bag": "stamp.slides.bags",
    "list_bags": "stamp.slides.bags",
    "write_bag": "stamp.slides.bags",
}
__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
