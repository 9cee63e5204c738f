"""Spot QC as in the STAMP paper: in-tissue spots with >= min_genes detected vocabulary genes.

Counts must be finite and non-negative (a slice that breaks this is corrupt or wrongly
processed, so it fails rather than being silently repaired); non-integer counts are accepted
but recorded as processed data, because downstream means of raw counts assume integers.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import scipy.sparse as sp

from spavis.errors import QCError, SpavisWarning
from spavis.format import schema as S

DEFAULT_MIN_GENES = 100
FLOAT32_EXACT_MAX = S.FLOAT32_EXACT_MAX


@dataclass
class QCResult:
    keep: np.ndarray  # bool per input spot
    n_genes: np.ndarray  # detected vocabulary genes per input spot (int32)
    n_spots_input: int
    n_spots_in_tissue: int
    n_spots_kept: int
    counts_are_integer: bool
    has_coordinates: bool
    min_genes: int
    warnings: list[str] = field(default_factory=list)
    max_count: float = 0.0  # largest count of the harmonized matrix
    counts_exceed_float32: bool = False  # a count >= 2**24: float32 may have rounded it

    def to_dict(self) -> dict:
        """Counters only (no per-spot arrays), e.g. for slides.parquet / manifest."""
        d = asdict(self)
        d.pop("keep")
        d.pop("n_genes")
        return d


def _values(X) -> np.ndarray:
    if sp.issparse(X):
        return X.data if hasattr(X, "data") else sp.csr_matrix(X).data
    return np.asarray(X).ravel()


def _check_values(vals: np.ndarray, name: str, where: str) -> None:
    if vals.dtype.kind not in "fiub":
        raise QCError(f"{name}: {where} has non-numeric values ({vals.dtype}); the input is corrupt.")
    if vals.size:  # fast path, two reductions without temporaries (min/max propagate NaN)
        lo, hi = vals.min(), vals.max()
        if (vals.dtype.kind != "f" or (np.isfinite(lo) and np.isfinite(hi))) and lo >= 0:
            return
    if vals.dtype.kind == "f":
        bad = ~np.isfinite(vals)
        if bad.any():
            n_nan = int(np.isnan(vals).sum())
            raise QCError(
                f"{name}: {where} has {int(bad.sum())} non-finite values ({n_nan} NaN, "
                f"{int(bad.sum()) - n_nan} infinite). Counts must be finite: re-export the raw "
                "counts (filtered_feature_bc_matrix) instead of a processed matrix."
            )
    neg = vals < 0
    if neg.any():
        raise QCError(
            f"{name}: {where} has {int(neg.sum())} negative values (min {vals[neg].min():g}). "
            "Counts must be non-negative: this looks like scaled/centred data; use the raw counts."
        )


def apply_qc(
    adata,
    X_vocab,
    *,
    min_genes: int = DEFAULT_MIN_GENES,
    slice_name: str | None = None,
) -> QCResult:
    """Which spots of a read slice to keep.

    ``adata``: read_slice output (uses obs['in_tissue'], obsm['spatial'], X for value checks).
    ``X_vocab``: the harmonized spots x vocabulary matrix (any scipy sparse or dense array).
    Raises QCError for an empty matrix or NaN / infinite / negative counts.
    """
    name = slice_name or str(adata.uns.get(S.UNS_SPAVIS, {}).get("source_path", "slice"))
    if not (sp.issparse(X_vocab) and X_vocab.format == "csr"):
        X_vocab = sp.csr_matrix(X_vocab)  # (a CSR input is used as is: it keeps its canonical-format flag)
    n = adata.n_obs
    if n == 0 or adata.n_vars == 0:
        raise QCError(f"{name}: the count matrix is empty ({adata.n_obs} spots x {adata.n_vars} features); the input holds no data.")
    if X_vocab.shape[0] != n:
        raise QCError(f"{name}: harmonized matrix has {X_vocab.shape[0]} rows for {n} spots; harmonize this slice again.")
    _check_values(_values(adata.X), name, "the count matrix")
    vals = X_vocab.data
    _check_values(vals, name, "the harmonized matrix")
    if X_vocab.nnz == 0 and sp.csr_matrix(adata.X).count_nonzero() == 0:
        raise QCError(f"{name}: every count is zero; the matrix is empty or the wrong file was downloaded.")

    notes: list[str] = []
    # rint(v) == v is mod(v, 1) == 0 for the finite values checked above, several times faster
    counts_are_integer = bool(np.array_equal(np.rint(vals), vals)) if vals.dtype.kind == "f" else True
    if not counts_are_integer:
        msg = (
            f"{name}: counts are not integers (e.g. {vals[np.mod(vals, 1) != 0][0]:g}); the slice is "
            "recorded as processed data, not raw UMI counts."
        )
        notes.append(msg)
        warnings.warn(msg, SpavisWarning, stacklevel=2)
    max_count = float(vals.max()) if vals.size else 0.0
    exceeds = max_count >= FLOAT32_EXACT_MAX
    if exceeds:
        n_big = int((vals >= FLOAT32_EXACT_MAX).sum())
        msg = (
            f"{name}: {n_big} count(s) reach 2^24 = {FLOAT32_EXACT_MAX} (max {max_count:.0f}); float32 "
            "cannot hold such integers exactly, so they may be off by a few units. Recorded as "
            "counts_exceed_float32 in slides.parquet; check that the matrix holds UMI counts."
        )
        notes.append(msg)
        warnings.warn(msg, SpavisWarning, stacklevel=2)

    in_tissue = (
        adata.obs["in_tissue"].to_numpy(dtype=bool) if "in_tissue" in adata.obs else np.ones(n, bool)
    )
    if not X_vocab.has_canonical_format:  # never mutate the caller's matrix
        X_vocab = X_vocab.copy()
        X_vocab.sum_duplicates()
    row_nnz = np.diff(X_vocab.indptr)
    is_zero = X_vocab.data == 0
    if is_zero.any():  # explicitly stored zeros are not detected genes
        zeros = np.bincount(np.repeat(np.arange(n), row_nnz), weights=is_zero, minlength=n)
        n_genes = (row_nnz - zeros).astype(np.int32)
    else:
        n_genes = row_nnz.astype(np.int32)
    keep = in_tissue & (n_genes >= min_genes)

    xy = adata.obsm[S.OBSM_SPATIAL] if S.OBSM_SPATIAL in adata.obsm else None
    has_coordinates = xy is not None and bool(np.isfinite(np.asarray(xy, dtype=np.float64)).all(axis=1).any())
    if has_coordinates:
        finite = np.isfinite(np.asarray(xy, dtype=np.float64)).all(axis=1)
        dropped = int((keep & ~finite).sum())
        if dropped:
            notes.append(f"{name}: {dropped} kept spots had no coordinates and were dropped.")
            keep &= finite
    else:
        notes.append(f"{name}: no spot coordinates; spots are kept but the slice gets no neighbour graph.")
    n_kept = int(keep.sum())
    if n_kept == 0 and not in_tissue.any():
        notes.append(
            f"{name}: no spot is marked in tissue (the in_tissue column of the positions file is all 0, "
            "or no barcode of the matrix is in it), so the slice contributes no spots. Check that the "
            "positions file belongs to this slice."
        )
    elif n_kept == 0:
        notes.append(
            f"{name}: no spot passes QC (in tissue and >= {min_genes} detected vocabulary genes; "
            f"the best spot has {int(n_genes.max()) if n else 0}). Lower --min-genes for small gene panels."
        )
    return QCResult(
        keep=keep, n_genes=n_genes, n_spots_input=n, n_spots_in_tissue=int(in_tissue.sum()),
        n_spots_kept=n_kept, counts_are_integer=counts_are_integer, has_coordinates=has_coordinates,
        min_genes=int(min_genes), warnings=notes, max_count=max_count, counts_exceed_float32=bool(exceeds),
    )


def geometry_report(
    adata,
    graph_method: str,
    pxl_row: np.ndarray | None,
    pxl_col: np.ndarray | None,
    array_row: np.ndarray | None,
    array_col: np.ndarray | None,
    spot_diameter_fullres: float | None,
    *,
    slice_name: str,
) -> dict:
    """µm per pixel of a slice and a warning for each thing its geometry lacks.

    Returns ``{"um_per_px", "um_per_px_method", "warnings"}`` for slides.parquet: the
    reader's notes (unreadable positions / scale factors) plus what the build loses because
    of them (neighbour graph, µm scale). Each warning is also emitted as a SpavisWarning.
    """
    from spavis.neighbors import pixel_scale

    um, how = pixel_scale(pxl_row, pxl_col, array_row, array_col, spot_diameter_fullres)
    meta = adata.uns.get(S.UNS_SPAVIS, {}) if hasattr(adata, "uns") else {}
    notes = [f"{slice_name}: {w}" for w in list(meta.get("warnings", []) if isinstance(meta, dict) else [])]
    raw = meta.get("spot_diameter_fullres") if isinstance(meta, dict) else None
    if raw is not None and how != "scalefactors" and um is not None:
        lack = f"spot_diameter_fullres={raw} is not a positive number"
    else:
        lack = "no scale factors (spatial/scalefactors_json.json)"
    if graph_method == "none":
        new = (f"{slice_name}: no spot positions (tissue positions missing or unreadable): the slice has no "
               "neighbour graph (spatial training skips it) and no µm scale; its spots are kept.")
    elif um is None and graph_method == "lattice":
        new = (f"{slice_name}: no pixel coordinates: the neighbour graph uses the array lattice (100 µm "
               "spacing), and there is no µm-per-pixel scale (images cannot be placed on the spots).")
    elif how == "lattice":
        new = (f"{slice_name}: {lack}: the neighbour graph uses the array lattice and µm per pixel "
               f"({um:.4f}) is estimated from pixel vs lattice distances.")
    elif how == "spot-spacing":
        new = (f"{slice_name}: {lack} and no array lattice: the graph and µm per pixel ({um:.4f}) are "
               "estimated by taking the median spot gap as 100 µm.")
    else:
        new = None
    if new is not None:
        notes.append(new)
    for note in notes:
        warnings.warn(note, SpavisWarning, stacklevel=2)
    return {"um_per_px": um, "um_per_px_method": how, "warnings": notes}
