"""Expression arithmetic shared by training and evaluation: log-CP10K and the highly-variable-gene ranking.

``stamp finetune`` (the gene side of the ST-supervised protocol) and ``stamp evaluate`` (the PCA baseline,
the expression targets) select genes and normalise counts the same way, so the rules live here, below both.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from stamp.errors import DataError


def log_cp10k(counts: sp.csr_matrix) -> sp.csr_matrix:
    """log1p of counts scaled to 10,000 per spot (scanpy's normalize_total + log1p), float32."""
    counts = sp.csr_matrix(counts, dtype=np.float32, copy=True)
    totals = np.asarray(counts.sum(axis=1)).reshape(-1)
    scale = np.where(totals > 0, 1e4 / np.maximum(totals, 1e-12), 0.0).astype(np.float32)
    counts.data *= np.repeat(scale, np.diff(counts.indptr))
    np.log1p(counts.data, out=counts.data)
    return counts


# what highly-variable-gene ranking falls back to when Seurat v3's loess fit fails (small corpora:
# "There are other near singularities"): Seurat's and Cell Ranger's dispersions on log-CP10K, then variance
HVG_FLAVORS = ("seurat_v3", "seurat", "cell_ranger", "variance")


def _candidates(counts: sp.csr_matrix, genes: np.ndarray | None) -> np.ndarray:
    cand = np.arange(counts.shape[1]) if genes is None else np.asarray(genes)
    cand = cand[np.asarray(counts[:, cand].getnnz(axis=0)).reshape(-1) > 0]
    if cand.size == 0:
        raise DataError("no gene is detected in the corpus; nothing to select variable genes from")
    return cand


def _scanpy_rank(counts: sp.csr_matrix, cand: np.ndarray, n_top: int, flavor: str) -> np.ndarray:
    import warnings

    import anndata as ad
    import scanpy as sc

    if flavor == "seurat_v3":
        adata = ad.AnnData(X=sp.csr_matrix(counts[:, cand], dtype=np.float32))
        kwargs = {"span": 0.3 if n_top > 50 else 1.0}
    else:
        adata = ad.AnnData(X=log_cp10k(counts)[:, cand])
        kwargs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.highly_variable_genes(adata, flavor=flavor, n_top_genes=n_top, **kwargs)
    var = adata.var
    if flavor == "seurat_v3":
        rank = var["highly_variable_rank"].to_numpy()
        keep = np.flatnonzero(np.isfinite(rank))
        return keep[np.argsort(rank[keep], kind="stable")][:n_top]
    score = var["dispersions_norm"].to_numpy(dtype=float)
    keep = np.flatnonzero(np.isfinite(score))
    if keep.size < n_top:
        raise ValueError("too few genes with a finite dispersion")
    return keep[np.argsort(-score[keep], kind="stable")][:n_top]


def variable_genes(counts: sp.csr_matrix, n_top: int, genes: np.ndarray | None = None) -> tuple[np.ndarray, str]:
    """(column indices of the ``n_top`` most variable genes, best first; the flavor that ranked them).

    scanpy ``flavor="seurat_v3"`` on raw counts; when its loess fit fails (a corpus of a few dozen
    spots), Seurat's then Cell Ranger's dispersion on log-CP10K, then plain variance of log-CP10K.
    ``genes`` restricts the candidates (e.g. genes detected in every slide)."""
    cand = _candidates(counts, genes)
    n_top = int(min(n_top, cand.size))
    for flavor in HVG_FLAVORS[:-1]:
        try:
            return cand[_scanpy_rank(counts, cand, n_top, flavor)], flavor
        except (ValueError, ArithmeticError, np.linalg.LinAlgError, KeyError):
            continue
    X = log_cp10k(counts)[:, cand]
    var = np.asarray(X.power(2).mean(axis=0)).reshape(-1) - np.asarray(X.mean(axis=0)).reshape(-1) ** 2
    return cand[np.argsort(-var, kind="stable")[:n_top]], "variance"


def seurat_v3_hvgs(counts: sp.csr_matrix, n_top: int, genes: np.ndarray | None = None) -> np.ndarray:
    """Column indices of the ``n_top`` most variable genes, ranked best first (:func:`variable_genes`)."""
    return variable_genes(counts, n_top, genes)[0]


__all__ = ["log_cp10k", "variable_genes", "seurat_v3_hvgs", "HVG_FLAVORS"]
