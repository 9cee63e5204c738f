"""spavis.corpus: the read API STAMP uses, on a local corpus and through a loopback Hub."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spavis.corpus import Corpus, open_corpus, rows_to_csr
from spavis.errors import SpavisError


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    from spavis.shards import build_shards
    from spavis.genes import Vocabulary, load_vocabulary
    from spavis.simulate import write_simulated_slice

    root = tmp_path_factory.mktemp("corpus_inputs")
    stamp = load_vocabulary("stamp-v1")
    ids = [e for e in stamp.ensembl_ids if str(e).startswith("ENSG")][:200]
    vocab = Vocabulary("test-200", ids, [stamp.symbols[stamp.index[e]] for e in ids]).write(root / "vocab.json")
    for i in range(2):
        write_simulated_slice(root / "in" / f"s{i}", genes=ids, tissue_fraction=0.03, seed=i, median_umis=1200)
    return build_shards([root / "in"], root / "out", vocab=str(vocab), min_genes=20, k_neighbors=4,
                        max_spots_per_shard=10_000)


def _dense_rows(table: pa.Table, n_genes: int) -> np.ndarray:
    out = np.zeros((table.num_rows, n_genes), np.float32)
    for r, (gi, c) in enumerate(zip(table.column("gene_index").to_pylist(), table.column("counts").to_pylist())):
        out[r, gi] = c
    return out


def test_open_local_corpus_and_iter_slides(corpus_dir):
    c = open_corpus(corpus_dir)
    assert isinstance(c, Corpus) and c.n_genes == len(c.genes) == 200
    assert c.slides["slide_id"].tolist() == ["s0", "s1"]
    assert len(c.expression_files) == 1  # both slides fit in one shard
    assert c.vocabulary["name"] == "test-200"
    tables = list(c.iter_slides(columns=["gene_index", "counts"]))
    assert [t.column("slide_id")[0].as_py() for t in tables] == ["s0", "s1"]
    assert tables[0].column_names == ["slide_id", "gene_index", "counts"]
    assert sum(t.num_rows for t in tables) == c.n_spots == int(c.slides["n_spots_kept"].sum())
    only = list(c.iter_slides(slide_ids=["s1"]))
    assert len(only) == 1 and only[0].num_rows == tables[1].num_rows
    with pytest.raises(SpavisError, match="unknown expression column"):
        next(c.iter_slides(columns=["nope"]))
    a = c.read_slide_zarr("s0")
    assert a.n_obs == tables[0].num_rows


def test_iter_slides_joins_row_groups_of_one_slide(tmp_path, corpus_dir):
    # a file written with tiny row groups: slides span several row groups and a group holds two slides
    src = pq.read_table(open_corpus(corpus_dir).expression_files[0])
    path = tmp_path / "part.parquet"
    pq.write_table(src, path, row_group_size=7)
    tables = list(open_corpus(corpus_dir).iter_slides(files=[path]))
    assert [t.num_rows for t in tables] == [
        int(n) for n in open_corpus(corpus_dir).slides["n_spots_kept"]
    ]
    assert pa.concat_tables(tables).equals(src)


def test_rows_to_csr_from_table_batch_and_datasets_batch(corpus_dir):
    import datasets

    c = open_corpus(corpus_dir)
    table = next(c.iter_slides())
    X = rows_to_csr(table, c.n_genes)
    assert X.dtype == np.float32 and X.shape == (table.num_rows, 200)
    np.testing.assert_array_equal(X.toarray(), _dense_rows(table, 200))
    batch = table.to_batches(max_chunksize=5)[1]
    np.testing.assert_array_equal(rows_to_csr(batch, 200).toarray(), _dense_rows(table.slice(5, 5), 200))
    ds = c.load()
    assert isinstance(ds, datasets.Dataset) and len(ds) == c.n_spots
    np.testing.assert_array_equal(rows_to_csr(ds[:5], 200).toarray(), _dense_rows(table.slice(0, 5), 200))
    stream = c.load(streaming=True)
    assert isinstance(stream, datasets.IterableDataset)
    assert next(iter(stream))["spot_id"] == ds[0]["spot_id"]
    with pytest.raises(SpavisError, match="out of range"):
        rows_to_csr(table, 10)


def test_open_corpus_errors(tmp_path):
    with pytest.raises(SpavisError, match="not a spavis corpus"):
        open_corpus(tmp_path)
    with pytest.raises(SpavisError, match="not a Hub dataset id"):
        open_corpus(str(tmp_path / "missing" / "deep" / "path"))


def test_open_corpus_from_hub(corpus_dir, tmp_path, monkeypatch):
    from fakes.hub import FakeHub

    files = {p.relative_to(corpus_dir).as_posix(): p for p in sorted(corpus_dir.rglob("*")) if p.is_file()}
    with FakeHub(tmp_path / "hub") as hub:
        hub.create_repo("org/visium", repo_type="dataset")
        sha = hub.add_files("org/visium", files, repo_type="dataset")
        hub.activate(monkeypatch, cache_dir=tmp_path / "hf")
        c = open_corpus("org/visium")
        assert c.repo_id == "org/visium" and c.revision == sha
        # metadata only until expression is asked for
        assert (c.root / "genes.parquet").is_file() and not (c.root / "data").exists()
        assert not (c.root / "zarr").exists()
        local = open_corpus(corpus_dir)
        assert c.genes.equals(local.genes)
        remote_tables = list(c.iter_slides())
        assert [t.equals(l) for t, l in zip(remote_tables, local.iter_slides())] == [True, True]
        assert not (c.root / "zarr").exists()
        assert c.read_slide_zarr("s1").n_obs == remote_tables[1].num_rows
        stream = c.load(streaming=True)
        first = next(iter(stream))
        assert first["spot_id"] == remote_tables[0].column("spot_id")[0].as_py()
        with pytest.raises(SpavisError, match="org/missing"):
            open_corpus("org/missing")
