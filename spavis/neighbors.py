"""Per-slide k-nearest-neighbour spatial graph in micrometres.

Pixel coordinates are converted with Space Ranger's ``spot_diameter_fullres``. Space Ranger
defines it as the pixels spanning a theoretical 65 µm spot (the 55 µm capture spot plus
margin), so µm/px = 65 / spot_diameter_fullres. Checked on the real V1 human heart slice:
neighbouring centres are 138 px apart and spot_diameter_fullres is 89.43 px, giving
100.3 µm (the Visium centre spacing) with 65 µm, but 84.9 µm if the 55 µm physical
diameter were used. Without pixels the Visium hex lattice is used: spots are 100 µm apart
centre to centre, ``array_col`` steps 50 µm and ``array_row`` steps 50·√3 µm, so both
paths agree. Ties are broken by spot index so the graph never depends on the KD-tree's
internal order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.spatial import cKDTree

from spavis.format.schema import SPACERANGER_SPOT_DIAMETER_UM, SPOT_SPACING_UM  # noqa: F401
from spavis.format.coordinates import lattice_to_um  # noqa: F401  (one definition, re-exported)

SPOT_DIAMETER_UM = 55.0  # physical capture spot


@dataclass(frozen=True)
class SpatialGraph:
    """k-NN graph of one slide: row i lists the k nearest other spots of spot i, nearest first."""

    neighbors: np.ndarray  # int32 (n, k'), k' = min(k, n - 1)
    distances: np.ndarray  # float32 (n, k') micrometres
    method: str  # "pixels", "pixels-estimated", "lattice" or "none"

    @property
    def n_spots(self) -> int:
        return int(self.neighbors.shape[0])

    def connectivities(self) -> sp.csr_matrix:
        """squidpy's ``obsp['spatial_connectivities']``: directed k-NN adjacency (1.0)."""
        return _to_csr(self.neighbors, np.ones_like(self.distances), self.n_spots)

    def distance_matrix(self) -> sp.csr_matrix:
        """squidpy's ``obsp['spatial_distances']``: the same edges weighted by µm distance."""
        return _to_csr(self.neighbors, self.distances, self.n_spots)


def _to_csr(nbrs: np.ndarray, values: np.ndarray, n: int) -> sp.csr_matrix:
    k = nbrs.shape[1] if nbrs.ndim == 2 else 0
    rows = np.repeat(np.arange(n, dtype=np.int64), k)
    mat = sp.csr_matrix(
        (values.reshape(-1).astype(np.float32), (rows, nbrs.reshape(-1).astype(np.int64))),
        shape=(n, n),
        dtype=np.float32,
    )
    mat.sort_indices()
    return mat


def knn(coords_um: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest other points, nearest first, equal distances ordered by index.

    The KD-tree is asked for a few more points than needed; rows whose last returned
    distance still equals the k-th one (a tie cut at the boundary) are asked again with a
    larger k so the tie-break by index sees every tied candidate.
    """
    coords_um = np.asarray(coords_um, dtype=np.float64)
    n = coords_um.shape[0]
    k = int(min(max(k, 0), max(n - 1, 0)))
    if k == 0:
        return np.zeros((n, 0), np.int32), np.zeros((n, 0), np.float32)
    tree = cKDTree(coords_um)
    out_idx = np.empty((n, k), dtype=np.int64)
    out_dst = np.empty((n, k), dtype=np.float32)
    todo = np.arange(n)
    kq = min(n, k + 1 + max(6, k // 2))
    while todo.size:
        dst, idx = tree.query(coords_um[todo], k=kq)
        dst = np.asarray(dst).reshape(todo.size, kq)
        idx = np.asarray(idx).reshape(todo.size, kq)
        # drop the query point itself (by index, so duplicated coordinates stay neighbours)
        is_self = idx == todo[:, None]
        # order each row by (float32 distance, index): the stored distances are float32, so
        # ties are ties at that precision (hex-lattice distances differ in the last float64
        # bits); self goes last by pushing it to +inf
        dst_sort = np.where(is_self, np.inf, dst).astype(np.float32)
        order = np.lexsort((idx, dst_sort), axis=-1)
        idx = np.take_along_axis(idx, order, axis=1)
        dst_sort = np.take_along_axis(dst_sort, order, axis=1)
        if kq < n:
            # the largest returned finite distance may hide more tied points beyond kq
            finite_max = np.where(np.isinf(dst_sort), -np.inf, dst_sort).max(axis=1)
            truncated = dst_sort[:, k - 1] >= finite_max
        else:
            truncated = np.zeros(todo.size, dtype=bool)
        done = ~truncated
        out_idx[todo[done]] = idx[done, :k]
        out_dst[todo[done]] = dst_sort[done, :k]
        todo = todo[truncated]
        kq = min(n, kq * 2)
    return out_idx.astype(np.int32), out_dst.astype(np.float32)


def pixel_scale(
    pxl_row: np.ndarray | None,
    pxl_col: np.ndarray | None,
    array_row: np.ndarray | None,
    array_col: np.ndarray | None,
    spot_diameter_fullres: float | None,
) -> tuple[float | None, str | None]:
    """Micrometres per full-resolution pixel and how it was found (``UM_PER_PX_METHODS``).

    ``"scalefactors"``: 65 µm / spot_diameter_fullres; ``"lattice"``: pixel distances of
    spots compared with their Visium lattice distances; ``"spot-spacing"``: the median
    nearest-neighbour gap taken as the 100 µm centre spacing. ``(None, None)`` without
    finite pixel coordinates for every spot.
    """
    if pxl_row is None or pxl_col is None:
        return None, None
    pr = np.asarray(pxl_row, dtype=np.float64)
    pc = np.asarray(pxl_col, dtype=np.float64)
    if not pr.size or not (np.isfinite(pr).all() and np.isfinite(pc).all()):
        return None, None
    if spot_diameter_fullres and np.isfinite(spot_diameter_fullres) and spot_diameter_fullres > 0:
        return SPACERANGER_SPOT_DIAMETER_UM / float(spot_diameter_fullres), "scalefactors"
    if pr.size < 2:
        return None, None
    xy = np.column_stack([pc, pr])
    d, j = cKDTree(xy).query(xy, k=2)
    gap_px, nearest = d[:, 1], j[:, 1]
    if _lattice_known(array_row, array_col):
        lat = lattice_to_um(np.asarray(array_row), np.asarray(array_col))
        gap_um = np.linalg.norm(lat - lat[nearest], axis=1)
        ok = (gap_px > 0) & (gap_um > 0)
        if ok.any():
            return float(np.median(gap_um[ok] / gap_px[ok])), "lattice"
    gap = float(np.median(gap_px))
    return (SPOT_SPACING_UM / gap, "spot-spacing") if gap > 0 else (None, None)


def slide_coordinates_um(
    pxl_row: np.ndarray | None,
    pxl_col: np.ndarray | None,
    array_row: np.ndarray | None,
    array_col: np.ndarray | None,
    spot_diameter_fullres: float | None,
) -> tuple[np.ndarray | None, str]:
    """Spot centres in µm and the method used; ``(None, "none")`` when nothing is known."""
    n = None
    if pxl_row is not None and pxl_col is not None:
        pr = np.asarray(pxl_row, dtype=np.float64)
        pc = np.asarray(pxl_col, dtype=np.float64)
        n = pr.size
        if n and np.isfinite(pr).all() and np.isfinite(pc).all():
            xy = np.column_stack([pc, pr])
            if spot_diameter_fullres and np.isfinite(spot_diameter_fullres) and spot_diameter_fullres > 0:
                return xy * (SPACERANGER_SPOT_DIAMETER_UM / float(spot_diameter_fullres)), "pixels"
            if not _lattice_known(array_row, array_col) and n >= 2:
                # no scale factor and no lattice: the median nearest-neighbour gap is one
                # Visium centre spacing (100 µm)
                d, _ = cKDTree(xy).query(xy, k=2)
                gap = float(np.median(d[:, 1]))
                if gap > 0:
                    return xy * (SPOT_SPACING_UM / gap), "pixels-estimated"
    if _lattice_known(array_row, array_col):
        return lattice_to_um(array_row, array_col), "lattice"
    return None, "none"


def _lattice_known(array_row: Any, array_col: Any) -> bool:
    if array_row is None or array_col is None:
        return False
    ar = np.asarray(array_row, dtype=np.float64)
    ac = np.asarray(array_col, dtype=np.float64)
    return bool(ar.size) and bool(np.isfinite(ar).all() and np.isfinite(ac).all()) and bool(
        (ar >= 0).all() and (ac >= 0).all()
    )


def spatial_graph(
    k: int,
    *,
    pxl_row: np.ndarray | None = None,
    pxl_col: np.ndarray | None = None,
    array_row: np.ndarray | None = None,
    array_col: np.ndarray | None = None,
    spot_diameter_fullres: float | None = None,
) -> SpatialGraph:
    """k-NN graph of one slide's spots (rows in spot_index order) in micrometres."""
    coords, method = slide_coordinates_um(pxl_row, pxl_col, array_row, array_col, spot_diameter_fullres)
    if coords is None:
        n = 0
        for arr in (pxl_row, array_row):
            if arr is not None:
                n = len(arr)
                break
        return SpatialGraph(np.zeros((n, 0), np.int32), np.zeros((n, 0), np.float32), "none")
    nbrs, dists = knn(coords, k)
    return SpatialGraph(nbrs, dists, method)
