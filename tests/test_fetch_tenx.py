"""`spavis fetch --source tenx` against a loopback 10x CDN (``cf.10xgenomics.com`` layout).

The tree is built from the real Visium fixture: each manifest row's
``<name>_filtered_feature_bc_matrix.h5`` and ``<name>_spatial.tar.gz`` (members under
``spatial/``, as 10x ships them) are served at the paths of the row's real URLs.
"""
from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from fakes.http import Fault, FileServer
from spavis import read_slice
from spavis.cli import app
from spavis.errors import FetchError
from spavis.manifests import load_manifest, write_manifest
from spavis.sources import fetch
from spavis.sources.sidecar import read_sidecar

PREFIX = "https://cf.10xgenomics.com"


def spatial_pack(fixture: Path, bad: tarfile.TarInfo | None = None) -> bytes:
    """A 10x ``*_spatial.tar.gz``: the fixture's spatial/ files, a file a reader ignores, and
    optionally a ``bad`` member first."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        if bad is not None:
            tar.addfile(bad, io.BytesIO(b"x" * bad.size) if bad.isfile() else None)
        for path in sorted((fixture / "spatial").iterdir()):
            tar.add(path, arcname=f"spatial/{path.name}")
        info = tarfile.TarInfo("spatial/aligned_fiducials.jpg")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"\xff\xd8\xff\xd9"))
    return buf.getvalue()


@pytest.fixture(scope="module")
def fixture(real_data) -> Path:
    return real_data / "visium" / "human_heart_v1_subsample"


@pytest.fixture(scope="module")
def rows():
    """Two real rows of the bundled manifest (their real URLs and metadata)."""
    return load_manifest("tenx-v1")[:2]


@pytest.fixture
def cdn(fixture, rows, monkeypatch):
    monkeypatch.setenv("SPAVIS_FETCH_BACKOFF", "0.01")
    monkeypatch.setenv("SPAVIS_FETCH_MAX_WAIT", "0.1")
    monkeypatch.setenv("SPAVIS_NO_PROGRESS", "1")
    h5 = (fixture / "filtered_feature_bc_matrix.h5").read_bytes()
    pack = spatial_pack(fixture)
    with FileServer() as srv:
        for row in rows:
            for name, url in row.extra["urls"].items():
                srv.add(url.removeprefix(PREFIX), h5 if name.endswith(".h5") else pack)
            for url in row.extra["image_urls"]:
                srv.add(url.removeprefix(PREFIX), b"II*\x00" + bytes(3000))
        monkeypatch.setenv("SPAVIS_TENX_URL", srv.url)
        yield srv


def _path(row, suffix: str) -> str:
    return next(u for n, u in row.extra["urls"].items() if n.endswith(suffix)).removeprefix(PREFIX)


def _gets(srv: FileServer) -> int:
    return sum(1 for r in srv.log if r.method == "GET")


def test_manifest_fetch_reads_like_the_fixture(cdn, rows, fixture, tmp_path):
    cache = tmp_path / "cache"
    out = fetch("tenx", manifest=write_manifest(rows, tmp_path / "m.csv"), cache=cache, workers=2)
    assert out == [cache / "tenx" / r.slide_id for r in rows]
    want, got = read_slice(fixture), read_slice(out[0])
    assert list(got.obs_names) == list(want.obs_names) and list(got.var_names) == list(want.var_names)
    assert (got.X != want.X).nnz == 0
    np.testing.assert_allclose(got.obsm["spatial"], want.obsm["spatial"])

    side, row = read_sidecar(out[0]), rows[0]
    assert side["source"] == "tenx" and side["accession"] == list(row.accession)
    assert side["license"] == "CC BY 4.0 (10x Genomics)" and "10xgenomics.com" in side["citation"]
    assert side["organ"] == row.organ and side["condition"] == row.condition
    h5_name = next(n for n in row.extra["urls"] if n.endswith(".h5"))
    pack_name = next(n for n in row.extra["urls"] if n.endswith(".tar.gz"))
    assert sorted(side["files"]) == sorted([h5_name, "spatial/scalefactors_json.json",
                                            "spatial/tissue_lowres_image.png", "spatial/tissue_positions_list.csv"])
    for name, rec in side["files"].items():
        data = (out[0] / name).read_bytes()
        assert rec["size"] == len(data) and rec["sha256"] == hashlib.sha256(data).hexdigest()
    assert side["files"]["spatial/tissue_positions_list.csv"]["url"] == (
        f"{cdn.url}{_path(row, '.tar.gz')}#spatial/tissue_positions_list.csv")
    assert list(side["archives"]) == [pack_name]
    assert not (out[0] / ".archives").exists() and not list(out[0].rglob("*.tar.gz"))
    assert not (out[0] / "spatial" / "aligned_fiducials.jpg").exists()


def test_dropped_connection_resumes_and_rerun_downloads_nothing(cdn, rows, tmp_path):
    row = rows[0]
    pack = _path(row, ".tar.gz")
    size = len(cdn.files[pack])
    cdn.inject(pack, Fault.drop(after=size // 2))  # the pack (~0.7 MB) spans many stream chunks
    cache = tmp_path / "cache"
    (folder,) = fetch("tenx", [row.slide_id], cache=cache)
    first, second = [r.range for r in cdn.gets(pack)]
    assert first is None and 0 < int(second.removeprefix("bytes=").rstrip("-")) <= size // 2  # resumed
    assert read_sidecar(folder)["archives"][pack.rsplit("/", 1)[-1]]["sha256"] == hashlib.sha256(
        cdn.files[pack]).hexdigest()
    before = _gets(cdn)
    assert fetch("tenx", [row.accession[0].lower()], cache=cache) == [folder]  # by 10x dataset name too
    assert _gets(cdn) == before


def test_with_images_adds_hires_and_fullres_image(cdn, rows, tmp_path):
    row, cache = rows[0], tmp_path / "cache"
    fetch("tenx", [row.slide_id], cache=cache)
    (folder,) = fetch("tenx", [row.slide_id], cache=cache, with_images=True)
    files = read_sidecar(folder)["files"]
    image = row.extra["image_files"][0]
    assert "spatial/tissue_hires_image.png" in files and image in files
    assert (folder / image).read_bytes() == cdn.files[row.extra["image_urls"][0].removeprefix(PREFIX)]
    assert "spatial/tissue_positions_list.csv" in files
    before = _gets(cdn)
    fetch("tenx", [row.slide_id], cache=cache)  # without images again: nothing downloaded, images still listed
    assert _gets(cdn) == before and read_sidecar(folder)["files"] == files


def test_unknown_id_and_404_leave_nothing(cdn, rows, tmp_path):
    with pytest.raises(FetchError, match="'NOT_A_10X_DATASET' is not in the bundled tenx-v1"):
        fetch("tenx", ["NOT_A_10X_DATASET"], cache=tmp_path / "cache")
    row = rows[1]
    del cdn.files[_path(row, ".tar.gz")]
    with pytest.raises(FetchError, match=r"10x .*spatial\.tar\.gz was not found \(HTTP 404\)"):
        fetch("tenx", [row.slide_id], cache=tmp_path / "cache")
    assert not (tmp_path / "cache" / "tenx" / row.slide_id).exists()


@pytest.mark.parametrize("kind", ["absolute", "symlink"])
def test_unsafe_pack_is_refused(cdn, rows, fixture, tmp_path, kind):
    if kind == "absolute":
        bad = tarfile.TarInfo("/tissue_positions_list.csv")  # picked before spatial/… (same depth)
        bad.size = 1
    else:
        bad = tarfile.TarInfo("spatial/tissue_positions.csv")  # Space Ranger 2 name: picked first
        bad.type, bad.linkname = tarfile.SYMTYPE, "/etc/passwd"
    row = rows[0]
    cdn.files[_path(row, ".tar.gz")] = spatial_pack(fixture, bad)
    with pytest.raises(FetchError, match="refus"):
        fetch("tenx", [row.slide_id], cache=tmp_path / "cache")
    assert not (tmp_path / "cache" / "tenx" / row.slide_id).exists()
    assert not [p for p in (tmp_path / "cache").rglob("tissue_positions_list.csv")]


def test_cli_fetch_then_build_shards(cdn, rows, tmp_path):
    pytest.importorskip("spavis.shards")
    runner = CliRunner()
    cache, out = tmp_path / "cache", tmp_path / "corpus"
    manifest = write_manifest(rows, tmp_path / "m.csv")
    res = runner.invoke(app, ["fetch", "--source", "tenx", "--manifest", str(manifest), "--cache", str(cache)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["build-shards", str(cache / "tenx"), "--out", str(out), "--min-genes", "1", "--quiet"])
    assert res.exit_code == 0, res.output
    slides = pd.read_parquet(out / "slides.parquet").set_index("slide_id").sort_index()
    assert list(slides.index) == sorted(r.slide_id for r in rows)
    assert set(slides["source"]) == {"tenx"} and set(slides["license"]) == {"CC BY 4.0 (10x Genomics)"}
    assert (slides["n_spots_kept"] > 0).all()
    expr = pd.concat(pd.read_parquet(p, columns=["slide_id"]) for p in sorted((out / "data" / "expression").glob("*.parquet")))
    assert expr["slide_id"].value_counts().sort_index().to_dict() == slides["n_spots_kept"].to_dict()
