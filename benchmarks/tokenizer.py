"""Tokenizer throughput: stamp.GeneTokenizer vs a plain per-spot loop of Algorithm 1, same data, same run.

Data are GENERATED (not real): spots over the 20,310-gene STAMP vocabulary size with about
``--nnz`` (default 2,000) nonzero genes each, integer counts from a heavy-tailed
distribution, per-gene means drawn from a gamma distribution. The baseline is Algorithm 1
as written, one spot at a time: take the spot's nonzero genes, scale to 10,000, divide by
the means, rank descending (stable sort, ties by vocabulary index), keep 1,500, pad; it
already uses numpy within each spot. Both produce identical ids (checked).

    python benchmarks/tokenizer.py [--spots 4000] [--nnz 2000] [--threads N] [--repeats 5] [--dense]

Each repetition times the loop once, then runs each faster variant repeatedly for about as
long (mean throughput over that window), so load changes on a shared machine hit all alike;
a repetition's ratio compares runs seconds apart.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stamp.tokenizer import PAD_ID, GeneTokenizer  # noqa: E402
from stamp.tokenizer.kernels import _encode  # noqa: E402

N_GENES = 20_310


def generate(n_spots: int, nnz: int, seed: int = 0) -> tuple[sp.csr_matrix, np.ndarray]:
    rng = np.random.default_rng(seed)
    lens = np.clip(rng.normal(nnz, nnz * 0.15, n_spots).astype(int), 1, N_GENES)
    indptr = np.r_[0, np.cumsum(lens)]
    # sorted distinct genes per spot: random keys, take the smallest `len` per row
    indices = np.concatenate([np.sort(rng.choice(N_GENES, k, replace=False)) for k in lens]).astype(np.int32)
    data = (rng.geometric(0.45, indptr[-1]) + (rng.random(indptr[-1]) < 0.02) * rng.integers(5, 80, indptr[-1]))
    X = sp.csr_matrix((data.astype(np.float32), indices, indptr), shape=(n_spots, N_GENES))
    means = rng.gamma(2.0, 1.2, N_GENES) + 1.0
    return X, means


def per_spot_loop(X: sp.csr_matrix, means: np.ndarray, max_length: int = 1500) -> np.ndarray:
    """Algorithm 1 as written, one spot at a time."""
    m = means.astype(np.float32)
    out = np.full((X.shape[0], max_length), PAD_ID, dtype=np.int32)
    for i in range(X.shape[0]):
        a, b = X.indptr[i], X.indptr[i + 1]
        genes, x = X.indices[a:b], X.data[a:b]
        if genes.size == 0:
            continue
        x = x * (np.float32(10_000) / np.float32(x.astype(np.float64).sum()))
        v = x / m[genes]
        order = np.argsort(-v, kind="stable")[:max_length]  # ties: ascending vocabulary index
        out[i, : order.size] = genes[order] + 30
    return out


def per_spot_dense_loop(X: sp.csr_matrix, means: np.ndarray, max_length: int = 1500) -> np.ndarray:
    """The same, starting from each spot's dense expression vector (the released tokenizer's pattern)."""
    m = means.astype(np.float32)
    out = np.full((X.shape[0], max_length), PAD_ID, dtype=np.int32)
    for i in range(X.shape[0]):
        row = X[i].toarray().ravel()
        genes = np.flatnonzero(row)
        if genes.size == 0:
            continue
        x = row[genes]
        x = x * (np.float32(10_000) / np.float32(x.astype(np.float64).sum()))
        order = np.argsort(-(x / m[genes]), kind="stable")[:max_length]
        out[i, : order.size] = genes[order] + 30
    return out


def numpy_only(tok: GeneTokenizer, X: sp.csr_matrix) -> np.ndarray:
    """GeneTokenizer's numpy fallback (what runs where numba is not installed)."""
    return _encode(X.data, X.indices, X.indptr.astype(np.int64), tok.means, tok.max_length, tok.pad_value,
                   tok._id_bits, tok.n_threads or min(4, os.cpu_count() or 1), use_numba=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spots", type=int, default=4000)
    ap.add_argument("--nnz", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=None, help="tokenizer threads (default: min(4, cores))")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dense", action="store_true", help="also time the per-spot loop over dense spot vectors")
    args = ap.parse_args()
    X, means = generate(args.spots, args.nnz)
    ids = [f"G{i}" for i in range(N_GENES)]
    tok = GeneTokenizer(ids, means, mean_source="generated", n_threads=args.threads)
    tok1 = GeneTokenizer(ids, means, mean_source="generated", n_threads=1)
    fns = {"loop": lambda: per_spot_loop(X, means), "ours": lambda: tok.encode_csr(X),
           "ours_1t": lambda: tok1.encode_csr(X), "numpy": lambda: numpy_only(tok, X)}
    if args.dense:
        fns["dense"] = lambda: per_spot_dense_loop(X, means)
    tok.encode_csr(X[:10])  # compile / load the numba kernels outside the timings
    n = X.shape[0]
    threads = args.threads or min(4, os.cpu_count() or 1)
    print(f"generated data: {n} spots x {N_GENES} genes, {X.nnz / n:.0f} nonzero genes/spot, "
          f"{os.cpu_count()} cores, tokenizer threads {threads}; spots/s per repetition (interleaved):")
    print(f"{'rep':>3} {'loop':>8} {'ours':>8} {'1 thread':>8} {'numpy':>8} {'ratio':>6}")
    ref, rates, cpu_us = None, {k: [] for k in fns}, {k: [] for k in fns}
    for rep in range(args.repeats):
        window = None
        for k, fn in fns.items():
            runs, t, cpu = 0, time.perf_counter(), time.process_time()
            while True:  # the fast variants repeat over about the loop's duration: same load window
                got = fn()
                runs += 1
                elapsed = time.perf_counter() - t
                if window is None or elapsed >= window:
                    break
            window = window or elapsed
            rates[k].append(runs * n / elapsed)
            cpu_us[k].append((time.process_time() - cpu) / (runs * n) * 1e6)
            if ref is None:
                ref = got
            assert np.array_equal(got, ref), f"{k} differs from the per-spot loop"
        print(f"{rep + 1:>3} {rates['loop'][-1]:8.0f} {rates['ours'][-1]:8.0f} {rates['ours_1t'][-1]:8.0f} "
              f"{rates['numpy'][-1]:8.0f} {rates['ours'][-1] / rates['loop'][-1]:5.1f}x")
    med = {k: float(np.median(v)) for k, v in rates.items()}
    ratios = np.array(rates["ours"]) / np.array(rates["loop"])
    print("outputs identical to the per-spot loop: yes")
    print(f"median spots/s: per-spot loop (Algorithm 1 as written) {med['loop']:.0f}; GeneTokenizer {med['ours']:.0f} "
          f"({threads} threads), {med['ours_1t']:.0f} (1 thread), {med['numpy']:.0f} (numpy fallback)")
    if args.dense:
        print(f"per-spot loop over dense spot vectors: {med['dense']:.0f} spots/s")
    print(f"ratio GeneTokenizer / per-spot loop: median {np.median(ratios):.1f}x, range {ratios.min():.1f}-{ratios.max():.1f}x "
          f"(goal >= 6x on 2 cores); 1 thread: median {np.median(np.array(rates['ours_1t']) / rates['loop']):.1f}x")
    loop_cpu, one_cpu = float(np.median(cpu_us["loop"])), float(np.median(cpu_us["ours_1t"]))
    print(f"CPU time per spot (less sensitive to other jobs): loop {loop_cpu:.0f} us, GeneTokenizer 1 thread "
          f"{one_cpu:.0f} us ({loop_cpu / one_cpu:.1f}x less)")


if __name__ == "__main__":
    main()
