"""spavis: curate public 10x Visium slices into one harmonized, sharded corpus.

The flat API mirrors the pipeline: ``fetch`` -> ``read_slice`` -> ``harmonize`` ->
``build_shards`` -> ``validate`` -> ``open_corpus``. Names load on first use, so
``import spavis`` stays fast and never pulls in the downloader or the builder.
"""
from __future__ import annotations

from spavis.format.lazy import lazy_exports

__version__ = "0.1.0"

from spavis.errors import SpavisError  # noqa: F401

_LAZY: dict[str, tuple[str, str]] = {
    "fetch": ("spavis.sources", "fetch"),
    "read_slice": ("spavis.readers", "read_slice"),
    "load_vocabulary": ("spavis.genes", "load_vocabulary"),
    "harmonize": ("spavis.genes", "harmonize"),
    "build_shards": ("spavis.shards", "build_shards"),
    "subset": ("spavis.shards.subset", "subset"),
    "BuildConfig": ("spavis.shards.config", "BuildConfig"),
    "validate": ("spavis.shards.validate", "validate"),
    "info": ("spavis.shards.info", "info"),
    "open_corpus": ("spavis.format", "open_corpus"),
    "Corpus": ("spavis.format", "Corpus"),
    "rows_to_csr": ("spavis.format", "rows_to_csr"),
    "simulate_slice": ("spavis.simulate", "simulate_slice"),
    "write_simulated_slice": ("spavis.simulate", "write_simulated_slice"),
    "load_manifest": ("spavis.manifests", "load_manifest"),
}
__all__ = ["__version__", "SpavisError", *_LAZY]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, extra=("__version__", "SpavisError"))
