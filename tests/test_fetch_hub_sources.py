"""`spavis fetch --source hest|stimage` against the loopback Hub, driven by the real huggingface_hub."""
from __future__ import annotations

import hashlib
import json

import pandas as pd
import pytest

from fakes.hub import FakeHub, hest_sample_files, stimage_slide_files
from spavis.errors import FetchError
from spavis.manifests import load_manifest, write_manifest
from spavis.sources import fetch
from spavis.sources.sidecar import read_sidecar

HEST_REPO, STIMAGE_REPO = "MahmoodLab/hest", "jiawennnn/STimage-1K4M"


@pytest.fixture(scope="module")
def heart_rows(real_data):
    """Two real human-heart HEST rows (manifest + their real metadata)."""
    meta = pd.read_csv(real_data / "manifests" / "hest_v1_1_0_metadata.csv", encoding="utf-8-sig")
    meta = meta.set_index("id", drop=False)
    rows = [r for r in load_manifest("manifests/hest-v1.csv") if r.organ == "heart"][:2]
    return rows, {r.slide_id: meta.loc[r.slide_id].to_dict() for r in rows}


@pytest.fixture(scope="module")
def hest_files(real_data, heart_rows):
    rows, meta = heart_rows
    heart = real_data / "visium" / "human_heart_v1_subsample"
    files = {}
    for r in rows:
        files.update(hest_sample_files(heart, r.slide_id, meta[r.slide_id]))
    return files


@pytest.fixture
def hub(tmp_path, monkeypatch, hest_files):
    monkeypatch.setenv("SPAVIS_FETCH_BACKOFF", "0.01")
    monkeypatch.setenv("SPAVIS_NO_PROGRESS", "1")
    with FakeHub(tmp_path / "hub") as h:
        h.create_repo(HEST_REPO, "dataset", gated=True)
        h.add_files(HEST_REPO, hest_files, "dataset", message="HEST samples")
        h.grant(HEST_REPO, "hf_granted")
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        monkeypatch.setenv("HF_TOKEN", "hf_granted")
        yield h


def _manifest(tmp_path, rows):
    return write_manifest(rows, tmp_path / "m.csv")


def _gets(hub, needle):
    return sum(1 for m, p in hub.requests if m == "GET" and needle in p and "/resolve/" in p)


def test_hest_manifest_fetch_lands_verified_files_with_revision(hub, heart_rows, tmp_path):
    rows, meta = heart_rows
    cache = tmp_path / "cache"
    out = fetch("hest", manifest=_manifest(tmp_path, rows), cache=cache, workers=2)
    assert sorted(p.name for p in out) == sorted(r.slide_id for r in rows)
    sid = rows[0].slide_id
    folder = cache / "hest" / sid
    side = read_sidecar(folder)
    assert side["revision"] == hub.head(HEST_REPO, "dataset")
    assert side["source"] == "hest" and side["organ"] == "heart" and side["species"] == "Homo sapiens"
    assert side["condition"] == rows[0].condition and side["license"] == rows[0].license
    assert side["data_path"] == f"st/{sid}.h5ad" and (folder / side["data_path"]).is_file()
    for name, rec in side["files"].items():
        data = (folder / name).read_bytes()
        assert rec["size"] == len(data) == len(hub.read_file(HEST_REPO, name, "dataset"))
        assert rec["sha256"] == hashlib.sha256(data).hexdigest()
        assert f"/resolve/{side['revision']}/{name}" in rec["url"]
    assert json.loads((folder / f"metadata/{sid}.json").read_text())["organ"] == meta[sid]["organ"]
    assert not list(folder.glob("wsis/*"))  # no images unless asked


def test_hest_rerun_downloads_nothing_and_images_added_on_request(hub, heart_rows, tmp_path):
    rows, _ = heart_rows
    sid = rows[0].slide_id
    hub.add_files(HEST_REPO, {f"wsis/{sid}.tif": b"II*\x00" + bytes(5000)}, "dataset")
    cache = tmp_path / "cache"
    fetch("hest", [sid], cache=cache)
    before = _gets(hub, sid)
    fetch("hest", [sid], cache=cache)
    assert _gets(hub, sid) == before
    fetch("hest", [sid], cache=cache, with_images=True)
    side = read_sidecar(cache / "hest" / sid)
    assert f"wsis/{sid}.tif" in side["files"] and _gets(hub, sid) == before + 1


def test_hest_gated_without_access_says_accept_terms(hub, heart_rows, tmp_path, monkeypatch):
    sid = heart_rows[0][0].slide_id
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
    for token in (None, "hf_not_granted"):
        if token:
            monkeypatch.setenv("HF_TOKEN", token)
        with pytest.raises(FetchError) as err:
            fetch("hest", [sid], cache=tmp_path / "cache")
        msg = str(err.value)
        assert "gated" in msg and "accept" in msg.lower() and "HF_TOKEN" in msg and "MahmoodLab/hest" in msg
    assert not (tmp_path / "cache" / "hest" / sid).exists()


def test_hest_transient_faults_recover(hub, heart_rows, tmp_path):
    sid = heart_rows[0][0].slide_id
    hub.add_fault(f"st/{sid}.h5ad", "status", status=503, retry_after=0, methods=("GET", "HEAD"))
    hub.add_fault(f"st/{sid}.h5ad", "truncate")  # dropped mid-file: resumed with Range
    out = fetch("hest", [sid], cache=tmp_path / "cache")
    data = (out[0] / f"st/{sid}.h5ad").read_bytes()
    assert data == hub.read_file(HEST_REPO, f"st/{sid}.h5ad", "dataset")
    assert all(f.fired == f.times for f in hub.faults)


def test_hest_corrupt_body_leaves_nothing(hub, heart_rows, tmp_path):
    sid = heart_rows[0][0].slide_id
    hub.add_fault(f"st/{sid}.h5ad", "corrupt", times=10)
    with pytest.raises(FetchError, match="sha256"):
        fetch("hest", [sid], cache=tmp_path / "cache")
    assert not (tmp_path / "cache" / "hest" / sid).exists()
    assert not list((tmp_path / "cache").rglob(f"st/{sid}.h5ad"))


def test_hest_unknown_id_404_and_mouse_rejected(hub, real_data, tmp_path):
    with pytest.raises(FetchError, match=r"NOPE1.*404"):
        fetch("hest", ["NOPE1"], cache=tmp_path / "cache")
    meta = pd.read_csv(real_data / "manifests" / "hest_v1_1_0_metadata.csv", encoding="utf-8-sig")
    mouse = meta[meta.species == "Mus musculus"].iloc[0].to_dict()
    files = hest_sample_files(real_data / "visium" / "human_heart_v1_subsample", mouse["id"], mouse)
    hub.add_files(HEST_REPO, files, "dataset")
    with pytest.raises(FetchError, match="Mus musculus"):
        fetch("hest", [mouse["id"]], cache=tmp_path / "cache")
    assert not (tmp_path / "cache" / "hest" / mouse["id"]).exists()


def test_stimage_fetch_by_manifest_row(tmp_path, monkeypatch, real_data):
    rows = [r for r in load_manifest("manifests/stimage-v1.csv") if r.organ == "heart"][:1]
    slide = rows[0].slide_id
    monkeypatch.setenv("SPAVIS_NO_PROGRESS", "1")
    with FakeHub(tmp_path / "hub") as hub:
        hub.create_repo(STIMAGE_REPO, "dataset")
        files = stimage_slide_files(real_data / "visium" / "human_heart_v1_subsample", slide)
        files[f"Visium/image/{slide}.png"] = b"\x89PNG\r\n\x1a\n" + bytes(100)
        hub.add_files(STIMAGE_REPO, files, "dataset")
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        out = fetch("stimage", manifest=_manifest(tmp_path, rows), cache=tmp_path / "cache", with_images=True)
    side = read_sidecar(out[0])
    assert out[0] == tmp_path / "cache" / "stimage" / slide
    assert side["organ"] == "heart" and side["license"].startswith("MIT") and side["revision"]
    assert sorted(side["files"]) == sorted(files)
    assert (out[0] / side["data_path"]).read_bytes() == files[f"Visium/gene_exp/{slide}_count.csv"]


def test_fetched_hest_slice_builds_into_shards(hub, heart_rows, tmp_path):
    build = pytest.importorskip("spavis.shards")
    corpus = pytest.importorskip("spavis.corpus")
    rows, _ = heart_rows
    cache = tmp_path / "cache"
    fetch("hest", manifest=_manifest(tmp_path, rows), cache=cache)
    out = build.build_shards([cache / "hest"], tmp_path / "shards", min_genes=1)
    slides = corpus.open_corpus(out).slides
    assert sorted(slides["slide_id"]) == sorted(r.slide_id for r in rows)
    assert set(slides["source"]) == {"hest"}


def test_hest_samples_run_as_slice_tasks_and_a_failure_keeps_the_others(hub, heart_rows, tmp_path):
    from spavis.sources import hest

    rows, _ = heart_rows
    bad, good = rows[0].slide_id, rows[1].slide_id
    cache = tmp_path / "cache"
    tasks = hest.plan_slices([], rows, cache=cache)
    assert [t.slide_id for t in tasks] == [bad, good] and not (cache / "hest").exists()  # planning fetches no data
    hub.add_fault(f"st/{bad}.h5ad", "corrupt", times=10)
    with pytest.raises(FetchError, match=rf"{bad}: .*sha256"):
        fetch("hest", [good, bad], cache=cache, workers=2)
    assert read_sidecar(cache / "hest" / good)["source"] == "hest" and not (cache / "hest" / bad).exists()
    assert fetch("hest", [good], cache=cache, workers=1) == [cache / "hest" / good]
