"""`spavis subset`: a sub-corpus carved from a built one equals a fresh build of the same slides.

The parent is built from four tiny GENERATED slices (spavis.simulate) with slice.json metadata
(organ, condition, licence), with image patches (--with-images, cut from the lowres images), two
slides per expression file; the reference is `build_shards` run on the raw slices of the chosen slides.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from spavis.errors import SpavisError
from spavis.format.io import tree_sha256

SLIDES = {  # slide -> (organ, condition, licence); every slide pairs its spots with its lowres image
    "s0": ("brain", "cancer", "CC-BY-4.0"),
    "s1": ("heart", "healthy", "CC-BY-NC-4.0"),
    "s2": ("brain", "healthy", "CC-BY-4.0"),
    "s3": ("liver", "cancer", "CC0-1.0"),
}
BUILD = dict(min_genes=1, k_neighbors=4, max_spots_per_shard=600, with_images=True)


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    from spavis.genes import Vocabulary, load_vocabulary
    from spavis.shards import build_shards
    from spavis.simulate import write_simulated_slice
    from spavis.sources.sidecar import write_sidecar

    root = tmp_path_factory.mktemp("subset")
    stamp = load_vocabulary("stamp-v1")
    ids = [e for e in stamp.ensembl_ids if str(e).startswith("ENSG")][:200]
    vocab = Vocabulary("test-200", ids, [stamp.symbols[stamp.index[e]] for e in ids]).write(root / "vocab.json")
    for i, (sid, (organ, condition, licence)) in enumerate(SLIDES.items()):
        folder = root / "raw" / sid
        write_simulated_slice(folder, genes=ids, seed=i, max_row=4, median_umis=1500, n_domains=3)
        write_sidecar(folder, slide_id=sid, source="geo", accession=[f"GSM{i}"], organ=organ, condition=condition,
                      license=licence, citation=f"generated slice {sid}")
    out = build_shards([root / "raw"], root / "parent", vocab=str(vocab), **BUILD)
    return {"root": root, "vocab": str(vocab), "out": out}


def _fresh(parent, ids: list[str], name: str) -> Path:
    from spavis.shards import build_shards

    dest = parent["root"] / name
    if not dest.exists():
        build_shards([parent["root"] / "raw" / s for s in ids], dest, vocab=parent["vocab"], **BUILD)
    return dest


def _files(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*"))
            if p.is_file() and not p.relative_to(root).as_posix().startswith("zarr/")}


def _assert_same_corpus(sub: Path, fresh: Path) -> None:
    """Every file byte-identical but the card and manifest; Zarr stores identical; same build key and inputs."""
    a, b = _files(sub), _files(fresh)
    assert sorted(a) == sorted(b)
    differ = [rel for rel in a if a[rel].read_bytes() != b[rel].read_bytes()]
    assert differ == ["README.md", "manifest.json"], differ
    stores = sorted(p.name for p in (fresh / "zarr").iterdir())
    assert sorted(p.name for p in (sub / "zarr").iterdir()) == stores
    for name in stores:
        assert tree_sha256(sub / "zarr" / name) == tree_sha256(fresh / "zarr" / name), name
    ms, mf = (json.loads((d / "manifest.json").read_text()) for d in (sub, fresh))
    assert ms["build_key"] == mf["build_key"] and ms["inputs"] == mf["inputs"] and ms["slides"] == mf["slides"]
    assert ms["outputs"] == mf["outputs"] or [o for o in ms["outputs"] if o["kind"] != "card"] == [
        o for o in mf["outputs"] if o["kind"] != "card"]


def test_subset_equals_a_fresh_build_of_its_slides(parent, tmp_path):
    from spavis.format import open_corpus
    from spavis.shards import build_shards, is_up_to_date, subset, validate
    from spavis.shards.config import BuildConfig
    from spavis.shards.discover import discover_inputs

    res = subset(parent["out"], tmp_path / "brain", where="organ = 'brain' AND has_image AND n_spots > 0")
    assert res.slide_ids == ("s0", "s2") and not res.up_to_date and res.n_files == 1
    parent_files = {r["slide_id"]: r["expression_file"] for r in
                    pq.read_table(parent["out"] / "slides.parquet").to_pylist()}
    assert parent_files["s0"] != parent_files["s2"]  # one new file made of slides of two parent files
    fresh = _fresh(parent, ["s0", "s2"], "fresh_brain")
    _assert_same_corpus(res.out, fresh)
    assert (res.out / "data" / "paired").is_dir()
    manifest = json.loads((res.out / "manifest.json").read_text())
    record = manifest["subset"]
    assert record["parent"]["build_key"] == json.loads((parent["out"] / "manifest.json").read_text())["build_key"]
    assert record["where"] == "organ = 'brain' AND has_image AND n_spots > 0" and record["slides"] is None
    assert validate(res.out).ok
    import datasets

    assert len(datasets.load_dataset(str(res.out), split="train")) == open_corpus(res.out).n_spots == res.n_spots
    # a re-run with the same filter is a no-op; build-shards of the raw slices finds it up to date too
    stamp = (res.out / "manifest.json").stat().st_mtime_ns
    again = subset(parent["out"], tmp_path / "brain", where="organ = 'brain' AND has_image AND n_spots > 0")
    assert again.up_to_date and (res.out / "manifest.json").stat().st_mtime_ns == stamp
    cfg = BuildConfig(vocab=parent["vocab"], **BUILD)
    raw = discover_inputs([parent["root"] / "raw" / s for s in ("s0", "s2")])
    from spavis.shards.discover import hash_inputs

    assert is_up_to_date(res.out, cfg.vocabulary, cfg.params(), hash_inputs(raw, 1))
    build_shards([parent["root"] / "raw" / s for s in ("s0", "s2")], res.out, cfg)
    assert (res.out / "manifest.json").stat().st_mtime_ns == stamp


def test_subset_by_ids_licence_and_card(parent, tmp_path):
    from spavis.shards import subset

    res = subset(parent["out"], tmp_path / "mixed", slides="s3,s1", workers=2)
    assert res.slide_ids == ("s1", "s3")
    _assert_same_corpus(res.out, _fresh(parent, ["s1", "s3"], "fresh_mixed"))
    card = (res.out / "README.md").read_text()
    assert "license: cc-by-nc-4.0" in card  # the most restrictive of CC-BY-NC-4.0 and CC0-1.0
    assert "## Subset" in card and "2 of the 4 slides" in card
    assert (res.out / "data" / "paired").is_dir()  # patches from the lowres image (flagged upsampled)


def test_subset_mistakes_are_one_line(parent, tmp_path):
    from spavis.cli import app

    def run(*args):
        res = CliRunner().invoke(app, ["subset", str(parent["out"]), *map(str, args)])
        assert res.exit_code == 1 and "Traceback" not in res.output, res.output
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), res.output
        return lines[0]

    out = tmp_path / "sub"
    msg = run("--where", "tissue = 'brain'", "--out", out)
    assert "no column 'tissue'" in msg and "organ" in msg and "has_image" in msg
    assert "selects none of the 4 slides" in run("--where", "organ = 'kidney'", "--out", out)
    assert "not a valid SQL WHERE clause" in run("--where", "organ = = 'brain'", "--out", out)
    assert "not in" in run("--slides", "s9", "--out", out)
    assert "--where" in run("--out", out)
    assert not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert "not a spavis corpus" in run("--slides", "s1", "--out", out)
    other = tmp_path / "other"
    assert CliRunner().invoke(app, ["subset", str(parent["out"]), "--slides", "s1", "--out", str(other)]).exit_code == 0
    msg = run("--slides", "s3", "--out", other)
    assert "holds another corpus" in msg and "--overwrite" in msg
    assert "is the parent corpus" in run("--slides", "s3", "--out", parent["out"] / "inner")
    res = CliRunner().invoke(app, ["subset", str(parent["out"]), "--slides", "s3", "--out", str(other), "--overwrite"])
    assert res.exit_code == 0 and json.loads((other / "manifest.json").read_text())["subset"]["slides"] == ["s3"]
    with pytest.raises(SpavisError, match="--workers"):
        from spavis.shards import subset

        subset(parent["out"], tmp_path / "w", slides="s1", workers=0)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind


def test_subset_of_a_hub_corpus_downloads_only_its_files(parent, tmp_path, monkeypatch):
    from fakes.hub import FakeHub

    from spavis.shards import subset

    src = parent["out"]
    files = {p.relative_to(src).as_posix(): p for p in sorted(src.rglob("*")) if p.is_file()}
    holder = pq.read_table(src / "slides.parquet", filters=[("slide_id", "=", "s3")]).column("expression_file")[0]
    with FakeHub(tmp_path / "hub") as hub:
        hub.create_repo("org/visium", repo_type="dataset")
        sha = hub.add_files("org/visium", files, repo_type="dataset")
        hub.activate(monkeypatch, cache_dir=tmp_path / "hf")
        res = subset("org/visium", tmp_path / "liver", where="organ = 'liver'")
        fetched = {path.split(f"/resolve/{sha}/", 1)[1] for method, path in hub.requests
                   if method == "GET" and "/resolve/" in path and f"/resolve/{sha}/" in path}
    assert res.slide_ids == ("s3",) and res.parent == "org/visium"
    data = {f for f in fetched if f.startswith("data/")}
    part = holder.as_py()
    assert data == {part, part.replace("expression", "paired")}, fetched  # the files holding s3, no others
    assert {f.split("/")[1] for f in fetched if f.startswith("zarr/")} == {"s3.zarr"}
    local = subset(src, tmp_path / "liver_local", where="organ = 'liver'")
    for rel, path in _files(local.out).items():
        if rel not in ("README.md", "manifest.json"):
            assert path.read_bytes() == (res.out / rel).read_bytes(), rel
    record = json.loads((res.out / "manifest.json").read_text())["subset"]["parent"]
    assert record["repo_id"] == "org/visium" and record["revision"] == sha


def test_subset_stores_leave_later_embeddings_behind(parent, tmp_path):
    """A parent store with an embedding added after the build (obsm/X_*, as `stamp embed --zarr` writes):
    the subset's copy has the build's files only and consolidated metadata that does not list it."""
    import anndata as ad
    import numpy as np
    import zarr

    from spavis.format.zarrstore import consolidate_anndata
    from spavis.shards.subset import _copy_store

    src = tmp_path / "parent.zarr"
    shutil.copytree(parent["out"] / "zarr" / "s1.zarr", src)
    n = ad.read_zarr(src).n_obs
    arr = zarr.open_group(str(src / "obsm"), mode="a", zarr_format=2).create_array("X_test", data=np.ones((n, 4), np.float32))
    arr.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
    consolidate_anndata(src)
    assert "X_test" in ad.read_zarr(src).obsm
    _copy_store(src, tmp_path / "copy.zarr")
    assert not (tmp_path / "copy.zarr" / "obsm" / "X_test").exists()
    assert "X_test" not in (tmp_path / "copy.zarr" / ".zmetadata").read_text()
    assert tree_sha256(tmp_path / "copy.zarr", include=None) != tree_sha256(src, include=None)
    from spavis.format import schema as S

    assert tree_sha256(tmp_path / "copy.zarr", include=S.zarr_build_file) == tree_sha256(src, include=S.zarr_build_file)
    assert ad.read_zarr(tmp_path / "copy.zarr").n_obs == n and not os.path.islink(tmp_path / "copy.zarr" / "X")


def test_a_damaged_slide_fails_in_one_line_and_leaves_nothing(parent, tmp_path):
    """A parent whose slides.parquet (re-recorded in its manifest, so the integrity check passes)
    disagrees with a file's rows: one line naming the file and the slide, no partial subset visible."""
    import hashlib

    import pyarrow as pa

    from spavis.cli import app

    damaged = tmp_path / "damaged"
    shutil.copytree(parent["out"], damaged)
    slides = pq.read_table(damaged / "slides.parquet")
    n = slides.column("n_spots_kept").to_pylist()
    i = slides.column("slide_id").to_pylist().index("s1")
    n[i] += 1
    pq.write_table(slides.set_column(slides.schema.get_field_index("n_spots_kept"), "n_spots_kept",
                                     pa.array(n, slides.schema.field("n_spots_kept").type)), damaged / "slides.parquet")
    manifest = json.loads((damaged / "manifest.json").read_text())  # re-recorded: only the rows disagree
    for entry in manifest["outputs"]:
        if entry["path"] == "slides.parquet":
            entry.update(size=(damaged / "slides.parquet").stat().st_size,
                         sha256=hashlib.sha256((damaged / "slides.parquet").read_bytes()).hexdigest())
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "sub"
    res = CliRunner().invoke(app, ["subset", str(damaged), "--slides", "s0,s1", "--out", str(out)])
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 1 and len(lines) == 1, res.output
    assert "slide 's1' has" in lines[0] and "slides.parquet says" in lines[0] and ".parquet" in lines[0]
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
