"""Benchmark `spavis build-shards` against the path users take today, in the same run.

Baseline: ``scanpy.read_visium`` per slice + ``anndata.concat`` + ``write_h5ad`` (no gene
harmonization, no QC, no neighbour graph, one file holding every slide in memory).
spavis: ``build_shards`` (read, harmonize to stamp-v1, QC, k-NN graph, Parquet + Zarr,
manifest with sha256) with one worker (the baseline's process model), and again with
``--workers N`` (default 2) spawned worker processes; the baseline has no parallel mode.
Peak RSS of the parallel case is the largest single process (main or one worker).

Inputs are GENERATED Visium slices (``spavis.simulate``, written as Space Ranger folders),
not real data. Each case runs in its own subprocess; peak RSS is that process's
``ru_maxrss`` (from ``os.wait4``), so cases do not share memory or imports.

    python benchmarks/build_shards.py                # 1, 10 and 50 slices, spavis with 1 and 2 workers
    python benchmarks/build_shards.py --workers 4    # parallel case with 4 workers (0: skip it)
    python benchmarks/build_shards.py --quick        # 1 and 3 small slices
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def _generate(folder: Path, n: int, tissue_fraction: float | None) -> list[Path]:
    """n generated slices (Space Ranger layout); a hires image copy lets scanpy.read_visium load it."""
    from spavis.simulate import write_simulated_slice

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        d = folder / f"generated_{i:03d}"
        if not d.exists():
            write_simulated_slice(d, seed=1000 + i, tissue_fraction=tissue_fraction)
            spatial = d / "spatial"
            shutil.copyfile(spatial / "tissue_lowres_image.png", spatial / "tissue_hires_image.png")
        out.append(d)
    return out


def _case_spavis(inputs: list[str], out: str, workers: int) -> dict:
    import spavis.genes  # noqa: F401  (imports outside the timed region, as for the baseline)
    import spavis.readers  # noqa: F401
    from spavis.shards import build_shards

    t0 = time.perf_counter()
    build_shards(inputs, out, vocab="stamp-v1", min_genes=100, k_neighbors=8, workers=workers)
    wall = time.perf_counter() - t0
    manifest = json.loads((Path(out) / "manifest.json").read_text())
    return {"wall_s": wall, "spots_in": manifest["summary"]["n_spots_input"],
            "spots_out": manifest["summary"]["n_spots"]}


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


def _run_case(case: str, inputs: list[Path], out: Path, workers: int) -> dict:
    """Run one case in a fresh interpreter; return its timing and peak RSS (MiB).

    ``ru_maxrss`` of ``wait4`` is the child's own peak, and for spawned workers the largest
    of the (waited-for) grandchildren's: the peak of the biggest single process.
    """
    cmd = [sys.executable, str(HERE), "--_case", case, "--_out", str(out), "--workers", str(workers),
           "--_inputs", *map(str, inputs)]
    with tempfile.TemporaryFile("w+") as err:  # a file, so a chatty stderr cannot block the child
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        stdout = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read()
    if proc.returncode != 0:
        raise SystemExit(f"{case} failed ({proc.returncode}):\n{stderr[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_rss_mib"] = usage.ru_maxrss / 1024  # KiB on Linux
    result["spots_per_s"] = result["spots_in"] / result["wall_s"]
    result["workers"] = workers if case == "spavis" else 1
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 and 3 small slices (a smoke run).")
    ap.add_argument("--sizes", type=int, nargs="*", help="Slide counts (default 1 10 50; --quick: 1 3).")
    ap.add_argument("--workers", type=int, default=2,
                    help="Workers of the parallel spavis case (default 2; 0 or 1: only the 1-worker case).")
    ap.add_argument("--keep", type=Path, help="Keep generated inputs and outputs here.")
    ap.add_argument("--json", type=Path, help="Also write the results as JSON.")
    ap.add_argument("--_case", help=argparse.SUPPRESS)
    ap.add_argument("--_out", help=argparse.SUPPRESS)
    ap.add_argument("--_inputs", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._case:  # inside the measured subprocess
        fn = _case_spavis if args._case == "spavis" else _case_baseline
        res = fn(args._inputs, args._out, args.workers) if args._case == "spavis" else fn(args._inputs, args._out)
        print(json.dumps(res))
        return 0

    sizes = args.sizes or ([1, 3] if args.quick else [1, 10, 50])
    tissue_fraction = 0.15 if args.quick else None
    work = args.keep or Path(tempfile.mkdtemp(prefix="spavis-bench-"))
    rows = []
    try:
        all_inputs = _generate(work / "inputs", max(sizes), tissue_fraction)
        for n in sizes:
            inputs = all_inputs[:n]
            base = _run_case("baseline", inputs, work / f"baseline_{n}.h5ad", 1)
            row = {"n_slides": n, "baseline": base, "spavis": _run_case("spavis", inputs, work / f"shards_{n}", 1)}
            if args.workers > 1:
                row["spavis_parallel"] = _run_case("spavis", inputs, work / f"shards_{n}_w{args.workers}", args.workers)
            rows.append(row)
            parts = [f"{n:>3} slides | {base['spots_in']:>7,} spots | scanpy+concat+h5ad "
                     f"{base['spots_per_s']:>7,.0f} spots/s {base['peak_rss_mib']:>6,.0f} MiB"]
            for key, label in (("spavis", "spavis 1 worker"), ("spavis_parallel", f"spavis {args.workers} workers")):
                if key in row:
                    r = row[key]
                    parts.append(f"{label} {r['spots_per_s']:>7,.0f} spots/s {r['peak_rss_mib']:>6,.0f} MiB "
                                 f"(speed x{r['spots_per_s'] / base['spots_per_s']:.2f}, "
                                 f"memory x{r['peak_rss_mib'] / base['peak_rss_mib']:.2f})")
            row["load_avg_1min"] = os.getloadavg()[0]  # other processes on the machine skew the speeds
            parts.append(f"load {row['load_avg_1min']:.1f}")
            print(" | ".join(parts), flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        for name in [k for k in ("baseline", "spavis", "spavis_parallel") if k in first and k in last]:
            growth = last[name]["peak_rss_mib"] / first[name]["peak_rss_mib"]
            print(f"peak RSS growth {first['n_slides']} -> {last['n_slides']} slides: {name} x{growth:.2f}")
    print("inputs are GENERATED slices (spavis.simulate); spavis also harmonizes, QCs, builds the k-NN graph, "
          "writes Parquet + Zarr and hashes every file; the baseline does none of that.")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
