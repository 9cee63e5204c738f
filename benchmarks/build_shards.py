"""Benchmark `spavis build-shards` against two same-run baselines.

Baselines, both single-process:
- scanpy: ``scanpy.read_visium`` per slice + ``anndata.concat`` + ``write_h5ad`` (the path
  users take today: no gene harmonization, QC or neighbour graph, every slide in memory);
- lower bound: ``h5py`` reads each slice's count matrix and ``pyarrow`` writes the same
  expression columns (spot_id, slide_id, barcode, spot_index, gene_index, counts,
  total_counts, n_genes) with the same codec and level as spavis's expression files (zstd 1,
  1,024-row groups, dictionary on strings) and pyarrow's default encodings: the I/O and
  encoding floor of a plain builder. spavis also delta-encodes gene_index and byte-stream-splits counts
  (spavis.format.schema.EXPRESSION_COLUMN_ENCODING: smaller files, faster writes and reads,
  benchmarks/parquet_encodings.py), which the lower bound does not.
spavis: ``build_shards`` (read, harmonize to stamp-v1, QC, k-NN graph, Parquet + Zarr,
manifest with sha256) with one worker, and again with ``--workers N`` (default 2).

Targets (issue 11): 1 worker >= 0.5x the lower bound; N=2 workers >= 1.6x 1 worker on 2
free cores. Memory: "tree" = peak of the summed RSS of the process and all its children
(sampled every 50 ms; psutil, else /proc), "largest" = the largest single process
(``ru_maxrss``). Inputs are GENERATED Visium slices (``spavis.simulate``), not real data.
Each case runs in its own subprocess. Other load on the machine skews the speeds (the CPU-seconds
ratio, user+sys of the case and its workers, much less so): the 1-minute load average is printed
with each row, and ``--repeat N`` runs the cases N times, interleaved, and keeps each case's
fastest run (the lower bound gets the same chance as spavis).

    python benchmarks/build_shards.py                # 1, 10 and 50 slices, spavis with 1 and 2 workers
    python benchmarks/build_shards.py --workers 4    # parallel case with 4 workers (0: skip it)
    python benchmarks/build_shards.py --quick        # 1 and 3 small slices
    python benchmarks/build_shards.py --sizes 4 --workers 2 --json out.json
    python benchmarks/build_shards.py --sizes 8 --max-spots-per-shard 8000   # several files: --workers scaling
    python benchmarks/build_shards.py --sizes 8 --max-spots-per-shard 8000 --repeat 3   # best of 3 per case
    python benchmarks/build_shards.py --sizes 6 20 --max-spots-per-shard 8000 --before ../old-checkout
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _generated import generated_slices  # benchmarks/_generated.py
from _measure import run_measured  # benchmarks/_measure.py

HERE = Path(__file__).resolve()


def _generate(folder: Path, n: int, tissue_fraction: float | None) -> list[Path]:
    """n generated slices (Space Ranger layout); a hires image copy lets scanpy.read_visium load it."""
    out = generated_slices(folder, n, tissue_fraction=tissue_fraction)
    for d in out:
        spatial = d / "spatial"
        if not (spatial / "tissue_hires_image.png").exists():
            shutil.copyfile(spatial / "tissue_lowres_image.png", spatial / "tissue_hires_image.png")
    return out


def _case_spavis(inputs: list[str], out: str, workers: int, max_spots: int | None = None) -> dict:
    import spavis.genes  # noqa: F401  (imports outside the timed region, as for the baseline)
    import spavis.readers  # noqa: F401
    from spavis.shards import BuildConfig, build_shards

    t0 = time.perf_counter()
    # the build-shards defaults (a smaller shard size only when asked)
    build_shards(inputs, out, BuildConfig.from_settings(max_spots_per_shard=max_spots), workers=workers)
    wall = time.perf_counter() - t0
    manifest = json.loads((Path(out) / "manifest.json").read_text())
    return {"wall_s": wall, "spots_in": manifest["summary"]["n_spots_input"],
            "spots_out": manifest["summary"]["n_spots"]}


def _case_lower_bound(inputs: list[str], out: str) -> dict:
    """h5py read + pyarrow write of the expression columns: the floor of any builder."""
    import h5py
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from spavis.format import schema as S

    t0 = time.perf_counter()
    Path(out).mkdir(parents=True, exist_ok=True)
    fields = ["spot_id", "slide_id", "barcode", "spot_index", "gene_index", "counts", "total_counts", "n_genes"]
    schema = pa.schema([S.EXPRESSION_SCHEMA.field(f) for f in fields])
    # the same codec and level as spavis's expression files, pyarrow's default encodings
    options = dict(S.PARQUET_WRITE_OPTIONS, use_dictionary=["spot_id", "slide_id", "barcode"],
                   compression_level=S.EXPRESSION_COMPRESSION_LEVEL)
    n_spots = 0
    with pq.ParquetWriter(Path(out) / "part-00000.parquet", schema, **options) as writer:
        for path in inputs:
            sid = Path(path).name
            with h5py.File(Path(path) / "filtered_feature_bc_matrix.h5", "r") as f:
                m = f["matrix"]
                data = m["data"][:].astype(np.float32)
                indices = m["indices"][:].astype(np.int32)
                indptr = m["indptr"][:].astype(np.int64)
                barcodes = [b.decode() for b in m["barcodes"][:]]
            n = len(barcodes)
            totals = np.add.reduceat(data, indptr[:-1]) if data.size else np.zeros(n, np.float32)
            totals[np.diff(indptr) == 0] = 0
            for a in range(0, n, S.ROW_GROUP_SIZE):
                b = min(n, a + S.ROW_GROUP_SIZE)
                off = pa.array((indptr[a: b + 1] - indptr[a]).astype(np.int32))
                lo, hi = int(indptr[a]), int(indptr[b])
                cols = [pa.array([f"{sid}:{x}" for x in barcodes[a:b]], pa.string()), pa.array([sid] * (b - a)),
                        pa.array(barcodes[a:b], pa.string()), pa.array(np.arange(a, b, dtype=np.int32)),
                        pa.ListArray.from_arrays(off, pa.array(indices[lo:hi])),
                        pa.ListArray.from_arrays(off, pa.array(data[lo:hi])),
                        pa.array(totals[a:b].astype(np.float32)), pa.array(np.diff(indptr[a: b + 1]).astype(np.int32))]
                writer.write_table(pa.Table.from_arrays(cols, schema=schema), row_group_size=S.ROW_GROUP_SIZE)
            n_spots += n
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "spots_in": n_spots, "spots_out": n_spots}


def _case_baseline(inputs: list[str], out: str) -> dict:
    import warnings

    import anndata as ad
    import scanpy as sc

    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    slides = []
    for path in inputs:
        a = sc.read_visium(path)
        a.var_names_make_unique()
        slides.append(a)
    merged = ad.concat(slides, label="slide_id", keys=[Path(p).name for p in inputs], index_unique=":",
                       uns_merge="unique")
    merged.write_h5ad(out)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "spots_in": int(merged.n_obs), "spots_out": int(merged.n_obs)}


def _run_case(case: str, inputs: list[Path], out: Path, workers: int, max_spots: int | None = None,
              tree: Path | None = None) -> dict:
    """Run one case in a fresh interpreter (``--_case``); its timing, peak RSS (MiB) and CPU seconds.

    ``tree``: import spavis from this checkout instead (``--before``)."""
    if out.is_dir():  # a kept earlier run: the build would be a no-op
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()
    cmd = [sys.executable, str(HERE), "--_case", case, "--_out", str(out), "--workers", str(workers),
           *(["--max-spots-per-shard", str(max_spots)] if max_spots else []), "--_inputs", *map(str, inputs)]
    env = None if tree is None else dict(os.environ, PYTHONPATH=str(tree))
    result = run_measured(cmd, env=env)
    result["spots_per_s"] = result["spots_in"] / result["wall_s"]
    result["workers"] = workers if case == "spavis" else 1
    return result


def _format_row(row: dict, workers: int) -> str:
    """One markdown table row: spots/s, ratios against the same-run baselines, memory."""
    base, low, one = row["baseline"], row["lower_bound"], row["spavis"]
    cells = [f"{row['n_slides']}", f"{base['spots_in']:,}",
             f"{base['spots_per_s']:,.0f}", f"{low['spots_per_s']:,.0f}",
             f"{one['spots_per_s']:,.0f} (x{one['spots_per_s'] / low['spots_per_s']:.2f} lower bound, "
             f"x{one['spots_per_s'] / base['spots_per_s']:.2f} scanpy)"]
    par = row.get("spavis_parallel")
    if par:
        cells.append(f"{par['spots_per_s']:,.0f} (x{par['spots_per_s'] / one['spots_per_s']:.2f} 1 worker)")
    before = row.get("spavis_before")
    if before:
        cells.append(f"{before['spots_per_s']:,.0f} (x{before['spots_per_s'] / low['spots_per_s']:.2f} lower bound)")
    mem = [f"{r['tree_rss_mib']:,.0f}/{r['peak_rss_mib']:,.0f}" for r in (base, low, one, par, before) if r]
    cpu = f"x{low['cpu_s'] / one['cpu_s']:.2f}"  # 1 worker vs lower bound, in CPU seconds per spot
    cells += [" ".join(mem), cpu, f"{row['load_avg_1min']:.1f}"]
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 and 3 small slices (a smoke run).")
    ap.add_argument("--sizes", type=int, nargs="*", help="Slide counts (default 1 10 50; --quick: 1 3).")
    ap.add_argument("--workers", type=int, default=2,
                    help="Workers of the parallel spavis case (default 2; 0 or 1: only the 1-worker case).")
    ap.add_argument("--max-spots-per-shard", type=int, default=None,
                    help="spavis cases only (default: the build-shards default, 50,000). A corpus smaller than "
                         "one shard ends with one file encoded by one worker, so use a smaller value to see "
                         "how --workers scales on a few slides.")
    ap.add_argument("--repeat", type=int, default=1,
                    help="Run every case this many times, interleaved, and report each case's fastest run "
                         "(as timeit does: other load only ever slows a run down). Default 1.")
    ap.add_argument("--before", type=Path,
                    help="Also run spavis with 1 worker from this checkout (e.g. a `git worktree` of an earlier "
                         "commit): before/after in the same run.")
    ap.add_argument("--keep", type=Path, help="Keep generated inputs and outputs here.")
    ap.add_argument("--json", type=Path, help="Also write the results as JSON.")
    ap.add_argument("--_case", help=argparse.SUPPRESS)
    ap.add_argument("--_out", help=argparse.SUPPRESS)
    ap.add_argument("--_inputs", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._case:  # inside the measured subprocess
        if args._case == "spavis":
            res = _case_spavis(args._inputs, args._out, args.workers, args.max_spots_per_shard)
        elif args._case == "lower_bound":
            res = _case_lower_bound(args._inputs, args._out)
        else:
            res = _case_baseline(args._inputs, args._out)
        print(json.dumps(res))
        return 0

    sizes = args.sizes or ([1, 3] if args.quick else [1, 10, 50])
    tissue_fraction = 0.15 if args.quick else None
    work = args.keep or Path(tempfile.mkdtemp(prefix="spavis-bench-"))
    rows = []
    try:
        all_inputs = _generate(work / "inputs", max(sizes), tissue_fraction)
        print("| slides | spots | scanpy spots/s | lower bound spots/s | spavis 1 worker spots/s | "
              + (f"spavis {args.workers} workers spots/s | " if args.workers > 1 else "")
              + (f"spavis 1 worker before ({args.before.name}) spots/s | " if args.before else "")
              + "RSS MiB tree/largest (scanpy, lower bound, 1 w" + (f", {args.workers} w" if args.workers > 1 else "")
              + (", 1 w before" if args.before else "") + ") | 1 worker vs lower bound in CPU s | load |", flush=True)
        print("|" + "---|" * (8 + (args.workers > 1) + bool(args.before)), flush=True)
        for n in sizes:
            inputs = all_inputs[:n]
            cases = {"baseline": ("baseline", work / f"baseline_{n}.h5ad", 1, None, None),
                     "lower_bound": ("lower_bound", work / f"lower_{n}", 1, None, None),
                     "spavis": ("spavis", work / f"shards_{n}", 1, args.max_spots_per_shard, None)}
            if args.workers > 1:
                cases["spavis_parallel"] = ("spavis", work / f"shards_{n}_w{args.workers}", args.workers,
                                            args.max_spots_per_shard, None)
            if args.before:
                cases["spavis_before"] = ("spavis", work / f"shards_{n}_before", 1, args.max_spots_per_shard,
                                          args.before.resolve())
            runs: dict[str, list[dict]] = {name: [] for name in cases}
            for _ in range(args.repeat):  # interleaved, so a noisy minute hits every case alike
                for name, (case, out, w, max_spots, tree) in cases.items():
                    runs[name].append(_run_case(case, inputs, out, w, max_spots, tree))
            row = {"n_slides": n, **{name: min(r, key=lambda x: x["wall_s"]) for name, r in runs.items()}}
            if args.repeat > 1:
                row["all_wall_s"] = {name: [round(x["wall_s"], 2) for x in r] for name, r in runs.items()}
            row["load_avg_1min"] = os.getloadavg()[0]  # other processes on the machine skew the speeds
            rows.append(row)
            print(_format_row(row, args.workers), flush=True)
            if "all_wall_s" in row:
                print("  wall s of every run: " + "; ".join(f"{k} {v}" for k, v in row["all_wall_s"].items()),
                      flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        for name in [k for k in ("baseline", "lower_bound", "spavis", "spavis_parallel", "spavis_before")
                     if k in first and k in last]:
            growth = last[name]["peak_rss_mib"] / first[name]["peak_rss_mib"]
            print(f"largest-process RSS growth {first['n_slides']} -> {last['n_slides']} slides: {name} x{growth:.2f}")
    print("inputs are GENERATED slices (spavis.simulate); spavis also harmonizes, QCs, builds the k-NN graph, "
          "writes Parquet + Zarr and hashes every file; the baseline does none of that.")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
