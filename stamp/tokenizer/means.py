"""Per-gene means for the tokenizer: read means files, turn means into float32 divisors.

The released STAMP means file is a .npy of 20,310 float64 in vocabulary order; .csv/.txt
(one value a line, optionally after a gene column and a header) and .parquet (first
numeric column, or ``mean``) are read too.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from stamp.errors import TokenizerError

MEAN_COLUMNS = ("nonzero_mean_cp10k", "nonzero_mean_raw")


def load_means_file(path: str | os.PathLike, n_genes: int | None = None) -> np.ndarray:
    """Read per-gene means (.npy, .csv/.txt one value a line, or .parquet first numeric column).

    The released STAMP means file is a .npy of 20,310 float64 in vocabulary order.
    """
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"means file {path} does not exist; pass the released .npy (or .csv/.txt/.parquet) path")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            try:
                values = np.load(path, allow_pickle=False)
            except ValueError as exc:
                if "pickle" not in str(exc):
                    raise
                raise TokenizerError(f"means file {path} is not a numeric .npy array (numpy would read it as a "
                                     "pickle, which is never loaded); save the means with numpy.save") from None
        elif suffix in (".csv", ".txt", ".tsv"):
            # one value a line, optionally after a gene column and a header: take the last field
            fields = [ln.replace("\t", ",").split(",")[-1].strip() for ln in path.read_text().splitlines()]
            fields = [f for f in fields if f]
            if fields and not _is_number(fields[0]):
                fields = fields[1:]
            values = np.array([float(f) if f.lower() not in ("nan", "na", "") else np.nan for f in fields])
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            numeric = [f.name for f in table.schema if pa.types.is_floating(f.type) or pa.types.is_integer(f.type)]
            if not numeric:
                raise TokenizerError(f"means file {path} has no numeric column; write one value per vocabulary gene")
            name = "mean" if "mean" in numeric else numeric[0]
            values = table.column(name).to_numpy(zero_copy_only=False)
        else:
            raise TokenizerError(f"means file {path}: unknown extension {suffix!r}; use .npy, .csv, .txt or .parquet")
        values = np.asarray(values, dtype=np.float64).ravel()
    except (ValueError, OSError) as exc:
        raise TokenizerError(f"cannot read means file {path}: {exc}") from exc
    if n_genes is not None and values.shape[0] != n_genes:
        raise TokenizerError(
            f"means file {path} has {values.shape[0]} values but the vocabulary has {n_genes} genes; "
            "it needs one mean per vocabulary gene, in vocabulary order (the released STAMP file has 20,310)"
        )
    return values


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def effective_means(means: np.ndarray, mode: str) -> np.ndarray:
    """Means as float32 divisors: stamp-v1 rounds half-up; NaN/inf/<=0 become 1 in both modes."""
    m = np.asarray(means, dtype=np.float64).copy()
    if mode in ("released", "stamp-v1"):  # the released rules ("stamp-v1" before the rename)
        m = np.floor(m + 0.5)
    bad = ~np.isfinite(m) | (m <= 0)
    m[bad] = 1.0
    return m.astype(np.float32)

