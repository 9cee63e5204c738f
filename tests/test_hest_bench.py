"""``stamp evaluate hest-bench`` against an independent reference of the HEST-Benchmark protocol.

The task folder is GENERATED in HEST's published layout (splits/train_K.csv + test_K.csv with
sample_id, patches_path, expr_path; patches/*.h5 with img, barcode, coords; adata/*.h5ad raw counts;
var_50genes.json); patch textures and counts depend on the same hidden domain, so expression is
predictable from the images. The reference below is written from the protocol's description with
sklearn / scipy (StandardScaler + PCA(256, random_state=seed) fit on train; float32 components as HEST's
torch.Tensor; Ridge(lsqr, alpha=100/(n_features*n_genes), fit_intercept=False, max_iter=1000); Pearson
per gene on pooled test spots, mean over genes), not with stamp's code.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.stats
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

ROOT = Path(__file__).resolve().parents[1]
N_GENES, N_EXTRA = 50, 10
SAMPLES = {"S1": 36, "S2": 30, "S3": 34, "S4": 28}
FOLDS = [(["S1", "S2"], ["S3", "S4"]), (["S3", "S4"], ["S1", "S2"])]
SEED = 1


def stamp_cli(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("STAMP_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "stamp.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def write_task(folder: Path, *, seed: int = 0) -> Path:
    """A GENERATED HEST-Benchmark task folder (4 samples, 2 folds of 2 train / 2 test samples)."""
    import anndata as ad
    from paired_helpers import domain_texture

    rng = np.random.default_rng(seed)
    genes = [f"GENE{i:03d}" for i in range(N_GENES + N_EXTRA)]
    profile = rng.gamma(2.0, 2.0, size=(3, len(genes)))  # per-domain mean counts
    (folder / "splits").mkdir(parents=True)
    (folder / "patches").mkdir()
    (folder / "adata").mkdir()
    for sid, n in SAMPLES.items():
        domains = rng.integers(0, 3, n)
        barcodes = [f"{sid}-{i:04d}-1" for i in range(n)]
        imgs = np.stack([domain_texture(int(d), rng, size=224, n_domains=3) for d in domains])
        with h5py.File(folder / "patches" / f"{sid}.h5", "w") as f:
            f["img"] = imgs
            f["barcode"] = np.array([[b.encode()] for b in barcodes])  # (N, 1) bytes, as HEST writes it
            f["coords"] = rng.integers(0, 10000, (n, 2))
        counts = rng.poisson(profile[domains] * rng.uniform(0.5, 1.5, (n, 1)))
        extra = rng.poisson(1.0, (5, len(genes)))  # spots without a patch: in the .h5ad, never looked up
        order = rng.permutation(n + 5)  # the .h5ad's own spot order differs from the patch order
        obs = np.array(barcodes + [f"{sid}-x{i}-1" for i in range(5)])[order]
        X = np.concatenate([counts, extra])[order].astype(np.float32)
        var_order = rng.permutation(len(genes))
        a = ad.AnnData(X=X[:, var_order], obs=pd.DataFrame(index=obs),
                       var=pd.DataFrame(index=np.array(genes)[var_order]))
        a.write_h5ad(folder / "adata" / f"{sid}.h5ad")
    for k, (train, test) in enumerate(FOLDS):
        for part, ids in (("train", train), ("test", test)):
            pd.DataFrame({"sample_id": ids, "patches_path": [f"patches/{s}.h5" for s in ids],
                          "expr_path": [f"adata/{s}.h5ad" for s in ids]}).to_csv(
                folder / "splits" / f"{part}_{k}.csv", index=False)
    (folder / "var_50genes.json").write_text(json.dumps({"genes": genes[:N_GENES]}))
    return folder


def tiny_model(folder: Path) -> Path:
    import torch

    from stamp.models.gene_encoder import StampConfig
    from stamp.models.aligned_model import StampModel, StampModelConfig

    torch.manual_seed(0)
    gene = StampConfig(n_genes=20, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                       context_length=16, heads=False)
    StampModel(StampModelConfig(gene=gene, vision="tiny", embed_dim=8)).save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------- the reference (sklearn, scipy)


def reference_targets(task: Path, sid: str, barcodes: list[str], genes: list[str]) -> np.ndarray:
    import anndata as ad

    a = ad.read_h5ad(task / "adata" / f"{sid}.h5ad")
    return np.log1p(a[barcodes, genes].X.astype(np.float64))


def reference_fold(X_tr, Y_tr, X_te, Y_te, *, seed, test_samples=None, alpha_factor=1.0):
    k = min(256, X_tr.shape[0] - 1, X_tr.shape[1])  # HEST's tasks have >> 256 training spots
    # lsqr stops at tol 1e-4, so on ill-conditioned features (a random tiny encoder) its answer follows
    # float32 rounding of the components: compute them the one way sklearn's idiom does, fit_transform
    pipe = make_pipeline(StandardScaler(), PCA(n_components=k, random_state=seed))
    Z_tr = pipe.fit_transform(X_tr).astype(np.float32)
    Z_te = pipe.transform(X_te).astype(np.float32)
    alpha = 100 / (Z_tr.shape[1] * Y_tr.shape[1]) * alpha_factor
    P = Ridge(solver="lsqr", alpha=alpha, fit_intercept=False, max_iter=1000, random_state=seed).fit(
        Z_tr, Y_tr).predict(Z_te)
    pooled = np.nanmean([scipy.stats.pearsonr(Y_te[:, j], P[:, j])[0] for j in range(Y_te.shape[1])])
    per = None
    if test_samples is not None:
        per = np.mean([np.nanmean([scipy.stats.pearsonr(Y_te[test_samples == s, j], P[test_samples == s, j])[0]
                                   for j in range(Y_te.shape[1])]) for s in dict.fromkeys(test_samples)])
    return pooled, per


def reference(task: Path, emb: dict[str, np.ndarray], bcs: dict[str, list[str]], *, seed: int):
    genes = json.loads((task / "var_50genes.json").read_text())["genes"]
    Y = {s: reference_targets(task, s, bcs[s], genes) for s in SAMPLES}
    out = []
    for train, test in FOLDS:
        X_tr = np.concatenate([emb[s] for s in train])
        X_te = np.concatenate([emb[s] for s in test])
        who = np.concatenate([[s] * len(emb[s]) for s in test])
        out.append(reference_fold(X_tr, np.concatenate([Y[s] for s in train]), X_te,
                                  np.concatenate([Y[s] for s in test]), seed=seed, test_samples=who))
    return out


# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("hest")
    task = write_task(root / "bench" / "TOY")
    model = tiny_model(root / "run" / "model")
    out = root / "ev"
    res = stamp_cli("evaluate", "hest-bench", "--model", model.parent, "--bench-dir", root / "bench", "--out", out,
                    "--device", "cpu", "--no-progress")
    assert res.returncode == 0, res.stderr
    return root, task, model, out


def test_hest_bench_reproduces_the_protocol_on_its_own_embeddings(bench):
    root, task, _, out = bench
    df = pd.read_csv(out / "results.csv")
    assert set(df["method"]) == {"hest", "cv-alpha", "per-slide"} and set(df["task"]) == {"TOY"}
    emb, bcs = {}, {}
    for s in SAMPLES:
        with h5py.File(out / "embeddings" / "TOY" / "run" / f"{s}.h5", "r") as f:
            emb[s] = f["embeddings"][()]
            bcs[s] = [b.decode() if isinstance(b, bytes) else str(b) for b in f["barcodes"][()]]
            assert f["coords"].shape == (SAMPLES[s], 2)
        with h5py.File(task / "patches" / f"{s}.h5", "r") as f:  # patch order kept
            assert bcs[s] == [b[0].decode() for b in f["barcode"][()]]
    ref = reference(task, emb, bcs, seed=SEED)
    for k, (pooled, per) in enumerate(ref):
        row = df[(df.fold == f"split{k}")].set_index("method")
        assert row.loc["hest", "pearson"] == pytest.approx(pooled, abs=1e-6)
        assert row.loc["per-slide", "pearson"] == pytest.approx(per, abs=1e-6)
        assert row.loc["per-slide", "pearson"] != pytest.approx(pooled, abs=1e-6)  # pooling matters here
        assert row.loc["hest", "n_genes"] == N_GENES and row.loc["hest", "n_test"] == sum(
            SAMPLES[s] for s in FOLDS[k][1])
        # cv-alpha: the same features, only alpha differs (a grid factor of HEST's alpha)
        factor = row.loc["cv-alpha", "alpha"] / row.loc["hest", "alpha"]
        assert np.isclose(np.log10(factor), round(np.log10(factor)))
        X_tr = np.concatenate([emb[s] for s in FOLDS[k][0]])
        X_te = np.concatenate([emb[s] for s in FOLDS[k][1]])
        genes = json.loads((task / "var_50genes.json").read_text())["genes"]
        Y_tr = np.concatenate([reference_targets(task, s, bcs[s], genes) for s in FOLDS[k][0]])
        Y_te = np.concatenate([reference_targets(task, s, bcs[s], genes) for s in FOLDS[k][1]])
        cv, _ = reference_fold(X_tr, Y_tr, X_te, Y_te, seed=SEED, alpha_factor=factor)
        assert row.loc["cv-alpha", "pearson"] == pytest.approx(cv, abs=1e-6)
    md = (out / "results.md").read_text()
    assert "| run | TOY | 2 |" in md and "Leaderboard" in md and "cv-alpha" in md and "per-slide" in md
    mean = df[df.method == "hest"]["pearson"]
    assert f"{mean.mean():.4f} ± {mean.std(ddof=0):.4f}" in md  # HEST's population sd
    assert (out / "leaderboard.png").read_bytes().startswith(b"\x89PNG")


def test_second_run_reuses_the_embeddings(bench, tmp_path):
    root, _, model, out = bench
    files = sorted((out / "embeddings").rglob("*.h5"))
    before = {p: p.stat().st_mtime_ns for p in files}
    res = stamp_cli("evaluate", "hest-bench", "--model", model.parent, "--bench-dir", root / "bench", "--out", out,
                    "--device", "cpu", "--no-progress", "--no-figures")
    assert res.returncode == 0, res.stderr
    assert {p: p.stat().st_mtime_ns for p in files} == before


def test_full_256_components_match_the_reference(bench):
    """Wider embeddings than the tiny model's: PCA keeps 256 components, still equal to the reference."""
    from stamp.evaluate.hest import read_task

    root, task_dir, _, _ = bench
    task = read_task(task_dir)
    rng = np.random.default_rng(3)
    emb, bcs = {}, {}
    for s, n in SAMPLES.items():
        with h5py.File(task_dir / "patches" / f"{s}.h5", "r") as f:
            bcs[s] = [b[0].decode() for b in f["barcode"][()]]
        emb[s] = rng.normal(size=(n, 300)).astype(np.float32)
    # 256 components need > 256 training spots: the training samples' spots five times, with noise
    from stamp.evaluate.hest import run_fold

    X_tr = np.concatenate([np.tile(emb[s], (5, 1)) + rng.normal(0, 0.1, (5 * len(emb[s]), 300)) for s in ("S1", "S2")])
    Y_tr = rng.normal(size=(len(X_tr), N_GENES))
    X_te = np.concatenate([emb[s] for s in ("S3", "S4")])
    Y_te = X_te[:, :N_GENES] * 0.5 + rng.normal(size=(len(X_te), N_GENES))
    rows = run_fold(X_tr, Y_tr, X_te, Y_te, seed=SEED, test_samples=np.array(["S3"] * 34 + ["S4"] * 28),
                    train_groups=np.array(["a"] * len(X_tr)), variants=False)
    assert rows[0]["pca_components"] == 256
    pooled, _ = reference_fold(X_tr, Y_tr, X_te, Y_te, seed=SEED)
    assert rows[0]["pearson"] == pytest.approx(pooled, abs=1e-6)
    assert rows[0]["alpha"] == pytest.approx(100 / (256 * N_GENES))
    assert task.folds[0][1] == ["S1", "S2"] and task.genes == [f"GENE{i:03d}" for i in range(N_GENES)]


@pytest.mark.parametrize("breakage, expect", [
    ("missing-split", "splits/test_1.csv: missing"),
    ("barcodes", "patch barcodes are not in its .h5ad"),
    ("genes", "genes of var_50genes.json are not in sample"),
    ("no-gene-list", "var_50genes.json: missing"),
])
def test_wrong_layouts_are_one_line(bench, tmp_path, breakage, expect):
    import shutil

    import anndata as ad

    root, task, model, _ = bench
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
    else:
        (bad / "var_50genes.json").unlink()
    out = tmp_path / "ev"
    res = stamp_cli("evaluate", "hest-bench", "--model", model.parent, "--bench-dir", bad, "--out", out,
                    "--device", "cpu", "--no-progress")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and expect in lines[0], res.stderr
    assert not out.exists()  # a failed run leaves no --out behind


def test_hest_bench_on_a_paired_corpus_leaves_one_patient_out(bench, tmp_path):
    """A paired corpus (GENERATED slides with mosaic patches): one fold per patient (--patient slide_id: one
    patient per slide), genes by HEST's rule, cached embeddings; --patient is required and checked."""
    from paired_helpers import make_mosaic_corpus

    from spavis.format import open_corpus
    from stamp.evaluate.data import load_eval_data
    from stamp.evaluate.hest import N_GENES as HEST_GENES
    from stamp.evaluate.hest import hest_genes

    _, _, model, _ = bench
    corpus, _ = make_mosaic_corpus(tmp_path / "c", slides=3, n_genes=80, max_row=4)
    ev = load_eval_data(open_corpus(corpus))
    genes = hest_genes(ev.counts, ev.slide_ids, ev.gene_symbols)
    detected = np.asarray((ev.counts[:, genes] > 0).mean(axis=0)).reshape(-1)
    assert len(genes) == HEST_GENES and (detected >= 0.1).all() and list(genes) == sorted(genes)
    out = tmp_path / "ev"
    res = stamp_cli("evaluate", "hest-bench", "--model", model.parent, "--data", corpus, "--patient", "slide_id",
                    "--out", out, "--device", "cpu", "--no-progress", "--no-figures")
    assert res.returncode == 0, res.stderr
    df = pd.read_csv(out / "results.csv")
    hest = df[df.method == "hest"]
    assert sorted(hest["fold"]) == ["patient-gen0", "patient-gen1", "patient-gen2"]
    assert (hest["n_genes"] == HEST_GENES).all() and hest["n_test"].sum() == ev.n_spots
    assert len(list((out / "embeddings").rglob("*.h5"))) == 3
    line = [ln for ln in stamp_cli("evaluate", "hest-bench", "--model", model.parent, "--data", corpus, "--out",
                                   tmp_path / "e2", "--no-progress").stderr.splitlines() if ln.strip()]
    assert len(line) == 1 and "--patient COLUMN" in line[0]
    line = [ln for ln in stamp_cli("evaluate", "hest-bench", "--model", model.parent, "--data", corpus, "--patient",
                                   "donor", "--out", tmp_path / "e3", "--no-progress").stderr.splitlines()
            if ln.strip()]
    assert len(line) == 1 and "no slide column or annotation column 'donor'" in line[0]
