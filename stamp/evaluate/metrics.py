"""Evaluation metrics, computed with scikit-learn / scipy wherever they implement them.

Expression metrics follow the gene-expression-prediction literature (BLEEP, STAMP):
MSE on the union of the top-100 variable and top-100 expressed genes, PCC-V / PCC-E the
mean per-gene Pearson correlation (across held-out spots) over those two gene sets.
"""
from __future__ import annotations

import warnings

import numpy as np


def classification_metrics(y_true, y_pred) -> dict[str, float]:
    """Balanced accuracy and weighted F1 (sklearn)."""
    from sklearn.metrics import balanced_accuracy_score, f1_score

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # classes unseen in a fold's training part
        return {
            "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
            "weighted_f1": float(f1_score(y_true, y_pred, average="weighted", zero_division=0)),
        }


def cluster_metrics(labels, clusters, features: np.ndarray | None = None) -> dict[str, float]:
    """ARI and NMI of clusters vs labels (sklearn); silhouette and Calinski-Harabasz of the features by the
    true labels (the paper's four)."""
    from sklearn.metrics import (
        adjusted_rand_score,
        calinski_harabasz_score,
        normalized_mutual_info_score,
        silhouette_score,
    )

    out = {"ari": float(adjusted_rand_score(labels, clusters)),
           "nmi": float(normalized_mutual_info_score(labels, clusters))}
    n_labels = len(set(labels))
    out["silhouette"] = (float(silhouette_score(features, labels, random_state=0))
                         if features is not None and 1 < n_labels < len(labels) else float("nan"))
    out["calinski_harabasz"] = (float(calinski_harabasz_score(features, labels))
                                if features is not None and 1 < n_labels < len(labels) else float("nan"))
    return out


def pearson_per_gene(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Pearson r of each column over rows (NaN for a constant column), as scipy.stats.pearsonr."""
    t = y_true - y_true.mean(axis=0)
    p = y_pred - y_pred.mean(axis=0)
    denom = np.sqrt((t * t).sum(axis=0) * (p * p).sum(axis=0))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (t * p).sum(axis=0) / denom
    return np.where(denom > 0, np.clip(r, -1.0, 1.0), np.nan)


def top_genes(y: np.ndarray, hvg_rank: np.ndarray, n: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """(top-``n`` variable genes, top-``n`` highly expressed genes) as target column indices.

    ``hvg_rank`` lists target columns best first (Seurat v3 order); expression = column mean of ``y``.
    """
    hvg = np.asarray(hvg_rank)[:n]
    heg = np.argsort(-y.mean(axis=0), kind="stable")[:n]
    return hvg, heg


def expression_metrics(y_true: np.ndarray, y_pred: np.ndarray, hvg: np.ndarray, heg: np.ndarray) -> dict[str, float]:
    """MSE on hvg ∪ heg (sklearn), PCC-V (mean r over hvg) and PCC-E (mean r over heg)."""
    from sklearn.metrics import mean_squared_error

    union = np.union1d(hvg, heg)
    r = pearson_per_gene(y_true, y_pred)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return {
            "mse": float(mean_squared_error(y_true[:, union], y_pred[:, union])),
            "pcc_v": float(np.nanmean(r[hvg])) if np.isfinite(r[hvg]).any() else float("nan"),
            "pcc_e": float(np.nanmean(r[heg])) if np.isfinite(r[heg]).any() else float("nan"),
        }
