"""Feature bags read back by CLAM's and TRIDENT's own reading logic (GENERATED slides, tiny random model).

The readers below are independent re-implementations, written from the references' code
(CLAM 53e2409: ``dataset_modules/dataset_h5.py`` ``Whole_Slide_Bag_FP``, ``dataset_generic.py``
``Generic_MIL_Dataset``; TRIDENT a91fa84: ``trident/wsi_objects/WSIPatcher.py``,
``WSI.get_best_level_and_custom_downsample``, ``IO.read_coords`` / ``read_coords_legacy``), not imported:
neither project is a dependency. What they must show: each reader, given only a bag's attributes,
reads back the very pixels ``embed-slides`` embedded, on a 40x slide with a 20x level and on one
without (the usual Aperio pyramid 1, 4, 16), and a reader of the other convention is refused or
routed to its legacy path instead of reading another tile size.
"""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from stamp.slides import bags
from stamp.slides.embed import TileDataset, embed_slides
from stamp.slides.synthetic import write_synthetic_slide
from stamp.slides.tissue import TissueParams
from test_slides import tiny_model  # noqa: F401  (module fixture)

PARAMS = TissueParams(min_tissue_mm2=0.05, min_hole_mm2=0.01)


# ----------------------------------------------------------------------------- CLAM, re-implemented
def clam_whole_slide_bag_fp(h5_path, wsi) -> list[np.ndarray]:
    """CLAM's Whole_Slide_Bag_FP: ``patch_size`` px at ``patch_level`` from each level-0 coordinate."""
    with h5py.File(h5_path, "r") as f:
        level = int(f["coords"].attrs["patch_level"])
        size = int(f["coords"].attrs["patch_size"])
        coords = f["coords"][:]
    return [np.asarray(wsi.read_region((int(x), int(y)), level, (size, size)).convert("RGB")) for x, y in coords]


def clam_generic_mil_item(data_dir, slide_id, use_h5: bool):
    """CLAM's Generic_MIL_Dataset.__getitem__: pt_files/<id>.pt, or h5_files/<id>.h5 (features, coords)."""
    import torch

    if not use_h5:
        return torch.load(data_dir / "pt_files" / f"{slide_id}.pt", weights_only=True), None
    with h5py.File(data_dir / "h5_files" / f"{slide_id}.h5", "r") as f:
        return torch.from_numpy(f["features"][:]), f["coords"][:]


# ----------------------------------------------------------------------------- TRIDENT, re-implemented
def trident_best_level(level_downsamples, downsample: float, tolerance: float = 0.1) -> int:
    for level, ds in enumerate(level_downsamples):
        if abs(ds - downsample) <= tolerance:
            return level
    best = None
    for level, ds in enumerate(level_downsamples):
        if ds <= downsample:
            best = level
        else:
            break
    assert best is not None
    return best


def trident_patcher(h5_path, level_downsamples, slide_mpp: float) -> dict:
    """TRIDENT's reading of a coords file: its own attributes when patch_size, level0_magnification and
    target_magnification are there, else the legacy (CLAM) attributes. Returns the geometry WSIPatcher
    derives: level-0 tile side, level read, side read there, output side, coords."""
    with h5py.File(h5_path, "r") as f:
        attrs = dict(f["coords"].attrs)
        coords = f["coords"][:]
    ps = attrs.get("patch_size")
    src_mag, dst_mag = attrs.get("level0_magnification"), attrs.get("target_magnification")
    if None in (ps, src_mag, dst_mag):  # legacy: CLAM / Fishing-Rod coordinates
        ps, level = int(attrs["patch_size"]), int(attrs["patch_level"])
        src_px = slide_mpp
        dst_px = slide_mpp * level_downsamples[level] * attrs.get("custom_downsample", 1)
        legacy = True
    else:
        src_px, dst_px, legacy = 10 / src_mag, 10 / dst_mag, False
    downsample = dst_px / src_px
    size_src = round(ps * downsample)
    level = trident_best_level(level_downsamples, downsample)
    size_level = round(size_src / int(level_downsamples[level]))
    return {"size_src": size_src, "level": level, "size_level": size_level, "out": int(ps), "coords": coords,
            "legacy": legacy}


# ----------------------------------------------------------------------------- slides and bags
@pytest.fixture(scope="module")
def cohort(tmp_path_factory, tiny_model):
    """Three GENERATED slides: 40x with a 20x level, 40x without (1, 4, 16), and 0.2527 µm/px (an Aperio
    '40x' whose magnification is not an integer); embedded in both layouts."""
    root = tmp_path_factory.mktemp("layouts")
    blobs = [(1000, 760, 760, 560)]
    slides = {
        "with20x": write_synthetic_slide(root / "slides" / "with20x.svs", 2048, 1536, blobs, um_per_px=0.25,
                                         tile=256, downsamples=(2, 8), pen=None, truth=False),
        "no20x": write_synthetic_slide(root / "slides" / "no20x.svs", 2048, 1536, blobs, um_per_px=0.25,
                                       tile=256, downsamples=(4, 16), pen=None, truth=False),
        "odd": write_synthetic_slide(root / "slides" / "odd.svs", 2048, 1536, blobs, um_per_px=0.2527,
                                     tile=256, downsamples=(4, 16), pen=None, truth=False),
    }
    out = {}
    for layout in bags.LAYOUTS:
        out[layout] = root / layout
        res = embed_slides([root / "slides"], tiny_model, out[layout], params=PARAMS, workers=0, progress=False,
                           device="cpu", layout=layout)
        assert [e["status"] for e in res.entries] == ["done"] * 3
    return slides, out


def _embedded_pixels(slide_path, attrs, coords) -> list[np.ndarray]:
    """The pixels embed-slides fed the encoder (before its resize), read by its own TileDataset."""
    ds = TileDataset(slide_path, None, coords, attrs["level"], attrs["read_px"], attrs["tile_px"], None)
    return [ds.region(i)[..., :3] for i in range(len(coords))]


@pytest.mark.parametrize("name,level,read_px", [("with20x", 1, 256), ("no20x", 0, 512)])
def test_clam_reads_the_pixels_we_embedded(cohort, name, level, read_px):
    import openslide

    slides, out = cohort
    bag = bags.read_bag(bags.bag_path(out["clam"], name, "clam"))
    assert (bag.attrs["level"], bag.attrs["read_px"], bag.attrs["tile_px_level0"]) == (level, read_px, 512)
    with h5py.File(bags.bag_path(out["clam"], name, "clam")) as f:
        assert int(f["coords"].attrs["patch_level"]) == level and int(f["coords"].attrs["patch_size"]) == read_px
    ours = _embedded_pixels(slides[name].path, bag.attrs, bag.coords)
    with openslide.OpenSlide(str(slides[name].path)) as wsi:
        theirs = clam_whole_slide_bag_fp(bags.bag_path(out["clam"], name, "clam"), wsi)
    assert len(theirs) == len(ours) >= 3
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape == (read_px, read_px, 3) and np.array_equal(a, b)
    # the default (TRIDENT) bag has no patch_level: CLAM's reader stops instead of reading another tile size
    with openslide.OpenSlide(str(slides[name].path)) as wsi, pytest.raises(KeyError):
        clam_whole_slide_bag_fp(bags.bag_path(out["trident"], name), wsi)


@pytest.mark.parametrize("name", ["with20x", "no20x", "odd"])
def test_trident_patcher_gives_our_tile_grid(cohort, name):
    import openslide

    slides, out = cohort
    with openslide.OpenSlide(str(slides[name].path)) as wsi:
        downsamples = [float(d) for d in wsi.level_downsamples]
    mpp = slides[name].um_per_px
    for layout in bags.LAYOUTS:
        path = bags.bag_path(out[layout], name, layout)
        bag = bags.read_bag(path)
        got = trident_patcher(path, downsamples, mpp)
        assert got["legacy"] == (layout == "clam")  # our CLAM bags send TRIDENT down its legacy path
        # the same level-0 squares: same corners, same side
        assert got["size_src"] == bag.attrs["tile_px_level0"], (layout, got)
        assert np.array_equal(got["coords"], bag.coords)
        # read the same region as we did (level read x side there)
        assert got["size_level"] * int(downsamples[got["level"]]) == \
            bag.attrs["read_px"] * int(bag.attrs["level_downsample"])
        # and the coords lie on the grid WSIPatcher itself lays (col * step, row * step from the origin)
        assert not (bag.coords % got["size_src"]).any()
    with h5py.File(bags.bag_path(out["trident"], name)) as f:
        c, feat = dict(f["coords"].attrs), dict(f["features"].attrs)
    assert c["patch_size"] == 256 and c["overlap"] == 0 and c["name"] == name and "patch_level" not in c
    assert (c["level0_width"], c["level0_height"]) == (2048, 1536) and c["target_magnification"] == 20
    assert c["level0_magnification"] == (40 if name != "odd" else pytest.approx(10 / 0.2527))
    assert c["patch_size_level0"] == (512 if name != "odd" else 507)
    assert feat["name"] == name and feat["encoder"] == bags.read_attrs(bags.bag_path(out["trident"], name))["model"]


def test_clam_layout_folders_load_as_clam_does(cohort):
    slides, out = cohort
    root = out["clam"]
    assert sorted(p.name for p in root.iterdir()) == [".manifest.json.lock", "h5_files", "manifest.json", "pt_files",
                                                      "qc"]
    for name in slides:
        pt, _ = clam_generic_mil_item(root, name, use_h5=False)
        h5, coords = clam_generic_mil_item(root, name, use_h5=True)
        assert pt.dtype == h5.dtype and pt.shape == h5.shape and bool((pt == h5).all())
        np.testing.assert_array_equal(coords, bags.read_bag(bags.bag_path(root, name, "clam")).coords)
        # the same features as the TRIDENT-layout bag of the same slide
        np.testing.assert_allclose(h5.numpy(), bags.read_bag(bags.bag_path(out["trident"], name)).features,
                                   rtol=1e-5, atol=1e-6)
    # one function finds the bags of either layout (what evaluate mil uses)
    for layout in bags.LAYOUTS:
        found = bags.list_bags(out[layout])
        assert sorted(found) == sorted(slides) and all(p == bags.bag_path(out[layout], n, layout)
                                                       for n, p in found.items())


def test_evaluate_mil_reads_clams_own_layout(tmp_path):
    """A features folder in CLAM's layout (h5_files/ + pt_files/, as extract_features_fp.py leaves it;
    here with our root attributes, for the heatmaps' QC thumbnail) scores exactly as the same bags at the
    top of a folder."""
    import shutil

    import torch

    from stamp.evaluate.mil import MilOptions, evaluate_mil
    from test_slides_mil import _make_bags

    labels, _ = _make_bags(tmp_path / "flat", n_patients=8)
    clam = tmp_path / "clam"
    (clam / "h5_files").mkdir(parents=True)
    (clam / "pt_files").mkdir()
    shutil.copytree(tmp_path / "flat" / "qc", clam / "qc")
    for name, path in bags.list_bags(tmp_path / "flat").items():
        bag = bags.read_bag(path)
        with h5py.File(clam / "h5_files" / f"{name}.h5", "w") as f:  # CLAM's datasets: float32, int32
            f["features"], f["coords"] = bag.features, bag.coords.astype(np.int32)
            f.attrs.update({k: v for k, v in bag.attrs.items() if k.startswith("qc") or k == "tile_px_level0"})
        torch.save(torch.from_numpy(bag.features), clam / "pt_files" / f"{name}.pt")
    opts = MilOptions(epochs=1, folds=2, heatmaps_per_class=1, baselines=False)
    a = evaluate_mil([tmp_path / "flat"], labels, label="label", patient="patient", options=opts).results
    b = evaluate_mil([clam], labels, label="label", patient="patient", options=opts, out=tmp_path / "eval").results
    cols = ["fold", "model", "auc", "n_test"]
    assert len(b) == 2 and a[cols].equals(b[cols])
    assert list((tmp_path / "eval" / "heatmaps" / "clam").glob("*.png"))  # qc_png found from h5_files/
    # half a layout is one line, not a silent empty folder
    shutil.rmtree(clam / "h5_files")
    with pytest.raises(bags.BagError, match="h5_files"):
        bags.list_bags(clam)
