"""Patch extraction speed: a pyramidal TIFF read lazily by tile vs reading the whole image.

The slide is GENERATED (random H&E-like tiles, not real tissue): a ``--size`` x ``--size``
px RGB TIFF at 0.25 µm/px, JPEG tiles of 256 px, pyramid levels 0.25 / 0.5 / 1.0 µm/px, as
HEST and slide scanners write them. Spots sit on a Visium hex lattice (100 µm apart) over
the ``--coverage`` fraction of the slide. Both methods cut the same 112 µm patch and 336 µm
region per spot into 224 x 224 (spavis.images.resample) and report spots/s and peak memory
in the same run:

- ``tile``: spavis.images.open_image (tifffile Zarr store) + WindowReaders at the levels closest
  to 0.5 µm/px (patch) and 1.5 µm/px (region): only the tiles under the spots are decoded;
- ``whole``: tifffile.imread of the full-resolution level, then the same cuts from memory.

    python benchmarks/patches.py [--size 6144] [--coverage 0.3]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spavis.format import schema as S  # noqa: E402
from spavis.images import WindowReader, from_array, open_image, resample  # noqa: E402

UM0 = 0.25
TILE = 256


def write_slide(path: Path, size: int, levels: int = 3) -> None:
    import tifffile

    rng = np.random.default_rng(0)
    bank = [np.clip(rng.normal([220, 150, 190], 30, (TILE, TILE, 3)), 0, 255).astype(np.uint8) for _ in range(8)]

    def tiles(h: int, w: int):
        for i in range(((h + TILE - 1) // TILE) * ((w + TILE - 1) // TILE)):
            yield bank[(i * 7 + i // 5) % len(bank)]

    with tifffile.TiffWriter(path) as tw:
        for lv in range(levels):
            h = w = size // 2**lv
            kw = {"subifds": levels - 1} if lv == 0 else {"subfiletype": 1}
            tw.write(tiles(h, w), shape=(h, w, 3), dtype=np.uint8, tile=(TILE, TILE), photometric="rgb",
                     compression="jpeg", compressionargs={"level": 90}, **kw)


def lattice(size: int, coverage: float) -> np.ndarray:
    """Spot centres (x, y) in level-0 edge coordinates on a 100 µm hex lattice."""
    span = size * UM0 * np.sqrt(coverage)
    start = (size * UM0 - span) / 2
    pts = []
    for r, y in enumerate(np.arange(start, start + span, 100 * np.sqrt(3) / 2)):
        for x in np.arange(start + (50 if r % 2 else 0), start + span, 100):
            pts.append((x / UM0 + 0.5, y / UM0 + 0.5))
    return np.array(pts)


def cut_all(patch: WindowReader, region: WindowReader, centres: np.ndarray) -> None:
    """A patch and a region (patch in the left column) per spot, as build-shards cuts them."""
    step = S.PATCH_UM / UM0  # level-0 pixels
    fp, fr = patch.level.factor, region.level.factor
    for ex, ey in centres:
        resample(patch, ex / fp, ey / fp, step / 2 / fp, S.PATCH_PX)
        resample(region, (ex + step) / fr, ey / fr, step * S.REGION_SCALE / 2 / fr, S.PATCH_PX)


def run(name: str, fn) -> tuple[float, float]:
    """Seconds (best of 2, untraced: tracemalloc slows Python-heavy code) and traced peak MiB."""
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return min(times), peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=6144, help="level-0 width = height in pixels")
    ap.add_argument("--coverage", type=float, default=0.3, help="fraction of the slide area holding spots")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "slide.tif"
        write_slide(path, args.size)
        centres = lattice(args.size, args.coverage)
        print(f"GENERATED slide {args.size}x{args.size} px at {UM0} µm/px ({path.stat().st_size / 1e6:.0f} MB JPEG "
              f"TIFF, 3 levels), {len(centres)} spots, patch + region per spot")

        def tile():
            with open_image(path) as src:
                target = S.PATCH_UM / S.PATCH_PX
                cut_all(WindowReader(src, src.choose_level(UM0, target)),
                        WindowReader(src, src.choose_level(UM0, target * S.REGION_SCALE)), centres)

        def whole():
            import tifffile

            arr = tifffile.imread(path)  # level 0, every tile decoded
            reader = WindowReader(from_array(arr), 0)
            cut_all(reader, reader, centres)

        results = {name: run(name, fn) for name, fn in (("tile", tile), ("whole", whole))}
    for name, (dt, peak) in results.items():
        print(f"{name:>6}: {len(centres) / dt:8.1f} spots/s  ({dt:6.2f} s, peak {peak:7.1f} MiB traced)")
    (t_tile, m_tile), (t_whole, m_whole) = results["tile"], results["whole"]
    print(f" ratio: tile reads are {t_whole / t_tile:.2f}x the whole-image spots/s with "
          f"{m_whole / max(m_tile, 1e-9):.1f}x less peak memory")


if __name__ == "__main__":
    main()
