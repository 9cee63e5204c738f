"""AnnData inputs: plain `.h5ad` and HEST-1k `st/<id>.h5ad` (+ `metadata/<id>.json`)."""
from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from spavis.errors import ReaderError
from spavis.format import schema as S
from spavis.spaceranger import LOWRES_IMAGE, SPATIAL_DIR
from spavis.readers._assemble import ENSEMBL_RE, assemble, split_gene_ids
from spavis.readers.tenx import normalize_positions, read_lowres, read_positions

_ID_COLS = ("gene_ids", "gene_id", "ensembl_id", "ensembl", "feature_id")
_SYMBOL_COLS = ("gene_symbols", "gene_symbol", "gene_name", "feature_name", "symbol", "name")
_MAX_IMAGE_PIXELS = 4096 * 4096


def _is_integer_valued(X) -> bool:
    data = X.data if sp.issparse(X) else np.asarray(X).ravel()
    return bool(data.size == 0 or np.all(np.mod(data[: 1_000_000], 1) == 0))


def _matrix(a: ad.AnnData) -> tuple[object, pd.DataFrame, str]:
    """Raw counts when the file keeps them (layers['counts'], raw), else X as stored."""
    for layer in ("counts", "raw_counts"):
        if layer in a.layers:
            return a.layers[layer], a.var, f"layers['{layer}']"
    if a.raw is not None and a.raw.n_obs == a.n_obs and _is_integer_valued(a.raw.X) and not _is_integer_valued(a.X):
        return a.raw.X, a.raw.var, "raw.X"
    return a.X, a.var, "X"


def _features(var: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    names = var.index.to_numpy(dtype=str)
    lower = {str(c).lower(): c for c in var.columns}
    id_col = next((lower[c] for c in _ID_COLS if c in lower), None)
    sym_col = next((lower[c] for c in _SYMBOL_COLS if c in lower), None)
    if id_col is not None:
        ids = var[id_col].astype(str).to_numpy()
        ids = np.where([bool(ENSEMBL_RE.match(x)) for x in ids], ids, "").astype(object)
        syms = var[sym_col].astype(str).to_numpy() if sym_col is not None else np.where(ids == names, "", names)
        return names, ids, np.asarray(syms, dtype=object)
    ids, syms = split_gene_ids(names)
    if sym_col is not None:
        syms = var[sym_col].astype(str).to_numpy(dtype=object)
    return names, ids, syms


def _metadata_json(path: Path) -> tuple[Path | None, dict]:
    stem = path.name[: -len(".h5ad")]
    for cand in (
        path.with_name(f"{stem}.json"),
        path.with_name(f"{stem}_metadata.json"),
        path.parent.parent / "metadata" / f"{stem}.json",
        path.with_name("metadata.json"),
    ):
        if cand.is_file():
            try:
                return cand, json.loads(cand.read_text())
            except (OSError, ValueError) as exc:
                raise ReaderError(f"{cand}: metadata JSON is not valid ({exc}); fix or remove it.") from exc
    return None, {}


def _positions_from_obs(a: ad.AnnData) -> pd.DataFrame | None:
    obs = a.obs
    cols = {str(c).lower(): c for c in obs.columns}
    df = pd.DataFrame({"barcode": a.obs_names.astype(str)})
    for src, dst in (
        ("in_tissue", "in_tissue"), ("array_row", "array_row"), ("array_col", "array_col"),
        ("pxl_row_in_fullres", "pxl_row"), ("pxl_col_in_fullres", "pxl_col"),
    ):
        if src in cols:
            df[dst] = obs[cols[src]].to_numpy()
    if "pxl_row" not in df and S.OBSM_SPATIAL in a.obsm:
        xy = np.asarray(a.obsm[S.OBSM_SPATIAL], dtype=np.float64)
        if xy.ndim == 2 and xy.shape[1] >= 2:
            df["pxl_col"], df["pxl_row"] = xy[:, 0], xy[:, 1]
    if len(df.columns) == 1:
        return None
    return normalize_positions(df, "obs")


def _image(a: ad.AnnData) -> tuple[str, dict, np.ndarray | None]:
    """(library_id, scalefactors, lowres) from uns['spatial']; a small image stands in for lowres."""
    spatial = a.uns.get(S.UNS_SPATIAL)
    if not isinstance(spatial, dict) or not spatial:
        return "library", {}, None
    lib = sorted(spatial)[0]
    entry = spatial[lib] if isinstance(spatial[lib], dict) else {}
    sf = {k: float(v) for k, v in dict(entry.get("scalefactors", {})).items() if np.isscalar(v)}
    images = dict(entry.get("images", {}))
    name = "lowres" if "lowres" in images else None
    if name is None:  # HEST: 'downscaled_fullres' with 'tissue_downscaled_fullres_scalef'
        small = [k for k in sorted(images) if f"tissue_{k}_scalef" in sf and np.asarray(images[k]).size <= _MAX_IMAGE_PIXELS * 3]
        name = small[0] if small else None
        if name is not None:
            sf["tissue_lowres_scalef"] = sf[f"tissue_{name}_scalef"]
    img = None
    if name is not None:
        img = np.asarray(images[name])
        if img.dtype != np.uint8:
            img = np.clip(img * (255.0 if img.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        if img.ndim == 3 and img.shape[2] == 4:
            img = img[:, :, :3]
    return str(lib), sf, img


def read_h5ad_slice(path: Path, root: Path | None = None) -> ad.AnnData:
    """Plain or HEST-style `.h5ad`; a positions file / lowres image next to it fill gaps."""
    try:
        a = ad.read_h5ad(path)
    except (OSError, KeyError, ValueError) as exc:
        raise ReaderError(f"{path}: cannot read the AnnData file ({exc}); it is truncated or corrupt, download it again.") from exc
    X, var, matrix_source = _matrix(a)
    names, ids, syms = _features(var)
    meta_path, meta = _metadata_json(path)
    positions = _positions_from_obs(a)
    positions_file: Path | str = f"{path} (obs/obsm)"
    folder = root or path.parent
    near = sorted(folder.glob("*tissue_positions*")) + sorted(folder.glob(f"{SPATIAL_DIR}/*tissue_positions*"))
    sidecar_pos = next((p for p in near if p.suffix in (".csv", ".gz", ".parquet")), None)
    if sidecar_pos is not None:
        extra = read_positions(sidecar_pos)
        if positions is None:
            positions, positions_file = extra, sidecar_pos
        else:  # keep the h5ad's own values (they match its image); fill what it lacks
            extra = extra.reindex(positions.index)
            for col in ("array_row", "array_col"):
                positions[col] = positions[col].fillna(extra[col])
    lib, sf, img = _image(a)
    if img is None:
        near = sorted(folder.glob(f"*{LOWRES_IMAGE}*")) + sorted(folder.glob(f"{SPATIAL_DIR}/*{LOWRES_IMAGE}*"))
        lowres = near[0] if near else None
        img = read_lowres(lowres) if lowres is not None else None
    spot_diam = sf.get("spot_diameter_fullres")
    if spot_diam is None and meta:
        px = meta.get("pixel_size_um_estimated") or meta.get("pixel_size_um_embedded")
        if meta.get("spot_diameter") and px:
            spot_diam = float(meta["spot_diameter"]) / float(px)
    is_hest = bool(meta) or "pxl_col_in_fullres" in a.obs.columns
    extra_uns = {"matrix_source": matrix_source}
    if meta:
        extra_uns["source_metadata_json"] = json.dumps(meta, sort_keys=True, default=str)
        extra_uns["source_metadata_path"] = str(meta_path)
    return assemble(
        X, a.obs_names.to_numpy(), names, gene_ids=ids, gene_symbols=syms,
        positions=positions, scalefactors=sf, lowres=img, library_id=lib,
        reader="hest-h5ad" if is_hest else "h5ad", source_path=root or path, matrix_file=path,
        positions_file=positions_file, spot_diameter_fullres=spot_diam, extra_uns=extra_uns,
    )
