"""`stamp evaluate mil`: ABMIL on GENERATED feature bags (the bag layout of `stamp embed-slides`).

Bags are synthetic: Gaussian tile features; in class "pos" a minority of tiles (the motif)
carries a distinct feature direction, so a slide-level classifier must find those tiles.
Survival times are generated from the same motif (motif patients die sooner). Small and few
epochs so the file runs in seconds on one core.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from stamp.slides.bags import write_bag
from stamp.evaluate.mil import MilOptions, evaluate_mil

D = 16


def _make_bags(root, n_patients: int = 30, seed: int = 0, qc: bool = True):
    """Bags + labels.csv; returns (labels path, {slide: motif mask})."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    motif = rng.normal(0, 1, D) * 3.5
    rows, truth = [], {}
    root.mkdir(parents=True, exist_ok=True)
    for p in range(n_patients):
        y = p % 2
        for s in range(2 if p % 3 == 0 else 1):  # some patients have two slides
            name = f"P{p:02d}-S{s}"
            n = int(rng.integers(20, 40))
            f = rng.normal(0, 1, (n, D)).astype(np.float32)
            m = np.zeros(n, bool)
            if y:
                m[rng.choice(n, max(3, n // 6), replace=False)] = True
                f[m] += motif
            coords = np.stack([(np.arange(n) % 8) * 256, (np.arange(n) // 8) * 256], 1)
            attrs = {"slide": name, "tile_px_level0": 256}
            if qc:
                (root / "qc").mkdir(exist_ok=True)
                Image.new("RGB", (128, 80), (240, 240, 240)).save(root / "qc" / f"{name}.png")
                attrs.update(qc_png=f"qc/{name}.png", qc_downsample=16.0)
            write_bag(root / f"{name}.h5", f, coords, attrs)
            truth[name] = m
            time = rng.exponential(8.0 if y else 40.0)
            rows.append({"slide": name + ".svs", "patient": f"P{p:02d}", "label": ["neg", "pos"][y],
                         "os_months": round(float(time), 2), "dead": int(rng.random() < 0.85)})
    labels = root.parent / f"{root.name}-labels.csv"
    pd.DataFrame(rows).to_csv(labels, index=False)
    return labels, truth


def test_abmil_separates_classes_and_attends_to_the_motif(tmp_path):
    from sklearn.metrics import roc_auc_score

    labels, truth = _make_bags(tmp_path / "bags", n_patients=40)
    out = tmp_path / "eval"
    res = evaluate_mil([tmp_path / "bags"], labels, label="label", patient="patient", out=out,
                       options=MilOptions(epochs=10, heatmaps_per_class=1))
    r = res.results
    abmil = r[r.model == "abmil"]
    assert len(abmil) == 5 and set(r.model) == {"abmil", "mean-logreg"}
    assert abmil.auc.mean() >= 0.9, abmil
    # attention ranks the motif tiles above the other tissue tiles of the same slide
    aucs = [roc_auc_score(truth[s], a) for d in res.attention.values() for s, (_, a) in d.items() if truth[s].any()]
    assert len(aucs) >= 15 and np.mean(aucs) >= 0.9
    # folds never share a patient; every patient is tested once
    tests = [set(te) for _, te in res.folds]
    assert all(not (a & b) for i, a in enumerate(tests) for b in tests[i + 1:])
    assert sorted(i for t in tests for i in t) == list(range(40))
    for tr, te in res.folds:
        assert not set(tr) & set(te)
    assert {"P00", "P01"} <= {p for _, p in res.attention}
    # two slides of one patient are one bag: both slides get attention from the same test fold
    assert set(res.attention[("bags", "P00")]) == {"P00-S0", "P00-S1"}
    assert {"results.csv", "results.md", "roc.png", "predictions.csv"} <= {p.name for p in out.iterdir()}
    assert len(list((out / "heatmaps" / "bags").glob("*.png"))) >= 2
    md = (out / "results.md").read_text()
    assert "| bags | abmil |" in md and "±" in md


def test_survival_gives_a_c_index_and_a_cox_baseline(tmp_path):
    labels, _ = _make_bags(tmp_path / "bags", qc=False)
    res = evaluate_mil([tmp_path / "bags"], labels, survival=("os_months", "dead"), patient="patient",
                       out=tmp_path / "eval", options=MilOptions(epochs=4))
    r = res.results
    assert set(r.model) == {"abmil", "mean-cox"} and len(r) == 10
    assert r.c_index.between(0, 1).all()
    assert r[r.model == "mean-cox"].c_index.mean() > 0.6  # motif patients die sooner: the Cox baseline sees it
    assert "c_index" in (tmp_path / "eval" / "results.md").read_text()


def test_two_feature_folders_share_the_folds_via_the_cli(tmp_path):
    from stamp.cli import app

    labels, _ = _make_bags(tmp_path / "enc_a", n_patients=20, qc=False)
    _make_bags(tmp_path / "enc_b", n_patients=20, seed=1, qc=False)
    out = tmp_path / "eval"
    res = CliRunner().invoke(app, ["evaluate", "mil", "--features", str(tmp_path / "enc_a"), "--features",
                                   str(tmp_path / "enc_b"), "--labels", str(labels), "--label", "label", "--patient",
                                   "patient", "--out", str(out), "--epochs", "3", "--folds", "4", "--no-progress"])
    assert res.exit_code == 0, res.output
    r = pd.read_csv(out / "results.csv")
    assert set(r.features) == {"enc_a", "enc_b"} and len(r) == 2 * 2 * 4
    same = r.groupby(["fold", "model"]).n_test.nunique()
    assert (same == 1).all()


@pytest.mark.parametrize("case", ["unknown-slide", "two-patients", "small-class", "empty-bag", "no-column"])
def test_bad_mil_inputs_are_one_line(tmp_path, case):
    from stamp.cli import app

    labels, _ = _make_bags(tmp_path / "bags", n_patients=12, qc=False)
    df = pd.read_csv(labels)
    expect = {"unknown-slide": "have no bag in", "two-patients": "belongs to two patients",
              "small-class": "fewer than the 5 folds", "empty-bag": "a bag without tiles",
              "no-column": "no column 'grade'"}[case]
    label = "label"
    if case == "unknown-slide":
        df.loc[len(df)] = {"slide": "ghost.svs", "patient": "P99", "label": "neg", "os_months": 1.0, "dead": 1}
    elif case == "two-patients":
        row = df.iloc[0].to_dict()
        df.loc[len(df)] = {**row, "patient": "P77"}
    elif case == "small-class":
        df.loc[df.patient == "P00", "label"] = "rare"
    elif case == "empty-bag":
        write_bag(tmp_path / "bags" / "P01-S0.h5", np.zeros((0, D), np.float32), np.zeros((0, 2)), {})
    else:
        label = "grade"
    df.to_csv(labels, index=False)
    res = CliRunner().invoke(app, ["evaluate", "mil", "--features", str(tmp_path / "bags"), "--labels", str(labels),
                                   "--label", label, "--out", str(tmp_path / "o"), "--epochs", "1"])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expect in lines[0], res.output
