"""Embeddings of any zoo encoder, written by one writer.

* :mod:`~stamp.embed.writer`: THE embeddings writer (Parquet rows, Zarr ``obsm``, h5 feature
  bags) and the model record every output carries;
* :mod:`~stamp.embed.genes`: ``embed_corpus`` -- gene-side spot embeddings of a corpus;
* :mod:`~stamp.embed.multimodal`: image / fused spot embeddings and image folders.
Whole-slide feature bags are :mod:`stamp.slides.embed`.
"""
from __future__ import annotations

from spavis.format.lazy import lazy_exports

_LAZY = {
    "embed_corpus": "stamp.embed.genes", "load_model": "stamp.embed.genes",
    "embed_paired_corpus": "stamp.embed.multimodal", "embed_image_folder": "stamp.embed.multimodal",
}
__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
