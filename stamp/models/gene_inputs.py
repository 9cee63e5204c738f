"""What the field's gene encoders read: raw counts of a corpus's genes, turned into each model's own input.

STAMP's encoders read rank tokens of the corpus's own vocabulary (:mod:`stamp.tokenizer`); scGPT,
Nicheformer and Geneformer each bring their own vocabulary and their own rules (value bins, technology
means, gene medians, special tokens). A :class:`CountInput` is such a rule set; the consumers
(``stamp embed``, ``stamp evaluate``) only do this, slide by slide::

    inputs.bind(CorpusGenes.of(corpus.genes))      # once: corpus genes -> the model's vocabulary
    ctx = inputs.slide_context(X_slide)            # once per slide (None unless a model needs it)
    batch = inputs(X_rows, slide=ctx)              # spots x corpus genes (raw counts) -> tensors
    vectors = model.embed(batch)                   # (spots, D)

``X`` is a ``scipy.sparse.csr_matrix`` of raw counts (float32), one row per spot, columns in the
corpus's gene order; row sums are the spots' total counts (``total_counts`` of the shards).

Nothing here knows a model name; the zoo (:mod:`stamp.zoo`) picks the rules from the catalogue.
"""
from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import scipy.sparse as sp

from stamp.errors import ModelConfigError


@dataclass(frozen=True)
class CorpusGenes:
    """A corpus's vocabulary in ``gene_index`` order: Ensembl ids and symbols ("" when unknown)."""

    ensembl_ids: tuple[str, ...]
    symbols: tuple[str, ...]

    @classmethod
    def of(cls, ensembl_ids: Sequence[Any], symbols: Sequence[Any] | None = None) -> "CorpusGenes":
        ids = tuple(str(g) for g in ensembl_ids)
        syms = tuple("" if s is None or (isinstance(s, float) and s != s) else str(s)
                     for s in (symbols if symbols is not None else [""] * len(ids)))
        if len(syms) != len(ids):
            raise ModelConfigError(f"{len(ids)} gene ids but {len(syms)} symbols")
        return cls(ids, syms)

    @classmethod
    def from_table(cls, genes: Any) -> "CorpusGenes":
        """From a corpus's ``genes.parquet`` DataFrame (``ensembl_id``, ``symbol``)."""
        symbols = genes["symbol"].tolist() if "symbol" in genes.columns else None
        return cls.of(genes["ensembl_id"].astype(str).tolist(), symbols)

    def __len__(self) -> int:
        return len(self.ensembl_ids)


@dataclass(frozen=True)
class GeneMatch:
    """How a corpus's genes met a model's vocabulary (written into the provenance of every output)."""

    matched: int
    corpus_genes: int
    model_genes: int
    key: str  # "ensembl_id" or "symbol"

    def describe(self) -> str:
        return (f"{self.matched:,} of {self.corpus_genes:,} corpus genes are in the model's vocabulary of "
                f"{self.model_genes:,} (matched by {self.key})")


class CountInput(ABC):
    """A model's input rules (see the module docstring). Subclasses fill ``columns`` in :meth:`bind`:
    for every corpus gene the model column it feeds, or -1 (not in the model's vocabulary)."""

    key: str = "ensembl_id"

    def __init__(self) -> None:
        self.columns: np.ndarray | None = None
        self.match: GeneMatch | None = None

    @property
    @abstractmethod
    def model_genes(self) -> int:
        """Size of the model's gene vocabulary (for the match report)."""

    @abstractmethod
    def column_of(self, genes: CorpusGenes) -> np.ndarray:
        """int64 (n_corpus_genes,): the model column of each corpus gene, -1 when it has none."""

    def bind(self, genes: CorpusGenes) -> GeneMatch:
        """Map the corpus's genes onto the model's vocabulary once; refuse a corpus with none in common."""
        columns = np.asarray(self.column_of(genes), dtype=np.int64)
        matched = int((columns >= 0).sum())
        self.match = GeneMatch(matched, len(genes), self.model_genes, self.key)
        if matched == 0:
            raise ModelConfigError(f"none of the corpus's {len(genes):,} genes is in the model's vocabulary "
                                   f"(matched by {self.key}); is the corpus human, with Ensembl ids and symbols?")
        self.columns = columns
        return self.match

    def model_counts(self, X: sp.csr_matrix) -> sp.csr_matrix:
        """Counts over the model's columns: corpus genes without a column dropped, genes sharing one summed."""
        if self.columns is None:
            raise ModelConfigError("bind(corpus genes) must come before encoding")
        X = sp.csr_matrix(X, dtype=np.float32)
        cols = self.columns[X.indices]
        keep = cols >= 0
        rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))[keep]
        out = sp.csr_matrix((X.data[keep], (rows, cols[keep])), shape=(X.shape[0], self.n_columns))
        out.sum_duplicates()  # sorted indices, duplicates summed (float32)
        return out

    @property
    def n_columns(self) -> int:
        return self.model_genes

    def slide_context(self, X: sp.csr_matrix) -> Any:
        """Statistics over a whole slide that every spot's input needs (none by default)."""
        return None

    @abstractmethod
    def __call__(self, X: sp.csr_matrix, *, slide: Any = None) -> dict[str, Any]:
        """Raw counts (spots x corpus genes) -> the model's input tensors (a dict of CPU tensors)."""

    def describe(self) -> dict[str, Any]:
        """The rules as plain data (recorded in provenance)."""
        return {}


def row_seed(seed: int, *arrays: np.ndarray) -> int:
    """A 32-bit seed from ``seed`` and a spot's own data: the same spot gets the same draws whatever the
    batch, order or run, and two spots never share a stream unless their data are equal."""
    h = hashlib.blake2b(digest_size=8)
    h.update(np.int64(seed).tobytes())
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return int.from_bytes(h.digest(), "little") & 0xFFFFFFFF


def pad_rows(rows: Sequence[np.ndarray], pad: float, *, length: int | None = None, dtype=np.int64) -> np.ndarray:
    """Right-pad 1-D arrays into one (n, length) array (length: the longest row by default)."""
    n = max((len(r) for r in rows), default=0) if length is None else length
    out = np.full((len(rows), n), pad, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r[:n]
    return out


__all__ = ["CorpusGenes", "GeneMatch", "CountInput", "row_seed", "pad_rows"]
