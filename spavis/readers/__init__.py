"""Read one Visium slice, whatever its layout, into one AnnData layout (docs/architecture.md,
"Reader output"). Supported: Space Ranger outs of every version (HDF5 v3/v2 and the old v3
layout without `library_ids`, Matrix Market folders, positions with or without header),
GEO flat folders with `GSMnnnn_` prefixes (gzip'd), HEST-1k `.h5ad` (+ metadata json),
STimage-1K4M csv triplets, and plain `.h5ad`. Inputs are only ever opened read-only.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad

from spavis.errors import ReaderError, SpavisWarning
from spavis.readers._assemble import assemble
from spavis.readers._find import classify, find_slice_files
from spavis.readers.h5ad import read_h5ad_slice
from spavis.readers.stimage import read_stimage
from spavis.readers.tenx import read_10x_h5, read_lowres, read_mtx, read_positions, read_scalefactors

__all__ = ["read_slice", "demo_slice_path", "ReaderError"]

_SUPPORTED = (
    "a Space Ranger 'outs' folder (filtered_feature_bc_matrix.h5 or filtered_feature_bc_matrix/ + "
    "spatial/), a GEO folder of GSMnnnn_* files, a HEST or plain .h5ad, or an STimage-1K4M "
    "<slide>_count.csv"
)


def _read_spaceranger(files, source: Path) -> ad.AnnData:
    if files.h5 is not None:
        X, bc, ids, names, reader = read_10x_h5(files.h5)
        matrix_file = files.h5
    else:
        mtx, bcf, ftf = files.mtx
        X, bc, ids, names = read_mtx(mtx, bcf, ftf)
        reader, matrix_file = "10x-mtx", mtx.parent if mtx.name.lower().startswith("matrix") else mtx
    gids = [i if i.startswith("ENS") else "" for i in map(str, ids)]
    notes: list[str] = []  # what is unusable; the build says what that costs (graph, µm scale)
    positions = _optional(read_positions, files.positions, "tissue positions", notes)
    sf = _optional(read_scalefactors, files.scalefactors, "scale factors", notes) or {}
    img = read_lowres(files.lowres) if files.lowres else None
    if source.is_dir():
        library_id = source.name
    else:
        f = classify(source)
        library_id = f.sample_key.rstrip("_") if f is not None and f.sample_key else source.parent.name
    # var.index: the Ensembl id when the file has one (unique), else the symbol
    feature_ids = [i if g else n for i, g, n in zip(map(str, ids), gids, map(str, names))]
    symbols = [n if n != i or not g else "" for i, g, n in zip(map(str, ids), gids, map(str, names))]
    return assemble(
        X, bc, feature_ids, gene_ids=gids, gene_symbols=symbols, positions=positions,
        scalefactors=sf, lowres=img, library_id=library_id, reader=reader, source_path=source,
        matrix_file=matrix_file, positions_file=files.positions,
        extra_uns={"warnings": notes} if notes else None,
    )


def _optional(read, path, what: str, notes: list[str]):
    """Read a spatial side file; an unreadable one is noted (and warned about), not fatal."""
    if path is None:
        return None
    try:
        return read(path)
    except ReaderError as exc:
        msg = f"{what} unusable, ignored ({exc})"
        notes.append(msg)
        warnings.warn(msg, SpavisWarning, stacklevel=3)
        return None


def read_slice(path: str | Path) -> ad.AnnData:
    """Read one slice (folder or file) into the reader-output AnnData.

    Raises ReaderError (naming the file and the fix) for missing or corrupt files, barcodes
    that do not match the positions file, and unknown layouts.
    """
    path = Path(path)
    if not path.exists():
        raise ReaderError(f"{path}: no such file or folder. Pass {_SUPPORTED}.")
    low = path.name.lower()
    if path.is_file():
        if low.endswith(".h5ad"):
            return read_h5ad_slice(path)
        if low.endswith("_count.csv") or low.endswith("_count.csv.gz"):
            return read_stimage(path)
        f = classify(path)
        if low.endswith(".h5") or low.endswith(".h5.gz") or (f is not None and f.kind in ("h5", "mtx")):
            files = find_slice_files(path.parent, only_prefix=f.sample_key if f else None)
            if low.endswith(".h5") or low.endswith(".h5.gz"):
                files.h5, files.mtx = path, None
            return _read_spaceranger(files, path)
        raise ReaderError(f"{path}: unknown input file. Pass {_SUPPORTED}.")
    files = find_slice_files(path)
    if files.h5 is not None or files.mtx is not None:
        return _read_spaceranger(files, path)
    if len(files.h5ad) == 1:
        return read_h5ad_slice(files.h5ad[0], root=path)
    if len(files.h5ad) > 1:
        names = ", ".join(p.name for p in files.h5ad[:5])
        raise ReaderError(f"{path}: holds several .h5ad files ({names}); pass the one to read.")
    if len(files.stimage_counts) == 1:
        return read_stimage(files.stimage_counts[0], root=path)
    if len(files.stimage_counts) > 1:
        raise ReaderError(f"{path}: holds several STimage-1K4M slides; pass one <slide>_count.csv.")
    if files.positions is not None:
        raise ReaderError(
            f"{path}: found {files.positions.name} but no count matrix "
            "(filtered_feature_bc_matrix.h5 or filtered_feature_bc_matrix/matrix.mtx.gz). "
            "Download the sample's matrix into this folder."
        )
    raise ReaderError(f"{path}: no count matrix found (unknown layout). Pass {_SUPPORTED}.")


def demo_slice_path() -> Path:
    """The bundled real demo slice (10x V1_Human_Heart subsample, CC BY 4.0; see its ATTRIBUTION.md)."""
    from importlib.resources import files

    return Path(str(files("spavis") / "data" / "demo" / "human_heart_v1_subsample"))
