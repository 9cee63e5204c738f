"""results.csv (one row per model x task x method x fold) and results.md (mean ± sd tables)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from spavis.format.io import atomic_write_text

KEY_COLUMNS = ["task", "method", "model", "kind", "fold", "scheme", "n_train", "n_test"]
METRICS = {
    "linear-probe": ["balanced_accuracy", "weighted_f1"],
    "cluster": ["ari", "nmi", "silhouette", "calinski_harabasz"],
    "predict-expression": ["mse", "pcc_v", "pcc_e"],
}
HIGHER_IS_BETTER = {"mse": False}


def results_frame(rows: Sequence[dict]) -> pd.DataFrame:
    df = pd.DataFrame(list(rows))
    metrics = [m for ms in METRICS.values() for m in ms]
    for col in KEY_COLUMNS + metrics:
        if col not in df.columns:
            df[col] = np.nan
    extra = [c for c in df.columns if c not in KEY_COLUMNS + metrics]
    return df[KEY_COLUMNS + metrics + extra]


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and sd (ddof 1; 0 for one fold) of every metric per task x method x model, run order kept."""
    rows = []
    for (task, method, model), g in df.groupby(["task", "method", "model"], sort=False):
        row = {"task": task, "method": method, "model": model, "kind": g["kind"].iloc[0], "n_folds": len(g)}
        for m in METRICS.get(task, []):
            v = g[m].to_numpy(dtype=float)
            v = v[np.isfinite(v)]
            row[m] = float(v.mean()) if v.size else np.nan
            row[f"{m}_sd"] = float(v.std(ddof=1)) if v.size > 1 else (0.0 if v.size else np.nan)
        rows.append(row)
    return pd.DataFrame(rows)


def _cell(mean: float, sd: float) -> str:
    return "n/a" if not np.isfinite(mean) else f"{mean:.3f} ± {sd:.3f}"


TABLE1_TITLE = "## Table 1 layout"
MARKS = ("V", "L", "G")


def table1(df: pd.DataFrame, marks: Mapping[str, str] | None = None) -> list[str]:
    """The paper's Table 1 layout: one row per model (run order) with its V / L / G marks (the modalities it
    saw in pretraining; none for the baselines), one column per task, method and metric (mean ± sd over
    folds, the best of each column in bold)."""
    s = summary(df)
    marks = dict(marks or {})
    columns = [(t, m, metric) for (t, m), _ in s.groupby(["task", "method"], sort=False) for metric in METRICS.get(t, [])]
    models = list(dict.fromkeys(s["model"].tolist()))
    cell = {(r["model"], r["task"], r["method"], metric): (r[metric], r[f"{metric}_sd"])
            for _, r in s.iterrows() for metric in METRICS.get(r["task"], [])}
    best = {}
    for t, m, metric in columns:
        vals = np.array([cell.get((name, t, m, metric), (np.nan, np.nan))[0] for name in models], dtype=float)
        if np.isfinite(vals).any() and len(models) > 1:
            best[t, m, metric] = models[int(np.nanargmax(vals) if HIGHER_IS_BETTER.get(metric, True)
                                            else np.nanargmin(vals))]
    lines = [f"{TABLE1_TITLE} (rows: models; V / L / G: vision, language, genes seen in pretraining; "
             "mean ± sd over folds)", "",
             "| model | " + " | ".join(MARKS) + " | " + " | ".join(f"{t} {m} {metric}" for t, m, metric in columns) + " |",
             "|---|" + ":-:|" * len(MARKS) + "---|" * len(columns)]
    for name in models:
        have = str(marks.get(name) or "")
        flags = ["✓" if k in have.split("+") else "" for k in MARKS]
        cells = []
        for t, m, metric in columns:
            mean, sd = cell.get((name, t, m, metric), (np.nan, np.nan))
            c = _cell(mean, sd)
            cells.append(f"**{c}**" if best.get((t, m, metric)) == name else c)
        lines.append(f"| {name} | " + " | ".join(flags) + " | " + " | ".join(cells) + " |")
    return lines + [""]


def markdown(df: pd.DataFrame, *, title: str, notes: Sequence[str] = (), marks: Mapping[str, str] | None = None) -> str:
    """One table per task and method: models as rows, metrics mean ± sd over folds; best in bold. With several
    models and their ``marks``, the paper's Table 1 layout (:func:`table1`) comes first."""
    s = summary(df)
    lines = [f"# {title}", ""] + [f"- {n}" for n in notes] + ([""] if notes else [])
    if marks is not None and s["model"].nunique() > 1:
        lines += table1(df, marks)
    for (task, method), g in s.groupby(["task", "method"], sort=False):
        metrics = METRICS.get(task, [])
        scheme = df[(df.task == task) & (df.method == method)]["scheme"].iloc[0]
        lines += [f"## {task} ({method}; {scheme}, mean ± sd over {int(g['n_folds'].max())} folds)", "",
                  "| model | kind | " + " | ".join(metrics) + " |",
                  "|---|---|" + "---|" * len(metrics)]
        best = {}
        for m in metrics:
            vals = g[m].to_numpy(dtype=float)
            if np.isfinite(vals).any():
                best[m] = np.nanargmax(vals) if HIGHER_IS_BETTER.get(m, True) else np.nanargmin(vals)
        for i, (_, r) in enumerate(g.iterrows()):
            cells = []
            for m in metrics:
                c = _cell(r[m], r[f"{m}_sd"])
                cells.append(f"**{c}**" if best.get(m) == i and len(g) > 1 else c)
            lines.append(f"| {r['model']} | {r['kind']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write_results(out: Path, rows: Sequence[dict], *, title: str, notes: Sequence[str] = (),
                  marks: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Write results.csv and results.md into ``out`` atomically; returns the frame (``marks``: model -> its
    V / L / G marks, for the Table 1 layout of results.md; results.csv does not carry them)."""
    df = results_frame(rows)
    atomic_write_text(out / "results.csv", df.to_csv(index=False, float_format="%.6g"))
    atomic_write_text(out / "results.md", markdown(df, title=title, notes=notes, marks=marks))
    return df


def table1_section(results_md: str) -> str:
    """The Table 1 block of a results.md (empty when it has none): what ``stamp evaluate`` prints."""
    lines = results_md.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith(TABLE1_TITLE)), None)
    if start is None:
        return ""
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "\n".join(lines[start:end]).strip() + "\n"
