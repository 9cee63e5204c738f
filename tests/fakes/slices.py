"""Derive broken (or edge-case) Visium slices from a real fixture, with h5py only.

Tests copy a real Space Ranger folder and then edit its ``filtered_feature_bc_matrix.h5``
the way a damaged download or a badly exported file would look. Nothing here imports
spavis, so the expected values a test computes from these files are independent of it.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

H5_NAME = "filtered_feature_bc_matrix.h5"


def copy_slice(src: Path, dst: Path) -> Path:
    """Copy a (read-only) fixture folder to ``dst`` with writable files and folders."""
    src, dst = Path(src), Path(dst)
    for root, _dirs, files in os.walk(src):
        target = dst / Path(root).relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        for name in files:
            shutil.copyfile(Path(root) / name, target / name)  # content only, not the r--r--r-- mode
    return dst


@dataclass
class Matrix10x:
    """The CSC matrix (features x barcodes) and feature/barcode names of a 10x v3 HDF5."""

    data: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray
    shape: tuple[int, int]  # (n_features, n_barcodes)
    ids: list[str]
    names: list[str]
    barcodes: list[str]

    def dense(self) -> np.ndarray:
        """Barcodes x features, float64, built straight from the CSC arrays."""
        out = np.zeros((self.shape[1], self.shape[0]))
        for j in range(self.shape[1]):
            lo, hi = self.indptr[j], self.indptr[j + 1]
            out[j, self.indices[lo:hi]] = self.data[lo:hi]
        return out


def read_matrix(path: Path) -> Matrix10x:
    with h5py.File(path, "r") as f:
        m = f["matrix"]
        return Matrix10x(
            data=m["data"][:], indices=m["indices"][:], indptr=m["indptr"][:],
            shape=tuple(int(x) for x in m["shape"][:]),
            ids=[x.decode() for x in m["features"]["id"][:]],
            names=[x.decode() for x in m["features"]["name"][:]],
            barcodes=[x.decode() for x in m["barcodes"][:]],
        )


def _replace(group: h5py.Group, name: str, values: np.ndarray) -> None:
    """Replace a dataset (any length) keeping its dtype."""
    dtype = group[name].dtype
    del group[name]
    group.create_dataset(name, data=np.asarray(values, dtype=dtype))


def edit_matrix(path: Path, *, data=None, indices=None, indptr=None, shape=None, ids=None,
                names=None, barcodes=None, data_dtype=None) -> None:
    """Rewrite the given parts of ``matrix/`` in place (other groups and attributes stay)."""
    with h5py.File(path, "r+") as f:
        m = f["matrix"]
        if data is not None:
            dtype = data_dtype or m["data"].dtype
            del m["data"]
            m.create_dataset("data", data=np.asarray(data, dtype=dtype))
        for name, values in (("indices", indices), ("indptr", indptr), ("shape", shape)):
            if values is not None:
                _replace(m, name, values)
        if barcodes is not None:
            _replace(m, "barcodes", np.array([b.encode() for b in barcodes], dtype=m["barcodes"].dtype))
        feats = m["features"]
        for name, values in (("id", ids), ("name", names)):
            if values is not None:
                _replace(feats, name, np.array([v.encode() for v in values], dtype=feats[name].dtype))


def empty_matrix(path: Path) -> None:
    """Keep the features, drop every barcode: a 10x HDF5 with 0 spots."""
    m = read_matrix(path)
    edit_matrix(path, data=np.zeros(0), indices=np.zeros(0), indptr=np.zeros(1), shape=[m.shape[0], 0],
                barcodes=[])


def truncate(path: Path, fraction: float = 0.5) -> None:
    raw = Path(path).read_bytes()
    Path(path).write_bytes(raw[: int(len(raw) * fraction)])


def flip_byte(path: Path, where: float = 0.5) -> None:
    raw = bytearray(Path(path).read_bytes())
    raw[int(len(raw) * where)] ^= 0xFF
    Path(path).write_bytes(bytes(raw))
