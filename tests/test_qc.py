"""spavis.qc.apply_qc on the real heart fixture and on corrupted copies of it."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from spavis.errors import QCError
from spavis.qc import apply_qc
from spavis.readers import read_slice


@pytest.fixture()
def heart(real_data):
    return read_slice(real_data / "visium" / "human_heart_v1_subsample")


def test_paper_threshold_drops_every_heart_spot(heart):
    res = apply_qc(heart, heart.X, slice_name="heart")
    assert res.n_spots_input == 100 and res.n_spots_in_tissue == 100
    assert res.n_spots_kept == 0 and not res.keep.any()
    assert any("Lower --min-genes" in w for w in res.warnings)
    assert res.counts_are_integer and res.has_coordinates


def test_min_genes_matches_direct_numpy_count(heart):
    dense = heart.X.toarray()
    # pretend the vocabulary is the first 60 features
    X_vocab = sp.csr_matrix(dense[:, :60])
    heart.obs.loc[heart.obs_names[:10], "in_tissue"] = False
    res = apply_qc(heart, X_vocab, min_genes=3)
    expected_genes = (dense[:, :60] > 0).sum(axis=1)
    np.testing.assert_array_equal(res.n_genes, expected_genes)
    expected = (expected_genes >= 3) & heart.obs["in_tissue"].to_numpy()
    np.testing.assert_array_equal(res.keep, expected)
    assert res.n_spots_kept == expected.sum() > 0
    assert res.n_spots_in_tissue == 90
    assert set(res.to_dict()) >= {"n_spots_input", "n_spots_in_tissue", "n_spots_kept", "counts_are_integer", "has_coordinates"}


@pytest.mark.parametrize(
    ("value", "pattern"),
    [(-3.0, r"heart: the count matrix has 2 negative values"), (np.nan, r"heart: the count matrix has 2 non-finite values \(2 NaN"), (np.inf, "2 non-finite values")],
)
def test_bad_values_fail_with_slice_name_and_count(heart, value, pattern):
    heart.X.data[[0, 5]] = value
    with pytest.raises(QCError, match=pattern):
        apply_qc(heart, heart.X, slice_name="heart", min_genes=1)


def test_bad_values_in_harmonized_matrix_only(heart):
    Xv = heart.X.copy()
    Xv.data[0] = -1
    with pytest.raises(QCError, match="harmonized matrix has 1 negative"):
        apply_qc(heart, Xv, slice_name="heart")


def test_empty_and_all_zero_matrices(heart):
    empty = heart[:0].copy()
    with pytest.raises(QCError, match="empty"):
        apply_qc(empty, sp.csr_matrix((0, 5)), slice_name="e")
    zero = heart.copy()
    zero.X = sp.csr_matrix(zero.shape, dtype=np.float32)
    with pytest.raises(QCError, match="every count is zero"):
        apply_qc(zero, zero.X, slice_name="z")


def test_non_integer_counts_recorded_and_warned(heart):
    heart.X.data[:] = heart.X.data * 0.5
    with pytest.warns(UserWarning, match="not integers"):
        res = apply_qc(heart, heart.X, slice_name="heart", min_genes=1)
    assert res.counts_are_integer is False and any("processed" in w for w in res.warnings)


def test_slices_without_coordinates_are_kept_and_flagged(heart):
    del heart.obsm["spatial"]
    res = apply_qc(heart, heart.X, min_genes=1)
    assert res.has_coordinates is False and res.n_spots_kept > 0
    assert any("no neighbour graph" in w for w in res.warnings)


def test_spots_without_coordinates_in_a_slice_with_coordinates_are_dropped(heart):
    heart.obsm["spatial"][:4] = np.nan
    res = apply_qc(heart, heart.X, min_genes=1)
    assert not res.keep[:4].any() and res.has_coordinates


def test_does_not_mutate_non_canonical_input(heart):
    X = sp.csr_matrix((np.array([1.0, 1.0, 0.0], np.float32), np.array([2, 2, 3]), np.r_[0, 3, np.full(99, 3)]), shape=(100, 5))
    before = (X.data.copy(), X.indices.copy())
    res = apply_qc(heart, X, min_genes=1)
    assert res.n_genes[0] == 1  # duplicates summed, explicit zero not counted
    np.testing.assert_array_equal(X.data, before[0])
    np.testing.assert_array_equal(X.indices, before[1])
