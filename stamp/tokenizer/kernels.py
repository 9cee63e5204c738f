"""Encoding core of the rank-value tokenizer: spots x genes CSR -> int32 token ids.

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
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from stamp.constants import N_RESERVED

TARGET_SUM = 10_000.0
_WIDE = 2  # rows up to this many times max_length take the 32-bit key path
_ROW_CHUNK = 64  # spots per block (of similar length): ~1 MB of keys, cache-resident; thread work unit
_U64_MAX = np.iinfo(np.uint64).max


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

