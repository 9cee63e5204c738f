"""GeneTokenizer (Algorithm 1) against plain per-spot references written from the spec."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import scipy.sparse as sp

from stamp.errors import StampError
from stamp.tokenizer import (
    N_RESERVED,
    PAD_ID,
    GeneTokenizer,
    TokenizerError,
    load_means_file,
    table_to_csr,
    to_model_input_ids,
)


# ------------------------------------------------------------------ references (spec as written)
def reference_native(X: sp.csr_matrix, means: np.ndarray, max_length: int) -> np.ndarray:
    """Algorithm 1 per spot, float32, ties by ascending vocabulary index (np.lexsort)."""
    m = np.asarray(means, dtype=np.float64).copy()
    m[~np.isfinite(m) | (m <= 0)] = 1
    m = m.astype(np.float32)
    out = np.full((X.shape[0], max_length), PAD_ID, dtype=np.int32)
    for i in range(X.shape[0]):
        row = X.getrow(i)
        keep = row.data != 0
        genes, x = row.indices[keep], row.data[keep].astype(np.float32)
        if genes.size == 0:
            continue
        factor = np.float32(10000) / np.float32(x.astype(np.float64).sum())
        v = (x * factor) / m[genes]
        order = np.lexsort((genes, -v))[:max_length]
        out[i, : order.size] = genes[order] + 30
    return out


def reference_stamp_v1(X: sp.csr_matrix, released_means: np.ndarray) -> np.ndarray:
    """The released rules from ../shared/README.md: float32, means rounded half-up, NaN/0 -> 1,
    unstable descending sort, keep up to 4,096, pad with 0."""
    m = np.floor(np.asarray(released_means, dtype=np.float64) + 0.5)
    m[np.isnan(m) | (m == 0)] = 1
    m = m.astype(np.float32)
    dense = X.toarray().astype(np.float32)
    out = np.zeros((X.shape[0], 4096), dtype=np.int32)
    for i, x in enumerate(dense):
        s = np.float32(x.astype(np.float64).sum())
        x = x * (np.float32(10000) / (s if s > 0 else np.float32(1)))
        x = x / m
        idx = np.nonzero(x)[0]
        order = np.argsort(-x[idx], kind="quicksort")[:4096]
        out[i, : order.size] = idx[order] + 30
    return out


def values_of(ids: np.ndarray, X: sp.csr_matrix, means_f32: np.ndarray) -> np.ndarray:
    """The float32 value each token was ranked by (0 for padding)."""
    dense = X.toarray().astype(np.float32)
    sums = dense.astype(np.float64).sum(1).astype(np.float32)
    sums[sums == 0] = 1
    vals = (dense * (np.float32(10000) / sums)[:, None]) / means_f32[None, :]
    genes = np.where(ids >= 30, ids - 30, 0)
    return np.where(ids >= 30, np.take_along_axis(vals, genes, 1), 0)


def random_counts(rng, n_spots, n_genes, density, max_count=6):
    X = sp.random(n_spots, n_genes, density=density, random_state=rng, format="csr",
                  data_rvs=lambda k: rng.integers(1, max_count, k)).astype(np.float32)
    X.sort_indices()
    return X


@pytest.fixture
def genes():
    rng = np.random.default_rng(1)
    n = 300
    return pd.DataFrame({
        "ensembl_id": [f"ENSG{i:011d}" for i in range(n)],
        "symbol": [f"G{i}" for i in range(n)],
        "nonzero_mean_raw": rng.uniform(1, 6, n),
        "nonzero_mean_cp10k": rng.uniform(1, 60, n),
    })


# ------------------------------------------------------------------ tests
def test_matches_reference_native_and_raw(genes):
    rng = np.random.default_rng(0)
    X = random_counts(rng, 600, len(genes), 0.3)  # 600 rows: several threaded row blocks
    for mean in ("nonzero_mean_cp10k", "nonzero_mean_raw"):
        tok = GeneTokenizer.from_genes(genes, mean=mean, max_length=120)
        got = tok.encode_csr(X)
        assert got.dtype == np.int32 and got.shape == (600, 120)
        np.testing.assert_array_equal(got, reference_native(X, genes[mean].to_numpy(), 120))
    raw = GeneTokenizer.from_genes(genes, mean="nonzero_mean_raw").encode_csr(X)
    cp = GeneTokenizer.from_genes(genes, mean="nonzero_mean_cp10k").encode_csr(X)
    assert (raw != cp).any(), "the two means must rank differently"


def test_tie_break_by_ascending_vocab_index():
    gene_ids = [f"g{i}" for i in range(6)]
    tok = GeneTokenizer(gene_ids, np.ones(6), max_length=6)
    X = sp.csr_matrix(np.array([[0, 2, 5, 2, 0, 2], [3, 3, 3, 3, 3, 3]], dtype=np.float32))
    ids = tok.encode_csr(X)
    assert ids[0].tolist() == [2 + 30, 1 + 30, 3 + 30, 5 + 30, PAD_ID, PAD_ID]
    assert ids[1].tolist() == [30, 31, 32, 33, 34, 35]


def test_truncation_padding_and_empty_spots(genes, caplog):
    rng = np.random.default_rng(2)
    X = random_counts(rng, 40, len(genes), 0.5).tolil()
    X[5, :] = 0
    X[17, :] = 0
    X = X.tocsr()
    X.eliminate_zeros()
    tok = GeneTokenizer.from_genes(genes, max_length=50)
    with caplog.at_level("INFO", logger="stamp.tokenizer"):
        ids, n_empty = tok.encode_csr(X, return_n_empty=True)
    assert n_empty == 2 and "2 of 40 spots have no vocabulary gene" in caplog.text
    assert (ids[[5, 17]] == PAD_ID).all()
    nnz = np.diff(X.indptr)
    for i in range(40):
        k = min(nnz[i], 50)
        assert (ids[i, :k] >= N_RESERVED).all() and (ids[i, k:] == PAD_ID).all()
    long_tok = GeneTokenizer.from_genes(genes, max_length=400)  # wider than any row: pads
    wide = long_tok.encode_csr(X)
    np.testing.assert_array_equal(wide[:, :50], ids)
    # explicit zeros and unsorted duplicates are canonicalised, not tokenized
    Z = sp.csr_matrix((np.array([0, 4, 1, 1], np.float32), np.array([3, 1, 7, 7]), np.array([0, 4])), shape=(1, 300))
    canonical = sp.csr_matrix(Z.toarray())
    got = tok.encode_csr(Z)
    assert Z.nnz == 4 and Z.data[0] == 0  # the caller's matrix is left alone
    assert got[0, :3].tolist() == reference_native(canonical, genes["nonzero_mean_cp10k"].to_numpy(), 3)[0].tolist()
    assert sorted(got[0, :2]) == [31, 37] and (got[0, 2:] == PAD_ID).all()


def test_stamp_v1_matches_released_rules_up_to_ties(tmp_path):
    rng = np.random.default_rng(3)
    n_genes = 20_310
    released = rng.gamma(2.0, 1.5, n_genes) + 0.6  # half-up rounding matters: values around x.5
    released[rng.choice(n_genes, 210, replace=False)] = np.nan
    released[:4] = [0.0, 2.5, 3.5, 1.49]
    np.save(tmp_path / "means.npy", released)
    genes = pd.DataFrame({"ensembl_id": [f"ENSG{i:011d}" for i in range(n_genes)],
                          "nonzero_mean_raw": np.ones(n_genes), "nonzero_mean_cp10k": np.ones(n_genes)})
    # some spots wider than 4,096 genes so truncation is exercised; integer counts -> many ties
    X = sp.vstack([random_counts(rng, 20, n_genes, 0.08), random_counts(rng, 10, n_genes, 0.25)]).tocsr()
    tok = GeneTokenizer.from_genes(genes, mode="stamp-v1", means=tmp_path / "means.npy")
    assert tok.max_length == 4096 and tok.pad_value == 0
    got = tok.encode_csr(X)
    ref = reference_stamp_v1(X, released)
    m = np.floor(released + 0.5)
    m[np.isnan(m) | (m == 0)] = 1
    m = m.astype(np.float32)
    gv, rv = values_of(got, X, m), values_of(ref, X, m)
    np.testing.assert_array_equal(gv, rv)  # same value at every rank
    assert ((got == 0) == (ref == 0)).all()
    for i in range(X.shape[0]):  # same token set within each run of equal values
        truncated = np.diff(X.indptr)[i] > 4096
        for v in np.unique(gv[i][got[i] > 0]):
            a, b = set(got[i][gv[i] == v]), set(ref[i][rv[i] == v])
            if truncated and v == gv[i][-1]:  # a tie run cut by truncation: any equal-valued genes
                row = values_of(np.arange(n_genes)[None] + 30, X[i], m)[0]
                assert len(a) == len(b) and a <= set(np.flatnonzero(row == v) + 30)
            else:
                assert a == b
        if not truncated:
            assert set(got[i][got[i] > 0]) == set(ref[i][ref[i] > 0])
    assert np.diff(X.indptr).max() > 4096
    model_ids = to_model_input_ids(got, tok.pad_value, 1500)
    assert model_ids.shape == (30, 1500) and model_ids.min() >= PAD_ID
    assert ((model_ids == PAD_ID) == (got[:, :1500] == 0)).all()


def test_means_file_formats_and_length_errors(tmp_path, genes):
    values = np.arange(1, 301, dtype=np.float64)
    np.save(tmp_path / "m.npy", values)
    (tmp_path / "m.txt").write_text("\n".join(map(str, values)) + "\n")
    pd.DataFrame({"gene": genes["ensembl_id"], "mean": values}).to_csv(tmp_path / "m.csv", index=False)
    pd.DataFrame({"mean": values}).to_parquet(tmp_path / "m.parquet")
    for name in ("m.npy", "m.txt", "m.csv", "m.parquet"):
        np.testing.assert_array_equal(load_means_file(tmp_path / name, 300), values)
    np.save(tmp_path / "short.npy", values[:-1])
    with pytest.raises(StampError, match="299 values but the vocabulary has 300"):
        GeneTokenizer.from_genes(genes, mode="stamp-v1", means=tmp_path / "short.npy")
    with pytest.raises(TokenizerError, match="does not exist"):
        load_means_file(tmp_path / "nope.npy")
    (tmp_path / "text.npy").write_text("0.5\n")  # numpy's own message advised unpickling it
    with pytest.raises(TokenizerError, match=r"not a numeric .npy array .*never loaded\); save the means with numpy.save$"):
        load_means_file(tmp_path / "text.npy")
    with pytest.raises(TokenizerError, match="unknown tokenizer mode"):
        GeneTokenizer.from_genes(genes, mode="stamp-v2")


def test_save_load_roundtrip(tmp_path, genes):
    rng = np.random.default_rng(4)
    X = random_counts(rng, 30, len(genes), 0.4)
    for tok in (GeneTokenizer.from_genes(genes, mean="nonzero_mean_raw", max_length=77),
                GeneTokenizer.from_genes(genes, mode="stamp-v1", means=genes["nonzero_mean_cp10k"].to_numpy())):
        folder = tok.save_pretrained(tmp_path / tok.mode)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        assert config["mode"] == tok.mode and config["vocab_size"] == 330
        vocab = json.loads((folder / "vocab.json").read_text())
        assert vocab["<pad>"] == PAD_ID and vocab[genes["ensembl_id"][7]] == 37
        back = GeneTokenizer.from_pretrained(folder)
        assert (back.mode, back.max_length, back.gene_ids, back.symbols) == (tok.mode, tok.max_length, tok.gene_ids, tok.symbols)
        np.testing.assert_array_equal(back.encode_csr(X), tok.encode_csr(X))
    with pytest.raises(TokenizerError, match="neither a tokenizer folder"):
        GeneTokenizer.from_pretrained(tmp_path / "missing" / "deeper" / "x")


def test_arrow_rows_and_errors(genes):
    rng = np.random.default_rng(5)
    keep = np.ones(25)
    keep[3] = 0  # an empty spot
    X = (sp.diags(keep.astype(np.float32)) @ random_counts(rng, 25, len(genes), 0.2)).tocsr()
    X.eliminate_zeros()
    gi = [X.indices[X.indptr[i]:X.indptr[i + 1]].tolist() for i in range(25)]
    ct = [X.data[X.indptr[i]:X.indptr[i + 1]].tolist() for i in range(25)]
    table = pa.table({"spot_id": [f"s:{i}" for i in range(25)],
                      "gene_index": pa.array(gi, pa.list_(pa.int32())),
                      "counts": pa.array(ct, pa.list_(pa.float32()))})
    tok = GeneTokenizer.from_genes(genes)
    np.testing.assert_array_equal(tok(table), tok(X))
    sliced = table.slice(10, 7).to_batches()[0]  # sliced arrays keep offsets right
    np.testing.assert_array_equal(tok(sliced), tok(X[10:17]))
    assert (table_to_csr(table, 300) != X).nnz == 0
    with pytest.raises(TokenizerError, match="vocabulary has 300"):
        tok.encode_csr(sp.csr_matrix((2, 299), dtype=np.float32))
    bad = X.copy()
    bad.data[0] = -1
    with pytest.raises(TokenizerError, match="negative"):
        tok.encode_csr(bad)
    assert tok.decode([0, 1, 2, 31]) == ["<mask>", "<pad>", "<cls>", genes["ensembl_id"][1]]


@pytest.mark.parametrize("use_numba", [True, False])
def test_compiled_and_numpy_paths_match_reference_on_float_data(use_numba):
    """Both encoding paths, on non-integer counts of wide dynamic range (where the float64 row
    sum order matters), rows of very different lengths (several length-sorted blocks), empty
    rows, rows longer than max_length (top-k selection) and many ties."""
    from stamp.tokenizer.kernels import _encode

    rng = np.random.default_rng(6)
    n_spots, n_genes = 700, 400
    lens = rng.integers(0, n_genes, n_spots)
    lens[rng.choice(n_spots, 20, replace=False)] = 0
    rows = [np.sort(rng.choice(n_genes, k, replace=False)) for k in lens]
    data = (rng.random(lens.sum()) * 10.0 ** rng.integers(-4, 7, lens.sum())).astype(np.float32)
    data[rng.random(data.size) < 0.3] = 2.0  # equal counts on equal means -> ties
    X = sp.csr_matrix((data, np.concatenate(rows), np.r_[0, np.cumsum(lens)]), shape=(n_spots, n_genes))
    means = rng.choice([1.0, 2.0, 3.5], n_genes)
    ref = reference_native(X, means, 150)
    tok = GeneTokenizer([f"g{i}" for i in range(n_genes)], means, max_length=150, n_threads=2)
    got = _encode(X.data, X.indices, X.indptr.astype(np.int64), tok.means, 150, PAD_ID, tok._id_bits,
                  n_threads=2, use_numba=use_numba)
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(tok.encode_csr(X), ref)


def test_row_sums_round_like_numpy_pairwise_sum():
    """The float64 row sum must be numpy's (pairwise) ``x.astype(float64).sum()``: a sequential
    sum loses the small terms below and rounds the float32 sum (16777216 vs 16777218) differently."""
    from stamp.tokenizer.kernels import _exact_row_sums, _numba_kernels

    rng = np.random.default_rng(7)
    tricky = np.array([2.0**24, 1.0] + [2.0**-29] * 8, np.float32)
    rows = [tricky] + [(rng.random(k) * 10.0 ** rng.integers(-20, 20, k)).astype(np.float32)
                       for k in rng.integers(1, 3000, 40)]
    data = np.concatenate(rows)
    indptr = np.r_[0, np.cumsum([r.size for r in rows])].astype(np.int64)
    expected = np.array([r.astype(np.float64).sum() for r in rows])
    assert np.float32(expected[0]) == np.float32(2.0**24 + 2)
    np.testing.assert_array_equal(_exact_row_sums(data, indptr), expected)
    kernels = _numba_kernels()
    if kernels is None:
        pytest.skip("numba not installed")
    n_genes = int(np.diff(indptr).max())
    indices = np.concatenate([np.arange(r.size, dtype=np.int32) for r in rows])
    means = np.ones(n_genes, np.float32)
    keys = np.empty((len(rows), n_genes), np.uint64)
    kernels[0](data, indices, indptr, np.arange(len(rows), dtype=np.int64), means, 16, keys)
    for i, r in enumerate(rows):
        v = r * (np.float32(10000) / np.float32(expected[i]))
        np.testing.assert_array_equal(keys[i, : r.size] >> np.uint64(16),
                                      (np.uint32(0x7FFFFFFF) - v.view(np.uint32)).astype(np.uint64))
        assert (keys[i, r.size:] == np.iinfo(np.uint64).max).all()


def test_near_equal_values_keep_exact_order():
    """Values a few float32 ulps apart (the compiled path first sorts on their top bits only)
    must still come out in exact descending order: reversed runs, shuffled runs, exact ties."""
    rng = np.random.default_rng(8)
    n_genes = 3000
    ramp = (2.0 - np.arange(n_genes) * 2e-7).astype(np.float32)  # value rises with gene index
    means = np.where(np.arange(n_genes) % 3 == 0, ramp, rng.permutation(ramp)).astype(np.float64)
    means[::7] = 1.5  # exact ties
    rows = [np.sort(rng.choice(n_genes, k, replace=False)) for k in (1200, 2500, 2900, 40)]
    data = [np.ones(r.size, np.float32) for r in rows]
    data[0][0] = data[1][5] = 1e6  # a wide value range: coarse top bits, long runs of equal keys
    X = sp.csr_matrix((np.concatenate(data), np.concatenate(rows), np.r_[0, np.cumsum([r.size for r in rows])]),
                      shape=(len(rows), n_genes))
    for max_length in (1500, 3000):
        tok = GeneTokenizer([f"g{i}" for i in range(n_genes)], means, max_length=max_length)
        np.testing.assert_array_equal(tok.encode_csr(X), reference_native(X, means, max_length))
