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
``mode="stamp-v1"``
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

How it is fast
--------------
The order is that of the uint64 key ``(0x7FFFFFFF - float32_bits(v)) << 32 | token_id``:
non-negative float32 bit patterns order like the floats, so ascending keys mean
"descending value, then ascending id". Spots are ordered by nonzero count and cut into
blocks of 64 spots of similar length (nearly dense padded blocks, cache-resident). Per
block, with numba (compiled once, cached on disk, GIL released): a kernel writes 32-bit
keys ``top bits of the value << p | position in the row`` (positions follow vocabulary
order), numpy's SIMD sort (x86-simd-sort) sorts each row, and a second kernel rebuilds the
full 64-bit keys, fixes the rare out-of-order neighbours (values equal in their top bits;
insertion sort, or a full sort of the row when there are many) and writes the ids. Rows
longer than 2 x ``max_length`` instead sort 64-bit keys after ``np.partition`` keeps the
``max_length`` smallest. Blocks run on threads (2-4). Without numba the 64-bit path runs
in numpy (about half the speed, same output). No per-spot Python loop (the numpy fallback
sums non-integer rows one by one to keep the float64 sum exact).

Public API (used by stamp.batching, stamp.data, train/embed and the CLI)
-----------------------------------------------------------------------
``GeneTokenizer(gene_ids, means, *, symbols=None, mode="native", max_length=None,
mean_source=...)``; ``GeneTokenizer.from_genes(genes_df, mean=..., mode=..., means=FILE)``;
``GeneTokenizer.from_corpus(path_or_repo_id, ...)``;
``tok.encode_csr(X) -> np.ndarray[int32] (n_spots, max_length)``;
``tok.encode_table(table_or_record_batch)`` (expression rows: gene_index, counts);
``tok(x)`` dispatches; ``tok.save_pretrained(dir)``; ``GeneTokenizer.from_pretrained(dir_or_repo_id)``;
attributes ``vocab_size``, ``n_genes``, ``pad_value`` (what encode pads with),
``max_length``, ``gene_ids``. Module helpers: :func:`table_to_csr`,
:func:`to_model_input_ids`, :func:`load_means_file`.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from stamp.errors import StampError  # old local name; the base is stamp's own StampError

logger = logging.getLogger(__name__)

MASK_ID = 0
PAD_ID = 1
CLS_ID = 2
N_RESERVED = 30  # gene token id = vocabulary index + N_RESERVED
TARGET_SUM = 10_000.0
NATIVE_MAX_LENGTH = 1_500
STAMP_V1_MAX_LENGTH = 4_096
STAMP_V1_N_GENES = 20_310
MODES = ("native", "stamp-v1")
MEAN_COLUMNS = ("nonzero_mean_cp10k", "nonzero_mean_raw")

VOCAB_FILE = "vocab.json"
MEANS_FILE = "gene_means.safetensors"
CONFIG_FILE = "tokenizer_config.json"
_WIDE = 2  # rows up to this many times max_length take the 32-bit key path
_ROW_CHUNK = 64  # spots per block (of similar length): ~1 MB of keys, cache-resident; thread work unit
_U64_MAX = np.iinfo(np.uint64).max


class TokenizerError(StampError):
    """Bad tokenizer input: means file of the wrong length, unknown mode, negative counts."""


# ----------------------------------------------------------------------------- helpers
def load_means_file(path: str | os.PathLike, n_genes: int | None = None) -> np.ndarray:
    """Read per-gene means (.npy, .csv/.txt one value a line, or .parquet first numeric column).

    The released STAMP means file is a .npy of 20,310 float64 in vocabulary order.
    """
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"means file {path} does not exist; pass the released .npy (or .csv/.txt/.parquet) path")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            values = np.load(path, allow_pickle=False)
        elif suffix in (".csv", ".txt", ".tsv"):
            # one value a line, optionally after a gene column and a header: take the last field
            fields = [ln.replace("\t", ",").split(",")[-1].strip() for ln in path.read_text().splitlines()]
            fields = [f for f in fields if f]
            if fields and not _is_number(fields[0]):
                fields = fields[1:]
            values = np.array([float(f) if f.lower() not in ("nan", "na", "") else np.nan for f in fields])
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            numeric = [f.name for f in table.schema if pa.types.is_floating(f.type) or pa.types.is_integer(f.type)]
            if not numeric:
                raise TokenizerError(f"means file {path} has no numeric column; write one value per vocabulary gene")
            name = "mean" if "mean" in numeric else numeric[0]
            values = table.column(name).to_numpy(zero_copy_only=False)
        else:
            raise TokenizerError(f"means file {path}: unknown extension {suffix!r}; use .npy, .csv, .txt or .parquet")
        values = np.asarray(values, dtype=np.float64).ravel()
    except (ValueError, OSError) as exc:
        raise TokenizerError(f"cannot read means file {path}: {exc}") from exc
    if n_genes is not None and values.shape[0] != n_genes:
        raise TokenizerError(
            f"means file {path} has {values.shape[0]} values but the vocabulary has {n_genes} genes; "
            "it needs one mean per vocabulary gene, in vocabulary order (the released STAMP file has 20,310)"
        )
    return values


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def effective_means(means: np.ndarray, mode: str) -> np.ndarray:
    """Means as float32 divisors: stamp-v1 rounds half-up; NaN/inf/<=0 become 1 in both modes."""
    m = np.asarray(means, dtype=np.float64).copy()
    if mode == "stamp-v1":
        m = np.floor(m + 0.5)
    bad = ~np.isfinite(m) | (m <= 0)
    m[bad] = 1.0
    return m.astype(np.float32)


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


# ----------------------------------------------------------------------------- encoding core
# 64-bit keys: (0x7FFFFFFF - float32_bits(v)) << id_bits | token_id. Non-negative float32
# bit patterns order like the floats, so ascending keys = descending value, then ascending id.
def _pairwise_sum(a: np.ndarray, lo: int, n: int) -> float:
    """numpy's float64 pairwise summation (``x.astype(float64).sum()``), so row sums match it bit for bit."""
    if n < 8:
        res = 0.0
        for i in range(lo, lo + n):
            res += np.float64(a[i])
        return res
    if n <= 128:
        r0, r1, r2, r3 = np.float64(a[lo]), np.float64(a[lo + 1]), np.float64(a[lo + 2]), np.float64(a[lo + 3])
        r4, r5, r6, r7 = np.float64(a[lo + 4]), np.float64(a[lo + 5]), np.float64(a[lo + 6]), np.float64(a[lo + 7])
        i = 8
        stop = n - n % 8
        while i < stop:
            j = lo + i
            r0 += a[j]
            r1 += a[j + 1]
            r2 += a[j + 2]
            r3 += a[j + 3]
            r4 += a[j + 4]
            r5 += a[j + 5]
            r6 += a[j + 6]
            r7 += a[j + 7]
            i += 8
        res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
        while i < n:
            res += a[lo + i]
            i += 1
        return res
    n2 = n // 2
    n2 -= n2 % 8
    return _pairwise_sum(a, lo, n2) + _pairwise_sum(a, lo + n2, n - n2)


def _fill_keys(data, indices, indptr, rows, means, id_bits, block):  # pragma: no cover - compiled
    """Write the sort keys of spots ``rows`` into ``block`` (rows x width), padding with UINT64_MAX."""
    width = block.shape[1]
    one = np.empty(1, np.float32)
    bits = one.view(np.uint32)
    shift = np.uint64(id_bits)
    top = np.uint32(0x7FFFFFFF)
    for r in range(rows.shape[0]):
        a = indptr[rows[r]]
        b = indptr[rows[r] + 1]
        factor = np.float32(10000.0) / np.float32(_pairwise_sum(data, a, b - a))
        for j in range(a, b):
            one[0] = (data[j] * factor) / means[indices[j]]
            block[r, j - a] = (np.uint64(top - bits[0]) << shift) | np.uint64(indices[j] + N_RESERVED)
        for j in range(b - a, width):
            block[r, j] = np.uint64(0xFFFFFFFFFFFFFFFF)


def _take_ids(block, keep, lens, rows, out, id_bits):  # pragma: no cover - compiled
    """Low bits of each row's first min(len, keep) sorted keys -> ``out[rows]`` (already padded)."""
    mask = np.uint64((1 << id_bits) - 1)
    for r in range(rows.shape[0]):
        k = min(lens[r], keep)
        row = out[rows[r]]
        for j in range(k):
            row[j] = np.int32(block[r, j] & mask)


def _position_bits(width: int) -> int:
    """Bits for a position < width, leaving the all-ones key free for padding."""
    bits = 1
    while (1 << bits) <= width:
        bits += 1
    return bits


def _fill_keys32(data, indices, indptr, rows, means, block, ublock):  # pragma: no cover - compiled
    """32-bit keys for rows up to ~2x max_length: ``(u - u_min) >> shift << pbits | position``.

    ``u`` (kept in ``ublock``) is the inverted float32 bit pattern of the value; the key keeps
    its top bits and the position in the row (= ascending gene order), so sorting the keys
    orders the row exactly except among values equal in those top bits, which
    :func:`_take_ids32` then puts right. Half the bytes of the 64-bit keys: a faster SIMD sort.
    """
    width = block.shape[1]
    pbits = _position_bits(width)
    vbits = 32 - pbits
    vals = np.empty(width, np.float32)
    bits = vals.view(np.uint32)
    top = np.uint32(0x7FFFFFFF)
    for r in range(rows.shape[0]):
        a = indptr[rows[r]]
        n = indptr[rows[r] + 1] - a
        factor = np.float32(10000.0) / np.float32(_pairwise_sum(data, a, n))
        for j in range(n):
            vals[j] = (data[a + j] * factor) / means[indices[a + j]]
        urow = ublock[r]
        umin = np.uint32(0xFFFFFFFF)
        umax = np.uint32(0)
        for j in range(n):
            u = top - bits[j]
            urow[j] = u
            umin = min(umin, u)
            umax = max(umax, u)
        span = np.uint32(umax - umin)
        shift = 0
        while (span >> shift) >= (np.uint32(1) << vbits):
            shift += 1
        brow = block[r]
        for j in range(n):
            brow[j] = (((urow[j] - umin) >> shift) << pbits) | np.uint32(j)
        for j in range(n, width):
            brow[j] = np.uint32(0xFFFFFFFF)


def _take_ids32(block, ublock, keep, indices, indptr, rows, out):  # pragma: no cover - compiled
    """Exact order from the sorted 32-bit keys: rebuild full (u, token id) keys, insertion-sort the
    few out-of-order ones (any sort if there are many), write the first ``keep`` ids."""
    pmask = np.uint32((1 << _position_bits(block.shape[1])) - 1)
    full = np.empty(block.shape[1], np.uint64)
    for r in range(rows.shape[0]):
        a = indptr[rows[r]]
        n = indptr[rows[r] + 1] - a
        brow = block[r]
        urow = ublock[r]
        moves = 0
        for j in range(n):
            p = brow[j] & pmask
            x = (np.uint64(urow[p]) << np.uint64(32)) | np.uint64(indices[a + p] + N_RESERVED)
            k = j
            while k > 0 and full[k - 1] > x:
                full[k] = full[k - 1]
                k -= 1
            full[k] = x
            moves += j - k
            if moves > 4 * n:
                break
        if moves > 4 * n:  # many near-equal values: a plain O(n log n) sort instead
            for j in range(n):
                p = brow[j] & pmask
                full[j] = (np.uint64(urow[p]) << np.uint64(32)) | np.uint64(indices[a + p] + N_RESERVED)
            full[:n].sort()
        row = out[rows[r]]
        for j in range(min(n, keep)):
            row[j] = np.int32(full[j] & np.uint64(0xFFFFFFFF))


_KERNELS: list = []


def _numba_kernels():
    """Compile (or load from numba's on-disk cache) the two kernels on first use; None without numba."""
    if not _KERNELS:
        try:
            import numba
        except ImportError:
            _KERNELS.append(None)
        else:
            try:  # cache=True needs a writable cache folder (next to this file or the user's cache)
                jit = numba.njit(cache=True, nogil=True, error_model="numpy")
                pairwise = jit(_pairwise_sum)
            except RuntimeError:
                jit = numba.njit(nogil=True, error_model="numpy")
                pairwise = jit(_pairwise_sum)
            g = globals()  # the kernels resolve these by global name
            g["_pairwise_sum"] = pairwise
            g["_position_bits"] = jit(_position_bits)
            _KERNELS.append((jit(_fill_keys), jit(_take_ids), jit(_fill_keys32), jit(_take_ids32)))
    return _KERNELS[0]


def _exact_row_sums(data: np.ndarray, indptr: np.ndarray) -> np.ndarray:
    """Row sums equal to ``row.astype(float64).sum()`` (numpy fallback path).

    For integer counts every partial sum is exact, so a segmented sum gives the same bits;
    otherwise sum row by row with numpy's own reduction.
    """
    lens = np.diff(indptr)
    if data.size == 0:
        return np.zeros(len(lens))
    if np.array_equal(data, np.floor(data)) and float(data.sum(dtype=np.float64)) < 2.0**53:
        sums = np.add.reduceat(data, np.minimum(indptr[:-1], data.size - 1), dtype=np.float64)
        sums[lens == 0] = 0.0  # reduceat repeats a neighbour's value for empty rows
        return sums
    return np.array([data[a:b].astype(np.float64).sum() for a, b in zip(indptr[:-1], indptr[1:])])


def _fill_keys_numpy(values_bits, indices, indptr, rows, id_bits, block):
    """numpy twin of :func:`_fill_keys` given the float32 value bits of every nonzero."""
    n, width = block.shape
    lens = indptr[rows + 1] - indptr[rows]
    seg = np.cumsum(lens) - lens
    pos = np.arange(int(lens.sum()), dtype=np.int64)
    src = np.repeat(indptr[rows] - seg, lens) + pos
    dst = np.repeat(np.arange(n, dtype=np.int64) * width - seg, lens) + pos
    keys = (np.uint32(0x7FFFFFFF) - values_bits[src]).astype(np.uint64)
    keys <<= np.uint64(id_bits)
    keys |= indices[src].astype(np.uint64) + np.uint64(N_RESERVED)
    flat = block.reshape(-1)
    flat.fill(_U64_MAX)
    flat[dst] = keys


def _take_ids_numpy(block, keep, lens, rows, out, id_bits, pad_value):
    """numpy twin of :func:`_take_ids`."""
    ids = (block[:, :keep] & np.uint64((1 << id_bits) - 1)).astype(np.int32)
    ids[np.arange(keep)[None, :] >= lens[:, None]] = pad_value
    out[rows, :keep] = ids


def _encode(data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, means: np.ndarray, max_length: int,
            pad_value: int, id_bits: int, n_threads: int, use_numba: bool = True) -> np.ndarray:
    """Tokenize canonical CSR parts (no explicit zeros, sorted indices) -> int32 (n, max_length).

    Rows are ordered by length and cut into blocks of similar length, so each block's padded
    key array is nearly dense. Per block (see the module docstring): 32-bit keys, row sort,
    exact fix-up (numba, rows up to ``_WIDE * max_length``), or 64-bit keys, ``np.partition``
    to the ``max_length`` smallest when rows are longer, row sort, ids (numba or numpy).
    """
    n = indptr.shape[0] - 1
    out = np.full((n, max_length), pad_value, dtype=np.int32)
    lens = np.diff(indptr)
    order = np.argsort(lens, kind="stable")
    first = int(np.searchsorted(lens[order], 1))  # empty rows stay all-padding
    kernels = _numba_kernels() if use_numba else None
    if kernels is None:
        sums = _exact_row_sums(data, indptr)
        sums[lens == 0] = 1.0
        factor = np.float32(TARGET_SUM) / sums.astype(np.float32)
        values = data * np.repeat(factor, lens)
        values /= means[indices]
        bits = values.view(np.uint32)

    def block(start: int) -> None:
        rows = order[start:start + _ROW_CHUNK]
        row_lens = lens[rows]
        width = int(row_lens[-1])
        if kernels is not None and width <= _WIDE * max_length:
            keys32 = np.empty((rows.shape[0], width), dtype=np.uint32)
            ublock = np.empty((rows.shape[0], width), dtype=np.uint32)
            kernels[2](data, indices, indptr, rows, means, keys32, ublock)
            keys32.sort(axis=1)
            kernels[3](keys32, ublock, max_length, indices, indptr, rows, out)
            return
        keys = np.empty((rows.shape[0], width), dtype=np.uint64)
        if kernels is not None:
            kernels[0](data, indices, indptr, rows, means, id_bits, keys)
        else:
            _fill_keys_numpy(bits, indices, indptr, rows, id_bits, keys)
        keep = min(width, max_length)
        if width > keep:  # only the `keep` smallest keys matter: select them in place, sort those
            keys.partition(keep - 1, axis=1)
            keys[:, :keep].sort(axis=1)
        else:
            keys.sort(axis=1)
        if kernels is not None:
            kernels[1](keys, keep, row_lens, rows, out, id_bits)
        else:
            _take_ids_numpy(keys, keep, row_lens, rows, out, id_bits, pad_value)

    starts = range(first, n, _ROW_CHUNK)
    if n_threads > 1 and len(starts) > 1:
        with ThreadPoolExecutor(min(n_threads, len(starts))) as pool:
            list(pool.map(block, starts))
    else:
        for s in starts:
            block(s)
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
        default_len = STAMP_V1_MAX_LENGTH if mode == "stamp-v1" else NATIVE_MAX_LENGTH
        self.max_length = int(max_length or default_len)
        if self.max_length < 1:
            raise TokenizerError(f"max_length must be >= 1, got {self.max_length}")
        self.mean_source = mean_source
        self.pad_value = 0 if mode == "stamp-v1" else PAD_ID
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
            column = "nonzero_mean_raw" if mode == "stamp-v1" else mean
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
        }

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write vocab.json, gene_means.safetensors and tokenizer_config.json (each atomically).

        The means are a float64 safetensors tensor ``mean`` (exact, NaN kept) with the
        Ensembl ids / symbols in its metadata: huggingface_hub flags .parquet files in model
        repos as data files, safetensors it does not. A legacy gene_means.parquet in the
        folder is removed so a folder holds one means file.
        """
        from safetensors.numpy import save_file

        means_file, legacy_file = "gene_means.safetensors", "gene_means.parquet"
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        vocab = {"<mask>": MASK_ID, "<pad>": PAD_ID, "<cls>": CLS_ID}
        vocab.update({g: i + N_RESERVED for i, g in enumerate(self.gene_ids)})
        metadata = {"format": "stamp.gene_means.v1", "ensembl_id": json.dumps(self.gene_ids)}
        if self.symbols is not None:
            metadata["symbol"] = json.dumps(self.symbols)
        tensors = {"mean": np.ascontiguousarray(self.raw_means, dtype=np.float64)}

        def write(name: str, writer) -> None:
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=out)
            os.close(fd)
            try:
                writer(tmp)
                os.replace(tmp, out / name)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise

        write(VOCAB_FILE, lambda p: Path(p).write_text(json.dumps(vocab, indent=0) + "\n"))
        write(means_file, lambda p: save_file(tensors, p, metadata=metadata))
        write(CONFIG_FILE, lambda p: Path(p).write_text(json.dumps(self.config(), indent=2) + "\n"))
        (out / legacy_file).unlink(missing_ok=True)
        return out

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
        """Load from a local folder or a Hub model repo id (huggingface_hub.snapshot_download).

        Reads gene_means.safetensors, or gene_means.parquet of folders saved before it.
        """
        means_file, legacy_file = "gene_means.safetensors", "gene_means.parquet"
        path = Path(repo_or_dir)
        if not path.is_dir():
            if path.exists() or str(repo_or_dir).count("/") != 1:
                raise TokenizerError(f"{repo_or_dir} is neither a tokenizer folder nor a Hub repo id (ORG/NAME)")
            from huggingface_hub import snapshot_download
            from huggingface_hub.errors import HfHubHTTPError

            try:
                path = Path(snapshot_download(str(repo_or_dir), revision=revision, token=token, cache_dir=cache_dir,
                                              allow_patterns=[VOCAB_FILE, means_file, legacy_file, CONFIG_FILE]))
            except (HfHubHTTPError, OSError, ValueError) as exc:
                raise TokenizerError(f"cannot download the tokenizer of {repo_or_dir} from the Hub: {exc}") from exc
        means_path = path / means_file if (path / means_file).is_file() else path / legacy_file
        missing = [n for n in (VOCAB_FILE, means_path.name, CONFIG_FILE) if not (path / n).is_file()]
        if missing:
            raise TokenizerError(f"{path} lacks {', '.join(missing)}; save it with GeneTokenizer.save_pretrained")
        config = json.loads((path / CONFIG_FILE).read_text())
        vocab = json.loads((path / VOCAB_FILE).read_text())
        genes = sorted(((i, g) for g, i in vocab.items() if i >= N_RESERVED))
        gene_ids = [g for _, g in genes]
        if [i for i, _ in genes] != list(range(N_RESERVED, N_RESERVED + len(gene_ids))):
            raise TokenizerError(f"{path / VOCAB_FILE}: gene token ids are not contiguous from {N_RESERVED}")
        try:
            if means_path.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(means_path), framework="np") as f:
                    meta = f.metadata() or {}
                    means = f.get_tensor("mean")
                order = json.loads(meta["ensembl_id"])
                symbols = json.loads(meta["symbol"]) if "symbol" in meta else None
            else:
                import pyarrow.parquet as pq

                table = pq.read_table(means_path)
                order, means = table.column("ensembl_id").to_pylist(), table.column("mean").to_numpy()
                symbols = table.column("symbol").to_pylist() if "symbol" in table.column_names else None
        except (KeyError, ValueError, OSError, json.JSONDecodeError) as exc:
            raise TokenizerError(f"cannot read {means_path} ({type(exc).__name__}: {exc}); "
                                 "save the tokenizer again with GeneTokenizer.save_pretrained") from exc
        if order != gene_ids:
            raise TokenizerError(f"{means_path} is not in the order of {path / VOCAB_FILE}")
        kwargs = dict(mode=config.get("mode", "native"), max_length=config.get("max_length"),
                      mean_source=config.get("mean_source", "nonzero_mean_cp10k"))
        kwargs.update(overrides)
        return cls(gene_ids, means, symbols=symbols, **kwargs)
