"""Spatial groups (Algorithm 2) and the shards -> token batch loader, on hand-written shards.

The shards are written here with the public shard schema (spavis.shards.schema) from
generated lattices; they are read back only through spavis.corpus, as stamp does.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy.spatial import cKDTree

from stamp.data.batching import BatchingError, slide_coordinates_um, spatial_groups
from stamp.data.tokens import DataError, TokenBatchLoader, rank_files
from stamp.tokenizer import PAD_ID, GeneTokenizer

N_GENES = 200
UM_PER_PX = 0.37


def lattice_slide(slide_id: str, rows: int, cols: int, rng, *, k: int = 10, hole: bool = False,
                  pixels: bool = True) -> pa.Table:
    """One generated Visium-like slide (hex lattice, 100 µm spacing) as expression rows."""
    rr, cc = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    keep = (rr + cc) % 2 == 0
    if hole:  # a gap three spots wide makes far-reaching groups near it
        keep &= ~((cc >= cols // 2 - 2) & (cc <= cols // 2 + 2))
    ar, ac = rr[keep].astype(np.int32), cc[keep].astype(np.int32)
    xy = np.column_stack([ac * 50.0, ar * 50.0 * np.sqrt(3)])
    n = len(ar)
    dist, idx = cKDTree(xy).query(xy, k=k + 1)
    nbrs, nd = idx[:, 1:], dist[:, 1:]
    gene_index, counts = [], []
    for i in range(n):
        size = 0 if i == 3 else rng.integers(5, 60)  # spot 3 has no vocabulary gene
        g = np.sort(rng.choice(N_GENES, size, replace=False))
        gene_index.append(g.astype(np.int32))
        counts.append(rng.integers(1, 9, g.size).astype(np.float32))
    px = xy / UM_PER_PX + 1000.0
    return pa.table({
        "spot_id": [f"{slide_id}:B{i}" for i in range(n)],
        "slide_id": [slide_id] * n,
        "barcode": [f"B{i}" for i in range(n)],
        "spot_index": np.arange(n, dtype=np.int32),
        "gene_index": pa.array(gene_index, pa.list_(pa.int32())),
        "counts": pa.array(counts, pa.list_(pa.float32())),
        "total_counts": np.array([c.sum() for c in counts], np.float32),
        "n_genes": np.array([c.size for c in counts], np.int32),
        "array_row": ar, "array_col": ac,
        "pxl_row": pa.array(px[:, 1] if pixels else [None] * n, pa.float64()),
        "pxl_col": pa.array(px[:, 0] if pixels else [None] * n, pa.float64()),
        "neighbors": pa.array(list(nbrs.astype(np.int32)), pa.list_(pa.int32())),
        "neighbor_distances": pa.array(list(nd.astype(np.float32)), pa.list_(pa.float32())),
    })


def write_hand_corpus(root: Path, files: list[list[pa.Table]]) -> Path:
    """Shard directory with genes.parquet + data/expression/part-NNNNN.parquet (public schema)."""
    from spavis.format import schema as S

    rng = np.random.default_rng(0)
    (root / S.EXPRESSION_DIR).mkdir(parents=True)
    genes = pa.table({
        "gene_index": np.arange(N_GENES, dtype=np.int32),
        "ensembl_id": [f"ENSG{i:011d}" for i in range(N_GENES)],
        "symbol": [f"G{i}" for i in range(N_GENES)],
        "nnz": np.full(N_GENES, 10, np.int64),
        "nonzero_sum_raw": np.full(N_GENES, 30.0),
        "nonzero_mean_raw": rng.uniform(1, 5, N_GENES),
        "nonzero_sum_cp10k": np.full(N_GENES, 300.0),
        "nonzero_mean_cp10k": rng.uniform(50, 500, N_GENES),
        "n_slides_detected": np.ones(N_GENES, np.int32),
    }).cast(S.GENES_SCHEMA)
    pq.write_table(genes, root / S.GENES_FILE)
    for i, slides in enumerate(files):
        table = pa.concat_tables([t.cast(S.EXPRESSION_SCHEMA) for t in slides])
        pq.write_table(table, root / S.EXPRESSION_DIR / f"part-{i:05d}.parquet", row_group_size=64)
    return root


@pytest.fixture
def corpus_dir(tmp_path):
    rng = np.random.default_rng(42)
    return write_hand_corpus(tmp_path / "shards", [
        [lattice_slide("S1", 12, 24, rng), lattice_slide("S2", 10, 20, rng, hole=True)],
        [lattice_slide("S3", 8, 16, rng, pixels=False)],
        [lattice_slide("S4", 9, 18, rng)],
    ])


def lattice_um(table: pa.Table) -> np.ndarray:
    ar = table.column("array_row").to_numpy().astype(float)
    ac = table.column("array_col").to_numpy().astype(float)
    return np.column_stack([ac * 50, ar * 50 * np.sqrt(3)])


def check_groups(table: pa.Table, groups: np.ndarray, d_max: float) -> None:
    nbrs = np.stack(table.column("neighbors").to_numpy(zero_copy_only=False))
    xy = lattice_um(table)
    assert groups.ndim == 2 and groups.shape[1] == 9
    assert np.unique(groups).size == groups.size, "a spot is in two groups"
    for g in groups:
        seed_list = nbrs[g[0]].tolist()
        pos = [seed_list.index(j) for j in g[1:]]  # members are the seed's stored neighbours...
        assert pos == sorted(pos)  # ...nearest first, seed in column 0
        d = np.linalg.norm(xy[g][:, None] - xy[g][None], axis=-1)
        assert d.max() <= d_max + 1e-6


def test_groups_valid_and_deterministic():
    rng = np.random.default_rng(1)
    table = lattice_slide("A", 14, 28, rng, hole=True)
    groups = spatial_groups(table, seed=5)
    check_groups(table, groups, 400.0)
    assert groups.shape[0] >= 12  # a 196-spot lattice packs many 9-spot patches
    np.testing.assert_array_equal(groups, spatial_groups(table, seed=5))
    assert not np.array_equal(groups, spatial_groups(table, seed=6))
    assert not np.array_equal(groups, spatial_groups(table, seed=5, epoch=1))
    tight = spatial_groups(table, seed=5, d_max_um=300.0)
    check_groups(table, tight, 300.0)
    assert 0 < tight.shape[0] < groups.shape[0] or tight.shape[0] == 0
    assert spatial_groups(table, seed=5, d_max_um=150.0).shape[0] == 0  # 9 spots never fit in 150 µm
    # rows shuffled within the table: groups follow spot_index, not row order
    perm = np.random.default_rng(0).permutation(table.num_rows)
    shuffled = table.take(perm)
    g2 = spatial_groups(shuffled, seed=5)
    np.testing.assert_array_equal(perm[g2], groups)


def test_coordinates_from_pixels_lattice_and_graph_bound():
    rng = np.random.default_rng(2)
    with_px = lattice_slide("P", 8, 16, rng)
    np.testing.assert_allclose(slide_coordinates_um(with_px) - slide_coordinates_um(with_px)[0],
                               lattice_um(with_px) - lattice_um(with_px)[0], atol=1e-3)
    no_px = lattice_slide("Q", 8, 16, rng, pixels=False)
    np.testing.assert_allclose(slide_coordinates_um(no_px), lattice_um(no_px))
    bare = no_px.drop_columns(["array_row", "array_col", "pxl_row", "pxl_col"])
    assert slide_coordinates_um(bare) is None
    g = spatial_groups(bare, seed=0, d_max_um=400.0)  # triangle bound: conservative
    check_groups(no_px, g, 400.0)
    assert g.shape[0] <= spatial_groups(no_px, seed=0, d_max_um=400.0).shape[0] + 5
    few = no_px.set_column(no_px.schema.get_field_index("neighbors"), "neighbors",
                           pa.array([[1, 2]] * no_px.num_rows, pa.list_(pa.int32())))
    with pytest.raises(BatchingError, match="--k-neighbors 8"):
        spatial_groups(few)


def test_spot_loader_covers_each_spot_once_and_matches_tokenizer(corpus_dir):
    from spavis.corpus import open_corpus

    corpus = open_corpus(corpus_dir)
    tok = GeneTokenizer.from_corpus(corpus, max_length=40)
    loader = TokenBatchLoader(corpus, tok, batch_size=50, epochs=1, drop_last=False, shuffle_buffer=120,
                              context_length=48, seed=3)
    batches = list(loader)
    spot_ids = [s for b in batches for s in b["spot_ids"]]
    tables = {t.column("spot_id")[i].as_py(): (t, i) for t in corpus.iter_slides() for i in range(t.num_rows)}
    assert sorted(spot_ids) == sorted(tables) and len(set(spot_ids)) == len(spot_ids)
    assert spot_ids != sorted(spot_ids, key=lambda s: list(tables).index(s))  # shuffled
    b = batches[0]
    assert b["input_ids"].dtype.is_floating_point is False and tuple(b["input_ids"].shape) == (50, 48)
    for row, sid in zip(b["input_ids"].numpy(), b["spot_ids"]):
        t, i = tables[sid]
        expect = tok.encode_table(t.slice(i, 1))[0]
        assert row[:40].tolist() == expect.tolist() and (row[40:] == PAD_ID).all()
    assert any((b["input_ids"].numpy() == PAD_ID).all(1).any() for b in batches)  # the empty spots
    again = [s for b in TokenBatchLoader(corpus, tok, batch_size=50, epochs=1, drop_last=False,
                                          shuffle_buffer=120, context_length=48, seed=3) for s in b["spot_ids"]]
    assert again == spot_ids


def test_spatial_loader_groups_ddp_and_resume(corpus_dir):
    from spavis.corpus import open_corpus

    corpus = open_corpus(corpus_dir)
    tok = GeneTokenizer.from_corpus(corpus, mode="stamp-v1")  # pads with 0 -> remapped to PAD
    kw = dict(mode="spatial", groups_per_batch=4, seed=9, epochs=2, context_length=64, shuffle_buffer=200)
    batches = list(TokenBatchLoader(corpus, tok, **kw))
    assert batches
    slides = {t.column("slide_id")[0].as_py(): t for t in corpus.iter_slides()}
    for b in batches:
        ids, groups = b["input_ids"].numpy(), b["groups"].numpy()
        assert groups.shape == (4, 9) and ids.shape == (36, 64) and ids.min() >= PAD_ID
        for g in groups:
            members = [b["spot_ids"][r] for r in g]
            slide = {m.split(":")[0] for m in members}
            assert len(slide) == 1  # all of one slide
            t = slides[slide.pop()]
            index = {s: i for i, s in enumerate(t.column("spot_id").to_pylist())}
            check_groups(t, np.array([[index[m] for m in members]]), 400.0)
    # DDP: two ranks read disjoint shard files
    r0 = TokenBatchLoader(corpus, tok, rank=0, world_size=2, **kw)
    r1 = TokenBatchLoader(corpus, tok, rank=1, world_size=2, **kw)
    s0 = {s.split(":")[0] for b in r0 for s in b["spot_ids"]}
    s1 = {s.split(":")[0] for b in r1 for s in b["spot_ids"]}
    assert s0 and s1 and not (s0 & s1)
    with pytest.raises(DataError, match="only 3 expression shard"):
        TokenBatchLoader(corpus, tok, rank=0, world_size=4, **kw)
    # resume: stop after 3 batches, continue in a fresh loader -> the same remaining batches
    first = TokenBatchLoader(corpus, tok, **kw)
    it = iter(first)
    head = [next(it) for _ in range(3)]
    resumed = TokenBatchLoader(corpus, tok, **kw)
    resumed.load_state_dict(first.state_dict())
    tail = list(resumed)
    assert [b["spot_ids"] for b in head + tail] == [b["spot_ids"] for b in batches]
    assert all((a["input_ids"] == b["input_ids"]).all() for a, b in zip(head + tail, batches))
    # epochs differ in order
    per_epoch = len(batches) // 2
    assert [b["spot_ids"] for b in batches[:per_epoch]] != [b["spot_ids"] for b in batches[per_epoch:]]


def test_rank_files_partition():
    files = [f"f{i}" for i in range(7)]
    parts = [rank_files(files, r, 3, seed=1, epoch=2) for r in range(3)]
    assert sorted(sum(parts, [])) == sorted(files)
    assert rank_files(files, 0, 3, seed=1, epoch=2) == parts[0]
    assert rank_files(files, 0, 3, seed=1, epoch=3) != parts[0] or rank_files(files, 1, 3, seed=1, epoch=3) != parts[1]


def test_real_shards_from_generated_slice(tmp_path):
    """spavis.simulate (generated) -> spavis.shards.build_shards -> tokenizer, groups and loader."""
    from spavis.shards import build_shards
    from spavis.corpus import open_corpus
    from spavis.simulate import write_simulated_slice

    write_simulated_slice(tmp_path / "in" / "GEN1", seed=1, tissue_fraction=0.15)
    corpus = open_corpus(build_shards([tmp_path / "in" / "GEN1"], tmp_path / "shards", k_neighbors=8))
    tok = GeneTokenizer.from_corpus(corpus)
    (table,) = list(corpus.iter_slides())
    ids = tok(table)
    n_genes = table.column("n_genes").to_numpy()
    assert ((ids >= 30).sum(1) == np.minimum(n_genes, 1500)).all()
    groups = spatial_groups(table, seed=0)
    check_groups(table, groups, 400.0)
    assert groups.shape[0] * 9 > table.num_rows * 0.4  # most spots of a compact tissue are grouped
    batch = next(iter(TokenBatchLoader(corpus, tok, mode="spatial", groups_per_batch=24, epochs=1)))
    assert tuple(batch["input_ids"].shape) == (216, 1500) and tuple(batch["groups"].shape) == (24, 9)


def test_partial_slide_table_maps_neighbours_through_spot_index():
    """A table holding only part of a slide (here: the left columns, rows shuffled) must not
    index coordinates by spot_index; neighbours outside the table are simply unavailable."""
    rng = np.random.default_rng(3)
    full = lattice_slide("P", 10, 24, rng)
    ac = full.column("array_col").to_numpy()
    keep = np.flatnonzero(ac < 12)
    keep = keep[np.random.default_rng(1).permutation(keep.size)]
    part = full.take(keep)
    assert part.column("spot_index").to_numpy().max() >= part.num_rows  # spot_index is not a row number
    # same µm coordinates (same per-slide scale) as the whole slide gives for those spots
    np.testing.assert_allclose(slide_coordinates_um(part), slide_coordinates_um(full)[keep], rtol=1e-9)
    # many spots' nearest neighbour is outside the table: the next stored one that is inside sets the scale
    sparse_keep = np.flatnonzero(np.arange(full.num_rows) % 3 != 0)
    first = np.array([nb[0] for nb in full.column("neighbors").to_pylist()])[sparse_keep]
    assert (first % 3 == 0).sum() > 10
    np.testing.assert_allclose(slide_coordinates_um(full.take(sparse_keep)), slide_coordinates_um(full)[sparse_keep],
                               rtol=1e-9)

    groups = spatial_groups(part, seed=4)
    assert groups.shape[0] >= 4 and np.unique(groups).size == groups.size
    assert groups.max() < part.num_rows
    spot = part.column("spot_index").to_numpy()
    stored = part.column("neighbors").to_pylist()
    xy = lattice_um(part)
    for g in groups:
        pos = [stored[g[0]].index(spot[j]) for j in g[1:]]  # the seed's stored neighbours, nearest first
        assert pos == sorted(pos)
        assert np.linalg.norm(xy[g][:, None] - xy[g][None], axis=-1).max() <= 400.0 + 1e-6
    # the groups of a partial table are those of the same spots however the rows are ordered
    again = spatial_groups(full.take(np.sort(keep)), seed=4)
    np.testing.assert_array_equal(np.sort(keep)[again], keep[groups])


def test_endless_loader_without_a_batch_raises_instead_of_cycling(corpus_dir):
    """An epoch that yields no batch stops an endless loader at once with the numbers (issue 10 item 1)."""
    from spavis.corpus import open_corpus

    corpus = open_corpus(corpus_dir)
    tok = GeneTokenizer.from_corpus(corpus, max_length=40)
    n = corpus.n_spots
    spots = TokenBatchLoader(corpus, tok, batch_size=n + 1, epochs=None, context_length=48)
    with pytest.raises(DataError, match=f"one epoch holds {n} spots in 4 slide.*fewer than one batch of {n + 1}"):
        next(iter(spots))
    spatial = TokenBatchLoader(corpus, tok, mode="spatial", groups_per_batch=4, epochs=None, context_length=48,
                               d_max_um=150.0)  # 9 Visium spots never fit in 150 µm
    with pytest.raises(DataError, match="found 0 spatial groups of 9 spots within D_max=150 µm"):
        next(iter(spatial))
    batch = next(iter(TokenBatchLoader(corpus, tok, mode="spatial", groups_per_batch=4, epochs=None,
                                       context_length=48)))
    assert batch.groups.shape == (4, 9) and len(batch.slide_ids) == len(batch) == 36
    assert batch.spot_index.shape == (36,) and all(s.startswith(f"{sid}:") for s, sid in
                                                    zip(batch.spot_ids, batch.slide_ids))
