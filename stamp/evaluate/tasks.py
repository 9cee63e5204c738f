"""The evaluation protocols: linear probe, Leiden clustering, gene-expression prediction.

Each returns ``(rows, extras)``: ``rows`` one dict per feature set x fold (x method) for
results.csv; ``extras`` what the figures need (predictions, clusters).
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

from stamp.evaluate.data import EvalData, EvaluateError, log_cp10k, variable_genes
from stamp.evaluate.features import FeatureSet
from stamp.evaluate.heads import (MLP_HIDDEN, knn_regression, linear_probe, mlp_regression, ridge_regression,
                                 run_concurrently)
from stamp.evaluate.metrics import classification_metrics, cluster_metrics, expression_metrics, top_genes
from stamp.evaluate.splits import carve_validation, make_folds

TASKS = ("linear-probe", "cluster", "predict-expression")
LABEL_TASKS = ("linear-probe", "cluster")
# predict-expression heads: MLP regression, closed-form ridge, BLEEP-style query-reference (knn)
HEADS = ("knn", "ridge", "mlp")
LEIDEN_RESOLUTION = 0.5
N_NEIGHBORS = 15
EXPRESSION_HVGS = 5000
KNN_K = 50

Tick = Callable[[], None]


def _require_labels(data: EvalData, task: str) -> np.ndarray:
    if data.labels is None:
        raise EvaluateError(f"{task} needs labels: pass --label COLUMN (an annotation column of the corpus)")
    rows = np.flatnonzero(data.labelled)
    values = set(data.labels[rows].tolist())
    if len(values) < 2:
        raise EvaluateError(f"{task}: {len(rows)} labelled spot(s) with {len(values)} label value(s); scoring needs "
                            "at least two label values (label more spots, or pick another --label column)")
    return rows


MIN_PROBE_SPOTS = 4


def check_task(task: str, data: EvalData) -> None:
    """Refuse, in one line and before any encoder runs, a task the data cannot support."""
    if task in LABEL_TASKS:
        rows = _require_labels(data, task)
        if task == "linear-probe" and len(rows) < MIN_PROBE_SPOTS:
            raise EvaluateError(f"linear-probe: only {len(rows)} labelled spots; a probe with held-out folds needs "
                                f"at least {MIN_PROBE_SPOTS}")
    if task == "predict-expression" and data.n_spots < 4:
        raise EvaluateError(f"predict-expression: only {data.n_spots} spots; held-out folds need at least 4")


def check_heads(heads) -> tuple[str, ...]:
    """The predict-expression heads asked for (default: all), validated."""
    if heads is None:
        return HEADS
    heads = tuple(dict.fromkeys(h.strip() for h in heads if h and h.strip()))
    bad = [h for h in heads if h not in HEADS]
    if bad or not heads:
        raise EvaluateError(f"--head {', '.join(bad) or '(none)'}: choose among {', '.join(HEADS)}")
    return heads


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


def expression_targets(data: EvalData, n_hvgs: int = EXPRESSION_HVGS) -> tuple[np.ndarray, np.ndarray, str]:
    """(targets: log-CP10K of the top HVGs, spots x genes; their vocabulary indices, best first; how the
    genes were ranked).

    Genes: detected in every slide (the intersection across slides), ranked by Seurat v3 on the
    merged raw counts (see :func:`stamp.evaluate.data.variable_genes` for small corpora).
    """
    present = None
    for slide in data.slides:
        sel = data.slide_ids == slide
        nz = np.asarray(data.counts[sel].getnnz(axis=0)).reshape(-1) > 0
        present = nz if present is None else present & nz
    genes, flavor = variable_genes(data.counts, n_hvgs, np.flatnonzero(present))
    Y = log_cp10k(data.counts)[:, genes].toarray().astype(np.float32)
    return Y, genes, flavor


def predict_expression_task(data: EvalData, sets: Sequence[FeatureSet], *, seed: int, device: str, tick: Tick,
                            k: int = KNN_K, n_hvgs: int = EXPRESSION_HVGS, heads: Sequence[str] = HEADS,
                            timings: dict | None = None):
    """Every head on every feature set and fold; ``timings`` (when given) collects seconds per head.

    knn and ridge run first, fold by fold, on all threads; then every MLP fit, several at once on CPU
    (:func:`stamp.evaluate.heads.run_concurrently`)."""
    Y, genes, flavor = expression_targets(data, n_hvgs)
    hvg, heg = top_genes(Y, np.arange(Y.shape[1]))
    folds = make_folds(data.slide_ids, seed=seed)
    timings = {} if timings is None else timings
    jobs = [(fs, fold) for fs in sets for fold in folds]
    # metrics as soon as a prediction exists; predictions kept only for the first fold (the figures)
    metrics: dict[tuple[int, str], dict] = {}
    shown: dict[str, dict[str, np.ndarray]] = {}

    def keep(j: int, head: str, P: np.ndarray) -> None:
        fs, fold = jobs[j]
        metrics[j, head] = expression_metrics(Y[fold.test], P, hvg, heg)
        if fold is folds[0]:
            shown.setdefault(fs.name, {})[head] = P

    for j, (fs, fold) in enumerate(jobs):
        fit, val = carve_validation(fold.train, seed=seed)
        for head in heads:
            t0 = time.perf_counter()
            if head == "knn":
                P = knn_regression(fs.features[fold.train], Y[fold.train], fs.features[fold.test], k=k, device=device)
            elif head == "ridge":
                P = ridge_regression(fs.features[fit], Y[fit], fs.features[val], Y[val], fs.features[fold.test])
            else:
                continue
            timings[head] = timings.get(head, 0.0) + time.perf_counter() - t0
            keep(j, head, P)
        if "mlp" not in heads:
            tick()
    if "mlp" in heads:
        def mlp_job(j: int):
            fs, fold = jobs[j]

            def run(stop):
                fit, val = carve_validation(fold.train, seed=seed)
                keep(j, "mlp", mlp_regression(fs.features[fit], Y[fit], fs.features[val], Y[val],
                                              fs.features[fold.test], seed=seed, device=device, stop=stop))
            return run

        t0 = time.perf_counter()
        # one fit holds its fold's copies of features and targets, and the head with Adam's state and its best
        # epoch (x4); sized on the largest fold
        width = max(fs.features.shape[1] for fs in sets)
        rows = max(len(fold.train) + len(fold.test) for fold in folds)
        params = width * MLP_HIDDEN + MLP_HIDDEN * MLP_HIDDEN + MLP_HIDDEN * Y.shape[1]
        run_concurrently([mlp_job(j) for j in range(len(jobs))], device=device, on_done=tick,
                         bytes_per_job=4 * (2 * rows * (width + Y.shape[1]) + 5 * params))
        timings["mlp"] = timings.get("mlp", 0.0) + time.perf_counter() - t0
    out = [{"model": fs.name, "kind": fs.kind, "task": "predict-expression", "method": head, "fold": fold.name,
            "scheme": fold.scheme, "n_train": len(fold.train), "n_test": len(fold.test), **metrics[j, head]}
           for j, (fs, fold) in enumerate(jobs) for head in heads]
    shown = {name: {h: by_head[h] for h in heads} for name, by_head in shown.items()}
    notes = [] if flavor == "seurat_v3" else [
        f"predict-expression: target genes ranked by {flavor} (Seurat v3's fit failed on this small corpus)"]
    return out, {"Y": Y, "genes": genes, "test": folds[0].test, "fold": folds[0].name, "pred": shown, "heg": heg,
                 "notes": notes, "timings": timings}


RUNNERS = {"linear-probe": linear_probe_task, "cluster": cluster_task, "predict-expression": predict_expression_task}
