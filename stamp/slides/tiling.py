"""From an open slide to its tiles: scale, level choice, tissue mask, grid, QC thumbnail.

:func:`plan_tiles` is everything ``embed-slides`` decides before reading a tile: the tile size in
level-0 pixels (``tile_um`` / µm/px, rounded), the pyramid level to read from (the coarsest one
not coarser than the target scale), the size to read there and the tile coordinates. The QC
thumbnail (:func:`qc_image`) is the mask thumbnail with the tissue outline (green) and the kept
tiles (blue grid) drawn on it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stamp.errors import SlideError
from stamp.slides.reader import Slide
from stamp.slides.tissue import TissueParams, tile_grid, tissue_mask

#: Longest side of a QC thumbnail (a larger mask is shown downscaled).
QC_MAX_SIDE = 2048


@dataclass
class TilePlan:
    """What to read for one slide (all coordinates level-0 pixels)."""

    coords: np.ndarray  # (N, 2) int64, top-left x, y
    tissue_fraction: np.ndarray  # (N,)
    tile0: int  # tile side at level 0
    level: int  # pyramid level read
    level_downsample: float
    read_px: int  # tile side read at ``level``
    tile_px: int  # tile side at the target scale (resized to this, then the encoder's transform)
    slide_um_per_px: float
    mask: np.ndarray  # bool thumbnail mask
    thumbnail: np.ndarray  # RGB thumbnail
    mask_downsample: int  # level-0 px per thumbnail px


def plan_tiles(slide: Slide, params: TissueParams) -> TilePlan:
    """Tissue mask + tile grid + level choice for ``slide`` (see the module docstring).

    The tile is ``tile_px`` target pixels, ``round(tile_px * um_per_px / slide µm/px)`` level-0 pixels:
    TRIDENT's formula, so its ``WSIPatcher`` recomputes the same size from a bag's attributes. A tile
    below one level-0 pixel or larger than the slide is refused (one line); the mask's downsample is
    clamped to the slide's longest side."""
    mpp = slide.um_per_px
    W, H = slide.dimensions
    tile0 = int(round(params.tile_px * (params.um_per_px / mpp)))
    if tile0 < 1 or tile0 > min(W, H):
        what = "below one pixel" if tile0 < 1 else f"larger than the slide ({W} x {H} px)"
        raise SlideError(f"{slide.path}: a {params.tile_um:g} µm tile is {tile0} level-0 px at {mpp:.4g} µm/px, "
                         f"{what}; pass another --tile-um")
    target_ds = params.um_per_px / mpp
    if target_ds < 1 - 1e-3:
        import logging

        logging.getLogger(__name__).warning(
            "%s: scanned at %.4g µm/px, coarser than the asked %.4g µm/px; tiles are upsampled",
            slide.path, mpp, params.um_per_px)
    level = slide.best_level(max(target_ds, 1.0))
    lds = slide.level_downsamples[level]
    read_px = max(1, int(round(tile0 / lds)))
    mask_ds = min(max(1, int(round(params.mask_um_per_px / mpp))), max(W, H))
    thumb = slide.read_thumbnail(mask_ds)
    mask = tissue_mask(thumb, params, mask_ds * mpp)
    coords, frac = tile_grid(mask, mask_ds, slide.dimensions, tile0, params.min_tissue)
    return TilePlan(coords, frac, tile0, level, lds, read_px, params.tile_px, mpp, mask, thumb, mask_ds)


def qc_image(plan: TilePlan, *, tile_colors: np.ndarray | None = None, alpha: float = 0.45):
    """PIL image: thumbnail, tissue outline (green), tile grid (blue); ``tile_colors`` (N, 3) uint8 fills
    each tile (attention heatmaps)."""
    from PIL import Image, ImageDraw
    from scipy import ndimage as ndi

    img = plan.thumbnail.copy()
    edge = plan.mask & ~ndi.binary_erosion(plan.mask, iterations=2)
    base = Image.fromarray(img)
    if tile_colors is not None:
        overlay = base.copy()
        d = ImageDraw.Draw(overlay)
        for (x, y), c in zip(plan.coords, tile_colors):
            x0, y0 = x / plan.mask_downsample, y / plan.mask_downsample
            s = plan.tile0 / plan.mask_downsample
            d.rectangle([x0, y0, x0 + s, y0 + s], fill=tuple(int(v) for v in c))
        base = Image.blend(base, overlay, alpha if alpha < 1 else 1.0)
    arr = np.asarray(base).copy()
    arr[edge] = (0, 170, 0)
    base = Image.fromarray(arr)
    d = ImageDraw.Draw(base)
    s = plan.tile0 / plan.mask_downsample
    if tile_colors is None:
        for x, y in plan.coords:
            x0, y0 = x / plan.mask_downsample, y / plan.mask_downsample
            d.rectangle([x0, y0, x0 + s, y0 + s], outline=(40, 80, 220))
    side = max(base.size)
    if side > QC_MAX_SIDE:
        f = QC_MAX_SIDE / side
        base = base.resize((max(1, int(base.size[0] * f)), max(1, int(base.size[1] * f))), Image.BILINEAR)
    return base


__all__ = ["TilePlan", "plan_tiles", "qc_image", "QC_MAX_SIDE"]
