"""--workers spreads a fetch over slices: bounded transfers, one progress display, ordered results."""
from __future__ import annotations


import pytest

from fakes.cngb import FakeCNGB
from fakes.geo import FakeGEO
from fakes.http import FileServer, run_concurrently
from fakes.sodb import FakeSODB, h5ad_bytes
from spavis.errors import FetchError
from spavis.format import progress
from spavis.sources import fetch, parallel
from spavis.sources.sidecar import read_sidecar


@pytest.fixture(autouse=True)
def _fast(monkeypatch):
    monkeypatch.setenv("SPAVIS_FETCH_BACKOFF", "0.01")
    monkeypatch.setenv("SPAVIS_FETCH_MAX_WAIT", "0.1")
    monkeypatch.delenv("SPAVIS_NO_PROGRESS", raising=False)
    monkeypatch.setenv("SPAVIS_PROGRESS", "1")  # real rich bars: a second live display would raise


@pytest.fixture
def fake_geo_tree(real_data, monkeypatch):
    with FileServer() as srv:
        g = FakeGEO(srv, real_data).build()
        monkeypatch.setenv("SPAVIS_GEO_URL", g.base)
        yield g


def _sodb(srv, real_data, n):
    data = h5ad_bytes(real_data)
    return FakeSODB(srv, {("ds1", f"exp{i}"): data[:-1] + bytes([i]) for i in range(n)})


@pytest.mark.parametrize("workers", [1, 3])
def test_slices_are_fetched_concurrently_within_the_bound(real_data, monkeypatch, tmp_path, workers):
    with FileServer() as srv:
        sodb = _sodb(srv, real_data, 6)
        monkeypatch.setenv("SPAVIS_SODB_URL", sodb.base)
        srv.gather(workers)  # the first `workers` downloads meet in the server: all of them at once
        srv.delays["/pysodb/download/ds1/exp0"] = 0.5  # the first slice finishes last
        folders = fetch("sodb", ["ds1"], cache=tmp_path, workers=workers)
    assert [f.name for f in folders] == [f"exp{i}" for i in range(6)]  # input order, not completion order
    assert srv.max_inflight == workers  # 6 slices, one file each: exactly `workers` at once
    for i, f in enumerate(folders):
        assert read_sidecar(f)["accession"] == ["ds1", f"exp{i}"]


def test_geo_slices_and_their_files_share_one_bound(fake_geo_tree, tmp_path):
    srv = fake_geo_tree.server
    srv.gather(2, prefix="/geo/samples/")  # 2 slice files at once; the server counts exactly (fakes/http.py)
    folders = fetch("geo", ["GSE146540", "GSE138657"], cache=tmp_path, workers=2)
    assert [f.name for f in folders] == ["GSM4391934", "GSM4391935", "GSM4114982", "GSM4114983",
                                         "GSM4115598", "GSM4115599", "GSM4115600"]
    assert srv.max_inflight == 2  # slice pool x file pool never exceeds --workers transfers


def test_each_slice_is_still_locked_across_concurrent_fetches(real_data, monkeypatch, tmp_path):
    with FileServer() as srv:
        sodb = _sodb(srv, real_data, 3)
        monkeypatch.setenv("SPAVIS_SODB_URL", sodb.base)
        srv.delays["*"] = 0.1
        errors = run_concurrently(lambda: fetch("sodb", ["ds1"], cache=tmp_path, workers=3), 3)
    assert errors == []
    for i in range(3):  # three fetches, each slice downloaded exactly once
        assert len(srv.gets(f"/pysodb/download/ds1/exp{i}")) == 1


def test_one_failing_slice_keeps_the_others(real_data, monkeypatch, tmp_path):
    with FileServer() as srv:
        data = h5ad_bytes(real_data)
        sodb = FakeSODB(srv, {("ds1", "good1"): data, ("ds1", "bad"): data, ("ds1", "good2"): data})
        monkeypatch.setenv("SPAVIS_SODB_URL", sodb.base)
        del srv.files["/pysodb/download/ds1/bad"]
        with pytest.raises(FetchError, match="SODB ds1/bad: .*not found"):
            fetch("sodb", ["ds1"], cache=tmp_path, workers=3)
    assert sorted(p.name for p in (tmp_path / "sodb").iterdir() if not p.name.startswith(".")) == ["good1", "good2"]


def test_one_display_and_one_bound_reach_worker_threads():
    seen = []
    with progress.transfers(False) as bars, parallel.download_slots(2):
        outer_slots = parallel._SLOTS.get()

        def probe(i):
            with progress.transfers() as inner:
                seen.append((inner is bars, parallel._SLOTS.get() is outer_slots))
            return i * i

        assert parallel.run_ordered(probe, list(range(8)), 4) == [i * i for i in range(8)]
    assert seen == [(True, True)] * 8
    assert parallel._SLOTS.get() is None and progress.CURRENT.get() is None


def test_stomicsdb_sections_in_parallel(real_data, monkeypatch, tmp_path):
    data = h5ad_bytes(real_data)
    with FileServer() as srv:
        cngb = FakeCNGB(srv, {f"STT0000001/Analysis/STSA0000001/STTS000000{i}": {f"S{i}.h5ad": data}
                              for i in range(1, 5)})
        monkeypatch.setenv("SPAVIS_STOMICSDB_URL", cngb.base)
        srv.gather(2)
        folders = fetch("stomicsdb", ["STT0000001"], cache=tmp_path, workers=4)
    assert [f.name for f in folders] == [f"STTS000000{i}" for i in range(1, 5)]
    assert 2 <= srv.max_inflight <= 4
