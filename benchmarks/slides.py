"""Whole-slide tiling + reading + resizing speed against an OpenSlide I/O lower bound (same-run ratios).

Writes a GENERATED Aperio-style slide of ``--size`` x ``--size`` px (default 50,000; tile by
tile, never in memory at once; 0.5 µm/px, JPEG tiles, pyramid 1/4/16/64) and measures in one run:

* tiling: ``plan_tiles`` (thumbnail from the pyramid, tissue mask, grid) seconds and tiles found;
* I/O bound: the same level-0 regions of ``--tiles`` tissue tiles read with OpenSlide's
  ``read_region`` in this process, nothing else (tiles/s);
* loader: ``embed-slides``' own DataLoader (:class:`stamp.slides.embed.TileDataset` with the
  ``uni`` entry's preprocessing: workers read each tile and resize it to 224 px in uint8; then,
  as a second figure, the batches normalised to float in this process) with 1 and 2 worker
  processes (tiles/s), and the peak memory of the process tree while it runs;
* memory: the same loader on a ``--small`` slide, so "flat in slide size" is one ratio;
* GPU (only where CUDA exists): a UNI-size ViT-L/16 (random weights) in bf16 fed by the loader:
  tiles/s and the share of wall time the GPU is busy.

    python benchmarks/slides.py [--size 50000] [--tiles 2000] [--workers 1,2] [--rounds 5] [--work DIR]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def _blobs(size: int) -> list[tuple[float, float, float, float]]:
    """A grid of tissue ellipses covering ~40 % of the slide (deterministic)."""
    rng = np.random.default_rng(0)
    n = 3
    step = size / n
    return [((i + 0.5) * step, (j + 0.5) * step, step * rng.uniform(0.3, 0.42), step * rng.uniform(0.3, 0.42))
            for j in range(n) for i in range(n)]


def make_slide(path: Path, size: int) -> Path:
    from stamp.slides.synthetic import write_synthetic_slide

    if not path.exists():
        t = time.perf_counter()
        tmp = path.with_name(".tmp-" + path.name)
        write_synthetic_slide(tmp, size, size, _blobs(size), pen=None, downsamples=(4, 16, 64), truth=False)
        tmp.rename(path)
        print(f"generated {path.name}: {size} x {size} px, {path.stat().st_size / 2**20:.0f} MiB "
              f"in {time.perf_counter() - t:.0f} s")
    return path


class PeakRSS:
    """Peak resident memory of this process and its children, sampled every 50 ms."""

    def __init__(self) -> None:
        import psutil

        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def _total(self) -> int:
        total = self.proc.memory_info().rss
        for c in self.proc.children(recursive=True):
            try:
                total += c.memory_info().rss
            except Exception:
                pass
        return total

    def __enter__(self) -> "PeakRSS":
        self.peak = self._total()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._total())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


def plan(path: Path):
    from stamp.slides.reader import open_slide
    from stamp.slides.tiling import plan_tiles
    from stamp.slides.tissue import TissueParams

    t = time.perf_counter()
    with open_slide(path) as slide:
        p = plan_tiles(slide, TissueParams())
    return p, time.perf_counter() - t


def io_bound(path: Path, coords: np.ndarray, size: int) -> float:
    import openslide

    s = openslide.OpenSlide(str(path))
    t = time.perf_counter()
    for x, y in coords:
        s.read_region((int(x), int(y)), 0, (size, size))
    dt = time.perf_counter() - t
    s.close()
    return len(coords) / dt


def uni_preprocess():
    """The ``uni`` catalogue entry's own preprocessing (resize 224, crop 224, ImageNet mean / std): no weights
    needed to measure the loader."""
    from stamp.zoo.catalogue import get_pretrained
    from stamp.models.foundation import ImagePreprocess

    return ImagePreprocess(**get_pretrained("uni").preprocessing)


def loader_rate(path: Path, p, coords: np.ndarray, workers: int, batch: int = 64, full: bool = False,
                memory: bool = False):
    """Tiles/s (and, with ``memory``, peak memory) of ``embed-slides``' loader: workers read each tile and
    resize it to 224 in uint8 (the encoder's first stage); ``full``: the main process also normalises the
    batches (the second stage, done on the GPU where there is one). Speed is measured without the memory
    sampler: psutil's process-tree walk costs the loader ~10 % (measured)."""
    import contextlib

    import torch
    from torch.utils.data import DataLoader

    from stamp.slides.embed import TileDataset

    ds = TileDataset(path, None, coords, p.level, p.read_px, p.tile_px, uni_preprocess())
    loader = DataLoader(ds, batch_size=batch, num_workers=workers, prefetch_factor=4 if workers else None)
    n = n0 = 0
    with (PeakRSS() if memory else contextlib.nullcontext()) as mem:
        t = time.perf_counter()
        for b in loader:
            if full:
                b = ds.stages[1](b)
            if n == 0:  # steady state: from the first batch on (worker start-up is once per slide)
                n0, t = len(b), time.perf_counter()
            n += len(b)
        dt = time.perf_counter() - t
    assert n == len(coords) and b.shape[1:] == torch.Size([3, 224, 224])
    return (n - n0) / dt, (mem.peak if memory else 0)


def gpu(path: Path, p, coords: np.ndarray, workers: int, batch: int = 256) -> None:
    import timm
    import torch
    from torch.utils.data import DataLoader

    from stamp.slides.embed import TileDataset

    model = timm.create_model("vit_large_patch16_224", pretrained=False, num_classes=0, init_values=1e-5).cuda().eval()
    ds = TileDataset(path, None, coords, p.level, p.read_px, p.tile_px, uni_preprocess())
    loader = DataLoader(ds, batch_size=batch, num_workers=workers, pin_memory=True, prefetch_factor=4)
    busy = 0.0
    n = 0
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        model(torch.zeros(8, 3, 224, 224, device="cuda"))
        torch.cuda.synchronize()
        t = time.perf_counter()
        for b in loader:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            model(ds.stages[1](b.cuda(non_blocking=True)))
            end.record()
            end.synchronize()
            busy += start.elapsed_time(end) / 1000
            n += len(b)
        wall = time.perf_counter() - t
    print(f"GPU ViT-L/16 bf16, {workers} workers: {n / wall:,.0f} tiles/s, GPU busy {100 * busy / wall:.0f} % of wall")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=50_000)
    ap.add_argument("--small", type=int, default=16_000, help="side of the slide for the memory comparison")
    ap.add_argument("--tiles", type=int, default=2000, help="tissue tiles read per measurement")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved measurement rounds (medians reported)")
    ap.add_argument("--work", default=None, help="keep the generated slides here (default: a temporary folder)")
    args = ap.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="slides-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(1)
    print(f"CPUs: {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")
    big = make_slide(work / f"generated_{args.size}.svs", args.size)
    small = make_slide(work / f"generated_{args.small}.svs", args.small)

    p, t_plan = plan(big)
    print(f"tiling {args.size} px slide: {len(p.coords):,} tissue tiles in {t_plan:.2f} s "
          f"(mask {p.mask.shape[1]} x {p.mask.shape[0]})")
    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(len(p.coords), min(args.tiles, len(p.coords)), replace=False))
    coords = p.coords[pick]
    # the machine's speed drifts by +-20 % over minutes (shared cores): each loader figure is bracketed by
    # an I/O-bound measurement just before and just after it (ratio to their mean), every figure is measured
    # in each of --rounds rounds, and the median over rounds is reported
    workers = [int(x) for x in args.workers.split(",")]
    per_round: list[dict] = []
    for r in range(args.rounds):
        m: dict = {}
        before = io_bound(big, coords, p.tile0)
        bounds = [before]
        for w in workers:
            m[w], _ = loader_rate(big, p, coords, w)
            after = io_bound(big, coords, p.tile0)
            m[("bound", w)] = (before + after) / 2
            bounds.append(after)
            before = after
        for w in workers:
            m[("full", w)], _ = loader_rate(big, p, coords, w, full=True)
        m["bound"] = float(np.mean(bounds))
        per_round.append(m)
        line = ", ".join(f"{w} worker(s) {m[w]:,.0f} ({m[w] / m[('bound', w)]:.2f} x)" for w in workers)
        print(f"round {r + 1}: I/O bound {', '.join(f'{b:,.0f}' for b in bounds)} tiles/s; loader {line}", flush=True)

    def med(f) -> float:
        return float(np.median([f(m) for m in per_round]))

    print(f"I/O bound (OpenSlide read_region, level 0, 1 process): {med(lambda m: m['bound']):,.0f} tiles/s "
          f"(median of {args.rounds} rounds)")
    for w in workers:
        print(f"read + resize to 224 (uint8, in the workers), {w} worker(s): {med(lambda m: m[w]):,.0f} tiles/s = "
              f"{med(lambda m: m[w] / m[('bound', w)]):.2f} x the I/O bound measured around it")
        print(f"  + normalising the batches (float, in this process), {w} worker(s): "
              f"{med(lambda m: m[('full', w)]):,.0f} tiles/s = {med(lambda m: m[('full', w)] / m['bound']):.2f} x "
              "the I/O bound")
    rates = {w: med(lambda m: m[w]) for w in workers}
    if 1 in rates and 2 in rates:
        print(f"2 workers / 1 worker: {med(lambda m: m[2] / m[1]):.2f} x (per round: "
              f"{', '.join(f'{m[2] / m[1]:.2f}' for m in per_round)})")
    ps, _ = plan(small)
    cs = ps.coords[np.sort(rng.choice(len(ps.coords), min(args.tiles, len(ps.coords)), replace=False))]
    w = max(rates) if rates else 1
    _, peak_small = loader_rate(small, ps, cs, w, memory=True)
    _, peak_big = loader_rate(big, p, coords, w, memory=True)
    peaks = {v: loader_rate(big, p, coords, v, memory=True)[1] for v in workers if v != w}
    peaks[w] = peak_big
    for v in workers:
        print(f"peak memory of the process tree, {v} worker(s): {peaks[v] / 2**20:,.0f} MiB")
    print(f"memory, {w} workers: {peak_big / 2**20:,.0f} MiB on {args.size} px vs {peak_small / 2**20:,.0f} MiB on "
          f"{args.small} px ({(args.size / args.small) ** 2:.0f} x the pixels): ratio {peak_big / peak_small:.2f}")
    if torch.cuda.is_available():
        gpu(big, p, p.coords[: 20 * 256], max(2, min(8, os.cpu_count() or 2)))
    else:
        print("GPU: none here; the ViT-L/16 bf16 measurement runs where CUDA is available")


if __name__ == "__main__":
    main()
