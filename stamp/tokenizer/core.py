"""The :class:`GeneTokenizer` class and the helpers that feed it and read its output.

See the package docstring (:mod:`stamp.tokenizer`) for the algorithm and the two modes.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from stamp.constants import CLS_ID, MASK_ID, N_RESERVED, PAD_ID
from stamp.errors import TokenizerError
from stamp.tokenizer.kernels import TARGET_SUM, _encode
from stamp.tokenizer.means import MEAN_COLUMNS, effective_means, load_means_file

logger = logging.getLogger(__name__)

NATIVE_MAX_LENGTH = 1_500
STAMP_V1_MAX_LENGTH = 4_096
STAMP_V1_N_GENES = 20_310
RELEASED = "released"  # the released STAMP tokenizer's rules (was called "stamp-v1", a name it shared with
# the registry entry, the vocabulary preset and the pooling; the old value is still read)
MODES = ("native", RELEASED)
LEGACY_MODES = {"stamp-v1": RELEASED}


def table_to_csr(table: pa.Table | pa.RecordBatch, n_genes: int) -> sp.csr_matrix:
    """Expression rows (``gene_index`` list<int32>, ``counts`` list<float32>) -> CSR float32.

    Thin wrapper over ``spavis.format.rows_to_csr`` (the shard format's own reader).
    """
    from spavis.format import rows_to_csr

    return rows_to_csr(table, n_genes)


def to_model_input_ids(ids: np.ndarray, pad_value: int, context_length: int) -> np.ndarray:
    """Tokenizer output -> model input: first ``context_length`` tokens, padding as PAD=1.

    stamp-v1 rows are padded with 0 (= MASK id); gene tokens are never < 30, so mapping
    ``pad_value`` to PAD is unambiguous.
    """
    out = ids[:, :context_length]
    if pad_value != PAD_ID:
        out = np.where(out == pad_value, np.int32(PAD_ID), out).astype(np.int32, copy=False)
    else:
        out = np.ascontiguousarray(out, dtype=np.int32)
    if out.shape[1] < context_length:
        out = np.pad(out, ((0, 0), (0, context_length - out.shape[1])), constant_values=PAD_ID)
    return out



# ----------------------------------------------------------------------------- tokenizer
class GeneTokenizer:
    """Rank-value tokenizer over a fixed gene vocabulary (see module docstring)."""

    def __init__(
        self,
        gene_ids: Sequence[str],
        means: np.ndarray | Sequence[float],
        *,
        symbols: Sequence[str] | None = None,
        mode: str = "native",
        max_length: int | None = None,
        mean_source: str = "nonzero_mean_cp10k",
        n_threads: int | None = None,
    ) -> None:
        mode = LEGACY_MODES.get(mode, mode)  # tokenizer_config.json files written before the rename
        if mode not in MODES:
            raise TokenizerError(f"unknown tokenizer mode {mode!r}; use one of {', '.join(MODES)}")
        self.gene_ids = [str(g) for g in gene_ids]
        if len(set(self.gene_ids)) != len(self.gene_ids):
            raise TokenizerError("the gene vocabulary has duplicated Ensembl ids; token ids would be ambiguous")
        self.symbols = [str(s) for s in symbols] if symbols is not None else None
        self.raw_means = np.asarray(means, dtype=np.float64).ravel()
        if self.raw_means.shape[0] != len(self.gene_ids):
            raise TokenizerError(
                f"{self.raw_means.shape[0]} gene means for a {len(self.gene_ids)}-gene vocabulary; "
                "give one mean per vocabulary gene, in vocabulary order"
            )
        self.mode = mode
        default_len = STAMP_V1_MAX_LENGTH if mode == RELEASED else NATIVE_MAX_LENGTH
        self.max_length = int(max_length or default_len)
        if self.max_length < 1:
            raise TokenizerError(f"max_length must be >= 1, got {self.max_length}")
        self.mean_source = mean_source
        self.pad_value = 0 if mode == RELEASED else PAD_ID
        self.n_threads = n_threads
        self.means = effective_means(self.raw_means, mode)
        self._id_bits = max(16, int(self.vocab_size).bit_length())
        self._token_ids = np.arange(N_RESERVED, self.vocab_size, dtype=np.uint64)

    # -- properties
    @property
    def n_genes(self) -> int:
        return len(self.gene_ids)

    @property
    def vocab_size(self) -> int:
        """Embedding table size: reserved ids + one id per gene."""
        return self.n_genes + N_RESERVED

    @property
    def pad_token_id(self) -> int:
        return PAD_ID

    mask_token_id = MASK_ID
    cls_token_id = CLS_ID

    def __repr__(self) -> str:
        return (f"GeneTokenizer(n_genes={self.n_genes}, mode={self.mode!r}, max_length={self.max_length}, "
                f"mean_source={self.mean_source!r})")

    # -- constructors
    @classmethod
    def from_genes(
        cls,
        genes: Any,
        *,
        mean: str = "nonzero_mean_cp10k",
        mode: str = "native",
        means: str | os.PathLike | np.ndarray | None = None,
        max_length: int | None = None,
        n_threads: int | None = None,
    ) -> "GeneTokenizer":
        """Build from a genes.parquet frame (``corpus.genes``).

        ``means`` (a file path or array) overrides the ``mean`` column - e.g. the released
        STAMP means file for ``mode="stamp-v1"``. stamp-v1 without a file uses
        ``nonzero_mean_raw`` whatever ``mean`` says (the released means are raw-count means).
        """
        if "ensembl_id" not in genes.columns:
            raise TokenizerError("genes table lacks the 'ensembl_id' column; is it a spavis genes.parquet?")
        gene_ids = genes["ensembl_id"].astype(str).tolist()
        symbols = genes["symbol"].astype(str).tolist() if "symbol" in genes.columns else None
        if means is not None:
            if isinstance(means, (str, os.PathLike)):
                values = load_means_file(means, len(gene_ids))
                source = f"file:{Path(means).name}"
            else:
                values = np.asarray(means, dtype=np.float64)
                source = "array"
        else:
            column = "nonzero_mean_raw" if LEGACY_MODES.get(mode, mode) == RELEASED else mean
            if column not in MEAN_COLUMNS:
                raise TokenizerError(f"unknown mean {column!r}; use one of {', '.join(MEAN_COLUMNS)}")
            if column not in genes.columns:
                raise TokenizerError(f"genes table lacks the {column!r} column; rebuild the shards with spavis build-shards")
            values = genes[column].to_numpy(dtype=np.float64)
            source = column
        return cls(gene_ids, values, symbols=symbols, mode=mode, max_length=max_length,
                   mean_source=source, n_threads=n_threads)

    @classmethod
    def from_corpus(cls, data: Any, **kwargs: Any) -> "GeneTokenizer":
        """Build from a shard directory / Hub dataset id (via spavis.format) or an opened corpus."""
        corpus = data
        if not hasattr(data, "genes"):
            from spavis.format import open_corpus

            corpus = open_corpus(data)
        return cls.from_genes(corpus.genes, **kwargs)

    # -- encoding
    def encode_csr(self, X: sp.spmatrix | np.ndarray, *, return_n_empty: bool = False):
        """Tokenize spots x vocabulary counts -> int32 (n_spots, max_length), padded with ``pad_value``."""
        if not sp.issparse(X):
            X = sp.csr_matrix(np.asarray(X, dtype=np.float32))
        X = X.tocsr()
        if X.shape[1] != self.n_genes:
            raise TokenizerError(
                f"count matrix has {X.shape[1]} genes but the tokenizer vocabulary has {self.n_genes}; "
                "harmonize the data to this vocabulary first"
            )
        data = X.data.astype(np.float32, copy=False)
        has_zeros = False
        if data.size and not (data.min() > 0 and data.max() < np.inf):  # two fast reductions; NaN fails both
            if not np.isfinite(data).all():
                raise TokenizerError("count matrix holds NaN or infinite values; fix the input (spavis QC rejects them)")
            if (data < 0).any():
                raise TokenizerError("count matrix holds negative values; tokenize raw non-negative counts")
            has_zeros = True
        if has_zeros or not X.has_canonical_format:
            X = sp.csr_matrix((data.copy(), X.indices.copy(), X.indptr.copy()), shape=X.shape)  # may be read-only Arrow memory
            X.sum_duplicates()
            X.eliminate_zeros()
            data = X.data.astype(np.float32, copy=False)
        indptr = X.indptr.astype(np.int64, copy=False)
        n = X.shape[0]
        threads = self.n_threads or min(4, os.cpu_count() or 1)
        ids = _encode(data, X.indices.astype(np.int32, copy=False), indptr, self.means, self.max_length,
                      self.pad_value, self._id_bits, threads)
        n_empty = int((np.diff(indptr) == 0).sum())
        if n_empty:
            logger.info("%d of %d spots have no vocabulary gene: tokenized as all-padding rows", n_empty, n)
        return (ids, n_empty) if return_n_empty else ids

    def encode_table(self, table: pa.Table | pa.RecordBatch, *, return_n_empty: bool = False):
        """Tokenize expression rows (``gene_index``/``counts`` list columns) in row order."""
        return self.encode_csr(table_to_csr(table, self.n_genes), return_n_empty=return_n_empty)

    def __call__(self, x: Any, **kwargs: Any):
        if isinstance(x, (pa.Table, pa.RecordBatch)):
            return self.encode_table(x, **kwargs)
        return self.encode_csr(x, **kwargs)

    def decode(self, ids: Sequence[int]) -> list[str]:
        """Token ids -> Ensembl ids (reserved ids become '<mask>', '<pad>', '<cls>' or '<reserved>')."""
        names = {MASK_ID: "<mask>", PAD_ID: "<pad>", CLS_ID: "<cls>"}
        return [self.gene_ids[i - N_RESERVED] if i >= N_RESERVED else names.get(int(i), "<reserved>")
                for i in map(int, ids)]

    # -- persistence
    def config(self) -> dict:
        return {
            "tokenizer_class": "GeneTokenizer",
            "mode": self.mode,
            "max_length": self.max_length,
            "mean_source": self.mean_source,
            "target_sum": TARGET_SUM,
            "n_reserved": N_RESERVED,
            "mask_token_id": MASK_ID,
            "pad_token_id": PAD_ID,
            "cls_token_id": CLS_ID,
            "pad_value": self.pad_value,
            "tie_break": "ascending vocabulary index",
            "n_genes": self.n_genes,
            "vocab_size": self.vocab_size,
            "vocab_sha256": self.vocab_sha256,
        }

    @property
    def vocab_sha256(self) -> str:
        """Checksum of the ordered gene vocabulary (compare models and corpora by content)."""
        from stamp.tokenizer.io import vocabulary_sha256

        return vocabulary_sha256(self.gene_ids)

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write vocab.json, gene_means.safetensors and tokenizer_config.json (see :mod:`stamp.tokenizer.io`)."""
        from stamp.tokenizer.io import save_tokenizer

        return save_tokenizer(self, save_directory)

    @classmethod
    def from_pretrained(
        cls,
        repo_or_dir: str | os.PathLike,
        *,
        revision: str | None = None,
        token: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        **overrides: Any,
    ) -> "GeneTokenizer":
        """Load from a local folder or a Hub model repo id (fails fast when neither is reachable)."""
        from stamp.tokenizer.io import load_tokenizer

        return load_tokenizer(cls, repo_or_dir, revision=revision, token=token, cache_dir=cache_dir, **overrides)
