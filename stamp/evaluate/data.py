"""What an evaluation reads from a corpus: spots, slides, labels, coordinates and raw counts.

An evaluation corpus is an ordinary shard corpus; labels are an annotation column written
by ``spavis build-shards --obs-columns COL`` (null = unlabelled spot, left out of the
label metrics, never a class of its own). Read only through :mod:`spavis.format`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from stamp.data.expression import HVG_FLAVORS, log_cp10k, seurat_v3_hvgs, variable_genes  # noqa: F401  (shared)
from stamp.errors import EvaluateError, StampError  # noqa: F401  (EvaluateError: part of this module's API)

# fixed expression columns an evaluation reads (the label column is added when asked)
ROW_COLUMNS = ("spot_id", "gene_index", "counts", "array_row", "array_col", "pxl_row", "pxl_col")


@dataclass
class EvalData:
    """All spots of a corpus, in corpus order (rows of every array line up)."""

    spot_ids: np.ndarray  # str
    slide_ids: np.ndarray  # str
    labels: Optional[np.ndarray]  # object: str or None per spot (None when no --label)
    xy: np.ndarray  # (n, 2) float: plotting coordinates (pixels, else array lattice, else NaN)
    counts: sp.csr_matrix  # raw counts, spots x vocabulary
    gene_ids: np.ndarray  # Ensembl ids, vocabulary order
    gene_symbols: np.ndarray
    tables: list  # one pyarrow Table per slide (spot_id, gene_index, counts): what tokenizers read

    @property
    def n_spots(self) -> int:
        return len(self.spot_ids)

    @property
    def slides(self) -> list[str]:
        return list(dict.fromkeys(self.slide_ids.tolist()))

    def subset(self, mask: np.ndarray) -> "EvalData":
        """The spots where ``mask`` is True, in the same order (e.g. spots with an H&E patch)."""
        import pyarrow.compute as pc

        mask = np.asarray(mask, bool)
        keep_ids = set(zip(self.slide_ids[mask].tolist(), self.spot_ids[mask].tolist()))
        tables = []
        for t in self.tables:
            keys = zip(t.column("slide_id").to_pylist(), t.column("spot_id").to_pylist())
            sel = pa.array([k in keep_ids for k in keys], pa.bool_())
            if pc.any(sel).as_py():
                tables.append(t.filter(sel))
        return EvalData(spot_ids=self.spot_ids[mask], slide_ids=self.slide_ids[mask],
                        labels=None if self.labels is None else self.labels[mask], xy=self.xy[mask],
                        counts=self.counts[np.flatnonzero(mask)], gene_ids=self.gene_ids,
                        gene_symbols=self.gene_symbols, tables=tables)

    @property
    def labelled(self) -> np.ndarray:
        """Boolean mask of spots with a label."""
        if self.labels is None:
            return np.zeros(self.n_spots, bool)
        return np.array([v is not None for v in self.labels], dtype=bool)


def _xy(table: pa.Table) -> np.ndarray:
    def col(name: str) -> np.ndarray:
        return table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)

    px, py = col("pxl_col"), col("pxl_row")
    if np.isfinite(px).all() and np.isfinite(py).all():
        return np.column_stack([px, py])
    ax, ay = col("array_col"), col("array_row")
    return np.column_stack([ax, ay])  # NaN where neither is known


def load_eval_data(corpus, label: str | None = None) -> EvalData:
    """Every spot of ``corpus`` (a :class:`spavis.format.Corpus`) with its label column ``label``."""
    from spavis.format import rows_to_csr

    if label is not None and label not in corpus.annotation_columns:
        have = list(corpus.annotation_columns)
        raise EvaluateError(
            f"{corpus.root}: no annotation column {label!r} (it has {have or 'none'}); build the corpus with "
            f"`spavis build-shards ... --obs-columns {label}` (and --annotations FILE when the labels are in a CSV)"
        )
    n_genes = corpus.n_genes
    columns = list(ROW_COLUMNS) + ([label] if label else [])
    spot_ids, slide_ids, labels, xys, mats, tables = [], [], [], [], [], []
    for table in corpus.iter_slides(columns=columns):
        if table.num_rows == 0:
            continue
        spot_ids.append(table.column("spot_id").to_numpy(zero_copy_only=False).astype(str))
        slide_ids.append(table.column("slide_id").to_numpy(zero_copy_only=False).astype(str))
        if label:
            labels.append(np.asarray(table.column(label).to_pylist(), dtype=object))
        xys.append(_xy(table))
        mats.append(rows_to_csr(table, n_genes))
        tables.append(table.select(["slide_id", "spot_id", "gene_index", "counts"]))
    if not spot_ids:
        raise EvaluateError(f"{corpus.root}: the corpus holds no spots")
    genes = corpus.genes
    return EvalData(
        spot_ids=np.concatenate(spot_ids),
        slide_ids=np.concatenate(slide_ids),
        labels=np.concatenate(labels) if label else None,
        xy=np.concatenate(xys),
        counts=sp.vstack(mats, format="csr"),
        gene_ids=genes["ensembl_id"].astype(str).to_numpy(),
        gene_symbols=genes["symbol"].fillna("").astype(str).to_numpy(),
        tables=tables,
    )
