"""``stamp evaluate hest-bench`` against an independent reference written from HEST's own code path.

The task folders are GENERATED in HEST's published layout (splits/train_K.csv + test_K.csv with
sample_id, patches_path, expr_path; patches/*.h5 with img, barcode, coords; adata/*.h5ad raw counts;
var_50genes.json); patch textures and counts depend on the same hidden domain, so expression is
predictable from the images.

The reference follows HEST's benchmark.py / trainer.py step by step and dtype by dtype (read at
mahmoodlab/HEST afd42c3, re-written here, not copied): targets through scanpy (``adata[barcodes][:, genes]``,
float64, ``sc.pp.log1p``); ``Pipeline(StandardScaler, PCA(256, random_state=seed))`` on the float32
embeddings; both outputs wrapped in ``torch.Tensor`` and handed to sklearn's ``Ridge(lsqr)`` as HEST hands
them (sklearn then works in float64); ``scipy.stats.pearsonr`` per gene; ``np.mean`` over genes and folds
(NaN stays NaN), ``np.std`` over folds. It never calls stamp's protocol code. ``reference_genes`` is HEST's
``get_k_genes`` rule written the same way (scanpy on dense per-slide frames).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.stats

ROOT = Path(__file__).resolve().parents[1]
N_GENES, N_EXTRA = 50, 10
SAMPLES = {"S1": 36, "S2": 30, "S3": 34, "S4": 28}
FOLDS = [(["S1", "S2"], ["S3", "S4"]), (["S3", "S4"], ["S1", "S2"])]
SEED = 1
NAN_GENE = "GENE049"  # task TOYNAN: zero in S3 and S4, so fold split0's test spots have it constant
NAN_SAMPLES = {"S1": 12, "S2": 10, "S3": 11, "S4": 9}  # small: only its NaN bookkeeping is tested
NAN_FOLDS = [(["S1", "S2"], ["S3", "S4"]), (["S1", "S3"], ["S2", "S4"])]  # split1: defined (S1 trains it)


def stamp_cli(*args, timeout: int = 300, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **(env_extra or {})}
    env.pop("STAMP_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "stamp.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def one_line_error(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 1 and "Traceback" not in res.stderr + res.stdout, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    return lines[0]


def write_task(folder: Path, *, seed: int = 0, zero_gene_in: tuple[str, ...] = (), gene_list=None,
               folds=FOLDS, samples=SAMPLES) -> Path:
    """A GENERATED HEST-Benchmark task folder (4 samples, 2 folds of 2 train / 2 test samples)."""
    import anndata as ad
    from paired_helpers import domain_texture

    rng = np.random.default_rng(seed)
    genes = [f"GENE{i:03d}" for i in range(N_GENES + N_EXTRA)]
    profile = rng.gamma(2.0, 2.0, size=(3, len(genes)))  # per-domain mean counts
    (folder / "splits").mkdir(parents=True)
    (folder / "patches").mkdir()
    (folder / "adata").mkdir()
    for sid, n in samples.items():
        domains = rng.integers(0, 3, n)
        barcodes = [f"{sid}-{i:04d}-1" for i in range(n)]
        imgs = np.stack([domain_texture(int(d), rng, size=224, n_domains=3) for d in domains])
        with h5py.File(folder / "patches" / f"{sid}.h5", "w") as f:
            f["img"] = imgs
            f["barcode"] = np.array([[b.encode()] for b in barcodes])  # (N, 1) bytes, as HEST writes it
            f["coords"] = rng.integers(0, 10000, (n, 2))
        counts = rng.poisson(profile[domains] * rng.uniform(0.5, 1.5, (n, 1)))
        if sid in zero_gene_in:
            counts[:, genes.index(NAN_GENE)] = 0
        extra = rng.poisson(1.0, (5, len(genes)))  # spots without a patch: in the .h5ad, never looked up
        order = rng.permutation(n + 5)  # the .h5ad's own spot order differs from the patch order
        obs = np.array(barcodes + [f"{sid}-x{i}-1" for i in range(5)])[order]
        X = np.concatenate([counts, extra])[order].astype(np.float32)
        var_order = rng.permutation(len(genes))
        a = ad.AnnData(X=X[:, var_order], obs=pd.DataFrame(index=obs),
                       var=pd.DataFrame(index=np.array(genes)[var_order]))
        a.write_h5ad(folder / "adata" / f"{sid}.h5ad")
    for k, (train, test) in enumerate(folds):
        for part, ids in (("train", train), ("test", test)):
            pd.DataFrame({"sample_id": ids, "patches_path": [f"patches/{s}.h5" for s in ids],
                          "expr_path": [f"adata/{s}.h5ad" for s in ids]}).to_csv(
                folder / "splits" / f"{part}_{k}.csv", index=False)
    (folder / "var_50genes.json").write_text(json.dumps({"genes": gene_list or genes[:N_GENES]}))
    return folder


def tiny_model(folder: Path) -> Path:
    import torch

    from stamp.models.aligned_model import StampModel, StampModelConfig
    from stamp.models.gene_encoder import StampConfig

    torch.manual_seed(0)
    gene = StampConfig(n_genes=20, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                       context_length=16, heads=False)
    StampModel(StampModelConfig(gene=gene, vision="tiny", embed_dim=8)).save_pretrained(folder)
    return folder


def tiny_uni_by_hand(root: Path) -> tuple[Path, Path]:
    """(a $STAMP_REGISTRY overlay making the zoo's gated ``uni`` a 1-layer, width-32 ViT, its random weights in a
    folder as downloaded by hand): a zoo name that can only run from ``--weights``."""
    import timm
    import torch
    from importlib import resources
    from safetensors.torch import save_file

    entry = json.loads((resources.files("stamp.zoo") / "pretrained.json").read_text())["models"]["uni"]
    kwargs = {**entry["architecture"]["kwargs"], "embed_dim": 32, "depth": 1, "num_heads": 2}
    entry = {**entry, "architecture": {**entry["architecture"], "kwargs": kwargs}, "embed_dim": 32}
    (root / "registry.json").write_text(json.dumps({"models": {"uni": entry}}))
    torch.manual_seed(0)
    model = timm.create_model(entry["architecture"]["name"], pretrained=False, **kwargs)
    (root / "uni").mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "uni" / "model.safetensors"))
    return root / "registry.json", root / "uni"


# ----------------------------------------------------------------------------- the reference: HEST's code path


def reference_targets(task: Path, sid: str, barcodes: list[str], genes: list[str]) -> np.ndarray:
    """HEST's load_adata(normalize=True): adata[barcodes][:, genes], X as float64, sc.pp.log1p, to_df()."""
    import scanpy as sc

    adata = sc.read_h5ad(task / "adata" / f"{sid}.h5ad")
    adata = adata[barcodes]
    adata = adata[:, genes].copy()
    adata.X = adata.X.astype(np.float64)
    sc.pp.log1p(adata)
    return adata.to_df().values


def reference_split(X_train, X_test, y_train, y_test, *, seed, alpha_factor=1.0, ridge_dtype=None):
    """HEST's predict_single_split after loading + train_test_reg(method="ridge"): (pearson_mean, preds).

    PCA asks for 256 components as HEST does, or all that sklearn allows (n_train, n_features) when the data
    are smaller (HEST would stop with an error there). ``ridge_dtype`` (float32) replays stamp's former bug."""
    import torch
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    pipe = Pipeline([("scaler", StandardScaler()),
                     ("PCA", PCA(n_components=min(256, *X_train.shape), random_state=seed))])
    X_train, X_test = torch.Tensor(pipe.fit_transform(X_train)), torch.Tensor(pipe.transform(X_test))
    if ridge_dtype is not None:
        X_train, X_test = X_train.numpy().astype(ridge_dtype), X_test.numpy().astype(ridge_dtype)
    alpha = 100 / (X_train.shape[1] * y_train.shape[1]) * alpha_factor
    reg = Ridge(solver="lsqr", alpha=alpha, random_state=seed, fit_intercept=False, max_iter=1000)
    reg.fit(X_train, y_train)
    preds = reg.predict(X_test)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's ConstantInputWarning: the r is NaN, as in HEST
        corrs = [scipy.stats.pearsonr(y_test[:, j], preds[:, j])[0] for j in range(y_test.shape[1])]
    return float(np.mean(corrs)), preds


def reference_per_slide(y_test, preds, who) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(np.mean([np.mean([scipy.stats.pearsonr(y_test[who == s, j], preds[who == s, j])[0]
                                       for j in range(y_test.shape[1])]) for s in dict.fromkeys(who)]))


def reference_genes(slides: list[pd.DataFrame], k: int = 50, min_cells_pct: float = 0.10) -> list[str]:
    """HEST's get_k_genes(criteria="var"): per-slide filter_genes(min_cells=ceil(pct * n)), np.intersect1d of
    the names, BLANK / Control names dropped, raw counts stacked as float32, log1p, Seurat HVGs, first k."""
    import anndata as ad
    import scanpy as sc

    common = None
    for df in slides:
        a = ad.AnnData(df)
        sc.pp.filter_genes(a, min_cells=np.ceil(min_cells_pct * len(a.obs)))
        names = np.array(a.to_df().columns)
        common = names if common is None else np.intersect1d(common, names)
    common = [g for g in common if "BLANK" not in g and "Control" not in g]
    stacked = ad.AnnData(pd.concat([df[common] for df in slides]).astype(np.float32))
    sc.pp.filter_genes(stacked, min_cells=0)
    sc.pp.log1p(stacked)
    sc.pp.highly_variable_genes(stacked, n_top_genes=k)
    return stacked.var_names[stacked.var["highly_variable"]][:k].tolist()


def reference_task(task: Path, emb: dict[str, np.ndarray], bcs: dict[str, list[str]], *, seed: int, folds=FOLDS):
    """Per fold: (HEST's pearson_mean, per-slide mean, and the inputs for a cv-alpha replay). A gene listed
    twice is scored once (stamp's decision; HEST would count it twice)."""
    genes = list(dict.fromkeys(json.loads((task / "var_50genes.json").read_text())["genes"]))
    Y = {s: reference_targets(task, s, bcs[s], genes) for s in emb}
    out = []
    for train, test in folds:
        X_tr, X_te = np.concatenate([emb[s] for s in train]), np.concatenate([emb[s] for s in test])
        Y_tr, Y_te = np.concatenate([Y[s] for s in train]), np.concatenate([Y[s] for s in test])
        who = np.concatenate([[s] * len(emb[s]) for s in test])
        pooled, preds = reference_split(X_tr, X_te, Y_tr, Y_te, seed=seed)
        out.append((pooled, reference_per_slide(Y_te, preds, who), (X_tr, X_te, Y_tr, Y_te)))
    return out


def cached_embeddings(out: Path, task: str, model: str, samples=SAMPLES):
    emb, bcs = {}, {}
    for s in samples:
        with h5py.File(out / "embeddings" / task / model / f"{s}.h5", "r") as f:
            emb[s] = f["embeddings"][()]
            bcs[s] = [b.decode() if isinstance(b, bytes) else str(b) for b in f["barcodes"][()]]
            assert f["coords"].shape == (samples[s], 2) and emb[s].dtype == np.float32
    return emb, bcs


# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """One CLI run over two tasks: TOY (clean) and TOYNAN (NAN_GENE zero in S3 + S4, so split0 has no
    defined Pearson for it; a gene list with 5 names repeated)."""
    root = tmp_path_factory.mktemp("hest")
    task = write_task(root / "bench" / "TOY")
    genes = [f"GENE{i:03d}" for i in range(N_GENES)]
    write_task(root / "bench" / "TOYNAN", zero_gene_in=("S3", "S4"), gene_list=genes + genes[:5], folds=NAN_FOLDS,
               samples=NAN_SAMPLES)
    model = tiny_model(root / "run" / "model")
    registry, uni = tiny_uni_by_hand(root)
    out = root / "ev"
    # a gated zoo name offline with an empty cache: only --weights MODEL=PATH can make it run
    res = stamp_cli("evaluate", "hest-bench", "--model", model.parent, "--model", "uni", "--weights", f"uni={uni}",
                    "--bench-dir", root / "bench", "--out", out, "--device", "cpu", "--no-progress",
                    env_extra={"STAMP_REGISTRY": str(registry), "HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf")})
    assert res.returncode == 0, res.stderr
    return root, task, model, out


def test_hest_bench_equals_hests_code_path_on_its_own_embeddings(bench):
    _, task, _, out = bench
    df = pd.read_csv(out / "results.csv")
    assert set(df["method"]) == {"hest", "cv-alpha", "per-slide"} and set(df["task"]) == {"TOY", "TOYNAN"}
    emb, bcs = cached_embeddings(out, "TOY", "run")
    for s in SAMPLES:
        with h5py.File(task / "patches" / f"{s}.h5", "r") as f:  # patch order kept
            assert bcs[s] == [b[0].decode() for b in f["barcode"][()]]
    toy = df[(df.task == "TOY") & (df.model == "run")]
    for k, (pooled, per, (X_tr, X_te, Y_tr, Y_te)) in enumerate(reference_task(task, emb, bcs, seed=SEED)):
        row = toy[toy.fold == f"split{k}"].set_index("method")
        assert np.isfinite(pooled)
        assert row.loc["hest", "pearson"] == pytest.approx(pooled, abs=1e-6)
        assert row.loc["per-slide", "pearson"] == pytest.approx(per, abs=1e-6)
        assert row.loc["per-slide", "pearson"] != pytest.approx(pooled, abs=1e-6)  # pooling matters here
        n_train = sum(SAMPLES[s] for s in FOLDS[k][0])
        assert row.loc["hest", "pca_components"] == min(256, n_train, X_tr.shape[1])  # HEST's n_components
        assert row.loc["hest", "n_genes"] == N_GENES and row.loc["hest", "n_test"] == len(Y_te)
        # cv-alpha: the same features, only alpha differs (a grid factor of HEST's alpha)
        factor = row.loc["cv-alpha", "alpha"] / row.loc["hest", "alpha"]
        assert np.isclose(np.log10(factor), round(np.log10(factor)))
        cv, _ = reference_split(X_tr, X_te, Y_tr, Y_te, seed=SEED, alpha_factor=factor)
        assert row.loc["cv-alpha", "pearson"] == pytest.approx(cv, abs=1e-6)
    md = (out / "results.md").read_text()
    assert "| run | TOY | 2 |" in md and "Leaderboard" in md and "cv-alpha" in md and "per-slide" in md
    mean = toy[toy.method == "hest"]["pearson"]
    assert f"{np.mean(mean):.4f} ± {np.std(mean):.4f}" in md  # HEST's np.mean / np.std (population)
    assert (out / "leaderboard.png").read_bytes().startswith(b"\x89PNG")


def test_weights_by_hand_reach_hest_bench_and_its_cache_key(bench):
    _, _, _, out = bench
    df = pd.read_csv(out / "results.csv")
    assert set(df["model"]) == {"run", "uni"} and df.loc[df.task == "TOY", "pearson"].notna().all()
    with h5py.File(next((out / "embeddings" / "TOY" / "uni").glob("*.h5")), "r") as f:
        assert "uni/model.safetensors:" in f.attrs["model_stamp"]  # other weights -> embedded again, never reused


def test_a_fold_without_a_defined_pearson_is_nan_and_named(bench):
    """HEST lets NaN through (np.mean over genes, then over folds): reported, never dropped or nan-averaged."""
    root, _, _, out = bench
    df = pd.read_csv(out / "results.csv", keep_default_na=True)
    nan = df[(df.task == "TOYNAN") & (df.model == "run")].set_index(["method", "fold"])
    emb, bcs = cached_embeddings(out, "TOYNAN", "run", NAN_SAMPLES)
    ref = reference_task(root / "bench" / "TOYNAN", emb, bcs, seed=SEED, folds=NAN_FOLDS)
    assert np.isnan(ref[0][0]) and np.isfinite(ref[1][0])  # HEST's own result on this task
    assert np.isnan(nan.loc[("hest", "split0"), "pearson"])
    assert nan.loc[("hest", "split1"), "pearson"] == pytest.approx(ref[1][0], abs=1e-6)
    assert nan.loc[("hest", "split0"), "undefined_genes"] == NAN_GENE
    assert (nan["n_genes"] == N_GENES).all()  # 55 names, 50 distinct: each scored once
    md = (out / "results.md").read_text()
    assert "| run | TOYNAN | 2 | NaN (1 of 2 folds NaN) |" in md
    assert "run · TOYNAN · hest · split0: NaN (1 gene without a defined Pearson r" in md and NAN_GENE in md
    assert "lists 55 names but 50 distinct genes" in md


def test_second_run_reuses_the_embeddings(bench, tmp_path):
    root, _, model, out = bench
    files = sorted((out / "embeddings").rglob("*.h5"))
    before = {p: p.stat().st_mtime_ns for p in files}
    res = stamp_cli("evaluate", "hest-bench", "--model", model.parent, "--bench-dir", root / "bench" / "TOY", "--out",
                    out, "--device", "cpu", "--no-progress", "--no-figures")
    assert res.returncode == 0, res.stderr
    assert {p: p.stat().st_mtime_ns for p in files} == before


def test_float64_ridge_and_hests_pca_cap_in_process():
    """Wide, correlated embeddings (the regime of real encoders): 256 components, ridge fed float64 as HEST's
    torch.Tensor is; the float32 ridge stamp used before lands elsewhere (so this test can fail). With fewer
    training spots than features, PCA keeps n_train components, as sklearn lets HEST ask for."""
    from threadpoolctl import threadpool_limits

    from stamp.evaluate.hest import run_fold

    rng = np.random.default_rng(0)
    scale = np.arange(1, 65) ** -0.5  # 64 latent factors with a slowly decaying spectrum
    W, G = rng.normal(size=(64, 384)) * scale[:, None], rng.normal(size=(64, N_GENES))

    def draw(n):
        lat = rng.normal(size=(n, 64))
        X = (lat @ W + 0.05 * rng.normal(size=(n, 384))).astype(np.float32)
        return X, np.log1p(rng.poisson(np.exp(0.9 * (lat * scale) @ G / np.linalg.norm(scale))))

    limit = threadpool_limits(1)  # BLAS threads spin on a shared 2-core box
    X_tr, Y_tr = draw(600)
    X_te, Y_te = draw(200)
    who = np.array(["a"] * 120 + ["b"] * 80)
    rows = run_fold(X_tr, Y_tr, X_te, Y_te, seed=SEED, test_samples=who, train_groups=np.array(["p"] * 600),
                    variants=False)
    pooled, _ = reference_split(X_tr, X_te, Y_tr, Y_te, seed=SEED)
    float32_ridge, _ = reference_split(X_tr, X_te, Y_tr, Y_te, seed=SEED, ridge_dtype=np.float32)
    assert rows[0]["pca_components"] == 256 and rows[0]["alpha"] == pytest.approx(100 / (256 * N_GENES))
    assert rows[0]["pearson"] == pytest.approx(pooled, abs=1e-6)
    assert abs(float32_ridge - pooled) > 1e-4  # the dtype matters on these data
    rows = run_fold(X_tr[:40], Y_tr[:40], X_te, Y_te, seed=SEED, test_samples=who, train_groups=np.array(["p"] * 40),
                    variants=False)
    assert rows[0]["pca_components"] == 40
    assert rows[0]["pearson"] == pytest.approx(reference_split(X_tr[:40], X_te, Y_tr[:40], Y_te, seed=SEED)[0],
                                               abs=1e-6)
    limit.restore_original_limits()


def test_hest_gene_rule_equals_get_k_genes():
    """HEST's get_k_genes on GENERATED slides: the per-slide 10 % rule (a gene passing pooled but not in every
    slide is out), BLANK / Control names dropped, name order, no normalisation, no batch key."""
    import scipy.sparse as sp

    from stamp.evaluate.hest import hest_genes

    rng = np.random.default_rng(1)
    names = [f"G{i:03d}" for i in range(240)] + ["BLANK_0001", "NegControlProbe_00042", "ControlX", "AAA"]
    names = list(np.array(names)[rng.permutation(len(names))])
    slides, ids = [], []
    for s, n in enumerate((70, 47, 61)):
        lam = rng.gamma(0.4, 1.5, size=len(names)) * rng.uniform(0.2, 3.0, (n, 1)) * (1 + 3 * (s == 2))
        counts = rng.poisson(lam)
        if s == 1:
            counts[:, names.index("AAA")] = 0  # detected in slides 0 and 2 only
            counts[:4, names.index("AAA")] = 9  # 4 of 47 spots: < ceil(4.7)
        else:
            counts[:, names.index("AAA")] = rng.poisson(30, n)
        slides.append(pd.DataFrame(counts, columns=names, index=[f"s{s}-{i}" for i in range(n)]))
        ids += [f"slide{s}"] * n
    ref = reference_genes(slides)
    counts = sp.csr_matrix(np.concatenate([d.to_numpy() for d in slides]))
    got = [names[i] for i in hest_genes(counts, np.array(ids), np.array(names))]
    assert got == ref and len(got) == 50
    assert "AAA" not in got and not any("BLANK" in g or "Control" in g for g in got)
    assert got == sorted(got)


@pytest.mark.parametrize("breakage, expect", [
    ("missing-split", "splits/test_1.csv: missing"),
    ("barcodes", "patch barcodes are not in its .h5ad"),
    ("genes", "genes of var_50genes.json are not in sample"),
    ("no-gene-list", "var_50genes.json: missing"),
    ("img-shape", "S2.h5: img has shape (30, 3, 3); a HEST patch file holds RGB patches (N, 224, 224, 3)"),
    ("img-float", "S2.h5: img is float32; HEST patch images are uint8"),
])
def test_wrong_layouts_are_one_line(bench, tmp_path, breakage, expect):
    import shutil

    import anndata as ad

    _, task, model, _ = bench
    bad = tmp_path / "TOY"
    shutil.copytree(task, bad)
    if breakage == "missing-split":
        (bad / "splits" / "test_1.csv").unlink()
    elif breakage == "barcodes":
        a = ad.read_h5ad(bad / "adata" / "S2.h5ad")
        a.obs_names = [f"other-{i}" for i in range(a.n_obs)]
        a.write_h5ad(bad / "adata" / "S2.h5ad")
    elif breakage == "genes":
        genes = json.loads((bad / "var_50genes.json").read_text())["genes"] + ["NOT_A_GENE"]
        (bad / "var_50genes.json").write_text(json.dumps({"genes": genes}))
    elif breakage.startswith("img"):
        with h5py.File(bad / "patches" / "S2.h5", "a") as f:
            img = f["img"][()]
            del f["img"]
            f["img"] = (img[:, :3, :3, 0] if breakage == "img-shape" else img.astype(np.float32) * 1000)
    else:
        (bad / "var_50genes.json").unlink()
    out = tmp_path / "ev"
    line = one_line_error(stamp_cli("evaluate", "hest-bench", "--model", model.parent, "--bench-dir", bad, "--out",
                                    out, "--device", "cpu", "--no-progress"))
    assert expect in line, line
    assert not out.exists()  # a failed run leaves no --out behind


def test_hest_bench_on_a_paired_corpus_leaves_one_patient_out(bench, tmp_path):
    """A paired corpus (GENERATED slides with mosaic patches): one fold per patient (--patient slide_id: one
    patient per slide), genes by HEST's get_k_genes (the reference, on the spots with a patch) written to
    var_50genes.json; cached embeddings; --patient is required and checked."""
    from paired_helpers import make_mosaic_corpus

    from spavis.format import open_corpus
    from stamp.evaluate.data import load_eval_data
    from stamp.evaluate.features import image_spots

    _, _, model, _ = bench
    corpus, _ = make_mosaic_corpus(tmp_path / "c", slides=3, n_genes=80, max_row=2)
    c = open_corpus(corpus)
    ev = load_eval_data(c)
    ev = ev.subset(image_spots(c, ev))
    names = [s or i for s, i in zip(ev.gene_symbols, ev.gene_ids)]
    assert len(set(names)) == len(names)
    dense = ev.counts.toarray()
    ref = reference_genes([pd.DataFrame(dense[ev.slide_ids == s], columns=names) for s in ev.slides])
    out = tmp_path / "ev"
    res = stamp_cli("evaluate", "hest-bench", "--model", model.parent, "--data", corpus, "--patient", "slide_id",
                    "--out", out, "--device", "cpu", "--no-progress", "--no-figures")
    assert res.returncode == 0, res.stderr
    assert json.loads((out / "var_50genes.json").read_text()) == {"genes": ref} and len(ref) == 50
    df = pd.read_csv(out / "results.csv")
    hest = df[df.method == "hest"]
    assert sorted(hest["fold"]) == ["patient-gen0", "patient-gen1", "patient-gen2"]
    assert (hest["n_genes"] == 50).all() and hest["n_test"].sum() == ev.n_spots
    assert len(list((out / "embeddings").rglob("*.h5"))) == 3
    assert "HEST's get_k_genes rule" in (out / "results.md").read_text()
    line = one_line_error(stamp_cli("evaluate", "hest-bench", "--model", model.parent, "--data", corpus, "--out",
                                    tmp_path / "e2", "--no-progress"))
    assert "--patient COLUMN" in line
    line = one_line_error(stamp_cli("evaluate", "hest-bench", "--model", model.parent, "--data", corpus, "--patient",
                                    "donor", "--out", tmp_path / "e3", "--no-progress"))
    assert "no slide column or annotation column 'donor'" in line
