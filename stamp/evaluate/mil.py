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
* Outputs, all inside ``out`` whatever the inputs are called: ``results.csv`` (one row per
  features x model x fold), ``results.md`` (mean ± sd), ``roc.png`` (classification),
  ``heatmaps/<features>/<slide>.png`` (attention on the QC thumbnail for a few test patients per
  class). A run that fails removes the ``out`` it created.
* Inputs are checked before any training: the labels (ids read as text; one target per slide and
  per patient; survival times finite, events 0/1, at least one event), every bag of every features
  folder (readable, tiles, one width, finite values) and the options (``lr`` finite and > 0).
"""
from __future__ import annotations

import contextlib
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

    def check(self) -> None:
        """Refuse options no training can use (an infinite or zero lr trains to NaN and scores nothing)."""
        with np.errstate(over="ignore", under="ignore"):  # training runs in float32: 1e300 is inf there, 1e-50 is 0
            lr32 = None if self.lr is None else np.float32(self.lr)
        if lr32 is not None and not (np.isfinite(lr32) and lr32 > 0):
            raise BagError(f"--lr {self.lr}: give a positive, finite learning rate (default 5e-4; survival 5e-5)")
        if not 0 <= self.val_fraction < 1:
            raise BagError(f"validation fraction {self.val_fraction}: give a number in [0, 1)")
        for name in ("folds", "patience", "n_bins", "hidden", "attention_dim"):
            if getattr(self, name) < (2 if name == "folds" else 1):
                raise BagError(f"{name} {getattr(self, name)}: too small")
        if self.epochs is not None and self.epochs < 1:
            raise BagError(f"--epochs {self.epochs}: give at least 1")


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
    bag_attrs: dict = field(default_factory=dict)  # {(features, slide): the bag's root attributes}


# ----------------------------------------------------------------------------- inputs


def _read_labels(labels: str | os.PathLike, label: Optional[str], patient: str, slide_col: str,
                 survival: Optional[tuple[str, str]]):
    """The labels table, checked: every value read as text (slide ``000`` stays ``000``), one patient and one
    target per slide (a slide listed twice with different targets is refused), survival columns numeric."""
    import pandas as pd

    path = Path(labels)
    if not path.is_file():
        raise BagError(f"{path}: no such labels file; pass a CSV with {slide_col}, {patient} and label columns")
    try:
        df = (pd.read_csv(path, sep=None, engine="python", dtype=str) if path.suffix.lower() in (".tsv", ".txt")
              else pd.read_csv(path, dtype=str))
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise BagError(f"{path}: not a readable CSV ({str(exc).splitlines()[0]})") from None
    need = [slide_col, patient] + ([label] if label else []) + (list(survival) if survival else [])
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise BagError(f"{path}: no column {', '.join(map(repr, missing))} (columns: {', '.join(map(str, df.columns))}); "
                       "pass --slide-column / --patient / --label / --survival with its names")
    df = df[need].copy()
    for col in (slide_col, patient):
        blank = df[col].isna() | (df[col].str.strip() == "")
        if blank.any():
            raise BagError(f"{path}: row {int(np.flatnonzero(blank.to_numpy())[0]) + 2} has no {col}; every labelled "
                           f"slide needs its {col}")
    df[slide_col] = df[slide_col].map(lambda s: slide_name(s) if Path(s).suffix.lower() in
                                      (".svs", ".ndpi", ".mrxs", ".scn", ".tif", ".tiff", ".h5") else s)
    target = list(survival) if survival else [label]
    dropped = df[target].isna().any(axis=1)
    if dropped.any():
        log.warning("%s: %d rows without %s ignored", path, int(dropped.sum()), " / ".join(target))
        df = df[~dropped]
    if survival:
        df = _survival_columns(df, path, survival, slide_col)
    per_slide = df.groupby(slide_col)[patient].nunique()
    two = per_slide[per_slide > 1]
    if len(two):
        s = two.index[0]
        pats = sorted(df.loc[df[slide_col] == s, patient].unique())
        raise BagError(f"{path}: slide {s!r} belongs to two patients ({', '.join(pats)}); fix the {patient} column")
    for col in target:
        per_slide = df.groupby(slide_col)[col].nunique()
        if (per_slide > 1).any():
            s = per_slide[per_slide > 1].index[0]
            vals = ", ".join(map(str, sorted(df.loc[df[slide_col] == s, col].unique())))
            raise BagError(f"{path}: slide {s!r} is listed more than once with different {col!r} values ({vals}); "
                           "keep one row per slide")
    df = df.drop_duplicates(subset=[slide_col])
    if df.empty:
        raise BagError(f"{path}: no labelled slides")
    return df


def _survival_columns(df, path: Path, survival: tuple[str, str], slide_col: str):
    """Time as a finite number >= 0 and event as 0 / 1 (``1.0`` is 1, ``0.5`` is refused), per row."""
    import pandas as pd

    tcol, ecol = survival
    out = df.copy()
    for col in (tcol, ecol):
        num = pd.to_numeric(df[col].str.strip(), errors="coerce")
        bad = num.isna().to_numpy()
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise BagError(f"{path}: {col!r} of slide {df[slide_col].iloc[i]!r} is {df[col].iloc[i]!r}, not a number; "
                           f"{tcol!r} holds times, {ecol!r} 1 (event) or 0 (censored)")
        out[col] = num.astype(float)
    times, events = out[tcol].to_numpy(), out[ecol].to_numpy()
    bad = ~np.isfinite(times) | (times < 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise BagError(f"{path}: {tcol!r} of slide {out[slide_col].iloc[i]!r} is {times[i]:g}; survival times are "
                       "finite numbers >= 0")
    bad = ~np.isin(events, (0.0, 1.0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise BagError(f"{path}: {ecol!r} of slide {out[slide_col].iloc[i]!r} is {events[i]:g}; the event column "
                       "holds 1 (event) or 0 (censored)")
    out[ecol] = events.astype(int)
    return out


def _check_bag(bag, path: Path, slide: str, folder: Path, dim: Optional[int]) -> int:
    """One bag usable by ABMIL, or one line naming it: tiles, the folder's feature width, finite values."""
    if len(bag.features) == 0:
        raise BagError(f"{path}: a bag without tiles (no tissue found); remove slide {slide!r} from the labels "
                       "or embed it again with a lower --min-tissue")
    if bag.features.ndim != 2:
        raise BagError(f"{path}: features of shape {bag.features.shape}; a bag holds (tiles, features)")
    if dim is not None and bag.features.shape[1] != dim:
        raise BagError(f"{path}: {bag.features.shape[1]} features per tile, other bags of {folder} have "
                       f"{dim}; embed every slide with the same model")
    finite = np.isfinite(bag.features).all(axis=1)
    if not finite.all():
        raise BagError(f"{path}: slide {slide!r} has {int((~finite).sum())} of {len(finite)} tiles with NaN / inf "
                       "features; embed it again (or drop its row from the labels)")
    return bag.features.shape[1]


def _load_bags(folder: Path, slides: Sequence[str], labels_path: Path, *, keep: bool = True) -> dict[str, Any]:
    """{slide: bag} of ``folder``, every bag checked (:func:`_check_bag`); ``keep=False`` checks only,
    holding one bag at a time (every folder is checked before any training)."""
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
        dim = _check_bag(bag, available[s], s, folder, dim)
        if keep:
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
                 opts: MilOptions, seed: int, device, where: str = "ABMIL"):
    """Train one fold's ABMIL (early stopping on the validation loss); a loss that turns NaN / inf (a learning
    rate too large for these features) stops the run with one line instead of scoring NaN predictions."""
    import torch

    from stamp.models.abmil import GatedABMIL, nll_survival_loss

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)

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
        total = torch.zeros((), device=device)
        for i in rng.permutation(len(bags)):
            optim.zero_grad(set_to_none=True)
            loss = loss_of(bags[i], targets[i])
            loss.backward()
            optim.step()
            total += loss.detach()
        if not torch.isfinite(total):  # one check (one device sync) per epoch
            raise BagError(f"{where}: the ABMIL training loss became {float(total)} in epoch {epoch + 1} (lr "
                           f"{opts.task_lr(survival):g}); lower --lr")
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
    ``results.md`` and the figures into ``out`` when given (and only there; an ``out`` this run created is
    removed when it fails). Labels, options and every bag of every folder are checked before any training.
    """
    import pandas as pd

    from stamp.evaluate import output_folder

    if not features:
        raise BagError("no features folder; pass --features DIR (repeatable)")
    options.check()
    surv = tuple(survival) if survival else None
    if surv is not None and len(surv) != 2:
        raise BagError(f"--survival {','.join(surv)}: give TIME_COL,EVENT_COL")
    if surv is None and not label:
        raise BagError("pass --label COLUMN (classification) or --survival TIME_COL,EVENT_COL")
    labels = Path(labels)
    folders = [Path(f) for f in features]
    names = _feature_names(folders)
    df = _read_labels(labels, label, patient, slide_column, surv)
    # per-patient targets
    pat = df.groupby(patient, sort=True)
    patients = list(pat.groups)
    for col in ([label] if surv is None else list(surv)):
        per = pat[col].nunique()
        if (per > 1).any():
            p = per[per > 1].index[0]
            vals = ", ".join(map(str, sorted(df.loc[df[patient] == p, col].unique())))
            raise BagError(f"{labels}: patient {p!r} has slides with different {col!r} values ({vals}); one "
                           f"{'label' if surv is None else 'time and event'} per patient")
    if surv is None:
        classes = sorted(df[label].astype(str).unique())
        if len(classes) < 2:
            raise BagError(f"{labels}: column {label!r} has one class ({classes[0]}); need at least two")
        y_all = np.array([classes.index(str(v)) for v in pat[label].first().astype(str)])
        strata = y_all
        counts = np.bincount(y_all, minlength=len(classes))
        small = [(c, int(n)) for c, n in zip(classes, counts) if n < options.folds]
        if small:
            c, n = small[0]
            fix = f"use --folds {n} or drop the class" if n >= 2 else "drop the class (a class needs 2 patients)"
            raise BagError(f"{labels}: class {c!r} has {n} patients, fewer than the {options.folds} folds; {fix}")
    else:
        tcol, ecol = surv
        times = pat[tcol].first().to_numpy(dtype=float)
        events = pat[ecol].first().to_numpy(dtype=int)
        if not events.any():
            raise BagError(f"{labels}: no patient has an event ({ecol!r} is 0 for all {len(patients)}); a survival "
                           "model cannot be fitted or scored without events")
        classes = []
        strata = events
        if min(np.bincount(events, minlength=2)) < options.folds:
            strata = np.zeros_like(events)
        if len(patients) < options.folds:
            raise BagError(f"{labels}: {len(patients)} patients, fewer than the {options.folds} folds")
    slides = list(df[slide_column])
    for folder in folders[1:]:  # every folder checked before the first one trains (it is checked as it loads)
        _load_bags(folder, slides, labels, keep=False)
    folds = make_folds(strata, options.folds, options.seed)
    import torch  # only now: every refusal above is fast

    dev = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = torch.get_num_threads()
    rows, attention, preds, bag_attrs = [], {}, [], {}
    with contextlib.ExitStack() as stack:
        if out is not None:
            out = stack.enter_context(output_folder(Path(out)))
        try:
            for folder, fname in zip(folders, names):
                bags = _load_bags(folder, slides, labels)
                bag_attrs.update({(fname, s): b.attrs for s, b in bags.items()})
                pbags = _patient_bags(df, bags, slide_column, patient)
                del bags
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
                                                 [tgt[i] for i in va], n_out=n_out, survival=surv is not None,
                                                 opts=options, seed=options.seed * 1000 + k, device=dev,
                                                 where=f"--features {fname}, fold {k}")
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
                        preds += [{"features": fname, "model": "abmil", "fold": k, "patient": patients[i],
                                   "y": int(y_all[i]), **{f"p_{c}": float(p) for c, p in zip(classes, prob[j])}}
                                  for j, i in enumerate(test)]
                        if options.baselines:
                            bp, bcls = _baseline_classification(mean_feats[train], y_all[train], mean_feats[test],
                                                                options.seed)
                            full = np.zeros((len(test), len(classes)))
                            full[:, bcls] = bp
                            rows.append({**base, "n_train": len(train), "n_val": 0, "model": "mean-logreg",
                                         "epochs": 0, **classification_metrics(y_all[test], full, len(classes))})
                            preds += [{"features": fname, "model": "mean-logreg", "fold": k, "patient": patients[i],
                                       "y": int(y_all[i]), **{f"p_{c}": float(p) for c, p in zip(classes, full[j])}}
                                      for j, i in enumerate(test)]
                    else:
                        n_events = int(events[test].sum())
                        rows.append({**base, "model": "abmil", "epochs": epochs, "n_events": n_events,
                                     "c_index": c_index(times[test], events[test], _expected_survival(logits))})
                        if options.baselines:
                            try:
                                score = _baseline_cox(mean_feats[train], times[train], events[train],
                                                      mean_feats[test], options.seed)
                                ci = c_index(times[test], events[test], score)
                            except Exception as exc:  # lifelines convergence failures: recorded, not fatal
                                log.warning("%s fold %d: Cox baseline did not converge (%s)", fname, k, exc)
                                ci = float("nan")
                            rows.append({**base, "n_train": len(train), "n_val": 0, "model": "mean-cox", "epochs": 0,
                                         "n_events": n_events, "c_index": ci})
                    if progress:
                        log.warning("%s fold %d/%d done", fname, k + 1, len(folds))
        finally:
            torch.set_num_threads(threads)
        results = pd.DataFrame(rows)
        predictions = pd.DataFrame(preds) if preds else None
        result = MilResult(results, Path(out) if out is not None else None, attention, folds, predictions, bag_attrs)
        if out is not None:
            _write_outputs(result, classes, df, patient, label, features=folders, names=names,
                           survival=surv is not None, options=options)
    return result


def _feature_names(folders: list[Path]) -> list[str]:
    """One name per features folder (results rows, ``heatmaps/<name>/``): the folder name, or the shortest path
    suffix that tells same-named folders apart (``cohortA/feat``, ``cohortB/feat``). The same folder twice is
    refused (its rows would be pooled)."""
    keys = [f.resolve().parts for f in folders]
    for i, k in enumerate(keys):
        if k in keys[:i]:
            raise BagError(f"--features {folders[i]}: the same folder as --features {folders[keys.index(k)]}; give each "
                           "features folder once")
    names = []
    for i, k in enumerate(keys):
        n = 1
        while n < len(k) and any(k[-n:] == o[-n:] for j, o in enumerate(keys) if j != i):
            n += 1
        names.append("/".join(k[-n:]).lstrip("/") or k[-1])
    return names


def summary_table(results, metrics: Sequence[str]) -> str:
    """Markdown: one row per features x model, mean ± sd over the folds that have a score; a cell says how many
    folds it averages when some have none (their reasons: :func:`unscored_folds`)."""
    lines = ["| features | model | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for (f, m), g in results.groupby(["features", "model"], sort=False):
        cells = []
        for k in metrics:
            v = g[k].to_numpy(dtype=float)
            ok = v[np.isfinite(v)]
            if not ok.size:
                cells.append(f"n/a (0 of {len(v)} folds scored)")
                continue
            sd = f"{ok.std(ddof=1):.3f}" if ok.size > 1 else "n/a"
            cells.append(f"{ok.mean():.3f} ± {sd}" + (f" ({ok.size} of {len(v)} folds)" if ok.size < len(v) else ""))
        lines.append(f"| {f} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def unscored_folds(results, metrics: Sequence[str]) -> list[str]:
    """One line per features x model x fold without a score, and why (survival: no event among its test
    patients, or no comparable pair)."""
    lines = []
    for _, r in results.iterrows():
        bad = [k for k in metrics if not np.isfinite(float(r[k]))]
        if not bad:
            continue
        if "n_events" in r and r["n_events"] == 0:
            why = f"no event among its {int(r['n_test'])} test patients; the c-index needs one"
        elif "n_events" in r:
            why = "no comparable pair of test patients" if r["model"] == "abmil" else "the Cox fit failed"
        else:
            why = "a single class among its test patients"
        lines.append(f"- {r['features']} · {r['model']} · fold {int(r['fold'])}: no {', '.join(bad)} ({why})")
    return lines


def _write_outputs(result: MilResult, classes, df, patient, label, *, features, names, survival, options) -> None:
    from spavis.format.io import atomic_write_text

    out = result.out
    metrics = SURVIVAL_METRICS if survival else CLASSIFICATION_METRICS
    atomic_write_text(out / "results.csv", result.results.to_csv(index=False))
    task = "survival (discrete-time NLL)" if survival else f"classification of {label!r} ({', '.join(classes)})"
    md = [f"# ABMIL evaluation: {task}", "",
          f"{df[patient].nunique()} patients, {len(df)} slides, {options.folds} patient-level folds (seed "
          f"{options.seed}); ABMIL (gated attention), lr {options.task_lr(survival):g}, up to "
          f"{options.task_epochs(survival)} epochs, early stopping patience {options.patience}; baseline: mean-pooled "
          f"features + {'Cox (penalized, PCA)' if survival else 'logistic regression'}. Mean ± sd over folds.", "",
          summary_table(result.results, metrics), ""]
    unscored = unscored_folds(result.results, metrics)
    if unscored:
        md += ["Folds without a score (left out of the mean above, never counted as a value):", ""] + unscored + [""]
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


def _thumbnail(folder: Path, attrs: dict, slide: str):
    """(the slide's QC thumbnail as RGB, thumbnail downsample, tile side in thumbnail px), or None.

    ``qc_png`` is resolved inside the features folder only (an absolute path, ``..`` or a link out of the
    folder is refused); an unreadable or truncated thumbnail skips that heatmap with a warning."""
    from PIL import Image

    rel = attrs.get("qc_png")
    if not rel:
        return None  # no thumbnail recorded (bags of other tools): nothing to draw on
    root = folder.resolve()
    qc = (folder / str(rel)).resolve()
    if Path(str(rel)).is_absolute() or ".." in Path(str(rel)).parts or not qc.is_relative_to(root):
        log.warning("%s: slide %s's qc_png %r points outside the features folder; its heatmap is skipped", folder,
                    slide, str(rel))
        return None
    try:
        ds = float(attrs["qc_downsample"])
        side = float(attrs["tile_px_level0"]) / ds
        if not (np.isfinite(ds) and ds > 0 and np.isfinite(side) and side > 0):
            raise ValueError(f"qc_downsample {ds}, tile_px_level0 {attrs['tile_px_level0']}")
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        log.warning("%s: slide %s has no usable qc_downsample / tile_px_level0 (%s); its heatmap is skipped", folder,
                    slide, exc)
        return None
    try:
        with Image.open(qc) as im:
            img = im.convert("RGB")  # decodes every pixel: a truncated file fails here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        log.warning("%s: the QC thumbnail of slide %s is unreadable (%s); its heatmap is skipped", qc, slide, exc)
        return None
    return img, ds, side


def _heatmaps(result, classes, df, patient, label, features, names, per_class: int, out: Path) -> int:
    """Attention of the test-fold ABMIL on each slide's QC thumbnail, for a few patients per class, written
    under ``out/heatmaps/<features name>/`` only (the names are path suffixes of real folders: no ``..``)."""
    if per_class <= 0:
        return 0
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    from spavis.format.io import atomic_open

    if classes:
        first = df.groupby(patient, sort=True)[label].first().astype(str)
        chosen = [p for c in classes for p in list(first[first == c].index)[:per_class]]
    else:
        chosen = sorted(df[patient].unique())[:per_class * 2]
    cmap = colormaps["inferno"]
    root = (out / "heatmaps").resolve()
    made = 0
    for folder, fname in zip(features, names):
        for p in chosen:
            for slide, (coords, att) in result.attention.get((fname, p), {}).items():
                dest = out / "heatmaps" / fname / f"{slide}.png"
                if not len(att) or not dest.resolve().is_relative_to(root):
                    continue
                thumb = _thumbnail(folder, result.bag_attrs.get((fname, slide), {}), slide)
                if thumb is None:
                    continue
                img, ds, side = thumb
                rank = np.argsort(np.argsort(att)) / max(1, len(att) - 1)  # rank-normalised within the slide
                over = img.copy()
                d = ImageDraw.Draw(over)
                for (x, y), r in zip(coords, rank):
                    c = tuple(int(255 * v) for v in cmap(float(r))[:3])
                    d.rectangle([x / ds, y / ds, x / ds + side, y / ds + side], fill=c)
                img = Image.blend(img, over, 0.6)
                with atomic_open(dest, "wb") as fh:
                    img.save(fh, format="PNG")
                made += 1
    return made


__all__ = ["evaluate_mil", "MilOptions", "MilResult", "make_folds",
           "classification_metrics", "c_index", "summary_table", "unscored_folds"]
