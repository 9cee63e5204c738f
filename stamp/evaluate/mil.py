"""``evaluate_mil``: slide-level evaluation of feature bags with ABMIL (the STAMP paper's 4th protocol).

* Model: :class:`stamp.models.abmil.GatedABMIL`, attention-based MIL with gated attention (Ilse
  et al. 2018): tile features -> linear + ReLU (+ dropout) -> gated attention (tanh branch x
  sigmoid branch -> one score per tile) -> softmax over the bag -> attention-weighted mean ->
  linear head. Written in this project (40 lines): ``torchmil`` pulls ``tensordict``, whose
  releases pin torch versions.
* Classification: cross-entropy, Adam lr 5e-4, 50 epochs, early stopping (patience 5) on the
  validation loss of patients carved from the training fold (``val_fraction``, stratified).
* Survival (``survival=(TIME, EVENT)``): discrete-time negative log-likelihood (Zadeh & Schmid
  2020) over ``n_bins`` quantile bins of the training fold's event times, lr 5e-5, 30 epochs;
  scored by Harrell's c-index (lifelines) of the expected survival sum(S(t)).
* Folds: patient-level stratified k-fold (class, or event for survival); all slides of one
  patient are one bag; every features folder is scored on the same folds.
* Baseline in the same run: mean-pooled patient features + logistic regression (survival: Cox
  model, lifelines ``CoxPHFitter`` with a small penalizer, on the first principal components).
* Outputs: ``results.csv`` (one row per features x model x fold), ``results.md`` (mean ± sd),
  ``roc.png`` (classification), ``heatmaps/<features>/<slide>.png`` (attention on the QC
  thumbnail for a few test patients per class).
"""
from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from stamp.errors import BagError
from stamp.slides.bags import list_bags, read_bag
from stamp.slides.reader import slide_name

log = logging.getLogger(__name__)

CLASSIFICATION_METRICS = ("auc", "balanced_accuracy", "f1_weighted")
SURVIVAL_METRICS = ("c_index",)


@dataclass
class MilOptions:
    """Training options; ``None`` lr / epochs take the paper's value for the task."""

    folds: int = 5
    epochs: Optional[int] = None  # 50 classification, 30 survival
    lr: Optional[float] = None  # 5e-4 classification, 5e-5 survival
    patience: int = 5
    val_fraction: float = 0.2
    hidden: int = 256
    attention_dim: int = 128
    dropout: float = 0.25
    weight_decay: float = 1e-5
    n_bins: int = 4
    seed: int = 0
    baselines: bool = True
    heatmaps_per_class: int = 2
    figures: bool = True
    device: Optional[str] = None

    def task_epochs(self, survival: bool) -> int:
        return self.epochs if self.epochs is not None else (30 if survival else 50)

    def task_lr(self, survival: bool) -> float:
        return self.lr if self.lr is not None else (5e-5 if survival else 5e-4)


@dataclass
class PatientBag:
    patient: str
    slides: list[str]
    features: Any  # torch float32 (N, D), all slides concatenated
    spans: list[tuple[int, int]]  # rows of each slide in ``features``
    coords: list[np.ndarray]


@dataclass
class MilResult:
    """``results`` (DataFrame: one row per features x model x fold), the output folder, the test-fold
    attention of every ABMIL patient {(features, patient): {slide: (coords, attention)}} and the folds."""

    results: Any
    out: Optional[Path]
    attention: dict = field(default_factory=dict)
    folds: list = field(default_factory=list)
    predictions: Any = None


# ----------------------------------------------------------------------------- inputs


def _read_labels(labels: str | os.PathLike, label: Optional[str], patient: str, slide_col: str,
                 survival: Optional[tuple[str, str]]):
    import pandas as pd

    path = Path(labels)
    if not path.is_file():
        raise BagError(f"{path}: no such labels file; pass a CSV with {slide_col}, {patient} and label columns")
    df = pd.read_csv(path, sep=None, engine="python") if path.suffix.lower() in (".tsv", ".txt") else pd.read_csv(path)
    need = [slide_col, patient] + ([label] if label else []) + (list(survival) if survival else [])
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise BagError(f"{path}: no column {', '.join(map(repr, missing))} (columns: {', '.join(map(str, df.columns))}); "
                       "pass --slide-column / --patient / --label / --survival with its names")
    df = df[need].copy()
    df[slide_col] = df[slide_col].astype(str).map(lambda s: slide_name(s) if Path(s).suffix.lower() in
                                                  (".svs", ".ndpi", ".mrxs", ".scn", ".tif", ".tiff", ".h5") else s)
    df[patient] = df[patient].astype(str)
    target = list(survival) if survival else [label]
    dropped = df[target].isna().any(axis=1)
    if dropped.any():
        log.warning("%s: %d rows without %s ignored", path, int(dropped.sum()), " / ".join(target))
        df = df[~dropped]
    per_slide = df.groupby(slide_col)[patient].nunique()
    two = per_slide[per_slide > 1]
    if len(two):
        s = two.index[0]
        pats = sorted(df.loc[df[slide_col] == s, patient].unique())
        raise BagError(f"{path}: slide {s!r} belongs to two patients ({', '.join(pats)}); fix the {patient} column")
    df = df.drop_duplicates(subset=[slide_col])
    if df.empty:
        raise BagError(f"{path}: no labelled slides")
    return df


def _load_bags(folder: Path, slides: Sequence[str], labels_path: Path) -> dict[str, Any]:
    available = list_bags(folder)
    unknown = [s for s in slides if s not in available]
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
        raise BagError(f"{labels_path}: {len(unknown)} labelled slides have no bag in {folder}: {shown}; embed them "
                       "(stamp embed-slides) or remove their rows")
    out = {}
    dim = None
    for s in slides:
        bag = read_bag(available[s])
        if len(bag.features) == 0:
            raise BagError(f"{available[s]}: a bag without tiles (no tissue found); remove slide {s!r} from the labels "
                           "or embed it again with a lower --min-tissue")
        if dim is not None and bag.features.shape[1] != dim:
            raise BagError(f"{available[s]}: {bag.features.shape[1]} features per tile, other bags of {folder} have "
                           f"{dim}; embed every slide with the same model")
        dim = bag.features.shape[1]
        out[s] = bag
    return out


def _patient_bags(df, bags: dict, slide_col: str, patient: str) -> dict[str, PatientBag]:
    import torch

    result = {}
    for pid, rows in df.groupby(patient, sort=True):
        slides = sorted(rows[slide_col])
        feats, spans, coords, start = [], [], [], 0
        for s in slides:
            f = bags[s].features
            feats.append(f)
            spans.append((start, start + len(f)))
            coords.append(bags[s].coords)
            start += len(f)
        result[pid] = PatientBag(pid, slides, torch.from_numpy(np.concatenate(feats)), spans, coords)
    return result


def make_folds(strata: np.ndarray, n_folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified k-fold over patients (``strata``: one class / event code per patient)."""
    from sklearn.model_selection import StratifiedKFold

    skf = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return [(tr, te) for tr, te in skf.split(np.zeros(len(strata)), strata)]


def _carve_validation(train: np.ndarray, strata: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    n_val = max(1, int(round(len(train) * fraction)))
    if fraction <= 0 or len(train) - n_val < 2:
        return train, train[:0]
    try:
        tr, va = train_test_split(train, test_size=n_val, stratify=strata[train], random_state=seed)
    except ValueError:  # a class too small to split: carve without stratifying
        tr, va = train_test_split(train, test_size=n_val, random_state=seed)
    return np.sort(tr), np.sort(va)


# ----------------------------------------------------------------------------- training


def _train_abmil(bags: list, targets: list, val_bags: list, val_targets: list, *, n_out: int, survival: bool,
                 opts: MilOptions, seed: int, device):
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    from stamp.models.abmil import GatedABMIL, nll_survival_loss

    model = GatedABMIL(bags[0].shape[1], n_out, opts.hidden, opts.attention_dim, opts.dropout).to(device)
    optim = torch.optim.Adam(model.parameters(), lr=opts.task_lr(survival), weight_decay=opts.weight_decay)

    def loss_of(x, t):
        logits, _ = model(x.to(device))
        if survival:
            return nll_survival_loss(logits, int(t[0]), bool(t[1]))
        return torch.nn.functional.cross_entropy(logits[None], torch.tensor([int(t)], device=device))

    best, best_loss, bad, epochs = None, float("inf"), 0, 0
    for epoch in range(opts.task_epochs(survival)):
        model.train()
        for i in rng.permutation(len(bags)):
            optim.zero_grad(set_to_none=True)
            loss_of(bags[i], targets[i]).backward()
            optim.step()
        epochs = epoch + 1
        if not val_bags:
            continue
        model.eval()
        with torch.no_grad():
            vl = float(np.mean([float(loss_of(x, t)) for x, t in zip(val_bags, val_targets)]))
        if vl < best_loss - 1e-6:
            best_loss, best, bad = vl, copy.deepcopy(model.state_dict()), 0
        else:
            bad += 1
            if bad >= opts.patience:
                break
    if best is not None:
        model.load_state_dict(best)
    model.eval()
    return model, epochs


def _predict(model, bags: list, device) -> tuple[np.ndarray, list[np.ndarray]]:
    import torch

    outs, attn = [], []
    with torch.no_grad():
        for x in bags:
            logits, a = model(x.to(device))
            outs.append(logits.float().cpu().numpy())
            attn.append(a.float().cpu().numpy())
    return np.stack(outs), attn


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _expected_survival(logits: np.ndarray) -> np.ndarray:
    h = 1 / (1 + np.exp(-logits))
    return np.cumprod(1 - h, axis=1).sum(axis=1)


def classification_metrics(y: np.ndarray, prob: np.ndarray, n_classes: int) -> dict[str, float]:
    """ROC AUC (macro one-vs-rest when multi-class), balanced accuracy, weighted F1."""
    from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

    pred = prob.argmax(axis=1)
    try:
        if n_classes == 2:
            auc = roc_auc_score(y, prob[:, 1])
        else:
            auc = roc_auc_score(y, prob, multi_class="ovr", average="macro", labels=list(range(n_classes)))
    except ValueError:  # one class only in this fold
        auc = float("nan")
    return {"auc": float(auc), "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
            "f1_weighted": float(f1_score(y, pred, average="weighted", zero_division=0))}


def c_index(times: np.ndarray, events: np.ndarray, predicted_survival: np.ndarray) -> float:
    """Harrell's concordance (lifelines): higher ``predicted_survival`` should mean a longer time."""
    from lifelines.utils import concordance_index

    try:
        return float(concordance_index(times, predicted_survival, events))
    except ZeroDivisionError:  # no comparable pair (no event in the fold)
        return float("nan")


def _time_bins(times: np.ndarray, events: np.ndarray, n_bins: int) -> np.ndarray:
    """Inner edges of ``n_bins`` quantile bins of the event times (all times when there is no event)."""
    ref = times[events.astype(bool)] if events.any() else times
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, n_bins + 1)[1:-1]))
    return edges


def _baseline_classification(xtr, ytr, xte, seed):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    clf.fit(xtr, ytr)
    return clf.predict_proba(xte), clf.classes_


def _baseline_cox(xtr, ttr, etr, xte, seed, penalizer: float = 0.1):
    import pandas as pd
    from lifelines import CoxPHFitter
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    k = max(1, min(8, xtr.shape[1], len(xtr) // 5))
    sc = StandardScaler().fit(xtr)
    pca = PCA(n_components=k, random_state=seed).fit(sc.transform(xtr))
    ztr, zte = pca.transform(sc.transform(xtr)), pca.transform(sc.transform(xte))
    cols = [f"pc{i}" for i in range(k)]
    df = pd.DataFrame(ztr, columns=cols)
    df["time"], df["event"] = ttr, etr
    cph = CoxPHFitter(penalizer=penalizer)
    cph.fit(df, duration_col="time", event_col="event")
    risk = np.asarray(cph.predict_partial_hazard(pd.DataFrame(zte, columns=cols))).ravel()
    return -risk  # higher = longer survival


# ----------------------------------------------------------------------------- main


def evaluate_mil(features: Sequence[str | os.PathLike], labels: str | os.PathLike, *, label: Optional[str] = None,
                 patient: str = "patient", slide_column: str = "slide", survival: Optional[Sequence[str]] = None,
                 out: Optional[str | os.PathLike] = None, options: MilOptions = MilOptions(),
                 progress: bool = False) -> MilResult:
    """Score every features folder with ABMIL (+ the mean-pooling baseline) on the same patient folds.

    ``labels``: CSV with ``slide_column`` (bag names, extensions ignored), ``patient`` and ``label``
    (classification) or the two ``survival`` columns (time, event 1/0). Writes ``results.csv``,
    ``results.md`` and the figures into ``out`` when given.
    """
    import pandas as pd
    import torch

    if not features:
        raise BagError("no features folder; pass --features DIR (repeatable)")
    surv = tuple(survival) if survival else None
    if surv is not None and len(surv) != 2:
        raise BagError(f"--survival {','.join(surv)}: give TIME_COL,EVENT_COL")
    if surv is None and not label:
        raise BagError("pass --label COLUMN (classification) or --survival TIME_COL,EVENT_COL")
    labels = Path(labels)
    df = _read_labels(labels, label, patient, slide_column, surv)
    # per-patient targets
    pat = df.groupby(patient, sort=True)
    patients = list(pat.groups)
    if surv is None:
        per = pat[label].nunique()
        if (per > 1).any():
            p = per[per > 1].index[0]
            raise BagError(f"{labels}: patient {p!r} has slides with different {label!r} values; one label per patient")
        classes = sorted(df[label].astype(str).unique())
        if len(classes) < 2:
            raise BagError(f"{labels}: column {label!r} has one class ({classes[0]}); need at least two")
        y_all = np.array([classes.index(str(v)) for v in pat[label].first().astype(str)])
        strata = y_all
        counts = np.bincount(y_all, minlength=len(classes))
        small = [(c, int(n)) for c, n in zip(classes, counts) if n < options.folds]
        if small:
            c, n = small[0]
            raise BagError(f"{labels}: class {c!r} has {n} patients, fewer than the {options.folds} folds; "
                           f"use --folds {max(2, n)} or drop the class")
    else:
        tcol, ecol = surv
        try:
            times = pat[tcol].first().astype(float).to_numpy()
            events = pat[ecol].first().astype(float).astype(int).to_numpy()
        except ValueError as exc:
            raise BagError(f"{labels}: {tcol!r} must be a number and {ecol!r} 0/1 ({exc})") from None
        if not set(np.unique(events)) <= {0, 1}:
            raise BagError(f"{labels}: column {ecol!r} must be 0 (censored) or 1 (event)")
        if (times < 0).any():
            raise BagError(f"{labels}: column {tcol!r} has negative times")
        classes = []
        strata = events
        if min(np.bincount(events, minlength=2)) < options.folds:
            strata = np.zeros_like(events)
        if len(patients) < options.folds:
            raise BagError(f"{labels}: {len(patients)} patients, fewer than the {options.folds} folds")
    folds = make_folds(strata, options.folds, options.seed)
    dev = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = torch.get_num_threads()
    rows, attention, preds = [], {}, []
    names = _feature_names([Path(f) for f in features])
    for folder, fname in zip([Path(f) for f in features], names):
        bags = _load_bags(folder, list(df[slide_column]), labels)
        pbags = _patient_bags(df, bags, slide_column, patient)
        X = [pbags[p].features for p in patients]
        mean_feats = np.stack([x.mean(dim=0).numpy() for x in X])
        # small bags on CPU: one thread (thread hand-offs cost more than these matmuls)
        torch.set_num_threads(1 if dev.type == "cpu" and max(x.numel() for x in X) < 2**20 else threads)
        for k, (train, test) in enumerate(folds):
            tr, va = _carve_validation(train, strata, options.val_fraction, options.seed + k)
            if surv is None:
                tgt = list(y_all)
                n_out = len(classes)
            else:
                edges = _time_bins(times[train], events[train], options.n_bins)
                ybin = np.digitize(times, edges)
                tgt = list(zip(ybin, events))
                n_out = len(edges) + 1
            model, epochs = _train_abmil([X[i] for i in tr], [tgt[i] for i in tr], [X[i] for i in va],
                                         [tgt[i] for i in va], n_out=n_out, survival=surv is not None, opts=options,
                                         seed=options.seed * 1000 + k, device=dev)
            logits, attn = _predict(model, [X[i] for i in test], dev)
            base = {"features": fname, "fold": k, "n_train": len(tr), "n_val": len(va), "n_test": len(test)}
            for j, i in enumerate(test):
                pb = pbags[patients[i]]
                attention[(fname, pb.patient)] = {s: (c, attn[j][a:b]) for s, (a, b), c in
                                                  zip(pb.slides, pb.spans, pb.coords)}
            if surv is None:
                prob = _softmax(logits)
                rows.append({**base, "model": "abmil", "epochs": epochs,
                             **classification_metrics(y_all[test], prob, len(classes))})
                preds += [{"features": fname, "model": "abmil", "fold": k, "patient": patients[i], "y": int(y_all[i]),
                           **{f"p_{c}": float(p) for c, p in zip(classes, prob[j])}} for j, i in enumerate(test)]
                if options.baselines:
                    bp, bcls = _baseline_classification(mean_feats[train], y_all[train], mean_feats[test], options.seed)
                    full = np.zeros((len(test), len(classes)))
                    full[:, bcls] = bp
                    rows.append({**base, "n_train": len(train), "n_val": 0, "model": "mean-logreg", "epochs": 0,
                                 **classification_metrics(y_all[test], full, len(classes))})
                    preds += [{"features": fname, "model": "mean-logreg", "fold": k, "patient": patients[i],
                               "y": int(y_all[i]), **{f"p_{c}": float(p) for c, p in zip(classes, full[j])}}
                              for j, i in enumerate(test)]
            else:
                rows.append({**base, "model": "abmil", "epochs": epochs,
                             "c_index": c_index(times[test], events[test], _expected_survival(logits))})
                if options.baselines:
                    try:
                        score = _baseline_cox(mean_feats[train], times[train], events[train], mean_feats[test],
                                              options.seed)
                        ci = c_index(times[test], events[test], score)
                    except Exception as exc:  # lifelines convergence failures: recorded, not fatal
                        log.warning("%s fold %d: Cox baseline did not converge (%s)", fname, k, exc)
                        ci = float("nan")
                    rows.append({**base, "n_train": len(train), "n_val": 0, "model": "mean-cox", "epochs": 0,
                                 "c_index": ci})
            if progress:
                log.warning("%s fold %d/%d done", fname, k + 1, len(folds))
    torch.set_num_threads(threads)
    results = pd.DataFrame(rows)
    predictions = pd.DataFrame(preds) if preds else None
    result = MilResult(results, Path(out) if out else None, attention, folds, predictions)
    if out is not None:
        _write_outputs(result, classes, df, patient, label, features=[Path(f) for f in features], names=names,
                       survival=surv is not None, options=options)
    return result


def _feature_names(folders: list[Path]) -> list[str]:
    names = [f.name or str(f) for f in folders]
    if len(set(names)) < len(names):
        names = [str(f) for f in folders]
    return names


def summary_table(results, metrics: Sequence[str]) -> str:
    """Markdown: one row per features x model, mean ± sd over folds."""
    lines = ["| features | model | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for (f, m), g in results.groupby(["features", "model"], sort=False):
        cells = [f"{g[k].mean():.3f} ± {g[k].std(ddof=1) if len(g) > 1 else 0:.3f}" for k in metrics]
        lines.append(f"| {f} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write_outputs(result: MilResult, classes, df, patient, label, *, features, names, survival, options) -> None:
    from spavis.format.io import atomic_write_text

    out = result.out
    out.mkdir(parents=True, exist_ok=True)
    metrics = SURVIVAL_METRICS if survival else CLASSIFICATION_METRICS
    atomic_write_text(out / "results.csv", result.results.to_csv(index=False))
    task = "survival (discrete-time NLL)" if survival else f"classification of {label!r} ({', '.join(classes)})"
    md = [f"# ABMIL evaluation: {task}", "",
          f"{df[patient].nunique()} patients, {len(df)} slides, {options.folds} patient-level folds (seed "
          f"{options.seed}); ABMIL (gated attention), lr {options.task_lr(survival):g}, up to "
          f"{options.task_epochs(survival)} epochs, early stopping patience {options.patience}; baseline: mean-pooled "
          f"features + {'Cox (penalized, PCA)' if survival else 'logistic regression'}. Mean ± sd over folds.", "",
          summary_table(result.results, metrics), ""]
    if result.predictions is not None:
        atomic_write_text(out / "predictions.csv", result.predictions.to_csv(index=False))
    if options.figures and not survival and result.predictions is not None:
        _roc_figure(result.predictions, classes, out / "roc.png")
        md += ["![ROC curves (out-of-fold)](roc.png)", ""]
    if options.figures:
        made = _heatmaps(result, classes, df, patient, label, features, names, options.heatmaps_per_class, out)
        if made:
            md += [f"Attention heatmaps: {made} slides in `heatmaps/`.", ""]
    atomic_write_text(out / "results.md", "\n".join(md))


def _roc_figure(preds, classes, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    feats = list(dict.fromkeys(preds["features"]))
    fig, axes = plt.subplots(1, len(feats), figsize=(4.2 * len(feats), 4), squeeze=False)
    for ax, f in zip(axes[0], feats):
        for model, style in (("abmil", "-"), ("mean-logreg", "--")):
            g = preds[(preds["features"] == f) & (preds["model"] == model)]
            if g.empty:
                continue
            pos = [1] if len(classes) == 2 else range(len(classes))
            for c in pos:
                fpr, tpr, _ = roc_curve(g["y"] == c, g[f"p_{classes[c]}"])
                name = model if len(classes) == 2 else f"{model} {classes[c]}"
                ax.plot(fpr, tpr, style, label=name)
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.set(title=f, xlabel="false positive rate", ylabel="true positive rate")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _heatmaps(result, classes, df, patient, label, features, names, per_class: int, out: Path) -> int:
    """Attention of the test-fold ABMIL on each slide's QC thumbnail, for a few patients per class."""
    if per_class <= 0:
        return 0
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    from spavis.format.io import atomic_open
    from stamp.slides.bags import list_bags, read_attrs

    if classes:
        first = df.groupby(patient, sort=True)[label].first().astype(str)
        chosen = [p for c in classes for p in list(first[first == c].index)[:per_class]]
    else:
        chosen = sorted(df[patient].unique())[:per_class * 2]
    cmap = colormaps["inferno"]
    made = 0
    for folder, fname in zip(features, names):
        found = list_bags(folder)  # either layout (stamp.slides.bags); qc_png is relative to the folder
        for p in chosen:
            for slide, (coords, att) in result.attention.get((fname, p), {}).items():
                attrs = read_attrs(found[slide])
                qc = folder / str(attrs.get("qc_png", ""))
                if not attrs.get("qc_png") or not qc.is_file() or not len(att):
                    continue
                img = Image.open(qc).convert("RGB")
                ds = float(attrs["qc_downsample"])
                side = float(attrs["tile_px_level0"]) / ds
                rank = np.argsort(np.argsort(att)) / max(1, len(att) - 1)  # rank-normalised within the slide
                over = img.copy()
                d = ImageDraw.Draw(over)
                for (x, y), r in zip(coords, rank):
                    c = tuple(int(255 * v) for v in cmap(float(r))[:3])
                    d.rectangle([x / ds, y / ds, x / ds + side, y / ds + side], fill=c)
                img = Image.blend(img, over, 0.6)
                with atomic_open(out / "heatmaps" / fname / f"{slide}.png", "wb") as fh:
                    img.save(fh, format="PNG")
                made += 1
    return made


__all__ = ["evaluate_mil", "MilOptions", "MilResult", "make_folds",
           "classification_metrics", "c_index", "summary_table"]
