"""spavis.simulate: Visium geometry, realism statistics, determinism, Space Ranger-like output."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.neighbors import NearestNeighbors

from spavis.qc import apply_qc
from spavis.readers import read_slice
from spavis.simulate import GENERATED_LABEL, PIXEL_SIZE_UM, simulate_slice, visium_v1_lattice, write_simulated_slice

GENES = [f"ENSG{i:011d}" for i in range(20310)]


@pytest.fixture(scope="module")
def sim():
    return simulate_slice("sim_A", GENES, n_domains=5, seed=7)


def test_lattice_is_visium_v1():
    lat = visium_v1_lattice()
    assert len(lat.barcodes) == 4992 == len(set(lat.barcodes))
    assert lat.array_row.min() == 0 and lat.array_row.max() == 77
    assert lat.array_col.min() == 0 and lat.array_col.max() == 127
    assert ((lat.array_row % 2) == (lat.array_col % 2)).all()
    assert all(len(b) == 18 and b.endswith("-1") for b in lat.barcodes)


def test_reader_format(sim):
    a = sim
    assert isinstance(a.X, sp.csr_matrix) and a.X.dtype == np.float32 and a.X.has_canonical_format
    assert a.n_vars == 20310 and list(a.var["gene_ids"]) == GENES
    for col, dt in (("array_row", np.int32), ("array_col", np.int32), ("pxl_row", np.float64)):
        assert a.obs[col].dtype == dt
    assert a.obs["in_tissue"].all()
    np.testing.assert_array_equal(a.obsm["spatial"], a.obs[["pxl_col", "pxl_row"]].to_numpy())
    assert a.uns["spavis"]["generated"] is True and a.uns["spavis"]["label"] == GENERATED_LABEL
    assert "GENERATED" in GENERATED_LABEL


def test_geometry_spacing_and_irregular_tissue(sim):
    a = sim
    assert 0.4 * 4992 < a.n_obs < 0.95 * 4992
    xy_um = a.obsm["spatial"] * PIXEL_SIZE_UM
    d, _ = NearestNeighbors(n_neighbors=7).fit(xy_um).kneighbors(xy_um)
    assert np.median(d[:, 1:]) == pytest.approx(100.0, abs=3)  # hex lattice, 100 um centres
    # irregular: not a rectangle of the lattice
    rows = a.obs.groupby("array_row")["array_col"].agg(["min", "max"])
    assert rows["min"].nunique() > 3 and rows["max"].nunique() > 3


def test_realistic_counts(sim):
    a = sim
    X = a.X
    umis = np.asarray(X.sum(axis=1)).ravel()
    genes = np.diff(X.indptr)
    assert 3000 < np.median(umis) < 12000
    assert 0.3 < np.std(np.log(umis)) < 0.9  # log-normal spread
    assert 1000 < np.median(genes) < 5000  # "a few thousand detected genes per spot"
    assert np.all(X.data == np.round(X.data)) and X.data.min() >= 1
    # overdispersion of the highly expressed genes (NB, not Poisson) within one domain
    dom = a.obs["domain"].to_numpy()
    sub = X[dom == dom[0]].toarray()
    sub = sub / sub.sum(axis=1, keepdims=True) * np.median(sub.sum(axis=1))
    top = np.argsort(-sub.mean(axis=0))[:50]
    assert np.median(sub[:, top].var(axis=0) / sub[:, top].mean(axis=0)) > 2


def test_domains_are_smooth_and_have_markers(sim):
    a = sim
    dom = a.obs["domain"].astype(str).to_numpy()
    assert len(set(dom)) == 5
    _, idx = NearestNeighbors(n_neighbors=7).fit(a.obsm["spatial"]).kneighbors(a.obsm["spatial"])
    assert (dom[idx[:, 1:]] == dom[:, None]).mean() > 0.8
    cp = a.X.multiply(1e4 / a.X.sum(axis=1)).tocsr()
    for d in sorted(set(dom)):
        inside = np.asarray(cp[dom == d].mean(axis=0)).ravel()
        outside = np.asarray(cp[dom != d].mean(axis=0)).ravel()
        fold = (inside + 0.1) / (outside + 0.1)
        assert (fold > 4).sum() >= 20, d


def test_deterministic_for_a_seed():
    a = simulate_slice("sim_A", GENES[:2000], n_domains=4, seed=7)
    b = simulate_slice("sim_A", GENES[:2000], n_domains=4, seed=7)
    assert (a.X != b.X).nnz == 0 and a.obs.equals(b.obs)
    c = simulate_slice("sim_A", GENES[:2000], n_domains=4, seed=8)
    assert c.n_obs != a.n_obs or (c.X != a.X).nnz > 0
    # seed=None derives it from the slide id: stable, different per slide
    s1, s2 = simulate_slice("x", 500, seed=None), simulate_slice("x", 500, seed=None)
    assert (s1.X != s2.X).nnz == 0
    assert list(s1.var["gene_ids"][:2]) == ["SIMG00000000000", "SIMG00000000001"]


def test_written_folder_reads_back_and_is_labelled(tmp_path):
    import scanpy as sc

    out = write_simulated_slice(tmp_path / "gen1", genes=GENES[:1000], seed=3, n_domains=3)
    a = simulate_slice("gen1", GENES[:1000], seed=3, n_domains=3)
    r = read_slice(out)
    assert list(r.obs_names) == list(a.obs_names) and (r.X != a.X).nnz == 0
    np.testing.assert_array_equal(r.obsm["spatial"], a.obsm["spatial"])
    assert list(r.var["gene_ids"]) == GENES[:1000]
    marker = json.loads((out / "generated.json").read_text())
    assert marker["generated"] is True and marker["label"] == GENERATED_LABEL
    assert marker["domains"][a.obs_names[0]] == a.obs["domain"].iloc[0]
    pos = (out / "spatial" / "tissue_positions.csv").read_text().splitlines()
    assert pos[0] == "barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres" and len(pos) == 4993
    ref = sc.read_10x_h5(out / "filtered_feature_bc_matrix.h5")  # the real client reads it
    assert (sp.csr_matrix(ref.X) != a.X).nnz == 0
    # same bytes on rewrite; refuses to overwrite; no temp folder left
    out2 = write_simulated_slice(tmp_path / "gen2", slide_id="gen1", genes=GENES[:1000], seed=3, n_domains=3)
    for f in ("filtered_feature_bc_matrix.h5", "spatial/tissue_positions.csv", "spatial/tissue_lowres_image.png"):
        assert hashlib.sha256((out / f).read_bytes()).digest() == hashlib.sha256((out2 / f).read_bytes()).digest()
    with pytest.raises(Exception, match="not empty"):
        write_simulated_slice(out, genes=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen1", "gen2"]


def test_qc_keeps_most_generated_spots(sim):
    a = sim
    res = apply_qc(a, a.X, min_genes=100)
    assert res.n_spots_kept > 0.95 * a.n_obs and res.counts_are_integer
