"""`spavis build-shards` at scale and `spavis subset` against a rebuild, with same-run baselines.

GENERATED Visium slices (``spavis.simulate``, seed 1000 + i as in every benchmark here: the full
stamp-v1 gene set, ~3,700 spots and ~11 M nonzeros per slide), not real data. Each case runs in
its own subprocess (benchmarks/_measure.py: wall, peak RSS of the process tree and of the largest
process, CPU seconds).

1. Scale: ``build_shards`` of ``--base`` slides (default 20) and of ``--slides`` slides (default
   150, ~0.55 M spots) with ``--workers`` (default 2). Targets (issue 29): spots/s within 25 % of
   the small build's, peak memory <= 1.3x the small build's.
2. genes.parquet of the large corpus against an independent reduction of its expression files
   (pyarrow + numpy, no spavis code): nnz, n_slides_detected and the raw sums must be equal
   (integer counts: float64 sums of integers do not depend on the order), CP10k sums equal to
   1e-12 relative (float64 additions in another order).
3. Subset: ``spavis subset`` of ``--subset`` slides (default 20, every k-th slide) of the large
   corpus against ``build_shards`` of the same raw slides, with 1 worker and with ``--workers``,
   ``--repeat`` times interleaved; the expression files and genes.parquet must be byte-identical.
   Target: >= 2x. (A subset writes each expression file in one process, as the build does; with
   few files, e.g. 20 slides at 50,000 spots per file = 2 files, the largest file bounds it.)
4. Extrapolation to SpaVis-6M (1,982 slices, 5.75 M spots) from the large build.

    python benchmarks/build_scale.py                       # the issue's figures (~10 min + generation)
    python benchmarks/build_scale.py --slides 30 --base 10 --subset 5 --keep /tmp/scale   # a quick run
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
SPAVIS_6M = {"slices": 1982, "spots": 5_750_000}


def _case_build(inputs: list[str], out: str, workers: int, max_spots: int | None) -> dict:
    import spavis.genes  # noqa: F401  (imports outside the timed region)
    import spavis.readers  # noqa: F401
    from spavis.shards import BuildConfig, build_shards

    t0 = time.perf_counter()
    build_shards(inputs, out, BuildConfig.from_settings(max_spots_per_shard=max_spots), workers=workers)
    wall = time.perf_counter() - t0
    summary = json.loads((Path(out) / "manifest.json").read_text())["summary"]
    return {"wall_s": wall, "spots": summary["n_spots"], "slides": summary["n_slides"],
            "files": summary["n_expression_files"]}


def _case_subset(parent: str, out: str, workers: int, slides: list[str]) -> dict:
    import polars  # noqa: F401  (imports outside the timed region, as for the build)
    import spavis.shards.write  # noqa: F401
    from spavis.shards import subset

    t0 = time.perf_counter()
    res = subset(parent, out, slides=slides, workers=workers)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "spots": res.n_spots, "slides": len(res.slide_ids), "files": res.n_files}


def _run(case: str, out: Path, workers: int, args: list[str]) -> dict:
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, str(HERE), "--_case", case, "--_out", str(out), "--workers", str(workers), *args]
    res = run_measured(cmd)
    res["spots_per_s"] = res["spots"] / res["wall_s"]
    res["load_avg_1min"] = os.getloadavg()[0]
    return res


def independent_gene_check(corpus: Path) -> dict:
    """genes.parquet against per-gene sums computed here from the expression files (pyarrow + numpy)."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    genes = pq.read_table(corpus / "genes.parquet")
    n = genes.num_rows
    nnz = np.zeros(n, np.int64)
    raw = np.zeros(n, np.float64)
    cp10k = np.zeros(n, np.float64)
    slides_per_gene: dict[str, np.ndarray] = {}
    for path in sorted((corpus / "data" / "expression").glob("*.parquet")):
        pf = pq.ParquetFile(path)
        for rg in range(pf.num_row_groups):
            t = pf.read_row_group(rg, columns=["slide_id", "gene_index", "counts"])
            gi = pc.list_flatten(t.column("gene_index")).to_numpy().astype(np.int64)
            counts = pc.list_flatten(t.column("counts")).to_numpy().astype(np.float64)
            lengths = pc.list_value_length(t.column("gene_index")).to_numpy()
            spot = np.repeat(np.arange(t.num_rows), lengths)
            totals = np.bincount(spot, weights=counts, minlength=t.num_rows)
            here = np.bincount(gi, minlength=n)
            nnz += here
            raw += np.bincount(gi, weights=counts, minlength=n)
            cp10k += np.bincount(gi, weights=counts * (1e4 / totals)[spot], minlength=n)
            (sid,) = set(t.column("slide_id").to_pylist())  # a row group holds one slide
            seen = slides_per_gene.setdefault(sid, np.zeros(n, bool))
            seen |= here > 0
    n_slides = np.sum(list(slides_per_gene.values()), axis=0).astype(np.int32)
    g = {c: genes.column(c).to_numpy(zero_copy_only=False) for c in
         ("nnz", "nonzero_sum_raw", "nonzero_sum_cp10k", "n_slides_detected")}
    rel = np.abs(cp10k - g["nonzero_sum_cp10k"]) / np.maximum(np.abs(cp10k), 1e-300)
    return {
        "nnz_equal": bool(np.array_equal(nnz, g["nnz"])),
        "n_slides_detected_equal": bool(np.array_equal(n_slides, g["n_slides_detected"])),
        "raw_sums_equal": bool(np.array_equal(raw, g["nonzero_sum_raw"])),
        "cp10k_max_rel_diff": float(rel[nnz > 0].max()) if (nnz > 0).any() else 0.0,
        "n_nonzero": int(nnz.sum()),
    }


def _same_bytes(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in (a / "data").rglob("*.parquet")) + [Path("genes.parquet")]
    other = sorted(p.relative_to(b) for p in (b / "data").rglob("*.parquet")) + [Path("genes.parquet")]
    return files == other and all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def _row(label: str, r: dict) -> str:
    return (f"| {label} | {r['slides']:,} | {r['spots']:,} | {r['files']} | {r['wall_s']:.1f} | {r['spots_per_s']:,.0f} | "
            f"{r['tree_rss_mib']:,.0f} / {r['peak_rss_mib']:,.0f} | {r['cpu_s']:.0f} | {r['load_avg_1min']:.1f} |")


def _subset_part(args, work: Path, inputs: list[str], shard_args: list[str], results: dict) -> None:
    """Part 3: spavis subset of every k-th slide against build_shards of their raw slices."""
    step = max(1, args.slides // args.subset)
    chosen = [Path(p).name for p in inputs[::step][:args.subset]]
    chosen_inputs = [p for p in inputs if Path(p).name in chosen]
    parent = str(work / f"corpus_{args.slides}")
    print(f"\n| {args.subset} of {args.slides} slides | slides | spots | files | wall s | spots/s | "
          "RSS MiB tree / largest | CPU s | load |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    results["subset"] = {}
    for workers in sorted({1, args.workers}):
        runs: dict[str, list[dict]] = {"subset": [], "rebuild": []}
        for _ in range(args.repeat):  # interleaved: a noisy minute hits both
            runs["subset"].append(_run("subset", work / "subset", workers, ["--_parent", parent, "--_inputs", *chosen]))
            runs["rebuild"].append(_run("build", work / "rebuild", workers, [*shard_args, "--_inputs", *chosen_inputs]))
        sub = min(runs["subset"], key=lambda r: r["wall_s"])
        reb = min(runs["rebuild"], key=lambda r: r["wall_s"])
        same = _same_bytes(work / "subset", work / "rebuild")
        print(_row(f"spavis subset, {workers} worker(s)", sub))
        print(_row(f"build-shards of the raw slides, {workers} worker(s)", reb))
        print(f"  {workers} worker(s): subset x{reb['wall_s'] / sub['wall_s']:.2f} faster than the rebuild in wall "
              f"time, x{reb['cpu_s'] / sub['cpu_s']:.2f} in CPU s (target >= 2); wall s of every run: subset "
              f"{[round(r['wall_s'], 1) for r in runs['subset']]}, rebuild "
              f"{[round(r['wall_s'], 1) for r in runs['rebuild']]}; expression files + genes.parquet "
              f"identical: {same}", flush=True)
        results["subset"][workers] = {"subset": sub, "rebuild": reb, "speedup": reb["wall_s"] / sub["wall_s"],
                                      "identical": same}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=150, help="Slides of the large build (default 150).")
    ap.add_argument("--base", type=int, default=20, help="Slides of the small build it is compared with (20).")
    ap.add_argument("--subset", type=int, default=20, help="Slides carved by spavis subset (default 20).")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-spots-per-shard", type=int, default=None, help="Default: the build-shards default.")
    ap.add_argument("--repeat", type=int, default=2, help="Subset and rebuild runs, interleaved (best kept).")
    ap.add_argument("--keep", type=Path, help="Keep generated inputs and outputs here (reused by later runs).")
    ap.add_argument("--only-subset", action="store_true",
                    help="Only part 3, on the large corpus an earlier run left in --keep.")
    ap.add_argument("--json", type=Path, help="Also write the results as JSON.")
    ap.add_argument("--_case", help=argparse.SUPPRESS)
    ap.add_argument("--_out", help=argparse.SUPPRESS)
    ap.add_argument("--_inputs", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--_parent", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._case == "build":
        print(json.dumps(_case_build(args._inputs, args._out, args.workers, args.max_spots_per_shard)))
        return 0
    if args._case == "subset":
        print(json.dumps(_case_subset(args._parent, args._out, args.workers, args._inputs)))
        return 0

    work = args.keep or Path(tempfile.mkdtemp(prefix="spavis-scale-"))
    shard_args = ["--max-spots-per-shard", str(args.max_spots_per_shard)] if args.max_spots_per_shard else []
    results: dict = {"workers": args.workers, "cpus": os.cpu_count()}
    try:
        inputs = [str(p) for p in generated_slices(work / "inputs", args.slides)]
        print(f"{args.slides} GENERATED slides in {work / 'inputs'}; {args.workers} workers; "
              f"{os.cpu_count()} CPUs; load {os.getloadavg()[0]:.1f}", flush=True)
        if args.only_subset:
            if args.keep is None or not (work / f"corpus_{args.slides}" / "manifest.json").is_file():
                raise SystemExit("--only-subset needs --keep DIR holding corpus_<slides> from an earlier run")
            _subset_part(args, work, inputs, shard_args, results)
            return 0
        print("| build | slides | spots | files | wall s | spots/s | RSS MiB tree / largest | CPU s | load |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
        small = _run("build", work / f"corpus_{args.base}", args.workers, [*shard_args, "--_inputs", *inputs[:args.base]])
        print(_row(f"{args.base} slides", small), flush=True)
        large = _run("build", work / f"corpus_{args.slides}", args.workers, [*shard_args, "--_inputs", *inputs])
        print(_row(f"{args.slides} slides", large), flush=True)
        speed = large["spots_per_s"] / small["spots_per_s"]
        memory = large["tree_rss_mib"] / small["tree_rss_mib"]
        largest = large["peak_rss_mib"] / small["peak_rss_mib"]
        print(f"\n{args.slides} vs {args.base} slides: spots/s x{speed:.2f} (target 0.75-1.25), peak RSS x{memory:.2f} "
              f"tree, x{largest:.2f} largest process (target <= 1.3)", flush=True)
        results.update(small=small, large=large, speed_ratio=speed, memory_ratio=memory, largest_ratio=largest)

        t0 = time.perf_counter()
        check = independent_gene_check(work / f"corpus_{args.slides}")
        print(f"genes.parquet vs an independent reduction of {check['n_nonzero']:,} nonzeros "
              f"({time.perf_counter() - t0:.0f} s): nnz equal {check['nnz_equal']}, n_slides_detected equal "
              f"{check['n_slides_detected_equal']}, raw sums equal {check['raw_sums_equal']}, CP10k sums max "
              f"relative difference {check['cp10k_max_rel_diff']:.1e}", flush=True)
        results["genes_check"] = check

        _subset_part(args, work, inputs, shard_args, results)

        per_spot = large["wall_s"] / large["spots"]
        t6 = per_spot * SPAVIS_6M["spots"]
        size = sum(p.stat().st_size for p in (work / f"corpus_{args.slides}").rglob("*") if p.is_file())
        print(f"\nExtrapolated to SpaVis-6M ({SPAVIS_6M['slices']:,} slices, {SPAVIS_6M['spots']:,} spots) at this "
              f"build's {large['spots_per_s']:,.0f} spots/s with {args.workers} workers: {t6 / 3600:.1f} h; peak RSS "
              f"stays ~{large['tree_rss_mib']:,.0f} MiB (one slide or one shard per worker); output "
              f"~{size / large['spots'] * SPAVIS_6M['spots'] / 1e9:,.0f} GB ({size / 1e9:.1f} GB here).")
        results["extrapolation"] = {"hours": t6 / 3600, "output_gb": size / large["spots"] * SPAVIS_6M["spots"] / 1e9}
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print("inputs are GENERATED slices (spavis.simulate), not real data.")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
