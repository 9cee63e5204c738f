"""10x Space Ranger pieces: HDF5 and Matrix Market count matrices, tissue positions,
scale factors and the lowres image. Every function opens files read-only.
"""
from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import IO, Iterator

import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

from spavis.errors import ReaderError
from spavis.readers._h5 import read_1d

MAX_LOWRES_PIXELS = 4096 * 4096  # a "lowres" image larger than this is not a lowres image


@contextlib.contextmanager
def open_maybe_gzip(path: Path, mode: str = "rb") -> Iterator[IO]:
    """Open plain or .gz files alike (GEO serves most Space Ranger files gzip'd)."""
    if str(path).endswith(".gz"):
        with gzip.open(path, mode) as fh:
            yield fh
    else:
        with open(path, mode) as fh:
            yield fh


def _decode(arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind == "S":  # fixed-width bytes (every Space Ranger file): decode in C
        return np.char.decode(arr, "utf-8").astype(object)
    if arr.dtype.kind == "O":
        return np.array([x.decode() if isinstance(x, bytes) else str(x) for x in arr], dtype=object)
    return arr.astype(str).astype(object)


@contextlib.contextmanager
def _local_h5(path: Path) -> Iterator[Path]:
    """h5py needs a seekable plain file: decompress .h5.gz to a private temp file."""
    if not str(path).endswith(".gz"):
        yield path
        return
    fd, tmp = tempfile.mkstemp(suffix=".h5", prefix="spavis-")
    os.close(fd)
    try:
        with gzip.open(path, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        yield Path(tmp)
    except (OSError, EOFError) as exc:
        raise ReaderError(f"{path}: cannot decompress ({exc}); the download is incomplete, fetch it again.") from exc
    finally:
        os.unlink(tmp)


def _h5py_10x(path: Path) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray, np.ndarray]:
    """Read a 10x HDF5 matrix with h5py: v3 ('matrix' group, with or without attributes) or
    v2 (one group per genome). Returns (spots x features CSR, barcodes, ids, names)."""
    import h5py

    with h5py.File(path, "r") as f:
        if "matrix" in f:
            groups = [f["matrix"]]
        else:
            groups = [g for g in f.values() if isinstance(g, h5py.Group) and "indptr" in g]
        if not groups:
            raise ReaderError(
                f"{path}: HDF5 file has neither a 'matrix' group (10x v3) nor genome groups (10x v2); "
                "it is not a 10x feature-barcode matrix."
            )
        mats, ids, names, barcodes = [], [], [], None
        for g in groups:
            n_bc = len(g["barcodes"])
            shape = tuple(int(x) for x in g["shape"][:])
            if "features" in g:
                fid = _decode(g["features/id"][:])
                fname = _decode(g["features/name"][:]) if "name" in g["features"] else fid
                ftype = _decode(g["features/feature_type"][:]) if "feature_type" in g["features"] else None
            else:  # v2
                fid = _decode(g["genes"][:])
                fname = _decode(g["gene_names"][:]) if "gene_names" in g else fid
                ftype = None
            csc = sp.csr_matrix(
                (read_1d(g["data"]), read_1d(g["indices"], narrow_to=np.int32), read_1d(g["indptr"])), shape=(n_bc, shape[0])
            )  # CSC genes x barcodes == CSR barcodes x genes
            if ftype is not None:
                keep = ftype == "Gene Expression"
                if keep.any() and not keep.all():
                    csc, fid, fname = csc[:, np.flatnonzero(keep)], fid[keep], fname[keep]
            bc = _decode(g["barcodes"][:])
            if barcodes is not None and not np.array_equal(bc, barcodes):
                raise ReaderError(f"{path}: genome groups disagree on barcodes; the file is corrupt.")
            barcodes = bc
            mats.append(csc)
            ids.append(fid)
            names.append(fname)
    X = mats[0] if len(mats) == 1 else sp.hstack(mats, format="csr")
    return X, barcodes, np.concatenate(ids), np.concatenate(names)


def read_10x_h5(path: Path) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray, np.ndarray, str]:
    """Read a 10x HDF5 matrix (v3, v3 without library_ids, v2; plain or .gz).

    The h5py reader comes first: it handles every Space Ranger layout and avoids importing
    scanpy (and with it sklearn / scipy.stats: seconds per process, paid again by every
    spawned worker). scanpy.read_10x_h5 is only tried when h5py finds no 10x layout.
    Both give the same matrix, barcodes and features (tests/test_readers.py compares them).
    Returns (X, barcodes, gene_ids, names, reader_name).
    """
    import h5py

    with _local_h5(path) as local:
        try:
            with h5py.File(local, "r"):
                pass
        except OSError as exc:
            raise ReaderError(
                f"{path}: not a readable HDF5 file ({exc}). It is truncated or corrupt: download it "
                "again and compare its size and checksum with the source."
            ) from exc
        try:
            X, bc, ids, names = _h5py_10x(local)
            return X, bc, ids, names, "10x-h5"
        except (ReaderError, OSError, KeyError, ValueError, IndexError) as exc:
            first = exc
        try:  # a layout h5py does not know: scanpy may still read it
            import scanpy as sc

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                a = sc.read_10x_h5(local, gex_only=True)
            return (a.X, a.obs_names.to_numpy(), a.var["gene_ids"].to_numpy(), a.var_names.to_numpy(),
                    "10x-h5-scanpy")
        except Exception:  # noqa: BLE001 - report the h5py reader's reason, it names the layout
            pass
        if isinstance(first, ReaderError):
            raise first
        raise ReaderError(
            f"{path}: cannot read the 10x matrix ({type(first).__name__}: {first}). The file is "
            "truncated or corrupt: download it again."
        ) from first


def read_mtx(matrix: Path, barcodes: Path, features: Path) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray, np.ndarray]:
    """Matrix Market folder (Space Ranger 'filtered_feature_bc_matrix/' or GEO flat files):
    features x barcodes in the file, returned as spots x features CSR."""
    try:
        with open_maybe_gzip(matrix) as fh:
            M = scipy.io.mmread(fh)
        bc = pd.read_csv(barcodes, sep="\t", header=None, dtype=str).iloc[:, 0].to_numpy(dtype=object)
        feat = pd.read_csv(features, sep="\t", header=None, dtype=str)
    except (OSError, EOFError, ValueError, pd.errors.ParserError) as exc:
        raise ReaderError(
            f"{matrix.parent}: cannot read the Matrix Market files ({type(exc).__name__}: {exc}); "
            "a file is truncated or corrupt, download it again."
        ) from exc
    X = sp.csr_matrix(M.T)
    ids = feat.iloc[:, 0].to_numpy(dtype=object)
    names = feat.iloc[:, 1].to_numpy(dtype=object) if feat.shape[1] > 1 else ids
    if feat.shape[1] > 2:
        keep = feat.iloc[:, 2].to_numpy() == "Gene Expression"
        if keep.any() and not keep.all():
            X, ids, names = X[:, np.flatnonzero(keep)], ids[keep], names[keep]
    if X.shape[0] != len(bc) and X.shape[1] == len(bc):  # some GEO uploads store spots x genes
        X = sp.csr_matrix(M)
    return X, bc, ids, names


_HEADERLESS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row", "pxl_col"]
_ALIASES = {
    "barcode": "barcode", "barcodes": "barcode", "spot": "barcode", "": "barcode",
    "in_tissue": "in_tissue", "tissue": "in_tissue",
    "array_row": "array_row", "row": "array_row",
    "array_col": "array_col", "col": "array_col",
    "pxl_row_in_fullres": "pxl_row", "pxl_row": "pxl_row", "imagerow": "pxl_row",
    "pxl_col_in_fullres": "pxl_col", "pxl_col": "pxl_col", "imagecol": "pxl_col",
}


def normalize_positions(df: pd.DataFrame, path: Path | str) -> pd.DataFrame:
    """Columns in_tissue (bool), array_row/array_col (Int), pxl_row/pxl_col (float), barcode index."""
    out = pd.DataFrame(index=pd.Index(df["barcode"].astype(str).to_numpy(dtype=object)))
    try:
        for col in ["array_row", "array_col", "pxl_row", "pxl_col"]:
            out[col] = pd.to_numeric(df[col], errors="raise").to_numpy(np.float64) if col in df else np.nan
        out["in_tissue"] = (
            pd.to_numeric(df["in_tissue"], errors="raise").to_numpy() != 0 if "in_tissue" in df else True
        )
    except (ValueError, TypeError) as exc:
        raise ReaderError(f"{path}: non-numeric value in a positions column ({exc}); the file is corrupt.") from exc
    return out[["in_tissue", "array_row", "array_col", "pxl_row", "pxl_col"]]


def read_positions(path: Path) -> pd.DataFrame:
    """tissue_positions_list.csv (no header), tissue_positions.csv (header), .parquet; gz allowed."""
    try:
        if ".parquet" in path.name:
            df = pd.read_parquet(path)
        else:
            with open_maybe_gzip(path) as fh:
                text = fh.read().decode()
            first = text.split("\n", 1)[0].split(",")
            has_header = len(first) > 1 and not first[1].strip().lstrip("-").replace(".", "").isdigit()
            df = pd.read_csv(io.StringIO(text), header=0 if has_header else None, dtype={0: str})
            if not has_header:
                if df.shape[1] < 6:
                    raise ReaderError(
                        f"{path}: expected 6 columns (barcode, in_tissue, array_row, array_col, "
                        f"pxl_row, pxl_col), found {df.shape[1]}."
                    )
                df = df.iloc[:, :6]
                df.columns = _HEADERLESS
    except ReaderError:
        raise
    except (OSError, EOFError, UnicodeDecodeError, ValueError, pd.errors.ParserError) as exc:
        raise ReaderError(f"{path}: cannot read tissue positions ({exc}); the file is corrupt.") from exc
    df.columns = [_ALIASES.get(str(c).strip().lower(), str(c)) for c in df.columns]
    if "barcode" not in df.columns:
        df = df.rename(columns={df.columns[0]: "barcode"})
    return normalize_positions(df, path)


def read_scalefactors(path: Path) -> dict:
    try:
        with open_maybe_gzip(path) as fh:
            sf = json.loads(fh.read().decode())
    except (OSError, EOFError, ValueError) as exc:
        raise ReaderError(f"{path}: cannot read scale factors ({exc}); the file is corrupt.") from exc
    return {k: float(v) for k, v in sf.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def read_lowres(path: Path) -> np.ndarray | None:
    """The lowres image as uint8 (H, W, 3). A huge image (a WSI) is refused, not decoded."""
    from PIL import Image

    try:
        with open_maybe_gzip(path) as fh:
            data = fh.read()
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_LOWRES_PIXELS:
                warnings.warn(f"{path}: {im.width}x{im.height} is too large for a lowres image; skipped.")
                return None
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, EOFError, ValueError) as exc:
        warnings.warn(f"{path}: lowres image unreadable ({exc}); continuing without it.")
        return None
