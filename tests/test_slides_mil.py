"""`stamp evaluate mil`: ABMIL on GENERATED feature bags (the bag layout of `stamp embed-slides`).

Bags are synthetic: Gaussian tile features; in class "pos" a minority of tiles (the motif)
carries a distinct feature direction, so a slide-level classifier must find those tiles.
Survival times are generated from the same motif (motif patients die sooner). Small and few
epochs so the file runs in seconds on one core.
"""
from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
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
        time, dead = rng.exponential(8.0 if y else 40.0), int(rng.random() < 0.85)  # one per patient
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
            rows.append({"slide": name + ".svs", "patient": f"P{p:02d}", "label": ["neg", "pos"][y],
                         "os_months": round(float(time), 2), "dead": dead})
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


# ----------------------------------------------------------------------------- the real CLI, as users run it

DRIVER = r"""
import json, os, sys, tempfile, traceback
from stamp.cli import app
results = []
for args in json.loads(sys.argv[1]):
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)  # this case's stderr, whoever writes it (rich, logging, warnings)
        try:
            try:
                app(args, prog_name="stamp")
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:
                traceback.print_exc()
                code = -1
            sys.stderr.flush()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        results.append([code, tmp.read().decode(errors="replace")])
print(json.dumps(results))
"""


def stamp_cli_cases(*cases: list) -> list[tuple[int, str]]:
    """Every argument list through the real ``stamp`` typer app (``python -m stamp.cli`` runs the same app), all
    in ONE subprocess so the interpreter and torch start once: [(exit status, stderr)] per case."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("STAMP_DEBUG", None)
    res = subprocess.run([sys.executable, "-c", DRIVER, json.dumps([[str(a) for a in c] for c in cases])],
                         capture_output=True, text=True, timeout=600, env=env, cwd=root)
    assert res.returncode == 0, res.stderr
    return [tuple(r) for r in json.loads(res.stdout.strip().splitlines()[-1])]


def one_line(code: int, err: str) -> str:
    assert code == 1 and "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    return lines[0]


def _numeric_bags(root, n_patients: int = 12, seed: int = 0):
    """Bags named like many cohorts name them (``000``, ``001``: ids that must stay text) with QC thumbnails;
    labels.csv with patient ids ``000``... Returns the labels path."""
    labels, _ = _make_bags(root, n_patients=n_patients, seed=seed)
    df = pd.read_csv(labels, dtype=str)
    ids = {n: f"{i:03d}" for i, n in enumerate(df["slide"].str.replace(".svs", "", regex=False))}
    for old, new in ids.items():
        (root / f"{old}.h5").rename(root / f"{new}.h5")
        (root / "qc" / f"{old}.png").rename(root / "qc" / f"{new}.png")
        with h5py.File(root / f"{new}.h5", "a") as f:
            f.attrs["slide"], f.attrs["qc_png"] = new, f"qc/{new}.png"
    df["slide"] = [ids[s.replace(".svs", "")] for s in df["slide"]]
    df["patient"] = [f"{int(p[1:]):03d}" for p in df["patient"]]
    df.to_csv(labels, index=False)
    return labels


def test_mil_through_the_cli_outputs_only_under_out_and_refuses_bad_inputs_in_one_line(tmp_path):
    """issue 24: items 4, 5, 6 and the low ones, as careless users meet them, through the real CLI.

    Two successful runs: two features folders both called ``feat`` (outputs only under --out, the inputs
    untouched), slide / patient ids ``000``... read as text, one truncated QC thumbnail and one ``qc_png``
    pointing out of its folder (each skips its heatmap with one warning); survival with folds without events
    (named in results.md, no "± nan"). Then every refusal: one line, exit 1, no --out left."""
    from PIL import Image

    labels = _numeric_bags(tmp_path / "cohortA" / "feat")
    _numeric_bags(tmp_path / "cohortB" / "feat", seed=1)
    a, b = tmp_path / "cohortA" / "feat", tmp_path / "cohortB" / "feat"
    qc = a / "qc" / "000.png"  # patient 000 (class neg): slides 000, 001; patient 001 (pos): slide 002
    Image.new("RGB", (128, 80), (200, 100, 150)).save(qc)
    qc.write_bytes(qc.read_bytes()[: len(qc.read_bytes()) // 2])
    with h5py.File(a / "002.h5", "a") as f:
        f.attrs["qc_png"] = "../../cohortA-labels.csv"
    (tmp_path / "cohortA-labels.csv").write_text("not an image\n")
    common = ["--labels", labels, "--label", "label", "--patient", "patient", "--epochs", "1", "--folds", "2"]
    # survival: one event in twelve patients -> a test fold without events
    surv = pd.read_csv(labels, dtype=str)
    surv["dead"] = (surv["patient"] == "003").astype(int)
    surv.to_csv(tmp_path / "surv.csv", index=False)

    # the refusals: (labels frame edit or extra args, expected text)
    base = pd.read_csv(labels, dtype=str)
    bad = tmp_path / "bad"
    bad.mkdir()
    cases, expect = [], []

    def refuse(name, edit=None, extra=(), features=(a,), want=""):
        df = base.copy()
        if edit is not None:
            df = edit(df)
        path = bad / f"{name}.csv"
        df.to_csv(path, index=False)
        args = ["evaluate", "mil", *[x for f in features for x in ("--features", f)], "--labels", path,
                "--patient", "patient", "--out", bad / f"out-{name}", "--folds", "2", "--epochs", "1", *extra]
        if not any(str(x).startswith("--survival") for x in extra) and "--label" not in extra:
            args += ["--label", "label"]
        cases.append(args)
        expect.append((name, want))

    nan_bags = tmp_path / "nan"
    _numeric_bags(nan_bags, seed=2)
    with h5py.File(nan_bags / "005.h5", "a") as f:
        feats = f["features"][()]
        feats[3, 2] = np.nan
        del f["features"]
        f["features"] = feats
    refuse("nan-bag", features=(nan_bags,), want="slide '005' has 1 of")
    empty = tmp_path / "empty"
    _numeric_bags(empty, seed=4)
    write_bag(empty / "006.h5", np.zeros((0, D), np.float32), np.zeros((0, 2)), {})
    refuse("empty-bag", features=(empty,), want="006.h5: a bag without tiles")
    refuse("same-folder-twice", features=(a, tmp_path / "cohortA" / ".." / "cohortA" / "feat"),
           want="the same folder as --features")
    short = tmp_path / "short" / "feat2"
    _numeric_bags(short, seed=3)
    (short / "007.h5").unlink()
    refuse("second-folder-lacks-a-bag", features=(a, short), want="have no bag in")
    refuse("conflicting-duplicate", lambda d: pd.concat([d, d.iloc[[0]].assign(label="pos")]),
           want="slide '000' is listed more than once with different 'label' values (neg, pos)")
    refuse("all-censored", lambda d: d.assign(dead="0"), extra=("--survival", "os_months,dead"),
           want="no patient has an event")
    refuse("half-event", lambda d: d.assign(dead=np.where(d.patient == "002", "0.5", d.dead)),
           extra=("--survival", "os_months,dead"), want="'dead' of slide '003' is 0.5; the event column holds 1")
    refuse("infinite-time", lambda d: d.assign(os_months=np.where(d.slide == "004", "inf", d.os_months)),
           extra=("--survival", "os_months,dead"), want="'os_months' of slide '004' is inf; survival times are finite")
    refuse("two-times", lambda d: d.assign(os_months=np.where(d.slide == "001", "99", d.os_months)),
           extra=("--survival", "os_months,dead"), want="patient '000' has slides with different 'os_months' values")
    refuse("lr-inf", extra=("--lr", "inf"), want="--lr inf: give a positive, finite learning rate")
    refuse("lr-beyond-float32", extra=("--lr", "1e300"), want="--lr 1e+300: give a positive, finite learning rate")
    refuse("diverging", extra=("--lr", "1e30"), want="the ABMIL training loss became")
    refuse("unknown-slide", lambda d: pd.concat([d, d.iloc[[0]].assign(slide="ghost.svs", patient="099")]),
           want="1 labelled slides have no bag in")
    refuse("two-patients", lambda d: pd.concat([d, d.iloc[[0]].assign(patient="077")]), want="belongs to two patients")
    refuse("small-class", lambda d: d.assign(label=np.where(d.patient == "000", "rare", d.label)),
           want="class 'rare' has 1 patients, fewer than the 2 folds")
    refuse("no-column", extra=("--label", "grade"), want="no column 'grade'")

    # a seed numpy cannot take: the option's own bounds (it was a traceback after the labels were read)
    cases.append(["evaluate", "mil", "--features", a, *common, "--seed", "-1", "--out", bad / "out-seed"])

    inputs = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    res = stamp_cli_cases(
        ["evaluate", "mil", "--features", a, "--features", b, *common, "--heatmaps", "1", "--no-progress", "--out",
         tmp_path / "out"],
        ["evaluate", "mil", "--features", a, "--labels", tmp_path / "surv.csv", "--survival", "os_months,dead",
         "--patient", "patient", "--epochs", "1", "--folds", "2", "--no-progress", "--out", tmp_path / "surv"],
        *cases)

    # 1. outputs only under --out, named by the shortest distinguishing suffix; inputs untouched
    code, err = res[0]
    assert code == 0 and "Traceback" not in err, err
    assert {p: p.stat().st_mtime_ns for p in inputs} == inputs
    assert not [p for p in tmp_path.rglob("*") if p not in inputs and p.is_file()
                and not {tmp_path / "out", tmp_path / "surv"} & set(p.parents)]
    r = pd.read_csv(tmp_path / "out" / "results.csv", dtype={"features": str})
    assert set(r.features) == {"cohortA/feat", "cohortB/feat"}
    heat = tmp_path / "out" / "heatmaps"
    assert sorted(p.name for p in (heat / "cohortB" / "feat").glob("*.png")) == ["000.png", "001.png", "002.png"]
    assert sorted(p.name for p in (heat / "cohortA" / "feat").glob("*.png")) == ["001.png"]  # 000, 002 skipped
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 2, err
    assert "the QC thumbnail of slide 000 is unreadable" in err and "slide 002's qc_png" in err
    assert "points outside the features folder" in err
    assert "heatmaps/" in (tmp_path / "out" / "results.md").read_text()
    # 2. survival: the fold without events is named, the mean is over the scored fold and says so
    code, err = res[1]
    assert code == 0 and "Traceback" not in err, err
    s = pd.read_csv(tmp_path / "surv" / "results.csv")
    assert sorted(s.n_events[s.model == "abmil"]) == [0, 1]
    md = (tmp_path / "surv" / "results.md").read_text()
    assert "± nan" not in md and "(1 of 2 folds)" in md
    k = int(s.fold[(s.model == "abmil") & (s.n_events == 0)].iloc[0])
    assert f"feat · abmil · fold {k}: no c_index (no event among its 6 test patients" in md
    # 3. every refusal: one line, nothing left in --out, no fold trained before a later folder was checked
    for (name, want), (code, err) in zip(expect, res[2:]):
        line = one_line(code, err)
        assert want in line, (name, line)
        assert not (bad / f"out-{name}").exists(), name
    code, err = res[-1]
    assert code == 2 and "Traceback" not in err and "'--seed'" in err and not (bad / "out-seed").exists(), err
