"""Train / test folds: leave-one-slide-out when there are several slides, else seeded spot-level 5-fold.

No slide is ever in both the training and the test part of a slide-level fold; the
validation split (early stopping) is carved from the training part only.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

N_FOLDS = 5
VAL_FRACTION = 0.1


@dataclass(frozen=True)
class Fold:
    name: str  # the held-out slide, or "fold-k"
    train: np.ndarray  # spot row indices
    test: np.ndarray
    scheme: str  # "leave-one-slide-out" or "5-fold"


def make_folds(slide_ids: np.ndarray, labels: np.ndarray | None = None, *, seed: int = 0,
               n_folds: int = N_FOLDS, rows: np.ndarray | None = None) -> list[Fold]:
    """Folds over ``rows`` (default all spots): one per slide when there are several slides,
    else ``n_folds`` stratified (by ``labels`` when given) seeded folds of spots."""
    from sklearn.model_selection import KFold, StratifiedKFold

    rows = np.arange(len(slide_ids)) if rows is None else np.asarray(rows)
    slides = slide_ids[rows]
    unique = list(dict.fromkeys(slides.tolist()))
    if len(unique) > 1:
        return [Fold(s, rows[slides != s], rows[slides == s], "leave-one-slide-out") for s in unique]
    n_folds = int(min(n_folds, len(rows)))
    if labels is not None:
        y = np.asarray(labels[rows]).astype(str)
        _, counts = np.unique(y, return_counts=True)
        if counts.min() >= n_folds:
            splitter = StratifiedKFold(n_folds, shuffle=True, random_state=seed).split(rows, y)
            return [Fold(f"fold-{i}", rows[a], rows[b], f"{n_folds}-fold") for i, (a, b) in enumerate(splitter)]
    splitter = KFold(n_folds, shuffle=True, random_state=seed).split(rows)
    return [Fold(f"fold-{i}", rows[a], rows[b], f"{n_folds}-fold") for i, (a, b) in enumerate(splitter)]


def carve_validation(train: np.ndarray, labels: np.ndarray | None = None, *, seed: int = 0,
                     fraction: float = VAL_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, validation rows) from a fold's training rows, stratified when every class allows."""
    from sklearn.model_selection import train_test_split

    train = np.asarray(train)
    n_val = max(1, int(round(fraction * len(train))))
    if len(train) < 4:
        return train, train[:0]
    stratify = None
    if labels is not None:
        y = np.asarray(labels[train]).astype(str)
        _, counts = np.unique(y, return_counts=True)
        if counts.min() >= 2 and n_val >= len(counts):
            stratify = y
    fit, val = train_test_split(train, test_size=n_val, random_state=seed, shuffle=True, stratify=stratify)
    return np.sort(fit), np.sort(val)
