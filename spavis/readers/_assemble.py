"""Turn the parts every reader finds (matrix, barcodes, features, positions, scale factors,
lowres image) into the one AnnData layout described in docs/architecture.md.

Keeping this in one place is what makes every input layout produce identical output.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from spavis.errors import ReaderError
from spavis.format import schema as S

ENSEMBL_RE = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")
_CORE_BARCODE_RE = re.compile(r"([ACGTN]{12,})")
POSITION_COLUMNS = ["in_tissue", "array_row", "array_col", "pxl_row", "pxl_col"]


def to_csr_float32(X: Any) -> sp.csr_matrix:
    """CSR float32 with sorted indices; values unchanged (raw counts stay raw)."""
    if sp.issparse(X):
        X = sp.csr_matrix(X, dtype=np.float32)
    else:
        X = sp.csr_matrix(np.asarray(X, dtype=np.float32))
    if not X.has_sorted_indices:
        X.sort_indices()
    return X


def split_gene_ids(ids: np.ndarray, symbols: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return (gene_ids, gene_symbols): an identifier goes to gene_ids only if it looks like Ensembl."""
    ids = np.asarray(ids, dtype=str)
    is_ens = np.fromiter((bool(ENSEMBL_RE.match(x)) for x in ids), bool, len(ids))
    gene_ids = np.where(is_ens, ids, "")
    if symbols is None:
        symbols = np.where(is_ens, "", ids)
    return gene_ids.astype(object), np.asarray(symbols, dtype=str).astype(object)


def _core(barcodes: pd.Index) -> pd.Index:
    """The 16-mer part of a barcode, so 'AAAC..-1', 'AAAC..' and 'S1_AAAC..-1' can be matched."""
    return pd.Index([m.group(1) if (m := _CORE_BARCODE_RE.search(b)) else b for b in barcodes])


def _align_positions(
    barcodes: pd.Index, positions: pd.DataFrame, *, matrix_file: str, positions_file: str
) -> tuple[pd.DataFrame, int]:
    """Positions reindexed to the matrix barcodes; returns (frame, number of barcodes without a position)."""
    if len(barcodes) == 0:
        raise ReaderError(
            f"{matrix_file} holds no spots (0 barcodes): the count matrix is empty. Check that it is the "
            "filtered_feature_bc_matrix of a finished Space Ranger run, or download it again."
        )
    pos = positions[~positions.index.duplicated(keep="first")]
    aligned = pos.reindex(barcodes)
    found = aligned["pxl_row"].notna() | aligned["array_row"].notna()
    if not found.any():
        core_pos = pos.copy()
        core_pos.index = _core(pos.index)
        core_pos = core_pos[~core_pos.index.duplicated(keep="first")]
        aligned = core_pos.reindex(_core(barcodes))
        aligned.index = barcodes
        found = aligned["pxl_row"].notna() | aligned["array_row"].notna()
    if not found.any():
        raise ReaderError(
            f"none of the {len(barcodes)} barcodes of {matrix_file} (e.g. {barcodes[0]!r}) appear in "
            f"{positions_file} (e.g. {pos.index[0] if len(pos) else 'empty file'!r}). The two files "
            "probably come from different samples: pass the positions file of the same sample."
        )
    return aligned, int((~found).sum())


def assemble(
    X: Any,
    barcodes: Any,
    feature_ids: Any,
    *,
    gene_ids: Any = None,
    gene_symbols: Any = None,
    positions: pd.DataFrame | None = None,
    scalefactors: dict | None = None,
    lowres: np.ndarray | None = None,
    library_id: str = "library",
    reader: str,
    source_path: Path,
    matrix_file: Path | str | None = None,
    positions_file: Path | str | None = None,
    spot_diameter_fullres: float | None = None,
    extra_uns: dict | None = None,
) -> ad.AnnData:
    """Build the reader-output AnnData; raise ReaderError on inconsistent parts."""
    matrix_file = str(matrix_file or source_path)
    X = to_csr_float32(X)
    barcodes = pd.Index(np.asarray(barcodes, dtype=str).astype(object), name=None)
    feature_ids = np.asarray(feature_ids, dtype=str)
    if X.shape != (len(barcodes), len(feature_ids)):
        raise ReaderError(
            f"{matrix_file}: matrix shape {X.shape} does not match {len(barcodes)} barcodes x "
            f"{len(feature_ids)} features; the file is corrupt, re-download it."
        )
    if barcodes.has_duplicates:
        dup = barcodes[barcodes.duplicated()][0]
        raise ReaderError(
            f"{matrix_file}: barcode {dup!r} occurs {int((barcodes == dup).sum())} times. A spot must be "
            "unique: if the file merges several samples, split it into one file per sample; otherwise "
            "the file is corrupt, download it again."
        )
    if gene_ids is None:
        gids, syms = split_gene_ids(feature_ids)
    else:
        gids = np.asarray(gene_ids, dtype=str).astype(object)
        syms = np.asarray(gene_symbols if gene_symbols is not None else [""] * len(gids), dtype=str)
        syms = syms.astype(object)
    var = pd.DataFrame({"gene_ids": gids, "gene_symbols": syms}, index=pd.Index(feature_ids.astype(object)))

    n = len(barcodes)
    obs = pd.DataFrame(index=barcodes)
    n_missing = 0
    if positions is not None and len(positions):
        aligned, n_missing = _align_positions(
            barcodes, positions, matrix_file=matrix_file, positions_file=str(positions_file)
        )
        has_pos = (aligned["pxl_row"].notna() | aligned["array_row"].notna()).to_numpy()
        in_tissue = aligned["in_tissue"].eq(True).to_numpy(dtype=bool) & has_pos
        obs["in_tissue"] = in_tissue
        obs["array_row"] = aligned["array_row"].fillna(-1).to_numpy(dtype=np.int32)
        obs["array_col"] = aligned["array_col"].fillna(-1).to_numpy(dtype=np.int32)
        obs["pxl_row"] = aligned["pxl_row"].to_numpy(dtype=np.float64)
        obs["pxl_col"] = aligned["pxl_col"].to_numpy(dtype=np.float64)
        if n_missing:
            warnings.warn(
                f"{matrix_file}: {n_missing} of {n} barcodes have no row in {positions_file}; "
                "they are kept with in_tissue=False (so QC drops them) and no coordinates.",
                UserWarning,
                stacklevel=3,
            )
    else:
        obs["in_tissue"] = np.ones(n, bool)
        obs["array_row"] = np.full(n, -1, np.int32)
        obs["array_col"] = np.full(n, -1, np.int32)
        obs["pxl_row"] = np.full(n, np.nan)
        obs["pxl_col"] = np.full(n, np.nan)

    adata = ad.AnnData(X=X, obs=obs, var=var)
    if not adata.var_names.is_unique:
        adata.var_names_make_unique()
    has_xy = bool(np.isfinite(obs["pxl_row"].to_numpy()).any())
    if has_xy:
        adata.obsm[S.OBSM_SPATIAL] = np.column_stack(
            [obs["pxl_col"].to_numpy(np.float64), obs["pxl_row"].to_numpy(np.float64)]
        )
    if scalefactors or lowres is not None:
        entry: dict[str, Any] = {"scalefactors": dict(scalefactors or {}), "images": {}, "metadata": {}}
        if lowres is not None:
            entry["images"]["lowres"] = lowres
        adata.uns[S.UNS_SPATIAL] = {library_id: entry}
    if spot_diameter_fullres is None and scalefactors:
        spot_diameter_fullres = scalefactors.get("spot_diameter_fullres")
    uns = {
        "reader": reader,
        "source_path": str(source_path),
        "has_coordinates": has_xy,
        "spot_diameter_fullres": None if spot_diameter_fullres is None else float(spot_diameter_fullres),
        "n_spots_without_position": n_missing,
    }
    uns.update(extra_uns or {})
    adata.uns[S.UNS_SPAVIS] = uns
    return adata
