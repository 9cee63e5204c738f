"""`build-shards --with-images`: one-colour images of any size are skipped; no raw Python warnings reach the CLI.

A one-colour picture (10x's all-black hires placeholder, or a blank export) is no H&E: it is
skipped with a warning, whether small, pyramidal or a single level larger than 4096 x 4096.
Library warnings (zarr, PIL, anndata) reach the user as one ``warning:`` line each (or not at
all), never as Python's two-line ``File:Line: SomeWarning:`` format.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile

from spavis.format import schema as S
from spavis.shards import build_shards

HEART = Path(__file__).parents[1] / "spavis" / "data" / "demo" / "human_heart_v1_subsample"
SPAVIS = str(Path(sys.executable).with_name("spavis"))


def _heart_with(tmp_path: Path, image: np.ndarray, *, tile: bool) -> Path:
    folder = tmp_path / "heart"
    shutil.copytree(HEART, folder)
    kw = {"tile": (512, 512)} if tile else {"rowsperstrip": 256}
    tifffile.imwrite(folder / "image.tif", image, photometric="rgb", compression="zlib", **kw)
    return folder


@pytest.mark.parametrize("tile", [False, True], ids=["strips", "tiles"])
def test_large_one_colour_single_level_tiff_is_skipped(tmp_path, tile):
    side = 4096 + 160  # larger than 4096 x 4096, one level (no pyramid)
    folder = _heart_with(tmp_path, np.zeros((side, side, 3), np.uint8), tile=tile)
    with pytest.warns(UserWarning, match="image.tif is one colour"):
        out = build_shards([folder], tmp_path / "out", min_genes=1, with_images=True)
    (slide,) = pq.read_table(out / S.SLIDES_FILE).to_pylist()
    assert slide["image_kind"] == "lowres"  # the placeholder was skipped, the lowres H&E used
    assert any("one colour" in w for w in slide["warnings"])


def test_large_image_with_a_second_colour_is_used(tmp_path):
    side = 4096 + 160
    img = np.zeros((side, side, 3), np.uint8)
    img[-3:, -3:] = 200  # one corner differs: not one colour (found in the last block read)
    folder = _heart_with(tmp_path, img, tile=True)
    from spavis.images import open_image
    from spavis.shards.images import _is_blank

    with open_image(folder / "image.tif") as src:
        assert not _is_blank(src)
    with open_image(HEART / "spatial" / "tissue_lowres_image.png") as src:
        assert not _is_blank(src)


def _h5ad_with_duplicate_var_names(path: Path, seed: int) -> Path:
    """A slice whose reading makes anndata warn ("Variable names are not unique"): a real library warning."""
    import warnings

    from spavis.simulate import simulate_slice

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata = simulate_slice(seed=seed, max_row=8, median_umis=600)
        names = list(adata.var_names)
        names[1] = names[0]
        adata.var_names = names
        adata.write_h5ad(path)
    return path


@pytest.mark.parametrize("workers", [1, 2])
def test_cli_build_with_images_prints_library_warnings_as_one_line(tmp_path, workers):
    """A build with images through the real CLI, in the main process and in workers: a library's
    warning is one ``warning: ... (UserWarning from anndata)`` line, never Python's two-line format."""
    inputs = [_h5ad_with_duplicate_var_names(tmp_path / f"s{i}.h5ad", seed=i) for i in range(2)]
    env = {**os.environ, "SPAVIS_NO_PROGRESS": "1", "COLUMNS": "300", "PYTHONWARNINGS": "default"}
    res = subprocess.run([SPAVIS, "build-shards", *map(str, inputs), "--out", str(tmp_path / "out"),
                          "--min-genes", "1", "--with-images", "--workers", str(workers)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    lines = (res.stdout + res.stderr).splitlines()
    assert any(ln.startswith("warning: Variable names are not unique") and ln.endswith("(UserWarning from anndata)")
               for ln in lines), res.stderr
    raw = [ln for ln in lines if "Warning:" in ln or ln.startswith("  ") and "warn" in ln]
    assert raw == [], "\n".join(raw)
