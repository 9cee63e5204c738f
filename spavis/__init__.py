"""spavis: curate public 10x Visium slices into one harmonized, sharded corpus.

The flat API mirrors the pipeline: ``fetch`` -> ``read_slice`` -> ``harmonize`` ->
``build_shards`` -> ``open_corpus``.
"""
from __future__ import annotations

__version__ = "0.1.0"

from spavis.errors import SpavisError  # noqa: F401


def __getattr__(name: str):
    # Lazy re-exports keep `import spavis` fast and avoid import cycles.
    lazy = {
        "read_slice": ("spavis.readers", "read_slice"),
        "load_vocabulary": ("spavis.genes", "load_vocabulary"),
        "harmonize": ("spavis.genes", "harmonize"),
        "build_shards": ("spavis.shards", "build_shards"),
        "validate": ("spavis.shards", "validate"),
        "info": ("spavis.shards", "info"),
        "open_corpus": ("spavis.format", "open_corpus"),
        "fetch": ("spavis.sources", "fetch"),
        "simulate_slice": ("spavis.simulate", "simulate_slice"),
    }
    if name in lazy:
        import importlib

        module, attr = lazy[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'spavis' has no attribute {name!r}")
