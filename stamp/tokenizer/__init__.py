"""Rank-value gene tokenizer (the STAMP paper's Algorithm 1), vectorized over CSR batches.

Per spot: take its nonzero vocabulary genes, scale them to 10,000 counts, divide each by
the gene's nonzero mean, rank in descending order, keep the first ``max_length`` genes,
pad. Token id = vocabulary index + 30; ids 0-29 are reserved (MASK=0, PAD=1, CLS=2), the
same layout as the released STAMP / Nicheformer gene encoders, so embeddings tables are
interchangeable.

Two modes
---------
``mode="native"`` (default)
    means = ``nonzero_mean_cp10k`` of the corpus (genes.parquet). The numerator of the
    ratio is a cp10k value, so dividing by the cp10k nonzero mean makes it unit-free
    ("how much above its usual level is this gene here"), independent of each slide's
    sequencing depth - the same reasoning as Geneformer's nonzero medians of normalized
    counts. ``mean="nonzero_mean_raw"`` is available; the released model used raw means.
    ``max_length`` 1,500 (the model context), padding with PAD=1.
``mode="released"`` (``"stamp-v1"`` is read as this)
    reproduces the released tokenizer (see docs/tokenizer.md): means from a user file
    (the released ``.npy``; 20,310 float64) or, without a file, the corpus's
    ``nonzero_mean_raw`` (the released means look like raw-count nonzero means: min ~ 1);
    means are rounded half-up to integers, NaN or 0 become 1; up to 4,096 tokens are
    kept (the model reads the first 1,500) and rows are padded with 0, as the released
    tokenizer does (the model remaps 0 to PAD; :func:`to_model_input_ids` does it here).
    Tokens equal the released ones up to the order of equal values.

Both modes compute in float32 (as the released tokenizer): the row sum in float64 (numpy's
pairwise summation, i.e. ``x.astype(float64).sum()``, then rounded to float32),
``factor = float32(10000) / sum``, ``v = x * factor``, ``v = v / mean``. Ties - equal float32
values - break by ascending vocabulary index, so the output is deterministic on every
machine. Means that are NaN, infinite or <= 0 (genes never detected in the corpus) are
replaced by 1 in both modes.

The fast sorting kernels are described in :mod:`stamp.tokenizer.kernels`.

Package layout (one module, one job): ``means`` (means files, effective divisors),
``kernels`` (numba / numpy encoding core), ``core`` (the :class:`GeneTokenizer` class and
the table / model-input helpers), ``io`` (``save_pretrained`` / ``from_pretrained`` files).
The token-id layout lives in :mod:`stamp.constants`.

Public API (used by stamp.data.batching, stamp.data.tokens, train/embed and the CLI)
-----------------------------------------------------------------------
``GeneTokenizer(gene_ids, means, *, symbols=None, mode="native", max_length=None,
mean_source=...)``; ``GeneTokenizer.from_genes(genes_df, mean=..., mode=..., means=FILE)``;
``GeneTokenizer.from_corpus(path_or_repo_id, ...)``;
``tok.encode_csr(X) -> np.ndarray[int32] (n_spots, max_length)``;
``tok.encode_table(table_or_record_batch)`` (expression rows: gene_index, counts);
``tok(x)`` dispatches; ``tok.save_pretrained(dir)``; ``GeneTokenizer.from_pretrained(dir_or_repo_id)``;
attributes ``vocab_size``, ``n_genes``, ``pad_value`` (what encode pads with),
``max_length``, ``gene_ids``, ``vocab_sha256``. Helpers: :func:`table_to_csr`,
:func:`to_model_input_ids`, :func:`load_means_file`, :func:`vocabulary_sha256`.
"""
from __future__ import annotations

from stamp.constants import CLS_ID, MASK_ID, N_RESERVED, PAD_ID
from stamp.errors import TokenizerError
from stamp.tokenizer.core import (
    MODES,
    NATIVE_MAX_LENGTH,
    STAMP_V1_MAX_LENGTH,
    STAMP_V1_N_GENES,
    GeneTokenizer,
    table_to_csr,
    to_model_input_ids,
)
from stamp.tokenizer.io import CONFIG_FILE, MEANS_FILE, VOCAB_FILE, vocabulary_sha256
from stamp.tokenizer.kernels import TARGET_SUM
from stamp.tokenizer.means import MEAN_COLUMNS, effective_means, load_means_file

__all__ = [
    "GeneTokenizer", "TokenizerError", "load_means_file", "effective_means", "table_to_csr",
    "to_model_input_ids", "vocabulary_sha256", "MASK_ID", "PAD_ID", "CLS_ID", "N_RESERVED", "TARGET_SUM",
    "NATIVE_MAX_LENGTH", "STAMP_V1_MAX_LENGTH", "STAMP_V1_N_GENES", "MODES", "MEAN_COLUMNS",
    "VOCAB_FILE", "MEANS_FILE", "CONFIG_FILE",
]
