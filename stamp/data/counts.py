"""Raw-count batches for gene encoders with their own input rules (scGPT, Nicheformer, Geneformer).

STAMP's encoders read token rows (:mod:`stamp.data.tokens`); the zoo's other gene encoders read raw
counts and make their inputs themselves (:class:`stamp.models.gene_inputs.CountInput`), some with
statistics over a whole slide (scGPT-spatial's mean nonzero count). So batches here never cross a
slide: each slide's rows become one CSR matrix, its context is computed once, then it is cut into
batches in row order. One slide in memory at a time; rows keep the order of the tables given (corpus
order for ``Corpus.iter_slides``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import scipy.sparse as sp

from stamp.errors import DataError

COLUMNS = ["spot_id", "slide_id", "spot_index", "gene_index", "counts"]


@dataclass
class CountBatch:
    """Spots of one slide: raw counts (spots x corpus genes, float32 CSR), their ids, and the slide's
    context for the model's input rules."""

    X: sp.csr_matrix
    spot_ids: list[str]
    slide_ids: list[str]
    spot_index: np.ndarray | None
    slide: Any = None

    def __len__(self) -> int:
        return self.X.shape[0]


def count_batches(tables: Iterable[Any], n_genes: int, inputs: Any, *, batch_size: int = 256) -> Iterator[CountBatch]:
    """Batches of at most ``batch_size`` spots from per-slide tables (``spot_id``, ``gene_index``,
    ``counts``; ``slide_id`` and ``spot_index`` when present), each with ``inputs.slide_context``."""
    from spavis.format import rows_to_csr

    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    for table in tables:
        if table.num_rows == 0:
            continue
        X = rows_to_csr(table, n_genes)
        if X.shape[1] != n_genes or (X.nnz and X.indices.max() >= n_genes):
            raise DataError(f"gene indices beyond the corpus's {n_genes:,} genes; the shard is corrupt "
                            "(run spavis validate)")
        context = inputs.slide_context(X)
        spots = table.column("spot_id").to_pylist()
        slides = table.column("slide_id").to_pylist() if "slide_id" in table.column_names else [""] * len(spots)
        index = table.column("spot_index").to_numpy() if "spot_index" in table.column_names else None
        for start in range(0, X.shape[0], batch_size):
            stop = min(start + batch_size, X.shape[0])
            yield CountBatch(X[start:stop], spots[start:stop], slides[start:stop],
                             None if index is None else index[start:stop], context)


__all__ = ["CountBatch", "count_batches", "COLUMNS"]
