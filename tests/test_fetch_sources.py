"""STOmicsDB (CNGB tree) and SODB (pysodb REST API) against loopback fakes of their real protocols."""
from __future__ import annotations

import hashlib

import pytest

from fakes.cngb import FakeCNGB
from fakes.http import Fault, FileServer
from fakes.sodb import FakeSODB, h5ad_bytes
from spavis.errors import FetchError
from spavis.sources import fetch
from spavis.sources.sidecar import read_sidecar


@pytest.fixture(autouse=True)
def _fast(monkeypatch):
    monkeypatch.setenv("SPAVIS_FETCH_BACKOFF", "0.01")
    monkeypatch.setenv("SPAVIS_FETCH_MAX_WAIT", "0.1")
    monkeypatch.setenv("SPAVIS_NO_PROGRESS", "1")


def test_stomicsdb_project_lists_tree_and_fetches_each_section(real_data, monkeypatch, tmp_path):
    data = h5ad_bytes(real_data)
    with FileServer() as srv:
        cngb = FakeCNGB(srv, {
            "STT0000001/Analysis/STSA0000001/STTS0000001": {"A1.h5ad": data, "A1.tissue.gem.gz": b"g"},
            "STT0000001/Analysis/STSA0000001/STTS0000002": {"B1.h5ad": data[::-1]},
            "STT0000001/Analysis/STSA0000002/STTS0000003": {"readme.txt": b"no h5ad here"},
        })
        monkeypatch.setenv("SPAVIS_STOMICSDB_URL", cngb.base)
        srv.inject("/pub/stomics/STT0000001/Analysis/STSA0000001/STTS0000002/B1.h5ad", Fault.http(503, "0"))
        folders = fetch("stomicsdb", ["STT0000001"], cache=tmp_path)
        assert [f.name for f in folders] == ["STTS0000001", "STTS0000002"]
        meta = read_sidecar(folders[0])
        assert meta["accession"] == ["STT0000001", "STSA0000001", "STTS0000001"]
        assert meta["data_path"] == "A1.h5ad" and (folders[0] / "A1.h5ad").read_bytes() == data
        assert meta["files"]["A1.h5ad"]["sha256"] == hashlib.sha256(data).hexdigest()
        assert not (folders[0] / "A1.tissue.gem.gz").exists()
        (one,) = fetch("stomicsdb", ["STT0000001/STSA0000001/STTS0000002"], cache=tmp_path)
        assert one == folders[1]
        with pytest.raises(FetchError, match="STT0000009.*not found"):
            fetch("stomicsdb", ["STT0000009"], cache=tmp_path)


def test_sodb_uses_pysodb_endpoints(real_data, monkeypatch, tmp_path):
    data = h5ad_bytes(real_data)
    with FileServer() as srv:
        sodb = FakeSODB(srv, {("maynard2021trans", "151673"): data, ("maynard2021trans", "151674"): data[:-1] + b"!",
                              ("other2022", "expA"): data})
        monkeypatch.setenv("SPAVIS_SODB_URL", sodb.base)
        folders = fetch("sodb", ["maynard2021trans"], cache=tmp_path)
        assert [f.name for f in folders] == ["151673", "151674"]
        meta = read_sidecar(folders[0])
        assert meta["source"] == "sodb" and meta["accession"] == ["maynard2021trans", "151673"]
        assert (folders[0] / meta["data_path"]).read_bytes() == data
        assert [r.path for r in srv.log if r.method == "GET"][0] == "/pysodb/info"
        with pytest.raises(FetchError, match="no experiment 'nope'"):
            fetch("sodb", ["maynard2021trans/nope"], cache=tmp_path)
        srv.inject("/pysodb/download/other2022/expA", Fault.http(403))
        with pytest.raises(FetchError, match="SODB other2022/expA: .*forbidden"):
            fetch("sodb", ["other2022/expA"], cache=tmp_path)
        assert not (tmp_path / "sodb" / "expA").exists()


def test_fetch_needs_ids_or_manifest(tmp_path):
    with pytest.raises(FetchError, match="give --id"):
        fetch("geo", cache=tmp_path)
    with pytest.raises(FetchError, match="unknown source"):
        fetch("ncbi", ["x"], cache=tmp_path)


def test_stomicsdb_verifies_md5_listings_published_in_the_tree(real_data, monkeypatch, tmp_path):
    data = h5ad_bytes(real_data)
    md5 = hashlib.md5(data).hexdigest()
    other = data[::-1]
    with FileServer() as srv:
        cngb = FakeCNGB(srv, {
            # md5sum output next to the data (GNU format, binary-mode star)
            "STT0000002/Analysis/STSA0000003/STTS0000004": {"A1.h5ad": data, "md5sum.txt": f"{md5} *A1.h5ad\n".encode()},
            # only a per-file <file>.md5 holding the bare digest
            "STT0000002/Analysis/STSA0000003/STTS0000005": {"B1.h5ad": other,
                                                           "B1.h5ad.md5": hashlib.md5(other).hexdigest().encode()},
            # a wrong digest in a BSD-style listing one level up (the analysis folder)
            "STT0000002/Analysis/STSA0000006/STTS0000007": {"C1.h5ad": data},
            "STT0000002/Analysis/STSA0000006": {"MD5.txt": f"MD5 (STTS0000007/C1.h5ad) = {'0' * 32}\n".encode()},
        })
        monkeypatch.setenv("SPAVIS_STOMICSDB_URL", cngb.base)
        a, b = fetch("stomicsdb", ["STT0000002/STSA0000003/STTS0000004", "STT0000002/STSA0000003/STTS0000005"],
                     cache=tmp_path)
        assert read_sidecar(a)["files"]["A1.h5ad"]["md5"] == md5
        assert read_sidecar(b)["files"]["B1.h5ad"]["md5"] == hashlib.md5(other).hexdigest()
        with pytest.raises(FetchError, match=r"STOmicsDB STTS0000007: .*C1\.h5ad: checksum/size mismatch \(md5 "):
            fetch("stomicsdb", ["STT0000002/STSA0000006/STTS0000007"], cache=tmp_path)
        assert not (tmp_path / "stomicsdb" / "STTS0000007").exists()


def test_md5_listing_formats():
    from spavis.sources.stomicsdb import is_md5_listing, parse_md5_listing

    h = "d41d8cd98f00b204e9800998ecf8427e"
    text = f"{h}  ./STTS1/a.h5ad\n# comment\nMD5 (b.h5ad) = {h.upper()}\nc.h5ad\t{h}\nnot a line\n"
    assert parse_md5_listing(text) == {"STTS1/a.h5ad": h, "b.h5ad": h, "c.h5ad": h}
    assert parse_md5_listing(h + "\n", "x.h5ad.md5") == {"x.h5ad": h}
    assert [n for n in ["md5sum.txt", "MD5.txt", "md5", "x.h5ad.md5", "readme.txt", "md5dir/"]
            if is_md5_listing(n)] == ["md5sum.txt", "MD5.txt", "md5", "x.h5ad.md5"]
