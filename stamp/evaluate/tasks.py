"""The evaluation protocols: linear probe, Leiden clustering, gene-expression prediction.

Each returns ``(rows, extras)``: ``rows`` one dict per feature set x fold (x method) for
results.csv; ``extras`` what the figures need (predictions, clusters).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from stamp.evaluate.data import EvalData, EvaluateError, log_cp10k, seurat_v3_hvgs
from stamp.evaluate.features import FeatureSet
from stamp.evaluate.heads import knn_regression, linear_probe, mlp_regression
from stamp.evaluate.metrics import classification_metrics, cluster_metrics, expression_metrics, top_genes
from stamp.evaluate.splits import carve_validation, make_folds

TASKS = ("linear-probe", "cluster", "predict-expression")
LEIDEN_RESOLUTION = 0.5
N_NEIGHBORS = 15
EXPRESSION_HVGS = 5000
KNN_K = 50

Tick = Callable[[], None]


def _require_labels(data: EvalData, task: str) -> np.ndarray:
    if data.labels is None:
        raise EvaluateError(f"{task} needs labels: pass --label COLUMN (an annotation column of the corpus)")
    rows = np.flatnonzero(data.labelled)
    if len(set(data.labels[rows].tolist())) < 2:
        raise EvaluateError(f"{task}: fewer than two label values among the labelled spots; nothing to score")
    return rows


def n_steps(task: str, data: EvalData, n_sets: int) -> int:
    """How many progress ticks a task makes (for the progress bar)."""
    if task == "cluster":
        return n_sets * len({s for s, ok in zip(data.slide_ids, data.labelled) if ok})
    if task == "linear-probe":
        rows = np.flatnonzero(data.labelled)
        return n_sets * len(make_folds(data.slide_ids, data.labels, rows=rows))
    return n_sets * len(make_folds(data.slide_ids))


def linear_probe_task(data: EvalData, sets: Sequence[FeatureSet], *, seed: int, device: str, tick: Tick):
    rows = _require_labels(data, "linear-probe")
    classes = np.array(sorted(set(data.labels[rows].tolist())), dtype=object)
    code = {c: i for i, c in enumerate(classes)}
    y = np.array([code.get(v, -1) for v in data.labels], dtype=np.int64)
    folds = make_folds(data.slide_ids, data.labels, seed=seed, rows=rows)
    out, preds = [], {}
    for fs in sets:
        pred_all = np.full(data.n_spots, -1, np.int64)
        for fold in folds:
            fit, val = carve_validation(fold.train, data.labels, seed=seed)
            if len(np.unique(y[fit])) < 2:
                tick()
                continue
            pred = linear_probe(fs.features[fit], y[fit], fs.features[val], y[val], fs.features[fold.test],
                                n_classes=len(classes), lr=fs.probe_lr, seed=seed, device=device)
            pred_all[fold.test] = pred
            out.append({"model": fs.name, "kind": fs.kind, "task": "linear-probe", "method": "linear",
                        "fold": fold.name, "scheme": fold.scheme, "n_train": len(fold.train), "n_test": len(fold.test),
                        **classification_metrics(y[fold.test], pred)})
            tick()
        preds[fs.name] = pred_all
    return out, {"classes": classes, "y": y, "pred": preds}


def leiden(features: np.ndarray, *, seed: int, resolution: float = LEIDEN_RESOLUTION,
           n_neighbors: int = N_NEIGHBORS) -> np.ndarray:
    """Leiden clusters (scanpy neighbours on the features + igraph Leiden), seeded."""
    import anndata as ad
    import scanpy as sc

    adata = ad.AnnData(X=np.ascontiguousarray(features, dtype=np.float32))
    sc.pp.neighbors(adata, n_neighbors=int(min(n_neighbors, max(2, len(features) - 1))), use_rep="X",
                    random_state=seed)
    sc.tl.leiden(adata, resolution=resolution, random_state=seed, flavor="igraph", n_iterations=2, directed=False)
    return adata.obs["leiden"].astype(int).to_numpy()


def cluster_task(data: EvalData, sets: Sequence[FeatureSet], *, seed: int, device: str, tick: Tick):
    rows = _require_labels(data, "cluster")
    slides = list(dict.fromkeys(data.slide_ids[rows].tolist()))
    out, clusters = [], {}
    for fs in sets:
        assigned = np.full(data.n_spots, -1, np.int64)
        for slide in slides:
            sel = np.flatnonzero(data.slide_ids == slide)
            lab = sel[data.labelled[sel]]
            if len(sel) < 3:
                tick()
                continue
            c = leiden(fs.features[sel], seed=seed)
            assigned[sel] = c
            truth = data.labels[lab].astype(str)
            out.append({"model": fs.name, "kind": fs.kind, "task": "cluster", "method": "leiden",
                        "fold": slide, "scheme": "per-slide", "n_train": 0, "n_test": len(lab),
                        "n_clusters": int(len(np.unique(c))),
                        **cluster_metrics(truth, assigned[lab], fs.features[lab])})
            tick()
        clusters[fs.name] = assigned
    return out, {"clusters": clusters}


def expression_targets(data: EvalData, n_hvgs: int = EXPRESSION_HVGS) -> tuple[np.ndarray, np.ndarray]:
    """(targets: log-CP10K of the top HVGs, spots x genes; their vocabulary indices, best first).

    Genes: detected in every slide (the intersection across slides), ranked by Seurat v3 on the
    merged raw counts.
    """
    present = None
    for slide in data.slides:
        sel = data.slide_ids == slide
        nz = np.asarray(data.counts[sel].getnnz(axis=0)).reshape(-1) > 0
        present = nz if present is None else present & nz
    genes = seurat_v3_hvgs(data.counts, n_hvgs, np.flatnonzero(present))
    Y = log_cp10k(data.counts)[:, genes].toarray().astype(np.float32)
    return Y, genes


def predict_expression_task(data: EvalData, sets: Sequence[FeatureSet], *, seed: int, device: str, tick: Tick,
                            k: int = KNN_K, n_hvgs: int = EXPRESSION_HVGS):
    Y, genes = expression_targets(data, n_hvgs)
    hvg, heg = top_genes(Y, np.arange(Y.shape[1]))
    folds = make_folds(data.slide_ids, seed=seed)
    out = []
    first = folds[0]
    shown: dict[str, dict[str, np.ndarray]] = {}
    for fs in sets:
        for fold in folds:
            fit, val = carve_validation(fold.train, seed=seed)
            test = fold.test
            preds = {
                "bleep": knn_regression(fs.features[fold.train], Y[fold.train], fs.features[test], k=k, device=device),
                "mlp": mlp_regression(fs.features[fit], Y[fit], fs.features[val], Y[val], fs.features[test],
                                      seed=seed, device=device),
            }
            for method, P in preds.items():
                out.append({"model": fs.name, "kind": fs.kind, "task": "predict-expression", "method": method,
                            "fold": fold.name, "scheme": fold.scheme, "n_train": len(fold.train), "n_test": len(test),
                            **expression_metrics(Y[test], P, hvg, heg)})
            if fold is first:
                shown[fs.name] = preds
            tick()
    return out, {"Y": Y, "genes": genes, "test": first.test, "fold": first.name, "pred": shown, "heg": heg}


RUNNERS = {"linear-probe": linear_probe_task, "cluster": cluster_task, "predict-expression": predict_expression_task}
