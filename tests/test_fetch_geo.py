"""`spavis fetch --source geo` against a loopback GEO built from real SOFT text and real Visium files."""
from __future__ import annotations

import hashlib
import json

import pytest
from typer.testing import CliRunner

from fakes.geo import FakeGEO
from fakes.http import Fault, FileServer, run_concurrently
from spavis.errors import FetchError
from spavis.sources import fetch, geo
from spavis.sources.sidecar import read_sidecar


@pytest.fixture
def fake_geo(real_data, monkeypatch):
    with FileServer() as srv:
        g = FakeGEO(srv, real_data).build()
        monkeypatch.setenv("SPAVIS_GEO_URL", g.base)
        monkeypatch.setenv("SPAVIS_FETCH_BACKOFF", "0.01")
        monkeypatch.setenv("SPAVIS_FETCH_MAX_WAIT", "0.2")
        monkeypatch.setenv("SPAVIS_NO_PROGRESS", "1")
        yield g


def _check_slice(folder, g, gsm):
    want = g.expected[gsm]
    got = {p.name for p in folder.iterdir() if p.name != "slice.json"}
    assert got == set(want)
    meta = read_sidecar(folder)
    assert meta["slide_id"] == gsm and meta["source"] == "geo" and meta["species"] == "Homo sapiens"
    for name, data in want.items():
        assert (folder / name).read_bytes() == data
        assert meta["files"][name]["sha256"] == hashlib.sha256(data).hexdigest()
        assert meta["files"][name]["size"] == len(data)
    return meta


def test_fetch_series_loose_files(fake_geo, tmp_path):
    folders = fetch("geo", ["GSE146540"], cache=tmp_path, workers=3)
    assert [f.name for f in folders] == ["GSM4391934", "GSM4391935"]
    m1 = _check_slice(folders[0], fake_geo, "GSM4391934")
    m2 = _check_slice(folders[1], fake_geo, "GSM4391935")
    assert m1["accession"] == ["GSE146540", "GSM4391934"]
    assert m1["organ"] == "heart" and m1["condition"] == "cancer"
    assert m2["organ"] == "heart" and m2["condition"] == "healthy"
    assert "35115713" in m1["citation"] and m1["license"] == geo.LICENSE
    assert m1["files"]["GSM4391934_heart_A1_matrix.mtx.gz"]["url"].startswith(fake_geo.base + "/samples/GSM4391nnn/")
    # Nothing but the finished slices is visible next to them.
    assert sorted(p.name for p in (tmp_path / "geo").iterdir() if not p.name.startswith(".")) == \
        ["GSM4391934", "GSM4391935"]


def test_rerun_downloads_nothing(fake_geo, tmp_path):
    fetch("geo", ["GSE146540"], cache=tmp_path)
    n = len(fake_geo.server.log)
    fetch("geo", ["GSE146540"], cache=tmp_path)
    assert fake_geo.server.log[n:] == []


def test_fetch_by_gsm_resolves_series(fake_geo, tmp_path):
    (folder,) = fetch("geo", ["GSM4391935"], cache=tmp_path)
    _check_slice(folder, fake_geo, "GSM4391935")
    assert any(r.path == "/geo/query/acc.cgi" and "acc=GSM4391935" in r.query for r in fake_geo.server.log)
    assert not (tmp_path / "geo" / "GSM4391934").exists()


def test_raw_tar_series_extracts_only_that_sample(fake_geo, tmp_path):
    (folder,) = fetch("geo", ["GSM4114983"], cache=tmp_path)
    _check_slice(folder, fake_geo, "GSM4114983")
    meta = read_sidecar(folder)
    assert meta["files"]["GSM4114983_OxR_visium_filtered_feature_bc_matrix.h5"]["url"].endswith(
        "GSE138657_RAW.tar#GSM4114983_OxR_visium_filtered_feature_bc_matrix.h5")
    # The tar is downloaded once per series and reused for the next sample.
    fetch("geo", ["GSE138657"], cache=tmp_path)
    assert len(fake_geo.server.gets("/geo/series/GSE138nnn/GSE138657/suppl/GSE138657_RAW.tar")) == 1
    _check_slice(tmp_path / "geo" / "GSM4114982", fake_geo, "GSM4114982")


def test_with_images_adds_hires(fake_geo, tmp_path):
    (folder,) = fetch("geo", ["GSM4391935"], cache=tmp_path, with_images=True)
    assert (folder / "GSM4391935_heart_B1_tissue_hires_image.png.gz").is_file()
    assert "GSM4391935_heart_B1_tissue_hires_image.png.gz" in read_sidecar(folder)["files"]


def test_mouse_series_rejected_with_organism(fake_geo, tmp_path):
    with pytest.raises(FetchError, match="GSE105845: no human Visium sample.*Mus musculus"):
        fetch("geo", ["GSE105845"], cache=tmp_path)
    with pytest.raises(FetchError, match="GSM2828511 .*Mus musculus, not Homo sapiens"):
        fetch("geo", ["GSM2828511"], cache=tmp_path)
    assert not [p for p in (tmp_path / "geo").iterdir() if not p.name.startswith(".")]


def test_non_visium_sample_is_explained(fake_geo, tmp_path):
    with pytest.raises(FetchError, match="GSM4391936 .*no Visium file set"):
        fetch("geo", ["GSM4391936"], cache=tmp_path)


def test_unknown_series_404_names_accession_and_url(fake_geo, tmp_path):
    with pytest.raises(FetchError, match=r"GSE999999: .*/geo/series/GSE999nnn/GSE999999/soft/GSE999999_family\.soft\.gz was not found"):
        fetch("geo", ["GSE999999"], cache=tmp_path)


def test_faults_mid_slice_leave_no_half_slice(fake_geo, tmp_path):
    name = "GSM4391935_heart_B1_tissue_lowres_image.png.gz"  # ~0.5 MB: drops land mid-file
    url_path = f"/geo/samples/GSM4391nnn/GSM4391935/suppl/{name}"
    size = len(fake_geo.expected["GSM4391935"][name])
    fake_geo.server.inject(url_path, Fault.drop(size // 2), Fault.http(503, "0"), *[Fault.http(500)] * 10)
    with pytest.raises(FetchError, match="GSM4391935 \\(GSE146540\\): .*failed after .*HTTP 500.*resume"):
        fetch("geo", ["GSM4391935"], cache=tmp_path)
    assert not (tmp_path / "geo" / "GSM4391935").exists()  # no half slice visible
    fake_geo.server.faults.clear()
    (folder,) = fetch("geo", ["GSM4391935"], cache=tmp_path)
    _check_slice(folder, fake_geo, "GSM4391935")
    ranges = [r.range for r in fake_geo.server.gets(url_path)]
    assert ranges[-1] and ranges[-1] != "bytes=0-"  # the last run resumed the .part


def test_concurrent_fetches_of_one_slice_download_once(fake_geo, tmp_path):
    errors = run_concurrently(lambda: fetch("geo", ["GSM4391935"], cache=tmp_path), 3)
    assert errors == []
    h5 = "/geo/samples/GSM4391nnn/GSM4391935/suppl/GSM4391935_heart_B1_filtered_feature_bc_matrix.h5"
    assert len(fake_geo.server.gets(h5)) == 1
    _check_slice(tmp_path / "geo" / "GSM4391935", fake_geo, "GSM4391935")


def test_cli_fetch_then_read_slice(fake_geo, tmp_path):
    from spavis.cli import app

    res = CliRunner().invoke(app, ["fetch", "--source", "geo", "--id", "GSE146540", "--cache", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert str(tmp_path / "geo" / "GSM4391934") in res.output
    read_slice = pytest.importorskip("spavis.readers").read_slice
    a = read_slice(tmp_path / "geo" / "GSM4391934")
    b = read_slice(tmp_path / "geo" / "GSM4391935")
    assert a.shape == b.shape == (100, 100)
    assert (a.X != b.X).nnz == 0  # mtx triplet and h5 of the same fixture read the same
    assert a.obsm["spatial"].shape == (100, 2)


def test_cli_error_is_one_clean_line(fake_geo, tmp_path):
    from spavis.cli import app

    res = CliRunner().invoke(app, ["fetch", "--source", "geo", "--id", "GSE105845", "--cache", str(tmp_path)])
    assert res.exit_code == 1
    assert "Mus musculus" in res.output and "Traceback" not in res.output


def test_manifest_rows_drive_the_fetch(fake_geo, tmp_path):
    manifests = pytest.importorskip("spavis.manifests")
    data = fake_geo.expected["GSM4391935"]
    h5 = "GSM4391935_heart_B1_filtered_feature_bc_matrix.h5"
    md5 = hashlib.md5(data[h5]).hexdigest()
    path = tmp_path / "m.csv"
    header = ",".join(manifests.COLUMNS)
    rows = [
        f'GSM4391935,geo,GSE146540;GSM4391935,heart,Homo sapiens,healthy,Visium,CC BY 4.0,Paper X,,{h5}=md5:{md5},{{}}',
        'GSM4391934,geo,GSE146540;GSM4391934,kidney,Homo sapiens,cancer,Visium,CC BY 4.0,Paper Y,,,{}',
    ]
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    folders = fetch("geo", manifest=path, organ="heart", cache=tmp_path / "c")
    assert [f.name for f in folders] == ["GSM4391935"]
    meta = read_sidecar(folders[0])
    assert meta["license"] == "CC BY 4.0" and meta["citation"] == "Paper X"
    assert meta["files"][h5]["md5"] == md5
    # A wrong published md5 is caught and nothing is left behind.
    path.write_text(header + "\n" + rows[0].replace(md5, "0" * 32) + "\n")
    with pytest.raises(FetchError, match="md5"):
        fetch("geo", manifest=path, cache=tmp_path / "d")
    assert not (tmp_path / "d" / "geo" / "GSM4391935").exists()
    assert json.loads((folders[0] / "slice.json").read_text())["slide_id"] == "GSM4391935"


def _check_unpacked(folder, g, gsm):
    want = g.expected_unpacked[gsm]
    got = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != "slice.json"}
    assert got == set(want)  # only what a reader needs; no pack, no fiducials, no __MACOSX
    meta = read_sidecar(folder)
    for name, data in want.items():
        assert (folder / name).read_bytes() == data
        assert meta["files"][name]["sha256"] == hashlib.sha256(data).hexdigest()
    return meta


@pytest.mark.parametrize("gsm, packs", [
    ("GSM4115598", ["GSM4115598_visium_filtered_feature_bc_matrix.tar.gz", "GSM4115598_visium_spatial.tar.gz"]),
    ("GSM4115599", ["GSM4115599_visium_spatial.zip"]),
    ("GSM4115600", ["GSM4115600_HCT116_visium_filtered_feature_bc_matrix.tar", "GSM4115600_HCT116_visium_spatial.tar"]),
])
def test_packed_visium_files_are_unpacked_for_read_slice(fake_geo, tmp_path, gsm, packs):
    (folder,) = fetch("geo", [gsm], cache=tmp_path)
    meta = _check_unpacked(folder, fake_geo, gsm)
    assert sorted(meta["archives"]) == packs
    positions = meta["files"]["spatial/tissue_positions_list.csv"]["url"]
    assert positions.endswith("_spatial." + packs[-1].rsplit("_spatial.", 1)[1] + "#spatial/tissue_positions_list.csv")
    read_slice = pytest.importorskip("spavis.readers").read_slice
    adata = read_slice(folder)
    ref = read_slice(shared_fixture(fake_geo))
    assert adata.shape == ref.shape and (adata.X != ref.X).nnz == 0
    assert adata.obsm["spatial"].shape == (adata.n_obs, 2)
    n = len(fake_geo.server.log)
    fetch("geo", [gsm], cache=tmp_path)  # a re-run neither downloads nor unpacks anything
    assert fake_geo.server.log[n:] == []


def shared_fixture(g):
    return g.shared / "visium" / "human_heart_v1_subsample"


def test_with_images_takes_hires_from_the_spatial_pack(fake_geo, tmp_path):
    (folder,) = fetch("geo", ["GSM4115598"], cache=tmp_path)
    assert not (folder / "spatial" / "tissue_hires_image.png").exists()
    (folder,) = fetch("geo", ["GSM4115598"], cache=tmp_path, with_images=True)
    hires = (shared_fixture(fake_geo) / "spatial" / "tissue_hires_image.png").read_bytes()
    assert (folder / "spatial" / "tissue_hires_image.png").read_bytes() == hires


def test_unsafe_pack_is_refused_and_nothing_is_left(fake_geo, tmp_path):
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        link = tarfile.TarInfo("spatial/tissue_positions_list.csv")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    fake_geo.server.add("/geo/samples/GSM4115nnn/GSM4115598/suppl/GSM4115598_visium_spatial.tar.gz", buf.getvalue())
    with pytest.raises(FetchError, match=r"GSM4115598_visium_spatial\.tar\.gz: member .*is a link"):
        fetch("geo", ["GSM4115598"], cache=tmp_path)
    assert not (tmp_path / "geo" / "GSM4115598").exists()
    assert not (tmp_path / "evil").exists()
