"""stamp evaluate: metrics against sklearn / scipy, fold logic, labels through the build, and the
evidence that the protocols rank a pretrained encoder above its random initialisation.

All slices here are GENERATED (spavis.simulate) with known spatial domains.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scipy.stats
from sklearn.metrics import (
    adjusted_rand_score,
    balanced_accuracy_score,
    calinski_harabasz_score,
    f1_score,
    normalized_mutual_info_score,
    silhouette_score,
)
from typer.testing import CliRunner

from stamp.evaluate.heads import knn_regression
from stamp.evaluate.metrics import (
    classification_metrics,
    cluster_metrics,
    expression_metrics,
    pearson_per_gene,
    top_genes,
)
from stamp.evaluate.splits import carve_validation, make_folds
from stamp_helpers import gene_subset

RNG = np.random.default_rng(7)


# ----------------------------------------------------------------------------- metrics


def test_classification_and_cluster_metrics_match_sklearn():
    y = RNG.integers(0, 4, 200)
    p = np.where(RNG.random(200) < 0.6, y, RNG.integers(0, 4, 200))
    got = classification_metrics(y, p)
    assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p))
    assert got["weighted_f1"] == pytest.approx(f1_score(y, p, average="weighted"))

    X = RNG.normal(size=(200, 5)) + y[:, None]
    c = cluster_metrics(y.astype(str), p, X)
    assert c["ari"] == pytest.approx(adjusted_rand_score(y, p))
    assert c["nmi"] == pytest.approx(normalized_mutual_info_score(y, p))
    assert c["silhouette"] == pytest.approx(silhouette_score(X, y.astype(str)))
    assert c["calinski_harabasz"] == calinski_harabasz_score(X, y.astype(str))  # the paper's fourth metric
    assert np.isnan(cluster_metrics(["a"] * 5, [0, 1, 0, 1, 0], RNG.normal(size=(5, 2)))["silhouette"])


def test_expression_metrics_match_scipy():
    Y = RNG.poisson(3, size=(60, 30)).astype(float)
    P = Y + RNG.normal(0, 1.5, size=Y.shape)
    Y[:, 4] = 2.0  # constant gene: Pearson undefined -> NaN, left out of the means
    r = pearson_per_gene(Y, P)
    for j in range(Y.shape[1]):
        if j == 4:
            assert np.isnan(r[j])
        else:
            assert r[j] == pytest.approx(scipy.stats.pearsonr(Y[:, j], P[:, j])[0], abs=1e-10)
    hvg, heg = top_genes(Y, np.arange(29, -1, -1), n=10)
    assert list(hvg) == list(range(29, 19, -1))
    assert set(heg) == set(np.argsort(-Y.mean(0), kind="stable")[:10])
    m = expression_metrics(Y, P, hvg, heg)
    union = np.union1d(hvg, heg)
    assert m["mse"] == pytest.approx(((Y[:, union] - P[:, union]) ** 2).mean())
    pv = [scipy.stats.pearsonr(Y[:, j], P[:, j])[0] for j in hvg if j != 4]
    assert m["pcc_v"] == pytest.approx(np.mean(pv))
    pe = [scipy.stats.pearsonr(Y[:, j], P[:, j])[0] for j in heg if j != 4]
    assert m["pcc_e"] == pytest.approx(np.mean(pe))


def test_knn_regression_is_similarity_weighted_top_k():
    ref, expr, query = RNG.normal(size=(40, 6)), RNG.random((40, 3)), RNG.normal(size=(7, 6))
    got = knn_regression(ref, expr, query, k=5)
    rn = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    qn = query / np.linalg.norm(query, axis=1, keepdims=True)
    for i, s in enumerate(qn @ rn.T):
        top = np.argsort(-s)[:5]
        w = np.clip(s[top], 0, None)
        want = (w[:, None] * expr[top]).sum(0) / w.sum() if w.sum() > 0 else expr[top].mean(0)
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- folds


def test_leave_one_slide_out_never_shares_a_slide():
    slides = np.repeat(np.array(["a", "b", "c"]), [30, 20, 25])
    rows = np.flatnonzero(RNG.random(len(slides)) < 0.8)  # only labelled spots take part
    folds = make_folds(slides, rows=rows)
    assert [f.name for f in folds] == ["a", "b", "c"]
    tested = []
    for f in folds:
        assert f.scheme == "leave-one-slide-out"
        assert set(slides[f.train]).isdisjoint(slides[f.test])
        assert set(f.train) | set(f.test) == set(rows)
        fit, val = carve_validation(f.train, seed=1)
        assert set(fit).isdisjoint(val) and set(fit) | set(val) == set(f.train)
        assert set(slides[val]).isdisjoint(slides[f.test])
        tested += list(f.test)
    assert sorted(tested) == sorted(rows)


def test_single_slide_uses_seeded_stratified_five_fold():
    slides = np.array(["s"] * 100)
    labels = np.array(["x"] * 60 + ["y"] * 40, dtype=object)
    folds = make_folds(slides, labels, seed=3)
    assert len(folds) == 5 and folds[0].scheme == "5-fold"
    tested = np.concatenate([f.test for f in folds])
    assert sorted(tested) == list(range(100))  # every spot tested exactly once
    for f in folds:
        assert set(f.train).isdisjoint(f.test)
        assert (labels[f.test] == "x").sum() == 12  # stratified
    again = make_folds(slides, labels, seed=3)
    assert all(np.array_equal(a.test, b.test) for a, b in zip(folds, again))


# ----------------------------------------------------------------------------- labels through the build


def _generated(tmp: Path, n: int, n_genes: int = 120) -> list[Path]:
    from spavis.simulate import write_simulated_slice

    vocab = gene_subset(n_genes)
    return [write_simulated_slice(tmp / "in" / f"gen{s}", genes=list(vocab.ensembl_ids), symbols=list(vocab.symbols),
                                  seed=s, n_domains=3, with_image=False, max_row=12, n_markers=12)
            for s in range(n)]


def test_obs_columns_travel_through_the_build(tmp_path):
    import anndata as ad

    from spavis.format import open_corpus
    from spavis.shards import build_shards, validate

    folders = _generated(tmp_path, 2)
    truth = json.loads((folders[0] / "generated.json").read_text())["domains"]
    first = sorted(truth)[:20]
    pd.DataFrame({"slide_id": "gen0", "barcode": first, "region": [f"r{i % 2}" for i in range(20)]}).to_csv(
        tmp_path / "ann.csv", index=False)
    out = build_shards(folders, tmp_path / "c", vocab=gene_subset(120), min_genes=5, obs_columns="domain,region",
                       annotations=tmp_path / "ann.csv")
    assert validate(out).ok
    corpus = open_corpus(out)
    assert corpus.annotation_columns == ("domain", "region")
    assert corpus.manifest["parameters"]["obs_columns"] == ["domain", "region"]
    tables = {t.column("slide_id")[0].as_py(): t for t in corpus.iter_slides(columns=["barcode", "domain", "region"])}
    t0 = tables["gen0"]
    assert t0.column("domain").to_pylist() == [truth[b] for b in t0.column("barcode").to_pylist()]
    region = dict(zip(t0.column("barcode").to_pylist(), t0.column("region").to_pylist()))
    kept = [b for b in first if b in region]
    assert kept and all(region[b] == f"r{first.index(b) % 2}" for b in kept)
    assert sum(v is not None for v in region.values()) == len(kept)  # the rest is null, not a class
    assert tables["gen1"].column("region").null_count == tables["gen1"].num_rows  # CSV rows name gen0 only
    obs = ad.read_zarr(out / "zarr" / "gen0.zarr").obs
    assert obs["domain"].astype(str).tolist() == t0.column("domain").to_pylist()
    assert obs["region"].isna().sum() == t0.num_rows - len(kept)
    # the annotations decide the bytes: a changed CSV is not "up to date"
    before = json.loads((out / "manifest.json").read_text())["build_key"]
    pd.DataFrame({"barcode": first, "region": "z"}).to_csv(tmp_path / "ann.csv", index=False)
    build_shards(folders, out, vocab=gene_subset(120), min_genes=5, obs_columns="domain,region",
                 annotations=tmp_path / "ann.csv")
    assert json.loads((out / "manifest.json").read_text())["build_key"] != before
    assert set(pq.read_table(out / "data/expression/part-00000.parquet", columns=["region"]).column(0).drop_null()
               .to_pylist()) == {"z"}


def test_unknown_obs_column_is_an_error(tmp_path):
    from spavis.cli import app as spavis_app

    folders = _generated(tmp_path, 1)
    res = CliRunner().invoke(spavis_app, ["build-shards", str(folders[0]), "--out", str(tmp_path / "c"),
                                          "--vocab", str(_vocab_json(tmp_path)), "--min-genes", "5",
                                          "--obs-columns", "layer", "-q"])
    assert res.exit_code == 1
    assert "layer" in res.output and "no slide has this column" in res.output
    assert "Traceback" not in res.output


def _vocab_json(tmp: Path) -> Path:
    return gene_subset(120).write(tmp / "vocab.json")


# ----------------------------------------------------------------------------- evidence (generated slice)

# Short CPU run (see docs/learning.md for why short runs need these settings). The slice has
# known domains (GENERATED by spavis.simulate), mild depth variation (library_sigma 0.1) and
# strong markers (30 per domain), so 300 steps of IGR already shape the embedding. Measured
# (docs/evaluate.md "Evidence"): smaller vocabularies (150 genes) or 200 steps do not learn enough.
GENES, MAX_ROW, STEPS, BATCH, LR, WARMUP = 300, 24, 300, 32, 5e-3, 10


@pytest.fixture(scope="module")
def evidence(tmp_path_factory):
    """One GENERATED slice, one pretrained tiny encoder, one `stamp evaluate cluster,linear-probe` run,
    shared by the assertions below (the pretraining is the expensive part)."""
    import torch

    from spavis.shards import build_shards
    from spavis.simulate import write_simulated_slice
    from stamp.cli import app as stamp_app
    from stamp.training.gene import PretrainArgs, pretrain

    tmp = tmp_path_factory.mktemp("evidence")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # faster than two contending threads on a shared 2-core box
    try:
        vocab = gene_subset(GENES)
        folder = write_simulated_slice(tmp / "in" / "gen0", genes=list(vocab.ensembl_ids),
                                       symbols=list(vocab.symbols), seed=0, n_domains=4, with_image=False,
                                       max_row=MAX_ROW, n_markers=30, marker_lfc=4.0, library_sigma=0.1)
        corpus = build_shards([folder], tmp / "corpus", vocab=vocab, min_genes=5, obs_columns="domain")
        run = pretrain(PretrainArgs(stage="gene", data=str(corpus), out=str(tmp / "run"), config="tiny",
                                    max_steps=STEPS, batch_size=BATCH, lr=LR, min_lr=LR / 10, warmup_steps=WARMUP,
                                    save_every=STEPS, seed=0, progress=False))
        res = CliRunner().invoke(stamp_app, ["evaluate", "cluster,linear-probe", "--model", str(run),
                                             "--data", str(corpus), "--label", "domain", "--out", str(tmp / "ev"),
                                             "--device", "cpu", "--no-progress"])
        assert res.exit_code == 0, res.output
    finally:
        torch.set_num_threads(threads)
    name = Path(run).parent.name if Path(run).name == "model" else Path(run).name
    return pd.read_csv(tmp / "ev" / "results.csv"), tmp / "ev", name


def test_evaluate_ranks_pretrained_above_random_init(evidence):
    df, _, name = evidence
    assert set(df["model"]) == {name, "random-init", "pca"}
    assert (df[df.task == "linear-probe"].groupby("model").size() == 5).all()  # one slide: 5 folds, all models
    mean = df.groupby(["task", "model"]).mean(numeric_only=True)
    probe, clus = mean.loc["linear-probe"], mean.loc["cluster"]
    assert probe.loc[name, "balanced_accuracy"] > probe.loc["random-init", "balanced_accuracy"]
    assert clus.loc[name, "ari"] > clus.loc["random-init", "ari"]
    assert clus.loc[name, "nmi"] > clus.loc["random-init", "nmi"]
    assert clus.loc[name, "silhouette"] > clus.loc["random-init", "silhouette"]
    assert clus.loc["pca", "ari"] > 0.9  # the domains are in the data: the classical baseline finds them
    assert np.isfinite(clus["calinski_harabasz"]).all()


def test_evaluate_outputs_say_the_data_are_generated(evidence):
    _, out, _ = evidence
    for png in ("cluster_gen0.png", "probe_confusion.png"):
        assert (out / png).read_bytes().startswith(b"\x89PNG")
    md = (out / "results.md").read_text()
    assert "random-init" in md and "pca" in md and "GENERATED" in md


def test_predict_expression_leave_one_slide_out_with_pca(tmp_path):
    """Two GENERATED slides, PCA features only: one row per held-out slide and method, finite metrics."""
    from spavis.shards import build_shards
    from stamp.evaluate import evaluate

    corpus = build_shards(_generated(tmp_path, 2), tmp_path / "c", vocab=gene_subset(120), min_genes=5)
    df = evaluate("predict-expression", [], corpus, out=tmp_path / "ev", n_hvgs=60, knn_k=10, progress=False,
                  device="cpu", threads=1)  # small heads on a shared box: one thread is faster
    assert sorted(zip(df["method"], df["fold"])) == [("knn", "gen0"), ("knn", "gen1"), ("mlp", "gen0"),
                                                      ("mlp", "gen1"), ("ridge", "gen0"), ("ridge", "gen1")]
    assert (df["scheme"] == "leave-one-slide-out").all() and (df["model"] == "pca").all()
    assert np.isfinite(df[["mse", "pcc_v", "pcc_e"]].to_numpy()).all()
    assert (tmp_path / "ev" / "expression_pca.png").read_bytes().startswith(b"\x89PNG")


def test_label_column_must_exist(tmp_path):
    from spavis.shards import build_shards
    from stamp.cli import app as stamp_app

    corpus = build_shards(_generated(tmp_path, 1), tmp_path / "c", vocab=gene_subset(120), min_genes=5)
    res = CliRunner().invoke(stamp_app, ["evaluate", "cluster", "--data", str(corpus), "--label", "layer",
                                         "--out", str(tmp_path / "ev"), "--no-progress"])
    assert res.exit_code == 1
    assert "no annotation column 'layer'" in res.output and "--obs-columns layer" in res.output
    assert "Traceback" not in res.output


# ----------------------------------------------------------------------------- image / fused features


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    """Two GENERATED slides with domain labels; slide gen0 has H&E patches (domain textures), gen1 has
    none; a tiny aligned StampModel (1 gene step + 1 align step) trained on them."""
    from paired_helpers import _list_in_manifest, write_paired
    from stamp_helpers import generated_domains, write_generated_slices

    from spavis.format import schema as S
    from spavis.shards import build_shards
    from stamp.cli import app as stamp_app

    root = tmp_path_factory.mktemp("evimg")
    vocab, folders = write_generated_slices(root / "c", slides=2, n_genes=60, seed=5, n_domains=3, max_row=4,
                                            with_image=False)
    corpus = build_shards(folders, root / "c", vocab=vocab, min_genes=5, k_neighbors=8, max_spots_per_shard=1,
                          obs_columns="domain")
    domains = {k: int(str(v).rsplit("_", 1)[-1]) for k, v in generated_domains(folders).items()}
    written = write_paired(corpus, domains, seed=5, n_domains=3)
    keep = [p for p in written if pq.read_table(p, columns=["slide_id"]).column(0)[0].as_py() == "gen0"]
    for p in written:
        if p not in keep:
            p.unlink()
    _list_in_manifest(corpus, keep)  # gen1 is an un-imaged slide
    runner = CliRunner()
    res = runner.invoke(stamp_app, ["pretrain", "--stage", "gene", "--data", str(corpus), "--out", str(root / "g"),
                                    "--config", "tiny", "--max-steps", "1", "--batch-size", "8", "--warmup-steps", "1",
                                    "--no-progress"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    res = runner.invoke(stamp_app, ["pretrain", "--stage", "align", "--init", str(root / "g"), "--vision", "tiny",
                                    "--data", str(corpus), "--out", str(root / "a"), "--max-steps", "1",
                                    "--batch-size", "4", "--warmup-steps", "1", "--no-progress"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    n_imaged = sum(pq.ParquetFile(p).metadata.num_rows for p in keep)
    assert (corpus / S.PAIRED_DIR).is_dir()
    return corpus, root / "a", root / "g", n_imaged


def test_image_and_fused_features_come_before_the_projections(aligned):
    import torch

    from spavis.format import open_corpus
    from stamp.evaluate.data import load_eval_data
    from stamp.evaluate.features import image_spots, model_features
    from stamp.models.aligned_model import StampModel
    from stamp.data.paired import decode_png

    corpus_dir, run, _, n_imaged = aligned
    corpus = open_corpus(corpus_dir)
    ev = load_eval_data(corpus, "domain")
    mask = image_spots(corpus, ev)
    assert mask.sum() == n_imaged and set(ev.slide_ids[mask]) == {"gen0"} and not mask.all()
    sub = ev.subset(mask)
    assert sub.n_spots == n_imaged and sub.counts.shape[0] == n_imaged and sum(t.num_rows for t in sub.tables) > 0
    img = model_features(str(run), sub, device="cpu", modality="image", corpus=corpus, with_random=True, seed=1)
    fused = model_features(str(run), sub, device="cpu", modality="fused", corpus=corpus)
    gene = model_features(str(run), sub, device="cpu", modality="gene")
    assert [(s.kind, s.probe_lr) for s in img] == [("model", 1e-4), ("random-init", 1e-4)]
    assert gene[0].probe_lr == 1e-3

    model = StampModel.from_pretrained(str(run)).eval()
    first = next(corpus.iter_paired(columns=["spot_id", "patch"]))
    row = int(np.flatnonzero(sub.spot_ids == first.column("spot_id")[0].as_py())[0])
    with torch.no_grad():
        pooled = model.vision_encoder(model.pixels(torch.from_numpy(decode_png(first.column("patch")[0].as_py()))[None]))
    want = pooled.pooled[0].numpy()
    assert img[0].features.shape == (n_imaged, model.vision_encoder.dim)  # not embed_dim: before patch_projection
    np.testing.assert_allclose(img[0].features[row], want, rtol=1e-4, atol=1e-5)
    assert not np.allclose(img[1].features, img[0].features)  # random-init: same shape, other weights
    g, f = gene[0].features, fused[0].features
    assert f.shape == (n_imaged, g.shape[1] + want.size)
    np.testing.assert_allclose(f[row, :g.shape[1]], g[row] / np.linalg.norm(g[row]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(f[row, g.shape[1]:], want / np.linalg.norm(want), rtol=1e-4, atol=1e-5)


def test_evaluate_image_modality_excludes_unimaged_spots_and_counts_them(aligned, tmp_path):
    from stamp.cli import app as stamp_app

    corpus, run, gene_run, n_imaged = aligned
    res = CliRunner().invoke(stamp_app, ["evaluate", "linear-probe", "--model", str(run), "--data", str(corpus),
                                         "--label", "domain", "--modality", "fused", "--out", str(tmp_path / "ev"),
                                         "--device", "cpu", "--no-progress", "--no-figures"])
    assert res.exit_code == 0, res.output
    df = pd.read_csv(tmp_path / "ev" / "results.csv")
    assert set(df["model"]) == {"a", "random-init", "pca"}
    probe = df[df.task == "linear-probe"]
    assert (probe.groupby("model")["n_test"].sum() == n_imaged).all()  # only gen0's imaged spots
    assert (probe["scheme"] == "5-fold").all()  # gen1 (no image) is gone: one slide left, not leave-one-slide-out
    md = (tmp_path / "ev" / "results.md").read_text()
    assert "spots have no H&E patch and are excluded" in md and f"other {n_imaged:,})" in md

    # a gene-only encoder has no image side: one line, no traceback
    res = CliRunner().invoke(stamp_app, ["evaluate", "cluster", "--model", str(gene_run), "--data", str(corpus),
                                         "--label", "domain", "--modality", "image", "--out", str(tmp_path / "e2"),
                                         "--device", "cpu", "--no-progress"])
    assert res.exit_code == 1 and "needs an aligned StampModel" in res.output and "Traceback" not in res.output

    # a corpus without any H&E patch: one line naming the fix
    from spavis.shards import build_shards

    plain = build_shards(_generated(tmp_path, 1), tmp_path / "plain", vocab=gene_subset(120), min_genes=5,
                         obs_columns="domain")
    res = CliRunner().invoke(stamp_app, ["evaluate", "linear-probe", "--model", str(run), "--data", str(plain),
                                         "--label", "domain", "--modality", "image", "--out", str(tmp_path / "e3"),
                                         "--device", "cpu", "--no-progress"])
    assert res.exit_code == 1 and "holds no H&E patches" in res.output and "--with-images" in res.output
    assert "Traceback" not in res.output
