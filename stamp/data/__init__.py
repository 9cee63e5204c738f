"""Loaders that feed models from spavis shards (read through :mod:`spavis.format` only).

* :mod:`~stamp.data.tokens`: ``TokenBatchLoader`` -> typed ``Batch`` (streaming, shuffled,
  DDP-aware, resumable); the gene side of pretraining, embedding and evaluation;
* :mod:`~stamp.data.paired`: ``PairedBatchLoader`` -> ``PairedBatch`` (tokens, patch, region, cell);
* :mod:`~stamp.data.batching`: spatial groups (paper Algorithm 2);
* :mod:`~stamp.data.prefetch`: read-ahead on a thread.
"""
from __future__ import annotations

from spavis.format.lazy import lazy_exports

_LAZY = {
    "TokenBatchLoader": "stamp.data.tokens", "Batch": "stamp.data.tokens",
    "PairedBatchLoader": "stamp.data.paired", "PairedBatch": "stamp.data.paired",
    "spatial_groups": "stamp.data.batching", "prefetch": "stamp.data.prefetch",
}
__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
