"""`spavis info DIR`: a summary of a corpus from its metadata files (no expression scan)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from spavis.format import schema as S
from spavis.errors import ValidationError


def info(out: str | os.PathLike) -> dict[str, Any]:
    """Summary dict: format, vocabulary, parameters, sizes, per-source/organ/condition counts."""
    root = Path(out)
    try:
        manifest = json.loads((root / S.MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        raise ValidationError(
            f"{root}: no readable {S.MANIFEST_FILE}; point `spavis info` at a build-shards --out directory."
        ) from None
    slides = pq.read_table(root / S.SLIDES_FILE).to_pandas()
    genes = pq.read_table(root / S.GENES_FILE, columns=["nnz", "nonzero_mean_raw"]).to_pandas()
    outputs = manifest.get("outputs", [])
    kept = slides["n_spots_kept"].to_numpy()
    return {
        "path": str(root),
        "format": f"{manifest.get('format')} v{manifest.get('format_version')}",
        "spavis_version": manifest.get("spavis_version"),
        "vocabulary": manifest.get("vocabulary"),
        "parameters": manifest.get("parameters"),
        "n_slides": int(len(slides)),
        "n_spots": int(kept.sum()),
        "n_spots_input": int(slides["n_spots_input"].sum()),
        "n_spots_in_tissue": int(slides["n_spots_in_tissue"].sum()),
        "spots_per_slide": _quantiles(kept),
        "n_expression_files": sum(1 for o in outputs if o.get("kind") == "expression"),
        "n_genes_detected": int((genes["nnz"] > 0).sum()),
        "n_nonzero": int(genes["nnz"].sum()),
        "mean_genes_per_spot": float(genes["nnz"].sum() / kept.sum()) if kept.sum() else 0.0,
        "slides_without_coordinates": int((~slides["has_coordinates"]).sum()),
        "slides_with_noninteger_counts": int((~slides["counts_are_integer"]).sum()),
        # format v2 columns (absent in v1 corpora)
        "slides_without_um_per_px": _count(slides, "um_per_px", lambda c: c.isna()),
        "slides_with_counts_above_float32": _count(slides, "counts_exceed_float32", lambda c: c.fillna(False).astype(bool)),
        "slides_with_warnings": _count(slides, "warnings", lambda c: c.map(lambda w: w is not None and len(w) > 0)),
        "size_bytes": int(sum(o.get("size") or 0 for o in outputs)),
        "sources": _value_counts(slides["source"]),
        "organs": _value_counts(slides["organ"].fillna("unknown")),
        "conditions": _value_counts(slides["condition"]),
        "species": _value_counts(slides["species"].fillna("unknown")),
    }


def _count(slides, column: str, predicate) -> int | None:
    return int(predicate(slides[column]).sum()) if column in slides.columns else None


def _quantiles(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {}
    q = np.quantile(values, [0.0, 0.5, 1.0])
    return {"min": float(q[0]), "median": float(q[1]), "max": float(q[2])}


def _value_counts(series) -> dict[str, int]:
    counts = series.astype(str).value_counts()
    return {str(k): int(v) for k, v in sorted(counts.items())}
