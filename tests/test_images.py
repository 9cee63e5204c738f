"""`build-shards --with-images`: patch/region geometry, border handling, formats and bad images.

The geometry test draws a dark 5 x 5 px marker at every spot's centre pixel of a synthetic
2000 x 2000 pyramidal TIFF (tiled, 3 levels: 0.5, 1 and 2 µm/px, written with tifffile) and
finds the markers again in the patches and regions the build cut: expected positions come
from the geometry alone (patch centre at 111.5 px; region cell centres at (c + 0.5) * 224/3 - 0.5).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from spavis.format import open_corpus
from spavis.format import schema as S
from spavis.format.corpus import decode_image
from spavis.images import ImageError
from spavis.shards import build_shards
from spavis.shards.validate import validate
from spavis.shards.images import drawn_cells

tifffile = pytest.importorskip("tifffile")

UM0 = 0.5  # µm per level-0 pixel of the synthetic slide (the patch scale)
SIZE = 2000
# spot centres (µm, (x, y)), every pair > 280 µm apart on some axis (a region reaches 280 µm
# from its spot, so each region shows one marker): four interior spots, one 60 µm from the
# left edge (its region must move right: column 0), one 20 µm from it (the patch leaves the
# image: padded), one 60 µm from the bottom-right corner (cell 8)
SPOTS_UM = [(350, 350), (650, 350), (350, 650), (650, 650), (60, 500), (20, 880), (940, 940)]
ODD = [(3, 1), (1, 7), (5, 3), (7, 5), (1, 1), (3, 3), (5, 5)]  # odd pixel offsets: level 1 is not aligned


def _spots_px() -> np.ndarray:
    return np.array([(x / UM0 + ox, y / UM0 + oy) for (x, y), (ox, oy) in zip(SPOTS_UM, ODD)], np.int64)


def _write_tiff(path: Path, img: np.ndarray, levels: int = 2) -> None:
    photometric = "rgb" if img.ndim == 3 and img.shape[2] in (3, 4) else "minisblack"
    extra = {"extrasamples": ["unassalpha"]} if img.ndim == 3 and img.shape[2] == 4 else {}
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, tile=(256, 256), photometric=photometric, compression="zlib", subifds=levels - 1, **extra)
        level = img
        for _ in range(levels - 1):  # 2 x 2 box filter: keeps the marker centroids exact
            h, w = level.shape[0] // 2 * 2, level.shape[1] // 2 * 2
            blocks = level[:h, :w].reshape(h // 2, 2, w // 2, 2, *level.shape[2:]).astype(np.float64)
            level = blocks.mean(axis=(1, 3)).round().astype(np.uint8)
            tw.write(level, tile=(256, 256), photometric=photometric, compression="zlib", subfiletype=1, **extra)


def _marker_image(channels: int = 3, size: int = SIZE) -> np.ndarray:
    img = np.full((size, size, channels), 255, np.uint8) if channels > 1 else np.full((size, size), 255, np.uint8)
    for x, y in _spots_px():
        if 0 <= x < size and 0 <= y < size:
            img[max(y - 2, 0):y + 3, max(x - 2, 0):x + 3, ...] = 0
    if channels == 4:
        img[:, :, 3] = 255
    img[0, 0] = 128  # not one colour even where no spot falls (a blank image counts as no image)
    return img


def _make_slice(folder: Path, *, calibrated: bool = True, image: np.ndarray | None = None,
                tiff_levels: int = 3, lowres_of: int | None = None, hest_um: float | None = None) -> Path:
    """A plain .h5ad slice (7 spots, 20 vocabulary genes) + image.tif in ``folder``."""
    from spavis.genes import load_vocabulary

    folder.mkdir(parents=True)
    ids = [str(x) for x in load_vocabulary("stamp-v1").ensembl_ids[:20]]
    px = _spots_px()
    n = len(px)
    rng = np.random.default_rng(0)
    X = sp.csr_matrix(rng.integers(1, 5, size=(n, len(ids))).astype(np.float32))
    obs = pd.DataFrame({"in_tissue": np.ones(n, np.int64),
                        "pxl_col_in_fullres": px[:, 0].astype(np.float64),
                        "pxl_row_in_fullres": px[:, 1].astype(np.float64)},
                       index=[f"AAAC{i:04d}-1" for i in range(n)])
    a = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=ids))
    if calibrated:  # Space Ranger's calibration: spot_diameter_fullres = pixels per 65 µm
        a.uns["spatial"] = {"lib": {"scalefactors": {"spot_diameter_fullres": 65.0 / UM0}}}
    if lowres_of:  # a 600 px lowres picture of a lowres_of-px full-resolution image, as Space Ranger writes
        a.uns["spatial"]["lib"]["scalefactors"]["tissue_lowres_scalef"] = 600 / lowres_of
        a.uns["spatial"]["lib"]["images"] = {"lowres": np.full((600, 600, 3), 200, np.uint8)}
    name = "slice"
    if hest_um is not None:  # HEST-1k: st/<id>.h5ad + metadata/<id>.json with the scanner's µm/px
        name = "TENX999"
        (folder / f"{name}.json").write_text(json.dumps({"pixel_size_um_estimated": hest_um}))
    a.write_h5ad(folder / f"{name}.h5ad")
    _write_tiff(folder / "image.tif", _marker_image() if image is None else image, tiff_levels)
    return folder


def _centroid(img: np.ndarray) -> tuple[float, float]:
    dark = 255.0 - img.astype(np.float64).mean(axis=2)
    dark[dark < 8] = 0  # interpolation ripples are not the marker
    ys, xs = np.mgrid[0:img.shape[0], 0:img.shape[1]]
    return float((dark * xs).sum() / dark.sum()), float((dark * ys).sum() / dark.sum())


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    _make_slice(root / "markers")
    return build_shards([root / "markers"], root / "corpus", min_genes=1, with_images=True)


def test_patch_centre_is_the_spot_centre_and_regions_hold_the_patch_in_their_cell(built):
    corpus = open_corpus(built)
    assert corpus.has_images
    (table,) = list(corpus.iter_paired())
    rows = table.to_pylist()
    expr = next(corpus.iter_slides(columns=["spot_id"])).column("spot_id").to_pylist()
    assert [r["spot_id"] for r in rows] == expr  # same spots, same order as the expression rows
    step = S.PATCH_PX / S.REGION_GRID
    by_barcode = {f"AAAC{i:04d}-1": i for i in range(len(SPOTS_UM))}
    drawn = drawn_cells([r["spot_id"] for r in rows])
    for r, want in zip(rows, drawn):
        i = by_barcode[r["spot_id"].split(":", 1)[1]]
        patch, region = decode_image(r["patch"]), decode_image(r["region"])
        assert patch.shape == region.shape == (224, 224, 3)
        assert 0 <= r["region_cell"] <= 8
        assert r["um_per_px"] == pytest.approx(0.5)  # level 0: exactly the patch scale
        assert r["upsampled"] is False
        if i == 5:  # 20 µm from the left edge: the patch leaves the image
            assert r["padded"] is True
            continue
        assert r["padded"] is False
        cx, cy = _centroid(patch)
        # within half a source pixel (0.25 µm = 0.5 output pixel) of the spot centre
        assert abs(cx - 111.5) <= 0.5 and abs(cy - 111.5) <= 0.5, (i, cx, cy)
        row, col = divmod(r["region_cell"], 3)
        rx, ry = _centroid(region)
        assert abs(rx - ((col + 0.5) * step - 0.5)) <= 0.5 and abs(ry - ((row + 0.5) * step - 0.5)) <= 0.5
        if i < 4:
            assert r["region_cell"] == want  # interior: the drawn cell is kept
        elif i == 4:
            assert col == 0  # the region moved inside the image; the label followed
        elif i == 6:
            assert r["region_cell"] == 8


def test_slides_zarr_and_datasets_agree(built, tmp_path):
    import datasets
    import zarr

    slides = pq.read_table(built / S.SLIDES_FILE).to_pylist()
    (slide,) = slides
    assert slide["image_file"] == "image.tif" and slide["image_kind"] == "wsi"
    assert slide["image_um_per_px"] == pytest.approx(0.5)
    assert slide["n_patches_padded"] == 1 and slide["n_patches_upsampled"] == 0
    corpus = open_corpus(built)
    table = next(corpus.iter_paired())
    g = corpus.images_zarr("markers")
    assert isinstance(g, zarr.Group)
    assert g["patch"].shape == (table.num_rows, 224, 224, 3) and g["patch"].dtype == np.uint8
    for i, r in enumerate(table.to_pylist()):
        assert np.array_equal(g["patch"][i], decode_image(r["patch"]))
        assert np.array_equal(g["region"][i], decode_image(r["region"]))
    assert g["region_cell"][:].tolist() == table.column("region_cell").to_pylist()
    assert g["padded"][:].tolist() == table.column("padded").to_pylist()
    datasets.disable_progress_bars()
    # own cache_dir: datasets may be imported (its cache path fixed) before HF_DATASETS_CACHE is set
    ds = datasets.load_dataset(str(built), "paired", split="train", cache_dir=str(tmp_path / "hf"))
    first = ds[0]
    assert first["patch"].size == (224, 224) and first["patch"].mode == "RGB"
    assert np.array_equal(np.asarray(first["patch"]), decode_image(table.column("patch")[0].as_py()))
    report = validate(built)
    assert report.ok, report.errors


def test_builds_are_byte_identical(built, tmp_path, monkeypatch):
    monkeypatch.setenv("SPAVIS_IMAGE_THREADS", "1")  # the first build used several threads
    monkeypatch.setenv("SPAVIS_IMAGE_CACHE_MB", "16")  # and a cache large enough to keep every block
    again = build_shards([built.parent / "markers"], tmp_path / "again", min_genes=1, with_images=True)
    rel = f"{S.PAIRED_DIR}/part-00000.parquet"
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(again / rel) == digest(built / rel)
    m1, m2 = (json.loads((d / S.MANIFEST_FILE).read_text()) for d in (built, again))
    assert [o["sha256"] for o in m1["outputs"]] == [o["sha256"] for o in m2["outputs"]]


def test_lowres_fallback_flags_every_patch_upsampled(tmp_path):
    heart = Path(__file__).parents[1] / "spavis" / "data" / "demo" / "human_heart_v1_subsample"
    out = build_shards([heart], tmp_path / "heart", min_genes=1, with_images=True)
    (slide,) = pq.read_table(out / S.SLIDES_FILE).to_pylist()
    assert slide["image_kind"] == "lowres"
    # 65 µm / spot_diameter_fullres / tissue_lowres_scalef, from the slice's own scalefactors
    sf = json.loads((heart / "spatial" / "scalefactors_json.json").read_text())
    assert slide["image_um_per_px"] == pytest.approx(65.0 / sf["spot_diameter_fullres"] / sf["tissue_lowres_scalef"])
    assert slide["n_patches_upsampled"] == slide["n_spots_kept"] > 0
    assert any("upsampled" in w for w in slide["warnings"])
    table = next(open_corpus(out).iter_paired(columns=["upsampled", "padded", "region_cell"]))
    assert all(table.column("upsampled").to_pylist())


@pytest.mark.parametrize("channels,note", [(1, "grayscale"), (4, "RGBA")])
def test_gray_and_rgba_images_are_converted_and_said(tmp_path, channels, note):
    _make_slice(tmp_path / "s", image=_marker_image(channels), tiff_levels=1)
    with pytest.warns(UserWarning, match=note):
        out = build_shards([tmp_path / "s"], tmp_path / "out", min_genes=1, with_images=True)
    (slide,) = pq.read_table(out / S.SLIDES_FILE).to_pylist()
    assert any(note in w for w in slide["warnings"])
    row = next(open_corpus(out).iter_paired()).to_pylist()[0]
    assert decode_image(row["patch"]).shape == (224, 224, 3)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


@pytest.mark.parametrize("case,message", [
    ("small", "does not cover"),
    ("truncated", "truncated"),
    ("uncalibrated", "no calibration"),
    ("other slide", "not this slide's full-resolution image"),
])
def test_bad_images_fail_with_one_clear_error_and_no_output(tmp_path, case, message):
    if case == "small":
        _make_slice(tmp_path / "s", image=_marker_image(size=1000))
    elif case == "truncated":  # small, so a missed truncation would fail on coverage instead
        _make_slice(tmp_path / "s", image=_marker_image(size=1000), tiff_levels=1)
        _truncate(tmp_path / "s" / "image.tif")
    elif case == "uncalibrated":
        _make_slice(tmp_path / "s", calibrated=False, image=_marker_image(size=1000), tiff_levels=1)
    else:  # covers the spots, but the scale factors describe a 5000 px image
        _make_slice(tmp_path / "s", tiff_levels=1, lowres_of=5000)
    with pytest.raises(ImageError, match=message):
        build_shards([tmp_path / "s"], tmp_path / "out", min_genes=1, with_images=True)
    assert not (tmp_path / "out").exists()
    left = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".spavis-lock"))  # the build's lock
    assert left == ["s"]  # no partial output, no stray work dir


def test_cli_prints_one_line_for_a_bad_image(tmp_path):
    _make_slice(tmp_path / "s", image=_marker_image(size=1000), tiff_levels=1)
    _truncate(tmp_path / "s" / "image.tif")
    spavis = Path(sys.executable).with_name("spavis")
    res = subprocess.run([str(spavis), "build-shards", str(tmp_path / "s"), "--out", str(tmp_path / "out"),
                          "--min-genes", "1", "--with-images", "--quiet"],
                         capture_output=True, text=True, timeout=180, env=dict(os.environ))
    assert res.returncode == 1
    errors = [line for line in res.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "image.tif" in errors[0] and "download it again" in errors[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()


def test_generated_he_image_is_deterministic_and_its_texture_follows_the_domains(tmp_path):
    """GENERATED slices (spavis.simulate he_image=True): same seed, same TIFF bytes; a patch's
    mean colour alone tells its spot's domain far above chance (what patch -> spot retrieval needs)."""
    from spavis.genes import load_vocabulary
    from spavis.simulate import HE_IMAGE_NAME, write_simulated_slice

    ids = [str(x) for x in load_vocabulary("stamp-v1").ensembl_ids[:200]]
    kw = dict(genes=ids, seed=4, max_row=2, median_umis=1500, n_domains=3, he_image=True)
    a = write_simulated_slice(tmp_path / "gen_a", **kw)
    b = write_simulated_slice(tmp_path / "gen_b", **kw)
    assert (a / HE_IMAGE_NAME).read_bytes() == (b / HE_IMAGE_NAME).read_bytes()
    with tifffile.TiffFile(a / HE_IMAGE_NAME) as tf:
        assert len(tf.series[0].levels) >= 2 and tf.pages[0].is_tiled
        assert "GENERATED" in tf.pages[0].description
    out = build_shards([a], tmp_path / "out", min_genes=1, with_images=True)
    (slide,) = pq.read_table(out / S.SLIDES_FILE).to_pylist()
    assert slide["image_kind"] == "wsi" and slide["n_patches_upsampled"] == 0  # 0.72 µm/px: 1.45x, not > 2x
    domains = json.loads((a / "generated.json").read_text())["domains"]
    table = next(open_corpus(out).iter_paired(columns=["spot_id", "patch"]))
    feats = np.array([decode_image(p).reshape(-1, 3).mean(axis=0) for p in table.column("patch").to_pylist()])
    labels = np.array([domains[s.split(":", 1)[1]] for s in table.column("spot_id").to_pylist()])
    names = sorted(set(labels))
    assert len(names) >= 2
    centroids = np.stack([feats[labels == n].mean(axis=0) for n in names])
    pred = np.array(names)[np.argmin(((feats[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)]
    assert (pred == labels).mean() > 1 / len(names) + 0.3


def test_fetch_and_discovery_pick_the_microscope_image_not_space_ranger_pictures():
    """GEO --with-images also fetches a sample's full-resolution H&E (Space Ranger's --image input)."""
    from spavis.sources.geo import _fullres_images

    listing = ["GSM1_filtered_feature_bc_matrix.h5", "GSM1_tissue_positions_list.csv.gz",
               "GSM1_tissue_hires_image.png.gz", "GSM1_tissue_lowres_image.png.gz",
               "GSM1_aligned_fiducials.jpg.gz", "GSM1_detected_tissue_image.jpg.gz", "GSM1_scalefactors_json.json.gz",
               "GSM1_HE_image.tif.gz"]
    assert _fullres_images(listing) == {"fullres_image_0": "GSM1_HE_image.tif.gz"}
    assert _fullres_images(listing[:-1]) == {}


def test_hest_metadata_calibrates_a_slide_without_scale_factors(tmp_path):
    _make_slice(tmp_path / "s", calibrated=False, hest_um=UM0, image=_marker_image(), tiff_levels=2)
    out = build_shards([tmp_path / "s"], tmp_path / "out", min_genes=1, with_images=True)
    (slide,) = pq.read_table(out / S.SLIDES_FILE).to_pylist()
    assert slide["image_um_per_px"] == pytest.approx(UM0)
    row = next(open_corpus(out).iter_paired()).to_pylist()[0]
    cx, cy = _centroid(decode_image(row["patch"]))
    assert abs(cx - 111.5) <= 0.5 and abs(cy - 111.5) <= 0.5


def test_real_slice_skips_the_black_hires_placeholder_and_uses_the_lowres(real_data, tmp_path):
    """REAL 10x V1_Human_Heart files: its tissue_hires_image.png is all black (as released), so
    the lowres picture is used, said in a warning, and every patch is flagged upsampled."""
    heart = real_data / "visium" / "human_heart_v1_subsample"
    assert (heart / "spatial" / "tissue_hires_image.png").is_file()
    with pytest.warns(UserWarning, match="placeholder"):
        out = build_shards([heart], tmp_path / "out", min_genes=1, with_images=True)
    (slide,) = pq.read_table(out / S.SLIDES_FILE).to_pylist()
    assert slide["image_kind"] == "lowres" and slide["image_file"] == "spatial/tissue_lowres_image.png"
    assert any("placeholder" in w for w in slide["warnings"])
    assert slide["n_patches_upsampled"] == slide["n_spots_kept"]
    patch = decode_image(next(open_corpus(out).iter_paired(columns=["patch"])).column("patch")[0].as_py())
    assert patch.std() > 5  # real tissue colours, not the black placeholder


@pytest.mark.parametrize("tamper,message", [
    ("reverse", "spot_id differs from the expression rows"),
    ("cell 9", "region_cell outside 0..8"),
    ("unpad", "padded count differs"),
])
def test_validate_catches_paired_rows_that_disagree(built, tmp_path, tamper, message):
    """Edits with a consistent manifest (sha256 and size updated), so only the paired checks can see them."""
    import shutil

    import pyarrow as pa

    root = tmp_path / "corpus"
    shutil.copytree(built, root)
    rel = f"{S.PAIRED_DIR}/part-00000.parquet"
    table = pq.read_table(root / rel)
    if tamper == "reverse":
        table = table.take(list(range(table.num_rows))[::-1])
    elif tamper == "cell 9":
        table = table.set_column(table.schema.get_field_index("region_cell"), "region_cell",
                                 pa.array([9] * table.num_rows, pa.int8()))
    else:
        table = table.set_column(table.schema.get_field_index("padded"), "padded",
                                 pa.array([False] * table.num_rows, pa.bool_()))
    pq.write_table(table.cast(S.PAIRED_SCHEMA), root / rel)
    manifest = json.loads((root / S.MANIFEST_FILE).read_text())
    for entry in manifest["outputs"]:
        if entry["path"] == rel:
            entry["sha256"] = hashlib.sha256((root / rel).read_bytes()).hexdigest()
            entry["size"] = (root / rel).stat().st_size
    (root / S.MANIFEST_FILE).write_text(json.dumps(manifest))
    report = validate(root, deep=False)
    assert not report.ok and any(message in e for e in report.errors), report.errors


def test_stimage_slide_uses_its_full_png_image(tmp_path):
    """STimage-1K4M layout (gene_exp/, coord/ with the spot radius in image pixels, image/<slide>.png)."""
    from PIL import Image

    from spavis.genes import load_vocabulary

    slide = "GSE999_GSM999"
    root = tmp_path / "Visium"
    for sub in ("gene_exp", "coord", "image"):
        (root / sub).mkdir(parents=True)
    ids = [str(x) for x in load_vocabulary("stamp-v1").ensembl_ids[:20]]
    px = _spots_px()
    spots = [f"{slide}_AAAC{i:04d}-1" for i in range(len(px))]
    counts = np.random.default_rng(1).integers(1, 5, size=(len(px), len(ids)))
    pd.DataFrame(counts, index=spots, columns=ids).to_csv(root / "gene_exp" / f"{slide}_count.csv")
    # r: the spot radius in image pixels; spavis reads 2r as Space Ranger's 65 µm spot_diameter_fullres
    pd.DataFrame({"yaxis": px[:, 1], "xaxis": px[:, 0], "r": 65.0 / UM0 / 2}, index=spots).to_csv(
        root / "coord" / f"{slide}_coord.csv")
    Image.fromarray(_marker_image()).save(root / "image" / f"{slide}.png")
    out = build_shards([root / "gene_exp" / f"{slide}_count.csv"], tmp_path / "out", min_genes=1, with_images=True)
    (row,) = pq.read_table(out / S.SLIDES_FILE).to_pylist()
    assert row["image_kind"] == "fullres" and row["image_file"].endswith(f"image/{slide}.png")
    assert row["image_um_per_px"] == pytest.approx(UM0)
    first = next(open_corpus(out).iter_paired()).to_pylist()[0]
    cx, cy = _centroid(decode_image(first["patch"]))
    assert abs(cx - 111.5) <= 0.5 and abs(cy - 111.5) <= 0.5


@pytest.mark.parametrize("layout", ["tiled", "stripped", "planar"])
def test_window_reads_match_the_pixels_for_every_tiff_layout(tmp_path, layout):
    """Windows (inside, across and beyond the border) equal numpy slices of the written image."""
    from spavis.images import PAD_VALUE, WindowReader, open_image

    img = np.random.default_rng(2).integers(0, 255, (1500, 2600, 3), dtype=np.uint8)
    path = tmp_path / "x.tif"
    if layout == "tiled":
        tifffile.imwrite(path, img, photometric="rgb", tile=(256, 256), compression="zlib")
    elif layout == "stripped":
        tifffile.imwrite(path, img, photometric="rgb", rowsperstrip=16)
    else:
        tifffile.imwrite(path, np.moveaxis(img, -1, 0), photometric="rgb", planarconfig="separate")
    with open_image(path) as src:
        reader = WindowReader(src, 0, cache_mb=16)
        for y0, y1, x0, x1 in [(100, 400, 2000, 2500), (1400, 1600, 2500, 2700), (-50, 30, -20, 40)]:
            got = reader.read(y0, y1, x0, x1)
            want = np.full((y1 - y0, x1 - x0, 3), PAD_VALUE, np.uint8)
            cy0, cx0 = max(y0, 0), max(x0, 0)
            want[cy0 - y0:min(y1, 1500) - y0, cx0 - x0:min(x1, 2600) - x0] = img[cy0:y1, cx0:x1]
            assert np.array_equal(got, want)
