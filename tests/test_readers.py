"""read_slice on the real fixtures and on layouts built from them (mtx, GEO, HEST, STimage)."""
from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from spavis.errors import ReaderError
from spavis.readers import demo_slice_path, read_slice

POS_COLS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]


@pytest.fixture(scope="module")
def heart_dir(real_data) -> Path:
    return real_data / "visium" / "human_heart_v1_subsample"


@pytest.fixture(scope="module")
def heart(heart_dir):
    return read_slice(heart_dir)


def tree_digest(root: Path) -> dict:
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def assert_same_slice(a, b, *, coords=True):
    assert list(a.obs_names) == list(b.obs_names)
    assert a.X.shape == b.X.shape
    assert abs(a.X - b.X).max() == 0
    assert isinstance(b.X, sp.csr_matrix) and b.X.dtype == np.float32
    if coords:
        np.testing.assert_allclose(a.obsm["spatial"], b.obsm["spatial"])
        np.testing.assert_array_equal(a.obs["in_tissue"], b.obs["in_tissue"])


def heart_positions(heart_dir) -> pd.DataFrame:
    return pd.read_csv(heart_dir / "spatial" / "tissue_positions_list.csv", header=None, names=POS_COLS)


# ---------------------------------------------------------------- real fixtures

@pytest.mark.filterwarnings("ignore:Use `squidpy.read.visium`:FutureWarning")
def test_heart_h5_matches_contract_and_scanpy(heart, heart_dir):
    import scanpy as sc

    a = heart
    assert a.shape == (100, 100)
    assert isinstance(a.X, sp.csr_matrix) and a.X.dtype == np.float32
    assert a.obs["in_tissue"].dtype == bool
    assert a.obs["array_row"].dtype == np.int32 and a.obs["array_col"].dtype == np.int32
    assert a.obs["pxl_row"].dtype == np.float64
    ref = sc.read_visium(heart_dir)
    assert list(ref.obs_names) == list(a.obs_names)
    assert abs(sp.csr_matrix(ref.X) - a.X).max() == 0
    np.testing.assert_allclose(np.asarray(ref.obsm["spatial"], float), a.obsm["spatial"])
    pos = heart_positions(heart_dir).set_index("barcode").loc[a.obs_names]
    np.testing.assert_array_equal(a.obs["array_row"], pos["array_row"])
    np.testing.assert_array_equal(a.obsm["spatial"][:, 0], pos["pxl_col_in_fullres"])  # x = column
    assert a.var["gene_ids"].str.startswith("ENSG").all()
    lib = next(iter(a.uns["spatial"].values()))
    assert lib["scalefactors"] == json.loads((heart_dir / "spatial" / "scalefactors_json.json").read_text())
    assert lib["images"]["lowres"].shape == (600, 600, 3) and lib["images"]["lowres"].dtype == np.uint8
    assert a.uns["spavis"]["has_coordinates"] is True
    assert a.uns["spavis"]["spot_diameter_fullres"] == pytest.approx(89.4275106)


@pytest.mark.filterwarnings("ignore:Use `squidpy.read.visium`:FutureWarning")
def test_mouse_old_h5_layout_reads(real_data):
    import scanpy as sc

    folder = real_data / "visium" / "mouse_brain_v1_subset"
    with pytest.raises(KeyError):  # the reason this fixture exists
        sc.read_visium(folder)
    a = read_slice(folder)
    assert a.shape == (2695, 100)
    with h5py.File(folder / "filtered_feature_bc_matrix.h5", "r") as f:
        g = f["matrix"]
        ref = sp.csr_matrix((g["data"][:], g["indices"][:], g["indptr"][:]), shape=(2695, 100))
        ids = [x.decode() if isinstance(x, bytes) else x for x in g["features/id"][:]]
    assert abs(ref - a.X).max() == 0
    assert list(a.var["gene_ids"]) == ids and a.var["gene_ids"].str.startswith("ENSMUSG").all()
    assert a.obs["in_tissue"].all() and np.isfinite(a.obsm["spatial"]).all()


def test_mouse_processed_h5ad(real_data):
    folder = real_data / "visium" / "mouse_brain_processed"
    a = read_slice(folder)
    src = ad.read_h5ad(folder / "test_data.h5ad")
    assert a.shape == src.shape == (49, 1999)
    np.testing.assert_allclose(a.obsm["spatial"], src.obsm["spatial"])  # h5ad coordinates win
    assert (a.obs["array_row"] >= 0).any()  # filled from spatial/tissue_positions_list.csv
    assert a.uns["spavis"]["reader"] == "h5ad"
    assert list(a.var["gene_ids"]) == list(src.var["gene_ids"])


def test_bundled_demo_is_the_real_heart(heart):
    a = read_slice(demo_slice_path())
    assert_same_slice(heart, a)
    assert not (demo_slice_path() / "spatial" / "tissue_hires_image.png").exists()
    assert "CC BY 4.0" in (demo_slice_path().parent / "ATTRIBUTION.md").read_text()


def test_inputs_are_never_modified(real_data, tmp_path):
    for name in ("human_heart_v1_subsample", "mouse_brain_v1_subset", "mouse_brain_processed"):
        folder = tmp_path / name
        shutil.copytree(real_data / "visium" / name, folder)
        before = tree_digest(folder)
        read_slice(folder)
        assert tree_digest(folder) == before
        assert sorted(p.name for p in folder.rglob("*")) == sorted(p.name for p in (real_data / "visium" / name).rglob("*"))


# ---------------------------------------------------------------- layouts built from the real heart

def _write_mtx(folder: Path, heart, prefix: str = "", gz: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    op = gzip.open if gz else open
    with op(folder / f"{prefix}matrix.mtx{ext}", "wb") as fh:
        scipy.io.mmwrite(fh, sp.csr_matrix(heart.X.T).astype(np.int64), field="integer")
    with op(folder / f"{prefix}barcodes.tsv{ext}", "wt") as fh:
        fh.write("\n".join(heart.obs_names) + "\n")
    feats = pd.DataFrame({"id": heart.var["gene_ids"], "name": heart.var_names, "type": "Gene Expression"})
    with op(folder / f"{prefix}features.tsv{ext}", "wt") as fh:
        feats.to_csv(fh, sep="\t", header=False, index=False)


def test_mtx_folder_with_headered_positions(heart, heart_dir, tmp_path):
    out = tmp_path / "outs"
    _write_mtx(out / "filtered_feature_bc_matrix", heart)
    (out / "spatial").mkdir()
    heart_positions(heart_dir).to_csv(out / "spatial" / "tissue_positions.csv", index=False)  # v2 header
    shutil.copy(heart_dir / "spatial" / "scalefactors_json.json", out / "spatial")
    a = read_slice(out)
    assert_same_slice(heart, a)
    assert a.uns["spavis"]["reader"] == "10x-mtx"
    assert list(a.var["gene_ids"]) == list(heart.var["gene_ids"])


def test_geo_flat_gsm_prefixed_gzip_folder(heart, heart_dir, tmp_path):
    geo = tmp_path / "GSM8047880"
    p = "GSM8047880_sample_"
    _write_mtx(geo, heart, prefix=p)
    with gzip.open(geo / f"{p}tissue_positions.csv.gz", "wt") as fh:
        heart_positions(heart_dir).to_csv(fh, index=False)
    for src, dst in (("scalefactors_json.json", "scalefactors_json.json"), ("tissue_lowres_image.png", "tissue_lowres_image.png")):
        with open(heart_dir / "spatial" / src, "rb") as fi, gzip.open(geo / f"{p}{dst}.gz", "wb") as fo:
            fo.write(fi.read())
    a = read_slice(geo)
    assert_same_slice(heart, a)
    assert a.uns["spatial"][next(iter(a.uns["spatial"]))]["images"]["lowres"].shape == (600, 600, 3)
    assert a.uns["spavis"]["spot_diameter_fullres"] == pytest.approx(89.4275106)


def test_geo_old_series_h5_and_gz_positions_with_two_samples(heart, heart_dir, tmp_path):
    raw = tmp_path / "GSE1_RAW"
    raw.mkdir()
    for gsm in ("GSM1", "GSM2"):
        shutil.copy(heart_dir / "filtered_feature_bc_matrix.h5", raw / f"{gsm}_A1_filtered_feature_bc_matrix.h5")
        with open(heart_dir / "spatial" / "tissue_positions_list.csv", "rb") as fi, gzip.open(
            raw / f"{gsm}_A1_tissue_positions_list.csv.gz", "wb"
        ) as fo:
            fo.write(fi.read())
    with pytest.raises(ReaderError, match="2 samples"):
        read_slice(raw)
    a = read_slice(raw / "GSM2_A1_filtered_feature_bc_matrix.h5")
    assert_same_slice(heart, a)
    assert a.uns["spavis"]["source_path"].endswith("GSM2_A1_filtered_feature_bc_matrix.h5")


def test_gzipped_h5(heart, heart_dir, tmp_path):
    d = tmp_path / "s"
    shutil.copytree(heart_dir, d)
    with open(d / "filtered_feature_bc_matrix.h5", "rb") as fi, gzip.open(d / "filtered_feature_bc_matrix.h5.gz", "wb") as fo:
        fo.write(fi.read())
    (d / "filtered_feature_bc_matrix.h5").unlink()
    assert_same_slice(heart, read_slice(d))


def test_v2_genome_group_h5(heart, heart_dir, tmp_path):
    d = tmp_path / "v2"
    shutil.copytree(heart_dir, d)
    X = heart.X.tocsr()
    with h5py.File(d / "filtered_feature_bc_matrix.h5", "w") as f:
        g = f.create_group("GRCh38")
        g["barcodes"] = np.array(heart.obs_names, dtype="S")
        g["data"], g["indices"], g["indptr"] = X.data.astype(np.int32), X.indices, X.indptr
        g["shape"] = np.array([X.shape[1], X.shape[0]], dtype=np.int32)
        g["genes"] = np.array(heart.var["gene_ids"], dtype="S")
        g["gene_names"] = np.array(heart.var_names, dtype="S")
    a = read_slice(d)
    assert_same_slice(heart, a)
    assert list(a.var["gene_ids"]) == list(heart.var["gene_ids"])


def test_hest_like_h5ad_with_metadata(heart, tmp_path):
    (tmp_path / "st").mkdir()
    (tmp_path / "metadata").mkdir()
    obs = pd.DataFrame(
        {
            "in_tissue": heart.obs["in_tissue"].astype(int), "array_row": heart.obs["array_row"],
            "array_col": heart.obs["array_col"], "pxl_col_in_fullres": heart.obs["pxl_col"],
            "pxl_row_in_fullres": heart.obs["pxl_row"],
        },
        index=heart.obs_names,
    )
    h = ad.AnnData(X=heart.X.copy(), obs=obs, var=pd.DataFrame(index=heart.var["gene_ids"].to_numpy()))
    h.obsm["spatial"] = heart.obsm["spatial"].copy()
    img = next(iter(heart.uns["spatial"].values()))["images"]["lowres"]
    h.uns["spatial"] = {"ST": {"images": {"downscaled_fullres": img}, "scalefactors": {"tissue_downscaled_fullres_scalef": 0.045, "spot_diameter_fullres": 89.4}}}
    h.write_h5ad(tmp_path / "st" / "TENX99.h5ad")
    meta = {"id": "TENX99", "species": "Homo sapiens", "spot_diameter": 55.0, "pixel_size_um_estimated": 0.5}
    (tmp_path / "metadata" / "TENX99.json").write_text(json.dumps(meta))
    a = read_slice(tmp_path / "st" / "TENX99.h5ad")
    assert_same_slice(heart, a)
    assert a.uns["spavis"]["reader"] == "hest-h5ad"
    assert json.loads(a.uns["spavis"]["source_metadata_json"])["id"] == "TENX99"
    np.testing.assert_array_equal(a.obs["array_col"], heart.obs["array_col"])
    assert list(a.var["gene_ids"]) == list(heart.var["gene_ids"])
    lib = a.uns["spatial"]["ST"]
    assert lib["scalefactors"]["tissue_lowres_scalef"] == 0.045 and lib["images"]["lowres"].shape == (600, 600, 3)


def test_stimage_like_csvs(heart, tmp_path):
    slide = "GSE999_GSM999"
    root = tmp_path / "Visium"
    for sub in ("gene_exp", "coord", "image"):
        (root / sub).mkdir(parents=True)
    ids = [f"{slide}_{b}" for b in heart.obs_names]
    dense = pd.DataFrame(heart.X.toarray().astype(int), index=ids, columns=heart.var_names)
    dense.to_csv(root / "gene_exp" / f"{slide}_count.csv")
    coord = pd.DataFrame({"yaxis": heart.obs["pxl_row"].to_numpy(), "xaxis": heart.obs["pxl_col"].to_numpy(), "r": 44.7}, index=ids)
    coord.to_csv(root / "coord" / f"{slide}_coord.csv")
    assert (root / "coord" / f"{slide}_coord.csv").read_text().startswith(",yaxis,xaxis,r\n")
    (root / "image" / f"{slide}.png").write_bytes(b"not decoded")
    a = read_slice(root / "gene_exp" / f"{slide}_count.csv")
    assert_same_slice(heart, a)
    assert a.uns["spavis"]["reader"] == "stimage1k4m"
    assert a.uns["spavis"]["spot_diameter_fullres"] == pytest.approx(89.4)
    assert a.uns["spavis"]["image_path"].endswith(f"{slide}.png")
    assert (a.obs["array_row"] == -1).all()


def test_plain_h5ad_without_coordinates(heart, tmp_path):
    h = ad.AnnData(X=heart.X.toarray(), var=pd.DataFrame(index=heart.var_names.to_numpy()))
    h.obs_names = heart.obs_names
    h.write_h5ad(tmp_path / "plain.h5ad")
    a = read_slice(tmp_path / "plain.h5ad")
    assert_same_slice(heart, a, coords=False)
    assert "spatial" not in a.obsm and a.uns["spavis"]["has_coordinates"] is False
    assert np.isnan(a.obs["pxl_row"]).all() and a.obs["in_tissue"].all()


# ---------------------------------------------------------------- bad inputs

def test_truncated_h5(heart_dir, tmp_path):
    d = tmp_path / "trunc"
    shutil.copytree(heart_dir, d)
    data = (heart_dir / "filtered_feature_bc_matrix.h5").read_bytes()
    (d / "filtered_feature_bc_matrix.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(ReaderError, match=r"filtered_feature_bc_matrix\.h5.*(truncated|corrupt)"):
        read_slice(d)


def test_positions_for_unknown_barcodes(heart_dir, tmp_path):
    d = tmp_path / "wrong_pos"
    shutil.copytree(heart_dir, d)
    pos = heart_positions(heart_dir)
    pos["barcode"] = [f"{'T' * 15}{i}-9" for i in range(len(pos))]
    pos.to_csv(d / "spatial" / "tissue_positions_list.csv", header=False, index=False)
    with pytest.raises(ReaderError, match=r"none of the 100 barcodes.*tissue_positions_list\.csv.*same sample"):
        read_slice(d)


def test_matrix_barcodes_missing_from_positions_are_flagged(heart, heart_dir, tmp_path):
    d = tmp_path / "partial"
    shutil.copytree(heart_dir, d)
    pos = heart_positions(heart_dir)
    drop = set(heart.obs_names[:7])
    pos[~pos["barcode"].isin(drop)].to_csv(d / "spatial" / "tissue_positions_list.csv", header=False, index=False)
    with pytest.warns(UserWarning, match="7 of 100 barcodes have no row"):
        a = read_slice(d)
    assert a.uns["spavis"]["n_spots_without_position"] == 7
    missing = a.obs_names.isin(list(drop))
    assert not a.obs["in_tissue"][missing].any() and (a.obs["array_row"][missing] == -1).all()
    assert np.isnan(a.obsm["spatial"][missing]).all() and np.isfinite(a.obsm["spatial"][~missing]).all()


def test_barcode_suffix_mismatch_is_matched_on_core(heart, heart_dir, tmp_path):
    d = tmp_path / "suffix"
    shutil.copytree(heart_dir, d)
    pos = heart_positions(heart_dir)
    pos["barcode"] = pos["barcode"].str.replace("-1", "", regex=False)
    pos.to_csv(d / "spatial" / "tissue_positions_list.csv", header=False, index=False)
    assert_same_slice(heart, read_slice(d))


def test_missing_matrix_unknown_layout_and_missing_path(heart_dir, tmp_path):
    d = tmp_path / "only_spatial"
    shutil.copytree(heart_dir / "spatial", d / "spatial")
    with pytest.raises(ReaderError, match="no count matrix"):
        read_slice(d)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReaderError, match="unknown layout"):
        read_slice(tmp_path / "empty")
    with pytest.raises(ReaderError, match="no such file"):
        read_slice(tmp_path / "nope")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(ReaderError, match="unknown input file"):
        read_slice(tmp_path / "x.txt")


def test_mtx_without_barcodes_names_the_missing_file(heart, tmp_path):
    d = tmp_path / "mtx"
    _write_mtx(d, heart, prefix="GSM5_")
    (d / "GSM5_barcodes.tsv.gz").unlink()
    with pytest.raises(ReaderError, match=r"GSM5_barcodes\.tsv"):
        read_slice(d)


def test_no_warnings_on_clean_fixture(heart_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_slice(heart_dir)
