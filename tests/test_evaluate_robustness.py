"""stamp evaluate as a careless user runs it (issue 16: items 4, 9, 10 and the empty --out folder), through
the real CLI in a subprocess: same-named models stay apart, the same model twice is refused, missing or
too few labels are one line, a small low-depth corpus scores expression, a failed run leaves no --out.

Every slice here is GENERATED (spavis.simulate).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stamp_helpers import gene_subset

ROOT = Path(__file__).resolve().parents[1]


def stamp_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("STAMP_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "stamp.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def one_line_error(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    return lines[0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two GENERATED slides (domain labels) and a 1-step tiny gene encoder copied to same-named folders."""
    from spavis.shards import build_shards
    from spavis.simulate import write_simulated_slice
    from stamp.cli import app as stamp_app
    from typer.testing import CliRunner

    root = tmp_path_factory.mktemp("evrob")
    vocab = gene_subset(120)
    folders = [write_simulated_slice(root / "in" / f"gen{s}", genes=list(vocab.ensembl_ids),
                                     symbols=list(vocab.symbols), seed=s, n_domains=3, with_image=False, max_row=6,
                                     n_markers=12) for s in range(2)]
    corpus = build_shards(folders, root / "c", vocab=vocab, min_genes=5, obs_columns="domain")
    res = CliRunner().invoke(stamp_app, ["pretrain", "--stage", "gene", "--data", str(corpus), "--out",
                                         str(root / "g"), "--config", "tiny", "--max-steps", "1", "--batch-size", "8",
                                         "--warmup-steps", "1", "--no-progress"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    for sub in ("A/x/run", "B/x/run", "C/y/run"):
        shutil.copytree(root / "g", root / sub)
    return root, corpus


def test_two_same_named_models_are_two_rows(setup, tmp_path):
    root, corpus = setup
    out = tmp_path / "ev"
    res = stamp_cli("evaluate", "cluster", "--model", root / "A/x/run", "--model", root / "C/y/run", "--data", corpus,
                    "--label", "domain", "--out", out, "--device", "cpu", "--no-progress", "--no-figures",
                    "--no-baselines")
    assert res.returncode == 0, res.stderr
    df = pd.read_csv(out / "results.csv")
    assert sorted(set(df["model"])) == ["x/run", "y/run"]
    assert (df.groupby("model").size() == 2).all()  # one row per slide each: never pooled
    md = (out / "results.md").read_text()
    assert "| x/run |" in md and "| y/run |" in md and "over 2 folds" in md


def test_three_same_named_models_get_the_shortest_distinguishing_suffix(setup, tmp_path):
    root, corpus = setup
    out = tmp_path / "ev"
    res = stamp_cli("evaluate", "cluster", "--model", root / "A/x/run", "--model", root / "B/x/run/model",
                    "--model", root / "C/y/run", "--data", corpus, "--label", "domain", "--out", out, "--device",
                    "cpu", "--no-progress", "--no-figures")
    assert res.returncode == 0, res.stderr
    df = pd.read_csv(out / "results.csv")
    assert list(dict.fromkeys(df["model"])) == ["A/x/run", "B/x/run", "y/run", "random-init", "pca"]
    assert (df.groupby("model").size() == 2).all()


def test_model_names_unit():
    from stamp.evaluate.features import model_names

    assert model_names(["org/a", "org/b"]) == ["org/a", "org/b"]
    assert model_names(["x/org/run", "y/org/run"]) == ["x/org/run", "y/org/run"]  # Hub-style ids as given


def test_the_same_model_twice_is_refused(setup, tmp_path):
    root, corpus = setup
    for a, b in ((root / "A/x/run", root / "A/x/run/model"), (root / "A/x/run", root / "A/x/../x/run")):
        out = tmp_path / "ev"
        res = stamp_cli("evaluate", "cluster", "--model", a, "--model", b, "--data", corpus, "--label", "domain",
                        "--out", out, "--device", "cpu", "--no-progress")
        line = one_line_error(res)
        assert "the same model as" in line and "give each model once" in line
        assert not out.exists()


def test_linear_probe_without_label_is_one_line_and_leaves_no_out(setup, tmp_path):
    _, corpus = setup
    out = tmp_path / "ev"
    line = one_line_error(stamp_cli("evaluate", "linear-probe", "--data", corpus, "--out", out, "--no-progress"))
    assert "needs labels" in line and "--label" in line
    assert not out.exists()


def test_one_labelled_spot_is_one_line_and_leaves_no_out(tmp_path):
    from spavis.shards import build_shards
    from spavis.simulate import write_simulated_slice

    vocab = gene_subset(120)
    folder = write_simulated_slice(tmp_path / "in" / "gen0", genes=list(vocab.ensembl_ids),
                                   symbols=list(vocab.symbols), seed=0, n_domains=3, with_image=False, max_row=4,
                                   n_markers=12)
    barcode = pd.read_csv(folder / "spatial" / "tissue_positions.csv").query("in_tissue == 1")["barcode"].iloc[0]
    pd.DataFrame({"barcode": [barcode], "region": ["r1"]}).to_csv(tmp_path / "ann.csv", index=False)
    corpus = build_shards([folder], tmp_path / "c", vocab=vocab, min_genes=5, obs_columns="region",
                          annotations=tmp_path / "ann.csv")
    for task in ("linear-probe", "cluster"):
        out = tmp_path / f"ev-{task}"
        line = one_line_error(stamp_cli("evaluate", task, "--data", corpus, "--label", "region", "--out", out,
                                        "--no-progress"))
        assert "1 labelled spot(s) with 1 label value(s)" in line
        assert not out.exists()
    # an existing --out folder is the user's: kept after a failure
    (tmp_path / "mine").mkdir()
    one_line_error(stamp_cli("evaluate", "linear-probe", "--data", corpus, "--label", "region", "--out",
                             tmp_path / "mine", "--no-progress"))
    assert (tmp_path / "mine").is_dir()


def test_small_low_depth_corpus_scores_expression(tmp_path):
    """~100 spots at ~60 UMIs: Seurat v3's loess fails ("near singularities"); the HVG ranking falls back,
    the PCA baseline and predict-expression finish, and results.md says which ranking was used."""
    from spavis.format import open_corpus
    from spavis.shards import build_shards
    from spavis.simulate import write_simulated_slice
    from stamp.evaluate.data import load_eval_data, variable_genes

    vocab = gene_subset(1000)
    folder = write_simulated_slice(tmp_path / "in" / "gen0", genes=list(vocab.ensembl_ids),
                                   symbols=list(vocab.symbols), seed=0, n_domains=3, with_image=False, max_row=2,
                                   median_umis=60)
    corpus = build_shards([folder], tmp_path / "c", vocab=vocab, min_genes=5)
    ev = load_eval_data(open_corpus(corpus))
    genes, flavor = variable_genes(ev.counts, 5000)
    assert flavor != "seurat_v3" and len(genes) == len(set(genes)) > 0
    out = tmp_path / "ev"
    res = stamp_cli("evaluate", "predict-expression", "--data", corpus, "--out", out, "--no-progress",
                    "--device", "cpu", "--head", "knn,ridge", "--threads", "1")
    assert res.returncode == 0, res.stderr
    df = pd.read_csv(out / "results.csv")
    assert set(df["model"]) == {"pca"} and set(df["method"]) == {"knn", "ridge"}
    assert len(df) == 2 * 5 and np.isfinite(df["mse"]).all()
    assert f"ranked by {flavor}" in (out / "results.md").read_text()


def test_unknown_head_is_one_line(setup, tmp_path):
    _, corpus = setup
    line = one_line_error(stamp_cli("evaluate", "predict-expression", "--data", corpus, "--out", tmp_path / "ev",
                                    "--head", "svm", "--no-progress"))
    assert "--head svm" in line and "mlp" in line
    assert not (tmp_path / "ev").exists()
