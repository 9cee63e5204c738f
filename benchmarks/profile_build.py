"""Where a 1-worker `build_shards` spends its wall time, step by step (py-spy samples of the main thread).

Runs ``build_shards`` with ``--workers 1`` (everything in one process, so the main thread's
samples, idle ones included, add up to the wall time) under ``py-spy record`` and attributes
each sample to the innermost build step on its stack. GENERATED slices (``spavis.simulate``,
seed 1000 + i as in build_shards.py), not real data. ``--tree DIR`` profiles the spavis of
another checkout (e.g. a ``git worktree`` of an earlier commit) for a before/after table.

    pip install py-spy
    python benchmarks/profile_build.py --slides 20 --max-spots-per-shard 8000
    python benchmarks/profile_build.py --slides 20 --max-spots-per-shard 8000 --tree ../before
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _generated import generated_slices  # benchmarks/_generated.py

HERE = Path(__file__).resolve()
# (label, frame pattern, a frame that must be on the stack too): a sample counts for the first label
# whose function is on its stack, searching from the innermost frame out (nested steps count once).
_M = r"^(\w+\.)?"  # functions show as name or Class.name
STEPS = [
    ("h5 count matrix decode", _M + r"(read_1d|__getitem__) ", r"^read_slice "),
    ("read input (rest: features, positions, image)", _M + r"read_slice ", None),
    ("harmonize", _M + r"harmonize ", None),
    ("QC", _M + r"_qc ", None),
    ("spatial graph", _M + r"spatial_graph ", None),
    ("per-slide gene sums", _M + r"(gene_stats_table|_gene_stats) ", None),
    ("Zarr store write", _M + r"(_write_zarr|write_zarr_store) ", None),
    ("Zarr store hash", _M + r"tree_sha256 ", r"^prepare_slice "),
    ("rows file (spots.arrow)", _M + r"(write_rows|_rows_table) ", None),
    ("prepare (rest)", _M + r"prepare_slice ", None),
    ("Parquet encode + write", r"^ParquetWriter\.write_table ", r"^write_shard "),
    ("Zarr X read-back", _M + r"read_zarr_csr ", None),
    ("shard hash", _M + r"file_sha256 ", r"^write_shard "),
    ("shard (rest)", _M + r"write_shard ", None),
    ("input hashing", _M + r"hash_inputs? ", None),
    ("link / move stores", _M + r"(_link_or_copy_tree|_move_stores) ", None),
    ("genes, slides, card, figure", _M + r"(write_summary_files|_write_summary_files|prepare_commit) ", None),
    ("manifest + publish", _M + r"(_write_manifest|_publish|publish_dir) ", None),
    ("work dir removal", _M + r"rmtree ", None),
    ("imports", r"^_find_and_load ", None),
]


def attribute(raw: Path, n_slides: int, rate: int) -> list[tuple[str, float, float]]:
    """(step, seconds per slide, share) from py-spy's raw output (``--threads``, main thread only)."""
    per_thread: collections.Counter = collections.Counter()
    lines = []
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        lines.append((frames, int(count)))
        per_thread[frames[0]] += int(count)
    main = next((t for t in per_thread if "MainThread" in t), per_thread.most_common(1)[0][0])
    steps = [(label, re.compile(pat), re.compile(within) if within else None) for label, pat, within in STEPS]
    totals: collections.Counter = collections.Counter()
    total = 0
    for frames, count in lines:
        if frames[0] != main:
            continue
        total += count
        label = "other"
        for frame in reversed(frames[1:]):
            hit = next((lab for lab, pat, within in steps if pat.search(frame)
                        and (within is None or any(within.search(f) for f in frames[1:]))), None)
            if hit:
                label = hit
                break
        totals[label] += count
    return [(label, totals[label] / rate / n_slides, totals[label] / (total or 1))
            for label in [*(s[0] for s in STEPS), "other"] if totals[label]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=20)
    ap.add_argument("--max-spots-per-shard", type=int, default=None)
    ap.add_argument("--rate", type=int, default=100, help="py-spy samples per second (default 100).")
    ap.add_argument("--tree", type=Path, help="Profile the spavis of this checkout instead.")
    ap.add_argument("--keep", type=Path, help="Keep generated inputs here (reused by later runs).")
    ap.add_argument("--_build", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--_out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._build is not None:  # inside py-spy
        from spavis.shards import BuildConfig, build_shards

        build_shards(args._build, args._out, BuildConfig.from_settings(max_spots_per_shard=args.max_spots_per_shard))
        return 0
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        raise SystemExit("py-spy is not installed: pip install py-spy")
    work = args.keep or Path(tempfile.mkdtemp(prefix="spavis-profile-"))
    try:
        inputs = [str(p) for p in generated_slices(work / "inputs", args.slides)]
        out, raw = work / "profiled_corpus", work / "profile.txt"
        shutil.rmtree(out, ignore_errors=True)
        env = dict(os.environ, **({"PYTHONPATH": str(args.tree.resolve())} if args.tree else {}))
        cmd = [spy, "record", "--idle", "--threads", "-r", str(args.rate), "-f", "raw", "-o", str(raw), "--",
               sys.executable, str(HERE), "--_out", str(out),
               *(["--max-spots-per-shard", str(args.max_spots_per_shard)] if args.max_spots_per_shard else []),
               "--_build", *inputs]
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        rows = attribute(raw, args.slides, args.rate)
        print(f"{args.slides} GENERATED slides, 1 worker, {'spavis from ' + str(args.tree) if args.tree else 'this spavis'}"
              f": {wall:.1f} s under py-spy (load {os.getloadavg()[0]:.1f})")
        print("| step | s per slide | share of wall |")
        print("|---|---:|---:|")
        for label, seconds, share in rows:
            print(f"| {label} | {seconds:.3f} | {share:.0%} |")
        print(f"| total | {sum(r[1] for r in rows):.3f} | 100% |")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
