"""GENERATED whole-slide images for tests and benchmarks (labelled as generated, never real data).

:func:`write_synthetic_slide` writes an Aperio-style pyramidal TIFF (``.svs`` layout: tiled level
IFDs, ``Aperio Image Library`` description with ``MPP`` and ``AppMag``) tile by tile, so a
50,000 x 50,000 px slide never sits in memory: white glass, elliptic tissue blobs with an H&E-like
texture, an optional blue pen stroke on the glass, and a class motif (dark purple dots) drawn
in chosen tissue tiles. The truth comes back with it: every grid tile's exact tissue fraction
and the motif tiles, so tests can check the tiler against the generator.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

GLASS = 245
TISSUE_RGB = np.array([214, 120, 176], np.float32)  # eosin pink
NUCLEI_RGB = np.array([110, 60, 150], np.float32)  # haematoxylin purple
PEN_RGB = np.array([40, 70, 200], np.float32)  # blue marker


@dataclass
class SyntheticSlide:
    """Truth of a generated slide: level-0 size, tile size, per-tile tissue fraction, motif tiles."""

    path: Path
    width: int
    height: int
    um_per_px: float
    tile: int
    fraction: np.ndarray  # (rows, cols) tissue fraction of grid tile (row, col) at level 0
    motif: set = field(default_factory=set)  # {(x, y)} level-0 top-left of motif tiles


def _texture_bank(tile: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    bank = np.empty((n, tile, tile, 3), np.uint8)
    for i in range(n):
        noise = rng.normal(0, 10, (tile, tile, 1)).astype(np.float32)
        nuclei = rng.random((tile // 8, tile // 8)) < 0.12
        nuclei = np.kron(nuclei, np.ones((8, 8), bool))[:tile, :tile, None]
        img = np.where(nuclei, NUCLEI_RGB, TISSUE_RGB) + noise
        bank[i] = np.clip(img, 0, 255).astype(np.uint8)
    return bank


class _Scene:
    def __init__(self, blobs, pen, motif_cells, tile, seed):
        self.blobs = [tuple(map(float, b)) for b in blobs]  # (cx, cy, rx, ry) level-0 px
        self.pen = pen  # (x0, y0, x1, y1, half_width) or None
        self.motif_cells = motif_cells
        self.tile = tile
        self.bank = _texture_bank(tile, 8, seed)
        self.seed = seed

    def tissue(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Level-0 pixel centres (broadcast) -> inside some ellipse."""
        out = np.zeros(np.broadcast(xs, ys).shape, bool)
        for cx, cy, rx, ry in self.blobs:
            out |= ((xs + 0.5 - cx) / rx) ** 2 + ((ys + 0.5 - cy) / ry) ** 2 <= 1.0
        return out

    def near_tissue(self, x0, y0, x1, y1) -> bool:
        return any(x0 < cx + rx and x1 > cx - rx and y0 < cy + ry and y1 > cy - ry for cx, cy, rx, ry in self.blobs)

    def pen_mask(self, xs, ys) -> np.ndarray:
        if self.pen is None:
            return np.zeros(np.broadcast(xs, ys).shape, bool)
        x0, y0, x1, y1, hw = self.pen
        d = np.array([x1 - x0, y1 - y0], np.float64)
        t = np.clip(((xs - x0) * d[0] + (ys - y0) * d[1]) / (d @ d), 0, 1)
        return np.hypot(xs - (x0 + t * d[0]), ys - (y0 + t * d[1])) <= hw

    def render(self, x0: int, y0: int, w: int, h: int, ds: float) -> np.ndarray:
        """RGB (h, w) of the region whose top-left is level-0 (x0, y0), pixel = ``ds`` level-0 px."""
        out = np.full((h, w, 3), GLASS, np.uint8)
        X1, Y1 = x0 + w * ds, y0 + h * ds
        pen_near = self.pen is not None and not (
            max(self.pen[0], self.pen[2]) + self.pen[4] < x0 or min(self.pen[0], self.pen[2]) - self.pen[4] > X1
            or max(self.pen[1], self.pen[3]) + self.pen[4] < y0 or min(self.pen[1], self.pen[3]) - self.pen[4] > Y1)
        if not self.near_tissue(x0, y0, X1, Y1) and not pen_near:
            return out
        xs = x0 + (np.arange(w) + 0.5) * ds - 0.5
        ys = (y0 + (np.arange(h) + 0.5) * ds - 0.5)[:, None]
        t = self.tissue(xs[None, :], ys)
        if t.any():
            k = (int(x0 // (self.tile * ds)) * 7 + int(y0 // (self.tile * ds)) * 13) % len(self.bank)
            tex = self.bank[k][:h, :w] if (h <= self.tile and w <= self.tile) else np.resize(self.bank[k], (h, w, 3))
            out[t] = tex[t]
            if ds == 1:
                for cx, cy in self.motif_cells:
                    if cx < X1 and cx + self.tile > x0 and cy < Y1 and cy + self.tile > y0:
                        self._motif(out, x0, y0, cx, cy)
        if pen_near:
            p = self.pen_mask(xs[None, :], ys)
            out[p] = PEN_RGB.astype(np.uint8)
        return out

    def _motif(self, out, x0, y0, cx, cy):
        """Dark dots on a 32 px lattice inside the motif tile (level 0)."""
        h, w = out.shape[:2]
        ys, xs = np.mgrid[0:h, 0:w]
        gx, gy = xs + x0 - cx, ys + y0 - cy
        inside = (gx >= 0) & (gx < self.tile) & (gy >= 0) & (gy < self.tile)
        dots = inside & ((gx % 32 - 16) ** 2 + (gy % 32 - 16) ** 2 <= 36)
        out[dots] = (40, 10, 60)


def _tiles(scene: _Scene, width: int, height: int, ds: float, tile: int) -> Iterator[np.ndarray]:
    lw, lh = int(np.ceil(width / ds)), int(np.ceil(height / ds))
    for ty in range(0, lh, tile):
        for tx in range(0, lw, tile):
            yield scene.render(int(tx * ds), int(ty * ds), tile, tile, ds)


def write_synthetic_slide(path: str | os.PathLike, width: int, height: int, blobs: Sequence[Sequence[float]], *,
                          um_per_px: float = 0.5, tile: int = 256, motif_cells: Sequence[tuple[int, int]] = (),
                          pen: Optional[Sequence[float]] = None, downsamples: Sequence[int] = (4, 16),
                          compression: str = "jpeg", seed: int = 0, aperio: bool = True,
                          truth: bool = True) -> SyntheticSlide:
    """Write a GENERATED pyramidal slide tile by tile (see the module docstring).

    ``blobs``: (cx, cy, rx, ry) ellipses in level-0 px; ``motif_cells``: level-0 top-left corners of
    grid tiles that get the motif; ``pen``: (x0, y0, x1, y1, half_width) blue stroke;
    ``aperio=False`` writes a generic tiled TIFF with resolution tags (centimetre) instead.
    """
    import tifffile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scene = _Scene(blobs, pen, [tuple(map(int, c)) for c in motif_cells], tile, seed)
    opts = dict(dtype=np.uint8, tile=(tile, tile), photometric="rgb", compression=compression, metadata=None)
    ppcm = 1e4 / um_per_px
    with tifffile.TiffWriter(path, bigtiff=width * height > 2**31) as tw:
        for i, ds in enumerate((1, *downsamples)):
            lw, lh = int(np.ceil(width / ds)), int(np.ceil(height / ds))
            if min(lw, lh) < 1:
                break
            if aperio:
                desc = (f"Aperio Image Library v12.0.15 GENERATED\r\n{width}x{height} [0,0 {width}x{height}] "
                        f"({tile}x{tile}) JPEG/RGB Q=80|AppMag = {10 / um_per_px:g}|MPP = {um_per_px}"
                        f"|Filename = {path.stem}|Generated = stamp.slides.synthetic") if i == 0 else \
                    f"Aperio Image Library v12.0.15 GENERATED\r\n{lw}x{lh} -> level {i}"
                extra = {"description": desc}
            else:
                extra = {"resolution": (ppcm / ds, ppcm / ds), "resolutionunit": "CENTIMETER",
                         "subfiletype": 1 if i else 0}
            tw.write(_tiles(scene, width, height, ds, tile), shape=(lh, lw, 3), **opts, **extra)
    frac = np.zeros((height // tile, width // tile), np.float64)
    if truth:
        for r in range(frac.shape[0]):
            ys = (r * tile + np.arange(tile))[:, None].astype(np.float64)
            for c in range(frac.shape[1]):
                if scene.near_tissue(c * tile, r * tile, (c + 1) * tile, (r + 1) * tile):
                    xs = (c * tile + np.arange(tile))[None, :].astype(np.float64)
                    frac[r, c] = scene.tissue(xs, ys).mean()
    return SyntheticSlide(path, width, height, um_per_px, tile, frac, set(scene.motif_cells))


__all__ = ["SyntheticSlide", "write_synthetic_slide"]
