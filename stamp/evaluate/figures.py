"""PNG figures of an evaluation (matplotlib, Agg backend: no display needed).

Every figure's title says which corpus it shows (and "GENERATED data" when the slides
come from spavis.simulate), so a figure never passes for real tissue by accident.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from spavis.format.io import atomic_open

MAX_SLIDES = 2
N_GENES_SHOWN = 3


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    _plt().close(fig)
    return path


def _spatial(ax, xy: np.ndarray, values, *, title: str, categorical: bool, cmap: str = "viridis", lim=None):
    ok = np.isfinite(xy).all(axis=1)
    if categorical:
        cats = sorted({str(v) for v in values[ok] if v is not None and v != -1})
        code = {c: i for i, c in enumerate(cats)}
        c = np.array([code.get(str(v), -1) for v in values[ok]])
        colors = _plt().get_cmap("tab20")(np.where(c >= 0, c % 20, 0))
        colors[c < 0] = (0.85, 0.85, 0.85, 1.0)  # unlabelled
        ax.scatter(xy[ok, 0], xy[ok, 1], c=colors, s=6, linewidths=0)
    else:
        vmin, vmax = lim if lim is not None else (None, None)
        sc = ax.scatter(xy[ok, 0], xy[ok, 1], c=np.asarray(values, float)[ok], s=6, linewidths=0, cmap=cmap,
                        vmin=vmin, vmax=vmax)
        _plt().colorbar(sc, ax=ax, fraction=0.046, pad=0.02)
    ax.set_title(title, fontsize=8)
    ax.invert_yaxis()
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def cluster_maps(out: Path, data, clusters: dict[str, np.ndarray], *, label: str, describe) -> list[Path]:
    """Per slide (first two): true labels next to each feature set's Leiden clusters."""
    plt = _plt()
    paths = []
    labelled = [s for s in data.slides if data.labelled[data.slide_ids == s].any()]  # the slides clustered
    for slide in labelled[:MAX_SLIDES]:
        sel = data.slide_ids == slide
        names = list(clusters)
        fig, axes = plt.subplots(1, len(names) + 1, figsize=(3 * (len(names) + 1), 3.2), squeeze=False)
        _spatial(axes[0, 0], data.xy[sel], data.labels[sel], title=f"{label} (truth)", categorical=True)
        for ax, name in zip(axes[0, 1:], names):
            _spatial(ax, data.xy[sel], clusters[name][sel], title=f"{name}: Leiden", categorical=True)
        fig.suptitle(describe(slide), fontsize=9)
        paths.append(_save(fig, out / f"cluster_{slide}.png"))
    return paths


def confusion_matrices(out: Path, y: np.ndarray, preds: dict[str, np.ndarray], classes: Sequence[str], *,
                       caption: str) -> Path:
    """Row-normalised confusion matrix per feature set (held-out predictions of every fold)."""
    from sklearn.metrics import confusion_matrix

    plt = _plt()
    names = list(preds)
    fig, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        ok = (preds[name] >= 0) & (y >= 0)
        cm = confusion_matrix(y[ok], preds[name][ok], labels=np.arange(len(classes)), normalize="true")
        ax.imshow(np.nan_to_num(cm), vmin=0, vmax=1, cmap="Blues")
        ax.set_xticks(range(len(classes)), [str(c) for c in classes], rotation=90, fontsize=6)
        ax.set_yticks(range(len(classes)), [str(c) for c in classes], fontsize=6)
        ax.set_xlabel("predicted", fontsize=7)
        ax.set_ylabel("true", fontsize=7)
        ax.set_title(name, fontsize=8)
    fig.suptitle(f"linear probe, held-out predictions — {caption}", fontsize=9)
    return _save(fig, out / "probe_confusion.png")


def expression_maps(out: Path, data, extras: dict, *, describe) -> list[Path]:
    """Measured vs predicted (every head) log-CP10K on the first held-out part, for a few expressed genes."""
    plt = _plt()
    test = extras["test"]
    Y = extras["Y"]
    genes = extras["heg"][:N_GENES_SHOWN]
    paths = []
    xy = data.xy[test]
    titles = {"knn": "BLEEP top-K", "ridge": "ridge", "mlp": "MLP"}
    for name, preds in extras["pred"].items():
        cols = [("measured", None)] + [(titles.get(h, h), h) for h in preds]
        fig, axes = plt.subplots(len(genes), len(cols), figsize=(3 * len(cols), 3 * len(genes)), squeeze=False)
        for r, g in enumerate(genes):
            vocab_i = extras["genes"][g]
            sym = data.gene_symbols[vocab_i] or data.gene_ids[vocab_i]
            lim = (float(Y[test, g].min()), float(Y[test, g].max()))
            for c, (title, head) in enumerate(cols):
                values = Y[test, g] if head is None else preds[head][:, g]
                _spatial(axes[r, c], xy, np.clip(values, *lim), title=f"{sym}: {title}", categorical=False, lim=lim)
        fig.suptitle(f"{name}, held out: {describe(extras['fold'])}", fontsize=9)
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
        paths.append(_save(fig, out / f"expression_{safe}.png"))
    return paths
