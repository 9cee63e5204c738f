"""Spatial mini-batches (the STAMP paper's Algorithm 2): groups of a seed and its nearest spots.

A group is a seed spot plus its ``group_size - 1`` (default 8) nearest *unassigned* spots
of the same slide, seed first, taken from the precomputed neighbour graph of the shards
(``neighbors``: spot_index of the k nearest spots, nearest first). Seeds are visited in a
random order that is fixed by ``(seed, epoch, slide_id)``, so groups are reproducible
whatever the order in which slides or shards are read.

Decisions
---------
* Only the stored neighbour list is searched (no new k-NN at training time). When fewer
  than ``group_size - 1`` of the seed's stored neighbours are still unassigned, the seed
  forms no group and stays unassigned (a later seed may still take it as a neighbour).
  Build shards with ``--k-neighbors`` above 8 (e.g. 16) to cover more spots.
* A group whose largest pairwise distance exceeds ``d_max_um`` is dropped and its spots
  stay unassigned. Default 400 µm: the most compact 9-spot patch of the Visium lattice
  (100 µm spacing: 6 spots at 100 µm, 2 at 173 µm) spans at most 2·173 ≈ 346 µm, so 400 µm
  keeps every such patch with ~15% margin for pixel-scale error and drops groups that
  reach across holes or tissue edges.
* Pairwise distances need coordinates in µm: :func:`spavis.format.coordinates.spot_coordinates_um`
  from what the corpus records: ``pxl_row``/``pxl_col`` times the slide's ``um_per_px`` in
  ``slides.parquet`` (computed once by spavis at build time; stamp never re-derives it), or,
  for slides without a recorded scale (corpora of format v1, slides without pixels), the
  Visium lattice of the recorded ``array_row``/``array_col``. Without either, the bound
  d(a, b) <= d(seed, a) + d(seed, b) from the stored µm neighbour distances stands in
  (conservative: it may drop a valid group, never keeps an invalid one).

Public API
----------
``spatial_groups(table, *, group_size=9, d_max_um=400.0, seed=0, epoch=0) -> int64 (G, group_size)``
    row positions of one slide table (seed in column 0).
``slide_coordinates_um(table) -> float64 (n, 2) | None``.
A table may hold only part of a slide: neighbours (``spot_index`` values) are mapped to rows
through its ``spot_index`` column, and neighbours outside the table count as unavailable.
Batching into tensors (``input_ids`` (B, L) and ``groups`` (G, 9)) lives in ``stamp.data.tokens``.
"""
from __future__ import annotations

import zlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from spavis.format.coordinates import spot_coordinates_um
from stamp.constants import D_MAX_UM, GROUP_SIZE, GROUPS_PER_BATCH  # noqa: F401 (re-exported)
from stamp.errors import BatchingError


def _list_matrix(column: pa.ChunkedArray | pa.Array, fill: float, dtype) -> np.ndarray:
    """A list column -> dense (n, max_len) array padded with ``fill``."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pc.list_flatten(column).to_numpy(zero_copy_only=False)
    n, width = len(lengths), int(lengths.max()) if len(lengths) else 0
    out = np.full((n, width), fill, dtype=dtype)
    if values.size:
        rows = np.repeat(np.arange(n), lengths)
        cols = np.arange(values.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        out[rows, cols] = values
    return out


def _column(table: pa.Table, name: str) -> np.ndarray | None:
    if name not in table.column_names:
        return None
    col = table.column(name)
    if col.null_count == len(col):
        return None
    return col.to_numpy(zero_copy_only=False).astype(np.float64)  # nulls -> nan


def _neighbor_rows(table: pa.Table) -> np.ndarray:
    """Stored neighbours as row positions of ``table`` (-1: none, or not in this table).

    ``neighbors`` hold ``spot_index`` values; a table may cover only part of a slide (a
    subset, a split row group), so they are mapped through its ``spot_index`` column.
    """
    nbr_spots = _list_matrix(table.column("neighbors"), -1, np.int64)
    n = table.num_rows
    if "spot_index" in table.column_names:
        spot_index = table.column("spot_index").to_numpy(zero_copy_only=False).astype(np.int64)
    else:  # rows are the whole slide in spot_index order
        spot_index = np.arange(n, dtype=np.int64)
    if n == 0:
        return nbr_spots
    row_of = np.full(int(spot_index.max()) + 1, -1, dtype=np.int64)
    row_of[spot_index] = np.arange(n)
    valid = (nbr_spots >= 0) & (nbr_spots < row_of.size)
    return np.where(valid, row_of[np.where(valid, nbr_spots, 0)], -1)


def slide_coordinates_um(table: pa.Table, neighbor_rows: np.ndarray | None = None, *,
                         um_per_px: float | None = None) -> np.ndarray | None:
    """Spot centres (x, y) in µm for one slide's rows, or None when nothing recorded locates them.

    :func:`spavis.format.coordinates.spot_coordinates_um` on the table's columns: pixels times the
    slide's recorded ``um_per_px`` (``slides.parquet``), else the Visium lattice of
    ``array_row``/``array_col``. ``neighbor_rows`` is accepted for callers of the earlier
    signature and unused (the scale is never derived from the neighbour graph).
    """
    del neighbor_rows
    return spot_coordinates_um(um_per_px=um_per_px, pxl_row=_column(table, "pxl_row"),
                               pxl_col=_column(table, "pxl_col"), array_row=_column(table, "array_row"),
                               array_col=_column(table, "array_col"))


def _slide_rng(seed: int, epoch: int, slide_id: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(epoch), zlib.crc32(slide_id.encode())])


def spatial_groups(
    table: pa.Table,
    *,
    group_size: int = GROUP_SIZE,
    d_max_um: float = D_MAX_UM,
    seed: int = 0,
    epoch: int = 0,
    um_per_px: float | None = None,
) -> np.ndarray:
    """Algorithm 2 on one slide: int64 (n_groups, group_size) row positions, seed first.

    ``table`` holds one slide's expression rows (``spot_index``, ``neighbors``,
    ``neighbor_distances``; ``pxl_*``/``array_*`` for distances). Groups are disjoint.
    ``um_per_px``: the slide's scale from ``slides.parquet`` (None: the lattice, or the triangle bound).
    """
    n = table.num_rows
    need = group_size - 1
    if n == 0 or group_size < 1:
        return np.zeros((0, max(group_size, 0)), dtype=np.int64)
    slide_ids = pc.unique(table.column("slide_id")) if "slide_id" in table.column_names else pa.array([""])
    if len(slide_ids) != 1:
        raise BatchingError(f"spatial_groups takes one slide per call, got {len(slide_ids)} slides; use corpus.iter_slides")
    slide_id = str(slide_ids[0])
    spot_index = table.column("spot_index").to_numpy(zero_copy_only=False).astype(np.int64)
    nbrs = _neighbor_rows(table)  # neighbour rows, -1 = none / not in this table
    if nbrs.shape[1] < need and n > need:
        raise BatchingError(
            f"slide {slide_id}: the shards store {nbrs.shape[1]} neighbours per spot but groups of "
            f"{group_size} need {need}; rebuild with `spavis build-shards --k-neighbors {need}` or more"
        )
    coords = slide_coordinates_um(table, um_per_px=um_per_px)
    seed_dist = None if coords is not None else _list_matrix(table.column("neighbor_distances"), np.inf, np.float64)
    limit = float(d_max_um)

    order = np.argsort(spot_index, kind="stable")[_slide_rng(seed, epoch, slide_id).permutation(n)]
    assigned = bytearray(n)
    nbr_lists = nbrs.tolist()
    groups: list[list[int]] = []
    for s in order.tolist():
        if assigned[s]:
            continue
        free = [j for j in nbr_lists[s] if j >= 0 and not assigned[j] and j != s]
        if len(free) < need:
            continue
        members = [s, *free[:need]]
        if coords is not None:
            p = coords[members]
            diff = p[:, None, :] - p[None, :, :]
            span = float(np.sqrt((diff * diff).sum(-1).max()))
        else:  # triangle bound through the seed, from the stored µm distances
            pos = [nbr_lists[s].index(j) for j in members[1:]]
            d = np.sort(seed_dist[s, pos])
            span = float(d[-1] + d[-2]) if need >= 2 else float(d[-1]) if need else 0.0
        if span > limit:
            continue
        for j in members:
            assigned[j] = 1
        groups.append(members)
    if not groups:
        return np.zeros((0, group_size), dtype=np.int64)
    return np.asarray(groups, dtype=np.int64)
