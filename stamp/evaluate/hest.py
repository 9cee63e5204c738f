"""``stamp evaluate hest-bench``: HEST-Benchmark (gene expression from 112 µm H&E patches), reproduced.

Inputs, either
- HEST-Benchmark task folders as published (``--bench-dir``: one task folder, or a folder of them):
  ``splits/train_K.csv`` + ``splits/test_K.csv`` (columns ``sample_id``, ``patches_path``,
  ``expr_path``, paths relative to the task folder), patch ``.h5`` files (``img`` uint8
  (N, 224, 224, 3), ``barcode``, ``coords``), ``.h5ad`` expression (raw counts; obs names =
  barcodes) and ``var_50genes.json`` (``{"genes": [...]}``);
- or a paired corpus (``--data``, built with ``--with-images``: 224 px at 0.5 µm/px, HEST's input)
  with ``--patient COL``: one fold per patient (leave-one-patient-out), genes by HEST's rule
  (:func:`hest_genes`).

The protocol (HEST's ``benchmark.py`` / ``trainer.py``, read and re-implemented, not copied), dtype by
dtype as HEST runs it: per sample, the patches' float32 embeddings (the patch ``.h5`` order; expression
rows are looked up by the patch barcodes); targets float64 ``log1p`` of the raw counts of the task's
genes (no per-spot normalisation); ``StandardScaler`` + ``PCA(256, random_state=seed)`` fit on the
float32 training split only (sklearn keeps float32), the components rounded to float32 (HEST's
``torch.Tensor``) and handed to the ridge as float64 (sklearn does not know torch's dtype and converts
to float64: HEST's lsqr runs in float64); ``Ridge(solver="lsqr", alpha=100 / (n_features * n_genes),
fit_intercept=False, max_iter=1000, random_state=seed)``; Pearson r per gene on the pooled test spots,
averaged over genes with a plain mean (a gene without a defined r makes the fold NaN, as in HEST);
mean ± sd (population sd, as HEST's ``np.std``) over every fold, NaN folds included and named in
results.md. HEST's default seed is 1.

Two variants in the same run, as separate ``method`` rows: ``cv-alpha`` (α chosen by inner
cross-validation over the training samples' patients) and ``per-slide`` (the protocol's
predictions, Pearson per test slide, averaged over slides).

Embeddings are cached per sample as ``out/embeddings/<task>/<model>/<sample_id>.h5``
(``embeddings``, ``barcodes``, ``coords``; attributes name the model and the patch file), so a second
run of the same model reuses them.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from stamp.evaluate.data import EvaluateError
from stamp.locations import model_folder_of

N_COMPONENTS = 256
GENE_LIST = "var_50genes.json"
SPLIT_COLUMNS = ("sample_id", "patches_path", "expr_path")
HEST_SEED = 1
MAX_ITER = 1000
# inner-CV grid of the cv-alpha variant: multiples of HEST's alpha (1 = HEST's own)
ALPHA_FACTORS = tuple(10.0 ** np.arange(-1, 7))
INNER_FOLDS = 5
# HEST's gene rule (get_k_genes; corpus input): detected in >= 10 % of the spots of every slide, names
# containing a control marker dropped, the first 50 Seurat HVGs of log1p counts
MIN_SPOT_FRACTION = 0.1
N_GENES = 50
CONTROL_MARKERS = ("BLANK", "Control")
METHODS = {"hest": "HEST protocol (α = 100 / (n_features × n_genes), Pearson on pooled test spots)",
           "cv-alpha": "variant: α by inner cross-validation over the training patients",
           "per-slide": "variant: Pearson per test slide, averaged over slides"}


# ----------------------------------------------------------------------------- the protocol


def hest_alpha(n_features: int, n_genes: int) -> float:
    """HEST's ridge penalty: 100 / (n_features * n_genes)."""
    return 100.0 / (n_features * n_genes)


def reduce(X_train: np.ndarray, X_test: np.ndarray, *, seed: int,
           n_components: int = N_COMPONENTS) -> tuple[np.ndarray, np.ndarray]:
    """StandardScaler + PCA fit on the training rows only, in the embeddings' dtype (float32, as sklearn keeps
    it); the components rounded to float32 as HEST's ``torch.Tensor`` rounds them.

    ``n_components`` is capped at what sklearn's PCA accepts: min(n_train, n_features). HEST asks for
    exactly 256 and stops with an error below that; where HEST runs the cap changes nothing."""
    from sklearn.decomposition import PCA
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    k = int(max(1, min(n_components, X_train.shape[0], X_train.shape[1])))
    pipe = Pipeline([("scaler", StandardScaler()), ("pca", PCA(n_components=k, random_state=seed))])
    Z_train = pipe.fit_transform(X_train)
    return Z_train.astype(np.float32), pipe.transform(X_test).astype(np.float32)


def ridge_predict(Z_train: np.ndarray, Y_train: np.ndarray, Z_test: np.ndarray, *, alpha: float,
                  seed: int) -> np.ndarray:
    """HEST's ridge on float32 components, fit and applied in float64.

    HEST passes ``torch.Tensor`` components; sklearn does not recognise torch's dtype and converts them
    to float64, so lsqr iterates in float64 (in float32 it stops at other iterates: up to 2.5e-3 Pearson
    off on a real task)."""
    from sklearn.linear_model import Ridge

    reg = Ridge(solver="lsqr", alpha=alpha, random_state=seed, fit_intercept=False, max_iter=MAX_ITER)
    reg.fit(np.asarray(Z_train, np.float64), np.asarray(Y_train, np.float64))
    return reg.predict(np.asarray(Z_test, np.float64))


def gene_pearson(Y: np.ndarray, P: np.ndarray) -> np.ndarray:
    """Pearson r of every gene over the rows (NaN where a column is constant, as scipy's pearsonr)."""
    from stamp.evaluate.metrics import pearson_per_gene

    return pearson_per_gene(np.asarray(Y, np.float64), np.asarray(P, np.float64))


def hest_pearson(Y: np.ndarray, P: np.ndarray, genes: Sequence[str]) -> tuple[float, list[str]]:
    """(HEST's score: the plain mean of the per-gene r, NaN when any gene's r is undefined; those genes)."""
    r = gene_pearson(Y, P)
    return float(np.mean(r)), [str(genes[j]) for j in np.flatnonzero(~np.isfinite(r))]


def mean_pearson(Y: np.ndarray, P: np.ndarray) -> float:
    """Mean r over the genes where it is defined: only to rank the cv-alpha grid (never reported)."""
    r = gene_pearson(Y, P)
    return float(np.nanmean(r)) if np.isfinite(r).any() else float("nan")


def _inner_splits(groups: np.ndarray, seed: int):
    from sklearn.model_selection import GroupKFold, KFold

    unique = np.unique(groups)
    if len(unique) >= 2:
        return list(GroupKFold(n_splits=int(min(INNER_FOLDS, len(unique)))).split(groups, groups=groups)), "patients"
    n = int(min(INNER_FOLDS, len(groups)))
    return list(KFold(n, shuffle=True, random_state=seed).split(groups)), "spots (one training patient)"


def cv_alpha(X: np.ndarray, Y: np.ndarray, groups: np.ndarray, *, seed: int,
             factors: Sequence[float] = ALPHA_FACTORS) -> tuple[float, str]:
    """(the factor of HEST's alpha with the best mean inner-fold Pearson, what the inner folds split).

    Inner folds split the training samples by patient (GroupKFold, at most 5); scaler and PCA are
    refit inside every inner fold, so no inner validation spot informs its own features."""
    splits, over = _inner_splits(groups, seed)
    scores = np.zeros(len(factors))
    for tr, va in splits:
        Z_tr, Z_va = reduce(X[tr], X[va], seed=seed)
        base = hest_alpha(Z_tr.shape[1], Y.shape[1])
        for i, f in enumerate(factors):
            scores[i] += mean_pearson(Y[va], ridge_predict(Z_tr, Y[tr], Z_va, alpha=base * f, seed=seed))
    return float(factors[int(np.nanargmax(scores))]), over


def run_fold(X_train, Y_train, X_test, Y_test, *, seed: int, test_samples: np.ndarray,
             train_groups: np.ndarray, genes: Sequence[str] | None = None, variants: bool = True) -> list[dict]:
    """One fold: the HEST protocol and (``variants``) both variants, one dict per method.

    ``undefined_genes`` lists the genes whose r is undefined (constant targets or predictions in the
    test spots): the fold's score is then NaN, as in HEST, and results.md names the fold."""
    genes = list(genes) if genes is not None else [f"gene{j}" for j in range(Y_train.shape[1])]
    Z_train, Z_test = reduce(X_train, X_test, seed=seed)
    alpha = hest_alpha(Z_train.shape[1], Y_train.shape[1])
    P = ridge_predict(Z_train, Y_train, Z_test, alpha=alpha, seed=seed)
    common = {"n_train": len(Y_train), "n_test": len(Y_test), "n_genes": Y_train.shape[1],
              "pca_components": Z_train.shape[1]}

    def scored(method, P, **extra):
        r, undefined = hest_pearson(Y_test, P, genes)
        return {"method": method, "pearson": r, **extra, **common, "undefined_genes": ";".join(undefined)}

    rows = [scored("hest", P, alpha=alpha)]
    if not variants:
        return rows
    factor, over = cv_alpha(X_train, Y_train, train_groups, seed=seed)
    rows.append(scored("cv-alpha", ridge_predict(Z_train, Y_train, Z_test, alpha=alpha * factor, seed=seed),
                       alpha=alpha * factor, inner_cv=over))
    per, undefined = [], {}
    for s in dict.fromkeys(test_samples):
        sel = test_samples == s
        r, bad = hest_pearson(Y_test[sel], P[sel], genes)
        per.append(r)
        undefined.update(dict.fromkeys(f"{g}@{s}" for g in bad))
    rows.append({"method": "per-slide", "pearson": float(np.mean(per)), "alpha": alpha, "n_test_slides": len(per),
                 **common, "undefined_genes": ";".join(undefined)})
    return rows


# ----------------------------------------------------------------------------- inputs


@dataclass
class Sample:
    """One slide of a task: where its patches and expression come from."""

    sample_id: str
    patient: str
    patches: Path | None = None  # HEST layout: the patch .h5
    expr: Path | None = None  # HEST layout: the .h5ad
    slide_id: str | None = None  # corpus: the slide


@dataclass
class Task:
    name: str
    genes: list[str]
    samples: dict[str, Sample]
    folds: list[tuple[str, list[str], list[str]]]  # (fold name, train sample ids, test sample ids)
    source: str  # "hest" or "corpus"
    corpus: object = None
    expression: dict = field(default_factory=dict)  # corpus: sample -> (barcodes, counts of the genes)
    notes: list = field(default_factory=list)  # what results.md should say about the task's inputs


def task_folders(bench_dir: Path) -> list[Path]:
    """``bench_dir`` itself when it is a task folder (has ``splits/``), else its task subfolders."""
    bench_dir = Path(bench_dir)
    if not bench_dir.is_dir():
        raise EvaluateError(f"--bench-dir {bench_dir}: no such folder; give a HEST-Benchmark task folder (with "
                            "splits/) or a folder of them")
    if (bench_dir / "splits").is_dir():
        return [bench_dir]
    found = sorted(p for p in bench_dir.iterdir() if p.is_dir() and (p / "splits").is_dir())
    if not found:
        raise EvaluateError(f"--bench-dir {bench_dir}: no splits/ folder in it or in its subfolders; give a "
                            "HEST-Benchmark task folder (splits/train_K.csv, splits/test_K.csv, var_50genes.json)")
    return found


def _read_split(path: Path):
    import pandas as pd

    try:
        df = pd.read_csv(path)
    except (OSError, ValueError) as e:
        raise EvaluateError(f"{path}: not a readable CSV ({e}); HEST split files list sample_id, patches_path, "
                            "expr_path") from None
    missing = [c for c in SPLIT_COLUMNS if c not in df.columns]
    if missing or df.empty:
        raise EvaluateError(f"{path}: {'no rows' if df.empty else 'no column ' + ', '.join(missing)}; HEST split files "
                            f"list {', '.join(SPLIT_COLUMNS)} (one row per sample)")
    return df


def read_task(folder: Path) -> Task:
    """A HEST-Benchmark task folder, checked: every split file paired, every file present, genes listed."""
    folder = Path(folder)
    splits = folder / "splits"
    found: dict[str, dict[int, Path]] = {"train": {}, "test": {}}
    for p in splits.glob("*.csv"):
        m = re.fullmatch(r"(train|test)_(\d+)\.csv", p.name)
        if m:
            found[m.group(1)][int(m.group(2))] = p
    if not found["train"] and not found["test"]:
        raise EvaluateError(f"{splits}: no train_K.csv / test_K.csv split files; a HEST-Benchmark task has one pair "
                            "per fold")
    for have, need in (("train", "test"), ("test", "train")):
        for k in sorted(found[have]):
            if k not in found[need]:
                raise EvaluateError(f"{splits / f'{need}_{k}.csv'}: missing (there is {have}_{k}.csv); every fold "
                                    "needs both split files")
    gene_file = folder / GENE_LIST
    try:
        genes = json.loads(gene_file.read_text())["genes"]
        if not isinstance(genes, list) or not genes or not all(isinstance(g, str) for g in genes):
            raise ValueError("'genes' must be a non-empty list of gene names")
    except FileNotFoundError:
        raise EvaluateError(f"{gene_file}: missing; a HEST-Benchmark task lists its target genes there "
                            '({"genes": [...]})') from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EvaluateError(f'{gene_file}: not a gene list ({e}); expected {{"genes": ["GENE1", ...]}}') from None
    notes = []
    if len(set(genes)) < len(genes):
        notes.append(f"{folder.name}: {gene_file.name} lists {len(genes)} names but {len(set(genes))} distinct genes; "
                     "each gene is scored once (duplicates dropped)")
        genes = list(dict.fromkeys(genes))
    samples: dict[str, Sample] = {}
    folds = []
    for k in sorted(found["train"]):
        ids = {}
        for part in ("train", "test"):
            df = _read_split(found[part][k])
            patient_col = "patient" if "patient" in df.columns else "sample_id"
            ids[part] = []
            for _, r in df.iterrows():
                sid = str(r["sample_id"])
                s = Sample(sid, str(r[patient_col]), folder / str(r["patches_path"]), folder / str(r["expr_path"]))
                for f, what in ((s.patches, "patch .h5"), (s.expr, ".h5ad")):
                    if not f.is_file():
                        raise EvaluateError(f"{found[part][k]}: sample {sid}'s {what} {f} does not exist; fix the "
                                            "path (relative to the task folder) or download the task again")
                samples.setdefault(sid, s)
                ids[part].append(sid)
        if set(ids["train"]) & set(ids["test"]):
            raise EvaluateError(f"{found['test'][k]}: samples {sorted(set(ids['train']) & set(ids['test']))} are in "
                                f"both the training and the test split of fold {k}")
        folds.append((f"split{k}", ids["train"], ids["test"]))
    return Task(folder.name, list(genes), samples, folds, "hest", notes=notes)


def _decode(values) -> np.ndarray:
    flat = np.asarray(values).reshape(-1)
    return np.array([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in flat], dtype=object)


def read_patches(path: Path, batch: int):
    """(n, barcodes, coords, iterator over uint8 image batches) of a HEST patch .h5."""
    import h5py

    try:
        fh = h5py.File(path, "r")
    except OSError as e:
        raise EvaluateError(f"{path}: not a readable HDF5 patch file ({e}); download the task again") from None
    with fh:
        missing = [k for k in ("img", "barcode", "coords") if k not in fh]
        if missing:
            raise EvaluateError(f"{path}: no dataset {', '.join(missing)}; a HEST patch file holds img (N, 224, 224, "
                                "3), barcode and coords")
        _check_images(path, fh["img"])
        n = fh["img"].shape[0]
        barcodes, coords = _decode(fh["barcode"][()]), np.asarray(fh["coords"][()])
        if len(barcodes) != n:
            raise EvaluateError(f"{path}: {n} images but {len(barcodes)} barcodes; the patch file is inconsistent")
    def batches():
        with h5py.File(path, "r") as f:
            for a in range(0, n, batch):
                yield np.asarray(f["img"][a:a + batch])
    return n, barcodes, coords, batches()


def _check_images(path: Path, img) -> None:
    """HEST patch images are uint8 RGB (N, H, W, 3): anything else is refused before it is embedded (a float
    array would be cast to uint8 silently, a wrong shape fails deep in the encoder's transform)."""
    shape = tuple(img.shape)
    if len(shape) != 4 or shape[-1] != 3 or min(shape[1:3], default=0) < 1:
        raise EvaluateError(f"{path}: img has shape {shape}; a HEST patch file holds RGB patches (N, 224, 224, 3)")
    if img.dtype != np.uint8:
        raise EvaluateError(f"{path}: img is {img.dtype}; HEST patch images are uint8 (0-255) RGB, convert them "
                            "(np.uint8) or download the task again")


def patch_barcodes(path: Path) -> np.ndarray:
    """The barcodes of a HEST patch .h5, its images' shape and dtype checked, without reading them."""
    import h5py

    try:
        with h5py.File(path, "r") as fh:
            if "barcode" not in fh or "img" not in fh:
                raise EvaluateError(f"{path}: no dataset {'barcode' if 'barcode' not in fh else 'img'}; a HEST patch "
                                    "file holds img (N, 224, 224, 3), barcode and coords")
            _check_images(path, fh["img"])
            return _decode(fh["barcode"][()])
    except OSError as e:
        raise EvaluateError(f"{path}: not a readable HDF5 patch file ({e}); download the task again") from None


def _missing(s: Sample, barcodes, genes: Sequence[str], obs, var) -> None:
    obs = set(obs)
    missing = [b for b in barcodes if b not in obs]
    if missing:
        raise EvaluateError(f"{s.expr}: {len(missing)} of sample {s.sample_id}'s {len(barcodes)} patch barcodes are "
                            f"not in its .h5ad (e.g. {missing[0]!r}); the patch .h5 and the .h5ad must come from the "
                            "same sample")
    var = set(var)
    absent = [g for g in genes if g not in var]
    if absent:
        raise EvaluateError(f"{s.expr}: {len(absent)} genes of {GENE_LIST} are not in sample {s.sample_id}'s .h5ad "
                            f"(e.g. {', '.join(absent[:3])}); the gene list and the expression files disagree")


def check_task_files(task: Task) -> None:
    """Every sample's patch barcodes are in its .h5ad and every listed gene is in it: checked from the
    files' indexes before any patch is embedded (a wrong layout fails in seconds, not after hours)."""
    import anndata as ad

    for s in task.samples.values():
        barcodes = patch_barcodes(s.patches)
        try:
            a = ad.read_h5ad(s.expr, backed="r")
        except (OSError, ValueError, KeyError) as e:
            raise EvaluateError(f"{s.expr}: not a readable .h5ad ({e}); download the task again") from None
        try:
            _missing(s, barcodes, task.genes, a.obs_names.astype(str), a.var_names.astype(str))
        finally:
            a.file.close()


def read_expression(path: Path, barcodes: np.ndarray, genes: Sequence[str], sample_id: str) -> np.ndarray:
    """log1p of the raw counts of ``genes`` at ``barcodes`` (patch order), float64 (HEST's targets)."""
    import anndata as ad
    import scipy.sparse as sp

    try:
        adata = ad.read_h5ad(path)
    except (OSError, ValueError, KeyError) as e:
        raise EvaluateError(f"{path}: not a readable .h5ad ({e}); download the task again") from None
    obs = {b: i for i, b in enumerate(adata.obs_names.astype(str))}
    var = {g: i for i, g in enumerate(adata.var_names.astype(str))}
    _missing(Sample(sample_id, "", expr=Path(path)), barcodes, genes, obs, var)
    X = adata.X[np.array([obs[b] for b in barcodes])][:, np.array([var[g] for g in genes])]
    X = X.toarray() if sp.issparse(X) else np.asarray(X)
    return np.log1p(X.astype(np.float64))


# ----------------------------------------------------------------------------- corpus input


def gene_names(symbols: Sequence[str], ids: Sequence[str]) -> np.ndarray:
    """One name per vocabulary gene, as HEST names genes: the symbol, or the Ensembl id where the symbol is
    empty or shared by two vocabulary genes (HEST's var names are unique symbols)."""
    symbols = np.asarray(symbols).astype(str)
    ids = np.asarray(ids).astype(str)
    uniq, counts = np.unique(symbols, return_counts=True)
    shared = set(uniq[counts > 1])
    return np.array([i if (not s or s in shared) else s for s, i in zip(symbols, ids)], dtype=object)


def hest_genes(counts, slide_ids: np.ndarray, names: Sequence[str], *, n_top: int = N_GENES,
               min_fraction: float = MIN_SPOT_FRACTION) -> np.ndarray:
    """Column indices of the genes HEST's ``get_k_genes`` (criteria "var") picks, in its order.

    HEST's rule, step by step: per slide, genes with a count in at least ``ceil(min_fraction * n_spots)``
    spots (scanpy ``filter_genes(min_cells=...)``, the same float product); the genes passing in EVERY
    slide, ordered by name (``np.intersect1d`` sorts; one slide keeps its own order); names containing
    ``BLANK`` or ``Control`` dropped; the raw counts of all spots stacked, float32, ``log1p``; scanpy
    ``highly_variable_genes(n_top_genes=n_top)`` (Seurat flavour, no batch key); the first ``n_top`` flagged
    genes in that order. Counts stay sparse here (HEST stacks a dense frame): same numbers, bounded memory."""
    import warnings

    import anndata as ad
    import scanpy as sc
    import scipy.sparse as sp

    counts = sp.csr_matrix(counts)
    slide_ids = np.asarray(slide_ids).astype(str)
    names = np.asarray(names).astype(str)
    keep = np.ones(counts.shape[1], bool)
    for s in dict.fromkeys(slide_ids):
        rows = counts[np.flatnonzero(slide_ids == s)]
        keep &= np.asarray((rows > 0).sum(axis=0)).reshape(-1) >= np.ceil(min_fraction * rows.shape[0])
    keep &= np.array([not any(m in n for m in CONTROL_MARKERS) for n in names])
    cand = np.flatnonzero(keep)
    if len(set(slide_ids)) > 1:
        cand = cand[np.argsort(names[cand], kind="stable")]
    if cand.size < 2:
        raise EvaluateError(f"only {cand.size} genes are detected in >= {min_fraction:.0%} of the spots of every "
                            "slide; HEST's gene rule needs more (slides with deeper coverage, or fewer slides)")
    adata = ad.AnnData(X=sp.csr_matrix(counts[:, cand], dtype=np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.log1p(adata)
        sc.pp.highly_variable_genes(adata, n_top_genes=int(n_top))
    return cand[np.flatnonzero(adata.var["highly_variable"].to_numpy())[:n_top]]


def _slide_patients(corpus, ev, column: str) -> dict[str, str]:
    slides = corpus.slides
    if column in slides.columns:
        return dict(zip(slides["slide_id"].astype(str), slides[column].astype(str)))
    if column in corpus.annotation_columns:
        out = {}
        for table in corpus.iter_slides(columns=[column]):
            vals = {v for v in table.column(column).to_pylist() if v is not None}
            sid = table.column("slide_id")[0].as_py() if table.num_rows else None
            if sid is None:
                continue
            if len(vals) != 1:
                raise EvaluateError(f"--patient {column}: slide {sid} has {len(vals)} values of it; a patient column "
                                    "holds one value per slide")
            out[sid] = vals.pop()
        return out
    raise EvaluateError(f"{corpus.root}: no slide column or annotation column {column!r} (slide columns: "
                        f"{', '.join(slides.columns)}; annotation columns: "
                        f"{', '.join(corpus.annotation_columns) or 'none'}); pass --patient slide_id for one "
                        "patient per slide")


def corpus_task(data, patient: str) -> Task:
    """A paired corpus as one HEST task: samples = slides with patches, folds = leave one patient out."""
    from spavis.format import open_corpus

    from stamp.evaluate.data import load_eval_data
    from stamp.evaluate.features import image_spots

    corpus = open_corpus(data)
    ev = load_eval_data(corpus)
    ev = ev.subset(image_spots(corpus, ev))
    if ev.n_spots == 0:
        raise EvaluateError(f"{data}: no spot has an H&E patch; rebuild the corpus with --with-images")
    patients = _slide_patients(corpus, ev, patient) if patient != "slide_id" else {s: s for s in ev.slides}
    order = list(dict.fromkeys(patients[s] for s in ev.slides))
    if len(order) < 2:
        raise EvaluateError(f"--patient {patient}: every slide belongs to one patient ({order[0]}); "
                            "leave-one-patient-out needs slides of at least two patients")
    names = gene_names(ev.gene_symbols, ev.gene_ids)
    keep = hest_genes(ev.counts, ev.slide_ids, names)
    genes = [str(names[i]) for i in keep]
    samples, expression = {}, {}
    for s in ev.slides:
        sel = ev.slide_ids == s
        samples[s] = Sample(s, patients[s], slide_id=s)
        X = ev.counts[np.flatnonzero(sel)][:, keep].toarray().astype(np.float64)
        expression[s] = (ev.spot_ids[sel].astype(str), np.log1p(X))
    folds = [(f"patient-{p}", [s for s in ev.slides if patients[s] != p], [s for s in ev.slides if patients[s] == p])
             for p in order]
    return Task(Path(str(data)).name or "corpus", genes, samples, folds, "corpus", corpus=corpus,
                expression=expression)


# ----------------------------------------------------------------------------- embeddings (cached)


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def _model_stamp(model: str, weights: str | os.PathLike | None = None) -> str:
    """What identifies the weights of ``model`` for the cache: the path and its weight file's size + mtime
    (``weights``: the files of a zoo name downloaded by hand, identified the same way)."""
    if weights is not None:
        w = Path(weights).resolve()
        files = sorted(f for f in w.rglob("*") if f.is_file()) if w.is_dir() else [w]
        return model + "|" + ";".join(f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    p = Path(model)
    if p.exists():
        p = p.resolve()
        w = model_folder_of(p) / "model.safetensors"
        if w.is_file():
            st = w.stat()
            return f"{w}:{st.st_size}:{st.st_mtime_ns}"
        return str(p)
    return model


def _source_stamp(task: Task, s: Sample) -> str:
    if s.patches is not None:
        st = s.patches.stat()
        return f"{s.patches.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return f"{task.corpus.root}:{task.corpus.manifest.get('build_key', '')}:{s.slide_id}"


def read_embeddings(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(embeddings, barcodes, coords) of a cached per-sample ``.h5``."""
    import h5py

    with h5py.File(path, "r") as f:
        return np.asarray(f["embeddings"][()]), _decode(f["barcodes"][()]), np.asarray(f["coords"][()])


def _write_embeddings(path: Path, emb: np.ndarray, barcodes, coords, attrs: dict) -> None:
    """One sample's embeddings, written by the one embeddings writer (stamp.embed.writer.write_h5)."""
    from stamp.embed.writer import write_h5

    write_h5(path, {"embeddings": emb.astype(np.float32), "barcodes": np.asarray([str(b) for b in barcodes],
                                                                                  dtype=object),
                    "coords": np.asarray(coords)}, attrs)


def _cached(path: Path, attrs: dict) -> bool:
    import h5py

    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            return all(str(f.attrs.get(k, "")) == str(v) for k, v in attrs.items()) and "embeddings" in f
    except OSError:
        return False


def _corpus_images(task: Task, s: Sample, batch: int):
    """(n, barcodes = spot ids, coords = pixel positions, image batches) of one corpus slide."""
    from stamp.data.paired import decode_png

    barcodes, _ = task.expression[s.sample_id]
    pos = {b: i for i, b in enumerate(barcodes)}
    images: list = [None] * len(barcodes)
    for table in task.corpus.iter_paired(columns=["spot_id", "patch"], slide_ids=[s.slide_id]):
        for sid, patch in zip(table.column("spot_id").to_pylist(), table.column("patch").to_pylist()):
            if sid in pos:
                images[pos[sid]] = patch
    coords = np.zeros((len(barcodes), 2), np.float64)
    for table in task.corpus.iter_slides(columns=["spot_id", "pxl_col", "pxl_row"], slide_ids=[s.slide_id]):
        for sid, x, y in zip(table.column("spot_id").to_pylist(), table.column("pxl_col").to_pylist(),
                             table.column("pxl_row").to_pylist()):
            if sid in pos:
                coords[pos[sid]] = (np.nan if x is None else x, np.nan if y is None else y)

    def batches():
        for a in range(0, len(images), batch):
            yield np.stack([decode_png(v) for v in images[a:a + batch]])
    return len(barcodes), np.asarray(barcodes, dtype=object), coords, batches()


def sample_embeddings(task: Task, model: str, name: str, out: Path, *, encoder_fn: Callable, batch_size: int,
                      progress=None, weights: str | os.PathLike | None = None) -> dict[str, Path]:
    """Every sample's embedding file for ``model`` (computed when not cached); ``encoder_fn()`` loads the
    encoder lazily (a fully cached run never loads it); ``weights``: its files downloaded by hand, if any."""
    from stamp.evaluate.features import embed_pixels, image_side

    files, state = {}, {}
    for sid, s in task.samples.items():
        path = out / "embeddings" / _safe(task.name) / _safe(name) / f"{_safe(sid)}.h5"
        attrs = {"model": model, "model_stamp": _model_stamp(model, weights), "source": _source_stamp(task, s),
                 "features": "image side before any projection (stamp.evaluate.features.image_side)"}
        files[sid] = path
        if _cached(path, attrs):
            if progress:
                progress(1)
            continue
        if "enc" not in state:
            from stamp.embed.writer import model_record

            enc = encoder_fn()
            if enc.kind == "gene":
                raise EvaluateError(f"{model}: a gene encoder; hest-bench predicts expression from H&E patches, so "
                                    "it scores image encoders and aligned models (their image side)")
            state["enc"], state["fn"] = enc, image_side(enc, model, "image")
            state["record"] = json.dumps(model_record(enc, model, "hest-bench image side"), sort_keys=True)
        enc = state["enc"]
        if s.patches is not None:
            n, barcodes, coords, batches = read_patches(s.patches, batch_size)
        else:
            n, barcodes, coords, batches = _corpus_images(task, s, batch_size)
        parts = [embed_pixels(state["fn"], enc.transform, imgs, device=enc.device) for imgs in batches]
        emb = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
        attrs["provenance"] = state["record"]
        _write_embeddings(path, emb, barcodes, coords, attrs)
        if progress:
            progress(1)
    return files


def _assemble(task: Task, files: dict[str, Path], ids: Sequence[str], cache: dict):
    """(X, Y, sample of every row, patient of every row) of the samples ``ids`` (split order)."""
    X, Y, who, pat = [], [], [], []
    for sid in ids:
        if sid not in cache:
            emb, barcodes, _ = read_embeddings(files[sid])
            s = task.samples[sid]
            if task.source == "hest":
                y = read_expression(s.expr, barcodes, task.genes, sid)
            else:
                bc, y = task.expression[sid]
                if list(bc) != list(barcodes):
                    raise EvaluateError(f"{files[sid]}: its barcodes do not match the corpus slide {sid}; delete the "
                                        "file and run again")
            if not np.isfinite(emb).all():
                raise EvaluateError(f"{files[sid]}: the embeddings of sample {sid} are not all finite (NaN / inf from "
                                    "the model); check the model's weights, then delete the file and run again")
            cache[sid] = (emb, y)
        emb, y = cache[sid]
        X.append(emb)
        Y.append(y)
        who += [sid] * len(emb)
        pat += [task.samples[sid].patient] * len(emb)
    return np.concatenate(X), np.concatenate(Y), np.array(who, dtype=object), np.array(pat, dtype=object)


def score_task(task: Task, name: str, files: dict[str, Path], *, seed: int, variants: bool = True,
               tick=None) -> list[dict]:
    """results.csv rows of one model on one task: every fold, the protocol and its variants."""
    rows, cache = [], {}
    for fold, train, test in task.folds:
        X_tr, Y_tr, _, pat_tr = _assemble(task, files, train, cache)
        X_te, Y_te, who_te, _ = _assemble(task, files, test, cache)
        for r in run_fold(X_tr, Y_tr, X_te, Y_te, seed=seed, test_samples=who_te, train_groups=pat_tr,
                          genes=task.genes, variants=variants):
            rows.append({"task": task.name, "model": name, "fold": fold, **r})
        if tick:
            tick()
    return rows


# ----------------------------------------------------------------------------- results


def summary(df):
    """Mean and population sd (HEST's np.mean / np.std) of the fold Pearsons per model x task x method, over
    every fold: a NaN fold makes the mean NaN, as in HEST (``n_nan`` counts them; results.md names them)."""
    import pandas as pd

    rows = []
    for (model, task, method), g in df.groupby(["model", "task", "method"], sort=False):
        v = g["pearson"].to_numpy(dtype=float)
        rows.append({"model": model, "task": task, "method": method, "n_folds": len(g),
                     "n_nan": int((~np.isfinite(v)).sum()), "pearson_mean": float(np.mean(v)),
                     "pearson_sd": float(np.std(v))})
    return pd.DataFrame(rows)


def _board(s):
    """model x method: the mean over tasks of the per-task means (HEST's average; NaN stays NaN)."""
    return s.groupby(["model", "method"], sort=False)["pearson_mean"].agg(
        lambda v: float(np.mean(v.to_numpy()))).unstack("method")


def _nan_folds(df) -> list[str]:
    """One line per fold without a score: which, and the genes without a defined Pearson r."""
    lines = []
    for _, r in df[~np.isfinite(df["pearson"].to_numpy(dtype=float))].iterrows():
        genes = [g for g in str(r.get("undefined_genes", "") or "").split(";") if g and g != "nan"]
        why = (f"{len(genes)} gene{'s' if len(genes) != 1 else ''} without a defined Pearson r, constant targets "
               f"or predictions in the test spots: {', '.join(genes[:5])}{' ...' if len(genes) > 5 else ''}"
               ) if genes else "no score"
        lines.append(f"- {r['model']} · {r['task']} · {r['method']} · {r['fold']}: NaN ({why})")
    return lines


def markdown(df, *, notes: Sequence[str]) -> str:
    s = summary(df)

    def cell(r) -> str:
        if np.isfinite(r["pearson_mean"]):
            return f"{r['pearson_mean']:.4f} ± {r['pearson_sd']:.4f}"
        return f"NaN ({r['n_nan']} of {r['n_folds']} folds NaN)" if r["n_nan"] else "n/a"

    lines = ["# stamp evaluate hest-bench", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["Methods: " + "; ".join(f"**{k}** = {v}" for k, v in METHODS.items() if k in set(s["method"])), ""]
    methods = [m for m in METHODS if m in set(s["method"])]
    lines += ["## Pearson r (mean ± sd over folds), one row per model × task", "",
              "| model | task | folds | " + " | ".join(methods) + " |", "|---|---|---|" + "---|" * len(methods)]
    for (model, task), g in s.groupby(["model", "task"], sort=False):
        by = {r["method"]: r for _, r in g.iterrows()}
        lines.append(f"| {model} | {task} | {int(g['n_folds'].max())} | "
                     + " | ".join(cell(by[m]) if m in by else "n/a" for m in methods) + " |")
    nan = _nan_folds(df)
    if nan:
        lines += ["", "## Folds without a score", "",
                  "As in HEST, a fold's score is the plain mean over genes and a task's score the plain mean over "
                  "folds: one undefined value makes them NaN (reported here, never dropped).", ""] + nan
    lines += ["", "## Leaderboard (mean over tasks of the per-task means; HEST's average)", "",
              "| rank | model | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    board = _board(s)
    board = board.sort_values("hest", ascending=False) if "hest" in board else board
    for i, (model, r) in enumerate(board.iterrows(), 1):
        lines.append(f"| {i} | {model} | " + " | ".join(f"{r[m]:.4f}" if np.isfinite(r[m]) else "NaN"
                                                      for m in methods) + " |")
    return "\n".join(lines) + "\n"


def leaderboard_figure(out: Path, df) -> Path:
    """Horizontal bars: each model's mean Pearson over tasks, one bar per method."""
    from stamp.evaluate.figures import _plt, _save

    plt = _plt()
    s = summary(df)
    board = _board(s)
    methods = [m for m in METHODS if m in board.columns]
    board = board.sort_values(methods[0])
    fig, ax = plt.subplots(figsize=(7, 0.6 + 0.5 * len(board) * max(1, len(methods)) / 2))
    h = 0.8 / len(methods)
    y = np.arange(len(board))
    for i, m in enumerate(methods):
        ax.barh(y + i * h, board[m].to_numpy(dtype=float), height=h, label=m)
    ax.set_yticks(y + h * (len(methods) - 1) / 2, list(board.index), fontsize=8)
    ax.set_xlabel("mean Pearson r over tasks (50 genes)")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"HEST-Benchmark: {', '.join(dict.fromkeys(s['task']))}", fontsize=9)
    return _save(fig, out / "leaderboard.png")


def hest_bench(models: Sequence[str], *, out, bench_dir=None, data=None, patient: str | None = None,
               seed: int = HEST_SEED, device: str | None = None, batch_size: int = 128, figures: bool = True,
               progress: bool = True, means=None, variants: bool = True, threads: int | None = None,
               weights: Mapping[str, str | os.PathLike] | None = None):
    """Run HEST-Benchmark for every model on the same splits; writes results.csv, results.md,
    leaderboard.png and the per-sample embeddings into ``out``; returns the fold-level frame.
    ``weights``: model (as given) -> the files of that zoo name downloaded by hand (``stamp.load(weights=)``)."""
    import pandas as pd

    from spavis.format.io import atomic_write_text
    from spavis.format.progress import counter
    from stamp.evaluate import output_folder, torch_threads
    from stamp.evaluate.features import default_device, load_encoder, model_names

    if not models:
        raise EvaluateError("hest-bench: give at least one --model (zoo name, model folder or Hub id)")
    if (bench_dir is None) == (data is None):
        raise EvaluateError("hest-bench: give either --bench-dir (HEST-Benchmark task folders) or --data (a paired "
                            "corpus, with --patient COLUMN)")
    if data is not None and not patient:
        raise EvaluateError("hest-bench --data: pass --patient COLUMN (the slide column naming each slide's patient; "
                            "slide_id for one patient per slide)")
    models = [str(m) for m in models]
    weights = {str(k): v for k, v in (weights or {}).items()}
    unknown = sorted(set(weights) - set(models))
    if unknown:
        raise EvaluateError(f"--weights for {', '.join(unknown)}, which is not among the --model given")
    names = model_names(models)
    tasks = [read_task(f) for f in task_folders(bench_dir)] if bench_dir is not None else [corpus_task(data, patient)]
    for t in tasks:
        if t.source == "hest":
            check_task_files(t)
    device = device or default_device()
    notes = [f"input: {'HEST-Benchmark task folders in ' + str(bench_dir) if bench_dir is not None else 'corpus ' + str(data) + ', leave-one-patient-out by ' + str(patient)}",
             f"tasks: {', '.join(f'{t.name} ({len(t.samples)} samples, {len(t.folds)} folds, {len(t.genes)} genes)' for t in tasks)}",
             f"features: each model's image side before any projection, float32; StandardScaler + "
             f"PCA(min({N_COMPONENTS}, n_train, n_features), random_state={seed}) fit on the training split, "
             f"components rounded to float32; Ridge(lsqr, fit_intercept=False, max_iter={MAX_ITER}) in float64 "
             f"(as HEST's torch.Tensor reaches sklearn); seed {seed}; device {device}",
             "targets: log1p of raw counts (no per-spot normalisation, as HEST)",
             "score: plain mean of the per-gene Pearson r, then mean ± population sd over folds (HEST's np.mean / "
             "np.std: a NaN is reported, never dropped)"]
    if data is not None:
        notes.append(f"genes: HEST's get_k_genes rule on the corpus ({len(tasks[0].genes)} genes, written to "
                     f"{GENE_LIST}): detected in >= {MIN_SPOT_FRACTION:.0%} of the spots of every slide, names with "
                     f"{' / '.join(CONTROL_MARKERS)} dropped, Seurat HVGs of log1p counts, in name order")
    notes += [n for t in tasks for n in t.notes]
    rows = []
    with output_folder(Path(out)) as out, counter(enabled=progress, elapsed=True) as bar, torch_threads(threads):
        if data is not None:  # the gene list used, where HEST keeps it (a task folder's var_50genes.json)
            atomic_write_text(out / GENE_LIST, json.dumps({"genes": tasks[0].genes}) + "\n")
        for model, name in zip(models, names):
            enc_holder: dict = {}

            def load(model=model):
                if "enc" not in enc_holder:
                    enc_holder["enc"] = load_encoder(model, device, means, weights=weights.get(model))
                return enc_holder["enc"]
            for task in tasks:
                ptask = bar.add_task(f"{name} · {task.name}", total=len(task.samples) + len(task.folds))
                files = sample_embeddings(task, model, name, out, encoder_fn=load, batch_size=batch_size,
                                          progress=lambda n, p=ptask: bar.advance(p, n), weights=weights.get(model))
                rows += score_task(task, name, files, seed=seed, variants=variants,
                                   tick=lambda p=ptask: bar.advance(p))
            enc_holder.clear()
        df = pd.DataFrame(rows)
        cols = ["task", "model", "method", "fold", "pearson", "alpha", "n_train", "n_test", "n_genes", "pca_components"]
        df = df[cols + [c for c in df.columns if c not in cols]]
        atomic_write_text(out / "results.csv", df.to_csv(index=False, float_format="%.8g"))
        atomic_write_text(out / "results.md", markdown(df, notes=notes))
        if figures:
            leaderboard_figure(out, df)
    return df
