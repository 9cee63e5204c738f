"""Whole-slide reading, tissue tiling and `stamp embed-slides` on GENERATED pyramidal TIFFs.

The slides come from :func:`stamp.slides.synthetic.write_synthetic_slide` (Aperio-style SVS
layout or generic tiled TIFF, white glass, elliptic tissue, a blue pen stroke on the glass, a
motif in some tiles), which returns every grid tile's exact tissue fraction: the tiler is
checked against that truth. The encoder is a tiny aligned StampModel folder loaded through
``stamp.load`` (random weights; generated data only).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from stamp.slides.reader import open_slide
from stamp.slides.synthetic import write_synthetic_slide
from stamp.slides.tiling import plan_tiles
from stamp.slides.tissue import TissueParams

ROOT = Path(__file__).resolve().parents[1]
# Small generated slides: tissue pieces far below CLAM's 1.6 mm² default are kept.
PARAMS = TissueParams(min_tissue_mm2=0.05, min_hole_mm2=0.01)
PARAM_ARGS = ["--min-tissue-area", "0.05", "--min-hole-area", "0.01"]
BLOBS = [(1100, 1000, 650, 480), (2900, 1900, 760, 560)]
PEN = (150, 2700, 1500, 2950, 30)


def _slide(path: Path, **kw):
    kw.setdefault("motif_cells", [(1024, 1024), (2816, 2048)])
    return write_synthetic_slide(path, kw.pop("width", 4096), kw.pop("height", 3072), kw.pop("blobs", BLOBS),
                                 pen=kw.pop("pen", PEN), **kw)


def _check_against_truth(plan, truth, tile0: int) -> None:
    found = {(int(x), int(y)) for x, y in plan.coords}
    frac = truth.fraction  # at the generator's tile grid == the tiler's grid here
    assert all(x % tile0 == 0 and y % tile0 == 0 for x, y in found), "coordinates off the level-0 grid"
    on_glass = [(x, y) for x, y in found if frac[y // tile0, x // tile0] == 0]
    assert not on_glass, f"tiles on glass / pen: {on_glass}"
    # every tile clearly tissue is found, none clearly below the threshold; the mask is 16 px a tile, so
    # tiles within a few % of the 0.5 threshold may go either way
    rows, cols = np.nonzero(frac >= 0.56)
    missing = {(c * tile0, r * tile0) for r, c in zip(rows, cols)} - found
    assert not missing, f"tissue tiles missed: {sorted(missing)}"
    low = [(x, y, frac[y // tile0, x // tile0]) for x, y in found if frac[y // tile0, x // tile0] < 0.44]
    assert not low, f"tiles kept below the tissue threshold: {low}"
    assert list(map(tuple, plan.coords)) == sorted(found, key=lambda c: (c[1], c[0])), "not row-major order"


@pytest.mark.parametrize("aperio", [True, False], ids=["aperio-svs", "generic-tiff"])
def test_tiles_match_the_generator_through_openslide(tmp_path, aperio):
    truth = _slide(tmp_path / ("s.svs" if aperio else "s.tif"), aperio=aperio)
    import openslide

    assert openslide.OpenSlide.detect_format(str(truth.path)) == ("aperio" if aperio else "generic-tiff")
    with open_slide(truth.path) as slide:
        assert slide.backend == "openslide" and slide.dimensions == (4096, 3072)
        assert slide.um_per_px == pytest.approx(0.5)
        assert slide.level_downsamples == [1.0, 4.0, 16.0]
        plan = plan_tiles(slide, PARAMS)
    assert plan.level == 0 and plan.tile0 == 256 and plan.read_px == 256 and plan.tile_px == 256
    _check_against_truth(plan, truth, 256)
    assert len(plan.coords) > 30
    assert set(truth.motif) <= {tuple(c) for c in plan.coords.tolist()}


def test_40x_slide_reads_the_level_closest_to_20x_and_the_tifffile_path_agrees(tmp_path):
    """0.25 µm/px with a 2x level: tiles are 512 level-0 px read as 256 px at level 1; a plain pyramidal
    TIFF with SubIFDs (which OpenSlide does not take) goes through tifffile and gives the same tiles."""
    blobs = [(2 * x, 2 * y, 2 * rx, 2 * ry) for x, y, rx, ry in BLOBS]
    truth = write_synthetic_slide(tmp_path / "s40.svs", 8192, 6144, blobs, um_per_px=0.25, tile=512,
                                  downsamples=(2, 8, 32), compression="zlib")
    with open_slide(truth.path) as slide:
        plan = plan_tiles(slide, PARAMS)
        assert (plan.tile0, plan.level, plan.level_downsample, plan.read_px) == (512, 1, 2.0, 256)
        region = slide.read_region(2048, 2048, 1, 64, 64)
    _check_against_truth(plan, truth, 512)

    import tifffile

    from stamp.slides.reader import TiffSlide

    plain = tmp_path / "plain.ome.tif"
    with open_slide(truth.path) as src, tifffile.TiffWriter(plain) as tw:
        level1 = src.read_region(0, 0, 1, 4096, 3072)
        opts = dict(tile=(256, 256), photometric="rgb", compression="zlib", resolutionunit="CENTIMETER")
        tw.write(level1, subifds=1, resolution=(2e4, 2e4), metadata=None, **opts)
        tw.write(level1[::4, ::4], subfiletype=1, resolution=(5e3, 5e3), metadata=None, **opts)
    with open_slide(plain) as slide:
        assert isinstance(slide, TiffSlide) and slide.name == "plain"
        assert slide.dimensions == (4096, 3072) and slide.um_per_px == pytest.approx(0.5)
        assert slide.scale.source.startswith("TIFF resolution")
        plan2 = plan_tiles(slide, PARAMS)
        assert np.array_equal(slide.read_region(1024, 1024, 0, 64, 64), region)
    assert np.array_equal(plan2.coords * 2, plan.coords)


def test_scale_comes_from_the_file_or_the_user(tmp_path, caplog):
    import tifffile

    from stamp.errors import SlideError

    img = np.full((512, 512, 3), 240, np.uint8)
    bare = tmp_path / "bare.tif"
    tifffile.imwrite(bare, img, tile=(256, 256), photometric="rgb", metadata=None)
    with pytest.raises(SlideError, match="no scale .* pass --slide-um-per-px"):
        open_slide(bare)
    with open_slide(bare, um_per_px=0.25) as s:
        assert s.um_per_px == 0.25 and s.scale.source == "--slide-um-per-px"
    mag = tmp_path / "mag.svs"
    tifffile.imwrite(mag, img, tile=(256, 256), photometric="rgb", metadata=None,
                     description="Aperio Image Library v12 GENERATED\r\n512x512|AppMag = 40|Filename = mag")
    with caplog.at_level(logging.WARNING), open_slide(mag) as s:
        assert s.um_per_px == pytest.approx(0.25)
        assert "objective power" in s.scale.source
    assert "objective power 40x" in caplog.text and "--slide-um-per-px" in caplog.text
    with pytest.raises(SlideError, match="no such slide file"):
        open_slide(tmp_path / "missing.svs")


# ----------------------------------------------------------------------------- embed-slides


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny aligned StampModel folder (random weights), loadable by stamp.load."""
    import torch

    from stamp.models.gene_encoder import StampConfig
    from stamp.models.aligned_model import StampModel, StampModelConfig

    cfg = json.loads((ROOT / "stamp" / "configs" / "tiny.json").read_text())
    torch.manual_seed(0)
    model = StampModel(StampModelConfig(gene=StampConfig.from_dict({**cfg, "n_genes": 64}), vision="tiny",
                                        embed_dim=24))
    path = tmp_path_factory.mktemp("model") / "tiny"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("slides")
    for i, shift in enumerate((0, 256, 512)):
        write_synthetic_slide(root / f"s{i}.svs", 2560, 2048, [(900 + shift, 1000, 600, 520)], pen=None,
                              motif_cells=[(768 + shift, 768)], downsamples=(4,), seed=i)
    return root


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "240"}
    return subprocess.run([sys.executable, "-m", "stamp.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300, **kw)


def _bag_state(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.h5")}


def test_killed_run_resumes_and_bags_are_identical(tmp_path, slides, tiny_model):
    """A run killed on its third slide (large: its tiles take a while) resumes: the next run embeds only
    that slide, leaves the finished bags untouched, and its bags equal a fresh run's."""
    from stamp.slides.bags import read_bag, read_manifest

    out = tmp_path / "features"
    big = write_synthetic_slide(tmp_path / "s2.svs", 1536, 1024, [(768, 512, 1500, 1500)], pen=None,
                                truth=False).path  # tissue everywhere: 24 tiles, 3 batches
    inputs = [str(slides / "s0.svs"), str(slides / "s1.svs"), str(big)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "stamp.cli", "embed-slides", *inputs, "--model", str(tiny_model), "--out", str(out),
           "--workers", "0", "--batch-size", "8", "--no-progress", *PARAM_ARGS]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        def listed() -> int:  # slides in the manifest (s1's entry is written just after its bag)
            try:
                return len(read_manifest(out).get("slides", []))
            except Exception:  # noqa: BLE001 — not written yet
                return 0

        while listed() < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert sorted(p.name for p in out.glob("*.h5")) == ["s0.h5", "s1.h5"]  # killed while on s2
    before = _bag_state(out)
    res = _cli("embed-slides", *inputs, "--model", str(tiny_model), "--out", str(out), "--workers", "0",
               "--no-progress", *PARAM_ARGS)
    assert res.returncode == 0, res.stderr
    assert "1 embedded, 2 already done" in res.stderr
    after = _bag_state(out)
    assert {k: after[k] for k in before} == before  # finished slides untouched
    assert sorted(after) == ["s0.h5", "s1.h5", "s2.h5"]
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name != ".manifest.json.lock"]
    manifest = read_manifest(out)
    assert [(e["slide"], e["status"]) for e in manifest["slides"]] == [("s0", "done"), ("s1", "done"), ("s2", "done")]
    assert manifest["slides"][2]["tiles"] == 24

    # the same inputs give the same bags (API, in-process, into a fresh folder)
    from stamp.slides.embed import embed_slides

    fresh = tmp_path / "fresh"
    result = embed_slides(inputs, tiny_model, fresh, params=PARAMS, workers=0, progress=False, device="cpu")
    assert [e["status"] for e in result.entries] == ["done"] * 3
    for name in ("s0", "s1", "s2"):
        a, b = read_bag(out / f"{name}.h5"), read_bag(fresh / f"{name}.h5")
        assert np.array_equal(a.coords, b.coords)
        np.testing.assert_allclose(a.features, b.features, rtol=1e-5, atol=1e-6)
        assert a.attrs == b.attrs
        assert a.features.dtype == np.float32 and a.features.shape == (len(a.coords), 24)
        assert a.attrs["model_license"] and a.attrs["tile_um"] == 128.0 and a.attrs["tile_px"] == 256
        assert a.attrs["um_per_px"] == 0.5 and len(a.attrs["slide_fingerprint"]) == 64
        assert json.loads(a.attrs["tissue_params"])["min_tissue"] == 0.5
        assert (out / a.attrs["qc_png"]).is_file()
    assert read_bag(out / "s0.h5").attrs["slide_width"] == 2560
    # a manifest lost (a kill between a bag's rename and its entry) is written again from the bags on a rerun
    (out / "manifest.json").unlink()
    again = embed_slides(inputs, tiny_model, out, params=PARAMS, workers=0, progress=False, device="cpu")
    assert [e["status"] for e in again.entries] == ["skipped"] * 3
    assert [(e["slide"], e["tiles"]) for e in read_manifest(out)["slides"]] == \
        [(e["slide"], e["tiles"]) for e in manifest["slides"]]
    shift = {n: read_bag(out / f"{n}.h5").coords for n in ("s0", "s1")}
    assert np.array_equal(shift["s0"] + [256, 0], shift["s1"])  # the tissue moved one tile: so did the tiles


def test_bad_slides_are_recorded_and_the_rest_go_on(tmp_path, slides, tiny_model):
    from typer.testing import CliRunner

    from stamp.cli import app
    from stamp.slides.bags import read_manifest

    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"II*\x00" + b"\x00" * 64)
    empty = tmp_path / "glass.svs"
    write_synthetic_slide(empty, 1024, 1024, [], pen=None, downsamples=())
    out = tmp_path / "f"
    args = ["embed-slides", str(bad), str(empty), str(slides / "s0.svs"), "--model", str(tiny_model), "--out",
            str(out), "--workers", "0", "--no-progress", *PARAM_ARGS]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "1 of 3 slides failed (broken:" in lines[0] and "manifest.json" in lines[0]
    entries = {e["slide"]: e for e in read_manifest(out)["slides"]}
    assert entries["broken"]["status"] == "failed" and entries["broken"]["reason"]
    assert entries["glass"]["status"] == "empty" and entries["glass"]["tiles"] == 0
    assert entries["s0"]["status"] == "done" and (out / "s0.h5").is_file()
    assert not (out / "broken.h5").exists()
    # --fail-fast stops at the first failure
    out2 = tmp_path / "g"
    res = CliRunner().invoke(app, ["embed-slides", str(bad), str(slides / "s0.svs"), "--model", str(tiny_model),
                                   "--out", str(out2), "--workers", "0", "--no-progress", "--fail-fast"])
    assert res.exit_code == 1 and "--fail-fast" in res.output and not (out2 / "s0.h5").exists()
    # another model into the same folder is refused in one line
    from stamp.slides.embed import embed_slides
    from stamp.errors import BagError

    with pytest.raises(BagError, match="other tiling options"):
        embed_slides([slides / "s0.svs"], tiny_model, out, workers=0, progress=False)


def test_ranks_split_the_slides(tmp_path, slides, tiny_model):
    """torchrun-style RANK/WORLD_SIZE: each rank embeds its share, the manifest lists all."""
    from stamp.slides.bags import read_manifest
    from stamp.slides.embed import embed_slides, expand_slides, rank_share

    paths = expand_slides([slides])
    assert [p.name for p in rank_share(paths, 0, 2)] == ["s0.svs", "s2.svs"]
    assert [p.name for p in rank_share(paths, 1, 2)] == ["s1.svs"]
    import stamp

    enc = stamp.load(str(tiny_model), device="cpu", kind="image")
    for rank in (1, 0):
        embed_slides([slides], enc, tmp_path, params=PARAMS, workers=0, progress=False, rank=rank, world_size=2)
    assert [e["slide"] for e in read_manifest(tmp_path)["slides"]] == ["s0", "s1", "s2"]

