"""build-shards end to end on small generated slices (labelled generated) plus one fetched-style slice."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from spavis.shards import build_shards, info, validate
from spavis.format.schema import EXPRESSION_SCHEMA, GENES_SCHEMA, SLIDES_SCHEMA
from spavis.corpus import open_corpus, rows_to_csr
from spavis.errors import SpavisError

MIN_GENES = 40
K = 6


def tree_digest(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under root."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Three small generated slices: two local folders and one fetched folder with slice.json."""
    from spavis.genes import Vocabulary, load_vocabulary
    from spavis.simulate import write_simulated_slice
    from spavis.sources.sidecar import write_sidecar

    root = tmp_path_factory.mktemp("inputs")
    stamp = load_vocabulary("stamp-v1")
    human = [e for e in stamp.ensembl_ids if str(e).startswith("ENSG")]
    genes = human[:360]
    vocab_ids = human[40:400]  # 40 input genes are outside the vocabulary, 40 vocab genes never measured
    vocab = Vocabulary("test-360", vocab_ids, [stamp.symbols[stamp.index[e]] for e in vocab_ids])
    vocab_path = vocab.write(root / "vocab.json")
    slices = []
    for i, frac in enumerate((0.05, 0.04, 0.06)):
        name = f"gen_{i}" if i < 2 else "GSM000002"
        folder = root / ("local" if i < 2 else "fetched") / name
        write_simulated_slice(folder, genes=genes, tissue_fraction=frac, seed=10 + i, median_umis=1500)
        slices.append(folder)
    write_sidecar(slices[2], slide_id="GSM000002", source="geo", accession=["GSE000001", "GSM000002"],
                  organ="heart", condition="healthy", license="CC BY 4.0", citation="Generated et al.")
    return {"root": root, "vocab": str(vocab_path), "vocab_obj": vocab, "slices": slices,
            "args": [slices[0], slices[1], root / "fetched"]}


@pytest.fixture(scope="module")
def corpus(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("built") / "corpus"
    build_shards(inputs["args"], out, vocab=inputs["vocab"], min_genes=MIN_GENES, k_neighbors=K,
                 max_spots_per_shard=450)
    return out


def test_layout_schema_and_metadata(corpus, inputs):
    names = set(tree_digest(corpus))
    assert {"README.md", "genes.parquet", "slides.parquet", "manifest.json"} <= names
    assert not any(p.name.startswith(".spavis-work") for p in corpus.parent.iterdir())  # default work dir removed
    parts = sorted((corpus / "data" / "expression").glob("part-*.parquet"))
    assert len(parts) >= 2  # 450 spots per shard forces more than one file
    seen = []
    for part in parts:
        pf = pq.ParquetFile(part)
        assert pf.schema_arrow.remove_metadata().equals(EXPRESSION_SCHEMA.remove_metadata())
        t = pf.read()
        ids = t.column("slide_id").to_pylist()
        runs = [s for j, s in enumerate(ids) if j == 0 or ids[j - 1] != s]
        assert len(runs) == len(set(runs))  # contiguous
        seen += runs
        for sid in runs:
            rows = t.filter(t.column("slide_id").to_numpy(zero_copy_only=False) == sid)
            assert rows.column("spot_index").to_pylist() == list(range(rows.num_rows))
            assert rows.column("spot_id").to_pylist() == [f"{sid}:{b}" for b in rows.column("barcode").to_pylist()]
            gi = rows.column("gene_index").to_pylist()
            assert all(all(a < b for a, b in zip(g, g[1:])) for g in gi)
            assert min(rows.column("n_genes").to_pylist()) >= MIN_GENES
    assert seen == sorted(seen) == ["GSM000002", "gen_0", "gen_1"]  # slide_id order, a slide never split

    genes = pq.read_table(corpus / "genes.parquet")
    assert genes.schema.remove_metadata().equals(GENES_SCHEMA.remove_metadata())
    assert genes.column("ensembl_id").to_pylist() == list(inputs["vocab_obj"].ensembl_ids)
    slides = pq.read_table(corpus / "slides.parquet")
    assert slides.schema.remove_metadata().equals(SLIDES_SCHEMA.remove_metadata())
    rec = {r["slide_id"]: r for r in slides.to_pylist()}
    assert rec["GSM000002"]["organ"] == "heart" and rec["GSM000002"]["condition"] == "healthy"
    assert rec["GSM000002"]["accession"] == ["GSE000001", "GSM000002"] and rec["GSM000002"]["source"] == "geo"
    assert rec["gen_0"]["source"] == "generated" and "GENERATED" in rec["gen_0"]["citation"]
    assert rec["gen_0"]["mapping_not_in_vocab"] == 40 and rec["gen_0"]["mapping_by_id"] == 360
    assert all(r["has_coordinates"] and r["neighbor_method"] == "pixels" for r in rec.values())

    card = (corpus / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["configs"][0]["data_files"][0]["path"] == "data/expression/*.parquet"
    assert "Generated data" in card

    manifest = json.loads((corpus / "manifest.json").read_text())
    assert manifest["vocabulary"]["checksum"] == inputs["vocab_obj"].checksum
    assert manifest["parameters"] == {"vocab": "test-360", "min_genes": MIN_GENES, "k_neighbors": K,
                                      "max_spots_per_shard": 450}
    h5 = inputs["slices"][0] / "filtered_feature_bc_matrix.h5"
    entry = next(i for i in manifest["inputs"] if i["slide_id"] == "gen_0")
    files = {f["path"]: f["sha256"] for f in entry["files"]}
    assert files["filtered_feature_bc_matrix.h5"] == hashlib.sha256(h5.read_bytes()).hexdigest()
    outputs = {o["path"]: o for o in manifest["outputs"]}
    assert outputs["genes.parquet"]["sha256"] == hashlib.sha256((corpus / "genes.parquet").read_bytes()).hexdigest()
    assert sum(o["rows"] for o in outputs.values() if o["kind"] == "expression") == sum(
        r["n_spots_kept"] for r in rec.values())


def _direct_matrix(folder: Path, vocab) -> np.ndarray:
    """Dense kept spots x vocab counts read with h5py, independent of spavis readers/harmonize."""
    import h5py

    with h5py.File(folder / "filtered_feature_bc_matrix.h5", "r") as f:
        m = f["matrix"]
        n_genes, n_bc = m["shape"][:]
        dense = np.zeros((n_bc, n_genes))
        indptr, indices, data = m["indptr"][:], m["indices"][:], m["data"][:]
        for j in range(n_bc):
            dense[j, indices[indptr[j]:indptr[j + 1]]] = data[indptr[j]:indptr[j + 1]]
        ids = [x.decode() for x in m["features"]["id"][:]]
    out = np.zeros((n_bc, len(vocab)))
    for col, gid in enumerate(ids):
        if gid in vocab.index:
            out[:, vocab.index[gid]] += dense[:, col]
    return out[(out > 0).sum(axis=1) >= MIN_GENES]


def test_nonzero_means_match_numpy(corpus, inputs):
    vocab = inputs["vocab_obj"]
    X = np.vstack([_direct_matrix(f, vocab) for f in inputs["slices"]])
    nz = X > 0
    nnz = nz.sum(axis=0)
    cp10k = X / X.sum(axis=1, keepdims=True) * 1e4
    genes = open_corpus(corpus).genes
    assert len(genes) == len(vocab)
    np.testing.assert_array_equal(genes["nnz"].to_numpy(), nnz)
    np.testing.assert_allclose(genes["nonzero_sum_raw"], X.sum(axis=0), rtol=1e-12)
    with np.errstate(invalid="ignore", divide="ignore"):
        np.testing.assert_allclose(genes["nonzero_mean_raw"], X.sum(axis=0) / nnz, rtol=1e-12)
        np.testing.assert_allclose(genes["nonzero_mean_cp10k"], cp10k.sum(axis=0) / nnz, rtol=1e-10)
    assert genes["nonzero_mean_raw"].isna().sum() == (nnz == 0).sum() >= 40  # never measured -> null
    assert genes["n_slides_detected"].max() == 3


def test_neighbors_match_sklearn(corpus, inputs):
    from sklearn.neighbors import NearestNeighbors

    c = open_corpus(corpus)
    for table in c.iter_slides():
        sid = table.column("slide_id")[0].as_py()
        folder = next(f for f in inputs["slices"] if f.name == sid)
        sdf = json.loads((folder / "spatial" / "scalefactors_json.json").read_text())["spot_diameter_fullres"]
        xy = np.column_stack([table.column("pxl_col").to_numpy(), table.column("pxl_row").to_numpy()]) * 65.0 / sdf
        dist, idx = NearestNeighbors(n_neighbors=K + 1).fit(xy).kneighbors(xy)
        got_i = np.array(table.column("neighbors").to_pylist())
        got_d = np.array(table.column("neighbor_distances").to_pylist())
        assert got_i.shape == (table.num_rows, K)
        np.testing.assert_allclose(got_d, dist[:, 1:], rtol=1e-5)
        # neighbours closer than the k-th are exactly sklearn's; ties with the k-th go by spot_index
        for row, (gi, gd) in enumerate(zip(got_i, got_d)):
            ref = dict(zip(idx[row, 1:], dist[row, 1:]))
            strict = [j for j, d in zip(gi, gd) if d < gd[-1] - 1e-3]  # not tied with the k-th
            assert all(j in ref for j in strict)
            tied = [j for j, d in zip(gi, gd) if abs(d - gd[-1]) <= 1e-3]
            assert tied == sorted(tied)  # ties broken by spot_index


def test_zarr_matches_parquet(corpus):
    import anndata as ad

    c = open_corpus(corpus)
    for table in c.iter_slides():
        sid = table.column("slide_id")[0].as_py()
        a = ad.read_zarr(corpus / "zarr" / f"{sid}.zarr")
        X = rows_to_csr(table, len(c.genes))
        assert a.shape == X.shape and (a.X != X).nnz == 0
        assert list(a.obs_names) == table.column("spot_id").to_pylist()
        assert list(a.var_names) == c.genes["ensembl_id"].tolist()
        np.testing.assert_array_equal(a.obsm["spatial"][:, 0], table.column("pxl_col").to_numpy())
        conn, dist = a.obsp["spatial_connectivities"], a.obsp["spatial_distances"]
        assert (np.asarray(conn.sum(axis=1)).ravel() == K).all()
        first = table.column("neighbors")[0].as_py()
        assert sorted(dist[0].indices.tolist()) == sorted(first)
        assert sid in a.uns["spatial"] and "spot_diameter_fullres" in a.uns["spatial"][sid]["scalefactors"]
        assert a.uns["spatial_neighbors"]["distances_key"] == "spatial_distances"


def test_zarr_writes_are_byte_identical_to_anndata(tmp_path, corpus):
    import anndata as ad

    from spavis.shards.prepare import write_zarr_store

    a = ad.read_zarr(corpus / "zarr" / "gen_0.zarr")
    write_zarr_store(a, tmp_path / "ours.zarr")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a.write_zarr(tmp_path / "anndata.zarr", convert_strings_to_categoricals=False)
    assert tree_digest(tmp_path / "ours.zarr") == tree_digest(tmp_path / "anndata.zarr")


def test_load_dataset_normal_and_streaming(corpus):
    import datasets

    n = sum(r["n_spots_kept"] for r in pq.read_table(corpus / "slides.parquet").to_pylist())
    ds = datasets.load_dataset(str(corpus), split="train")
    assert len(ds) == n and ds.features["gene_index"].feature.dtype == "int32"
    stream = datasets.load_dataset(str(corpus), split="train", streaming=True)
    first = next(iter(stream))
    assert first["spot_id"] == ds[0]["spot_id"] and first["counts"] == ds[0]["counts"]
    genes = datasets.load_dataset(str(corpus), "genes", split="train")
    assert len(genes) == 360


def test_validate_detects_tampering(corpus, tmp_path):
    assert validate(corpus).ok
    from spavis.cli import app

    bad = tmp_path / "bad"
    shutil.copytree(corpus, bad)
    part = sorted((bad / "data" / "expression").glob("*.parquet"))[0]
    raw = bytearray(part.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    part.write_bytes(bytes(raw))
    rep = validate(bad)
    assert not rep.ok and any(part.name in e and "sha256" in e for e in rep.errors)
    res = CliRunner().invoke(app, ["validate", str(bad)])
    assert res.exit_code == 1 and "sha256" in res.output

    # consistent checksums but Zarr X differs from the Parquet rows -> caught by the deep check
    import anndata as ad

    from spavis.shards.prepare import write_zarr_store
    from spavis.format.integrity import store_digest

    bad2 = tmp_path / "bad2"
    shutil.copytree(corpus, bad2)
    z = bad2 / "zarr" / "gen_1.zarr"
    a = ad.read_zarr(z)
    a.X = a.X * 2
    shutil.rmtree(z)
    write_zarr_store(a, z)
    manifest = json.loads((bad2 / "manifest.json").read_text())
    for o in manifest["outputs"]:
        if o["path"] == "zarr/gen_1.zarr":
            o["sha256"] = store_digest(z)[0]
    (bad2 / "manifest.json").write_text(json.dumps(manifest))
    rep = validate(bad2)
    assert [e for e in rep.errors if "X differs" in e and "gen_1" in e]
    assert validate(bad2, deep=False).ok  # the quick check only looks at checksums and schema


def test_cli_determinism_workers_order_and_noop(corpus, inputs, tmp_path):
    """Same inputs in another order with 2 workers via the CLI -> the same bytes; re-run is a no-op."""
    from spavis.cli import app

    out = tmp_path / "again"
    args = ["build-shards", *map(str, reversed(inputs["args"])), "--out", str(out), "--vocab", inputs["vocab"],
            "--min-genes", str(MIN_GENES), "--k-neighbors", str(K), "--max-spots-per-shard", "450",
            "--workers", "2", "--quiet"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert tree_digest(out) == tree_digest(corpus)
    before = (out / "manifest.json").stat().st_mtime_ns
    build_shards(inputs["args"], out, vocab=inputs["vocab"], min_genes=MIN_GENES, k_neighbors=K,
                 max_spots_per_shard=450)
    assert (out / "manifest.json").stat().st_mtime_ns == before  # a no-op: nothing rewritten
    res = CliRunner().invoke(app, ["info", str(out)])
    assert res.exit_code == 0 and "test-360" in res.output and "geo 1" in res.output
    assert info(out)["n_slides"] == 3


def test_shard_size_does_not_change_gene_stats(corpus, inputs, tmp_path):
    work = tmp_path / "work"
    small = build_shards(inputs["args"], tmp_path / "small", vocab=inputs["vocab"], min_genes=MIN_GENES,
                         k_neighbors=K, max_spots_per_shard=1, work_dir=work)
    assert work.is_dir()  # an explicit work dir is kept
    assert (small / "genes.parquet").read_bytes() == (corpus / "genes.parquet").read_bytes()
    assert len(list((small / "data" / "expression").glob("*.parquet"))) == 3  # one slide per file at most
    assert validate(small).ok


def test_kill_and_rerun_gives_identical_bytes(corpus, inputs, tmp_path):
    out, work = tmp_path / "killed", tmp_path / "work"
    cmd = [sys.executable, "-c", "from spavis.cli import app; app()", "build-shards",
           *map(str, inputs["args"]), "--out", str(out), "--vocab", inputs["vocab"], "--min-genes",
           str(MIN_GENES), "--k-neighbors", str(K), "--max-spots-per-shard", "450", "--work-dir", str(work),
           "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if list(work.glob("*/prepared.json")):
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    build_shards(inputs["args"], out, vocab=inputs["vocab"], min_genes=MIN_GENES, k_neighbors=K,
                 max_spots_per_shard=450, work_dir=work)
    assert tree_digest(out) == tree_digest(corpus)
    assert not list(tmp_path.glob("killed.tmp-*")) and not list(tmp_path.glob(".killed.tmp-*"))


def _no_output(parent: Path, name: str) -> bool:
    return not (parent / name).exists() and not list(parent.glob(f"*{name}.tmp-*"))


def test_bad_inputs_fail_cleanly(inputs, tmp_path, real_data):
    good = inputs["slices"][0]
    trunc = tmp_path / "truncated"
    shutil.copytree(good, trunc)
    h5 = trunc / "filtered_feature_bc_matrix.h5"
    h5.write_bytes(h5.read_bytes()[:2000])
    with pytest.raises(SpavisError, match="truncated"):
        build_shards([good, trunc], tmp_path / "o1", vocab=inputs["vocab"], min_genes=MIN_GENES)
    assert _no_output(tmp_path, "o1")

    mouse = real_data / "visium" / "mouse_brain_v1_subset"
    with pytest.raises(SpavisError, match="not human"):
        build_shards([mouse], tmp_path / "o2", vocab=inputs["vocab"], min_genes=1)
    assert _no_output(tmp_path, "o2")
    assert not (tmp_path / ".spavis-work-o2").exists()  # nothing prepared -> no work dir left
    assert list((tmp_path / ".spavis-work-o1").glob("*/prepared.json"))  # the good slice is kept to resume

    with pytest.raises(SpavisError, match="--min-genes"):
        build_shards([good], tmp_path / "o3", vocab=inputs["vocab"], min_genes=100_000)
    assert _no_output(tmp_path, "o3")

    with pytest.raises(SpavisError, match="does not exist"):
        build_shards([tmp_path / "nope"], tmp_path / "o4", vocab=inputs["vocab"])
    assert _no_output(tmp_path, "o4")

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(SpavisError, match="not a spavis corpus"):
        build_shards([good], foreign, vocab=inputs["vocab"], min_genes=MIN_GENES)
    assert (foreign / "notes.txt").read_text() == "keep me"

    dup = tmp_path / "dups" / "gen_0"  # same slide_id, other files (an identical copy is counted once)
    shutil.copytree(good, dup)
    with open(dup / "spatial" / "scalefactors_json.json", "a") as fh:
        fh.write("\n")
    with pytest.raises(SpavisError, match="unique"):
        build_shards([good, dup], tmp_path / "o5", vocab=inputs["vocab"])


def test_real_human_slice_builds(real_data, tmp_path):
    """The bundled real 100-gene subsample: 2-14 vocabulary genes per spot, so --min-genes must be low."""
    heart = real_data / "visium" / "human_heart_v1_subsample"
    out = build_shards([heart], tmp_path / "heart", vocab="stamp-v1", min_genes=2, k_neighbors=K)
    c = open_corpus(out)
    s = c.slides.iloc[0]
    assert s["slide_id"] == "human_heart_v1_subsample" and s["neighbor_method"] == "pixels"
    assert 0 < s["n_spots_kept"] <= s["n_spots_in_tissue"] <= s["n_spots_input"]
    assert len(c.genes) == 20310 and 0 < (c.genes["nnz"] > 0).sum() <= 60
    assert validate(out).ok
