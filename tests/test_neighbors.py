"""spavis.neighbors: exact k-NN in micrometres, deterministic tie-breaks, lattice fallback."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.neighbors import NearestNeighbors

from spavis.neighbors import SPOT_SPACING_UM, knn, lattice_to_um, spatial_graph


def _sklearn(coords: np.ndarray, k: int):
    nn = NearestNeighbors(n_neighbors=k + 1).fit(coords)
    dist, idx = nn.kneighbors(coords)
    return dist[:, 1:], idx[:, 1:]


def test_knn_matches_sklearn_on_random_points():
    rng = np.random.default_rng(7)
    coords = rng.uniform(0, 5000, size=(600, 2))
    nbrs, dists = knn(coords, 8)
    ref_d, ref_i = _sklearn(coords, 8)
    assert nbrs.dtype == np.int32 and dists.dtype == np.float32 and nbrs.shape == (600, 8)
    np.testing.assert_allclose(dists, ref_d, rtol=1e-6)
    np.testing.assert_array_equal(nbrs, ref_i)  # continuous coordinates: no ties
    assert not (nbrs == np.arange(600)[:, None]).any()  # never itself
    assert (np.diff(dists, axis=1) >= 0).all()  # nearest first


def test_ties_are_broken_by_spot_index_on_the_hex_lattice():
    rows, cols = np.meshgrid(np.arange(10), np.arange(20), indexing="ij")
    keep = (rows % 2) == (cols % 2)  # Visium: a spot where array_col % 2 == array_row % 2
    ar, ac = rows[keep], cols[keep]
    # shuffle the spot order so index order differs from lattice order
    perm = np.random.default_rng(1).permutation(ar.size)
    ar, ac = ar[perm], ac[perm]
    g = spatial_graph(8, array_row=ar, array_col=ac)
    assert g.method == "lattice"
    coords = lattice_to_um(ar, ac)
    for i in range(ar.size):
        d = np.sqrt(((coords - coords[i]) ** 2).sum(axis=1))
        d[i] = np.inf
        # expected: sort by (rounded distance, index)
        order = np.lexsort((np.arange(ar.size), d.astype(np.float32)))[:8]
        np.testing.assert_array_equal(g.neighbors[i], order)
    interior = (ar > 1) & (ar < 8) & (ac > 2) & (ac < 17)
    # six hex neighbours at exactly one centre spacing
    np.testing.assert_allclose(g.distances[interior][:, :6], SPOT_SPACING_UM, rtol=1e-6)


def test_real_v1_pixels_give_100um_spacing(real_data):
    folder = real_data / "visium" / "human_heart_v1_subsample" / "spatial"
    pos = pd.read_csv(folder / "tissue_positions_list.csv", header=None,
                      names=["barcode", "in_tissue", "array_row", "array_col", "pxl_row", "pxl_col"])
    sf = json.loads((folder / "scalefactors_json.json").read_text())
    g_px = spatial_graph(6, pxl_row=pos.pxl_row.to_numpy(), pxl_col=pos.pxl_col.to_numpy(),
                         array_row=pos.array_row.to_numpy(), array_col=pos.array_col.to_numpy(),
                         spot_diameter_fullres=sf["spot_diameter_fullres"])
    g_lat = spatial_graph(6, array_row=pos.array_row.to_numpy(), array_col=pos.array_col.to_numpy())
    assert g_px.method == "pixels" and g_lat.method == "lattice"
    # nearest neighbour of every spot is one Visium centre spacing away (within 2 %)
    assert abs(np.median(g_px.distances[:, 0]) - 100.0) < 2.0
    np.testing.assert_allclose(np.median(g_lat.distances[:, 0]), 100.0, rtol=1e-6)


def test_fallbacks_and_graph_matrices():
    pr = np.array([0.0, 0.0, 10.0, np.nan])
    pc = np.array([0.0, 10.0, 0.0, 5.0])
    # a missing pixel -> lattice
    g = spatial_graph(2, pxl_row=pr, pxl_col=pc, array_row=np.array([0, 0, 1, 1]),
                      array_col=np.array([0, 2, 1, 3]), spot_diameter_fullres=65.0)
    assert g.method == "lattice"
    # nothing known -> no graph, one empty row per spot
    g = spatial_graph(3, pxl_row=pr, pxl_col=pc, array_row=np.full(4, -1), array_col=np.full(4, -1))
    assert g.method == "none" and g.neighbors.shape == (4, 0)
    # pixels without scale factor and without lattice -> median gap = 100 um
    g = spatial_graph(1, pxl_row=np.array([0.0, 0.0, 0.0]), pxl_col=np.array([0.0, 50.0, 100.0]))
    assert g.method == "pixels-estimated"
    np.testing.assert_allclose(g.distances[:, 0], 100.0)
    # k larger than the slide, and duplicated coordinates stay neighbours at distance 0
    g = spatial_graph(5, pxl_row=np.zeros(3), pxl_col=np.array([0.0, 0.0, 65.0]), spot_diameter_fullres=65.0)
    assert g.neighbors.shape == (3, 2)
    assert g.neighbors[0].tolist() == [1, 2] and g.distances[0].tolist() == [0.0, 65.0]
    conn, dist = g.connectivities(), g.distance_matrix()
    assert conn.shape == (3, 3) and conn.sum() == 6 and conn.diagonal().sum() == 0
    assert dist[0, 2] == pytest.approx(65.0)
