"""results.csv (one row per model x task x method x fold) and results.md (mean ± sd tables)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

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


def markdown(df: pd.DataFrame, *, title: str, notes: Sequence[str] = ()) -> str:
    """One table per task and method: models as rows, metrics mean ± sd over folds; best in bold."""
    s = summary(df)
    lines = [f"# {title}", ""] + [f"- {n}" for n in notes] + ([""] if notes else [])
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


def write_results(out: Path, rows: Sequence[dict], *, title: str, notes: Sequence[str] = ()) -> pd.DataFrame:
    """Write results.csv and results.md into ``out`` atomically; returns the frame."""
    df = results_frame(rows)
    atomic_write_text(out / "results.csv", df.to_csv(index=False, float_format="%.6g"))
    atomic_write_text(out / "results.md", markdown(df, title=title, notes=notes))
    return df
