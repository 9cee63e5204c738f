"""Tissue detection on a thumbnail and the tile grid (CLAM's recipe, scale-aware).

:func:`tissue_mask`: saturation (HSV) -> median blur -> Otsu threshold (never below
``min_saturation``; when Otsu's lower class is not glass, i.e. the slide is tissue from edge to edge,
``min_saturation`` alone: Otsu would split the tissue itself) -> pen marks and dark debris removed -> morphological closing -> holes
smaller than ``min_hole_mm2`` filled, at most ``max_holes`` larger holes kept -> tissue pieces
smaller than ``min_tissue_mm2`` dropped. CLAM's defaults (``sthresh=8``, ``mthresh=7``,
``close=4``, ``a_t=100``, ``a_h=16``, ``max_n_holes=8`` reference 512 px patches at 40x) are the
reference: areas are given in mm² (100 and 16 patches of 512 px at 0.25 µm/px = 1.64 and
0.26 mm²), kernels in thumbnail pixels at ``mask_um_per_px``.

:func:`tile_grid`: non-overlapping ``tile_um`` tiles on a grid anchored at level-0 (0, 0), row by
row (deterministic), kept when their exact tissue fraction (area-weighted over the mask's
pixels) is at least ``min_tissue``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# CLAM's reference patch: 512 level-0 px at 40x (0.25 µm/px) = 128 µm; its area in mm².
_CLAM_PATCH_MM2 = (512 * 0.25 / 1000) ** 2
#: Glass is grey: a background whose mean saturation (0-255) is above this is tissue (no glass in view).
#: Real glass measures ~0-20 (a tinted scanner background); pale eosin ~50, fat-free tissue ~100+.
GLASS_MAX_SATURATION = 32


@dataclass(frozen=True)
class TissueParams:
    """Tissue detection and tiling options (recorded in every bag)."""

    tile_um: float = 128.0
    um_per_px: float = 0.5
    min_tissue: float = 0.5
    mask_um_per_px: float = 8.0
    min_saturation: int = 8  # CLAM sthresh
    median_px: int = 7  # CLAM mthresh
    close_px: int = 4  # CLAM close
    min_tissue_mm2: float = 100 * _CLAM_PATCH_MM2  # CLAM a_t
    min_hole_mm2: float = 16 * _CLAM_PATCH_MM2  # CLAM a_h
    max_holes: int = 8  # CLAM max_n_holes
    pen: bool = True

    @property
    def tile_px(self) -> int:
        """Tile side at the target scale (256 px for 128 µm at 0.5 µm/px)."""
        return int(round(self.tile_um / self.um_per_px))

    def __post_init__(self) -> None:
        from stamp.errors import SlideError
        from stamp.slides.reader import check_scale

        check_scale(self.um_per_px, f"--um-per-px {self.um_per_px:g}", "pass the tiles' scale (0.5 = 20x)")
        if not self.tile_um > 0 or self.tile_px < 1:
            raise SlideError(f"--tile-um {self.tile_um:g} at --um-per-px {self.um_per_px:g} is a tile of "
                             f"{self.tile_um / self.um_per_px:.3g} px; tiles need at least one pixel")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def otsu(values: np.ndarray) -> float:
    """Otsu's threshold of uint8 values (between-class variance maximised over the 256 bins)."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0.0
    bins = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)
    w1 = total - w0
    m0 = np.cumsum(hist * bins)
    mt = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mt * w0 / total - m0) ** 2 / (w0 * w1 / total)
    between[~np.isfinite(between)] = -1
    return float(np.argmax(between))


def saturation_threshold(sat: np.ndarray, min_saturation: float) -> float:
    """Otsu's threshold of the (blurred) saturation, never below ``min_saturation``; ``min_saturation``
    alone when Otsu's lower class is not glass (mean > :data:`GLASS_MAX_SATURATION`): on a slide without
    glass Otsu splits eosin from haematoxylin and would drop half of the tissue."""
    thr = otsu(sat)
    low = sat[sat <= thr]
    if low.size and float(low.mean()) > GLASS_MAX_SATURATION:
        return float(min_saturation)
    return max(thr, float(min_saturation))


def pen_mask(rgb: np.ndarray, hsv: np.ndarray) -> np.ndarray:
    """Blue/green/black marker ink and dark debris: H&E is pink to purple, ink is not.

    Blue and green ink: hue 70°-250° with saturation >= 20%; black ink/debris: value < 25%.
    """
    h = hsv[..., 0].astype(np.float32) * (360.0 / 255.0)
    s, v = hsv[..., 1], hsv[..., 2]
    ink = (h >= 70) & (h <= 250) & (s >= 51)
    dark = v < 64
    return ink | dark


def tissue_mask(thumb: np.ndarray, params: TissueParams, mask_um_per_px: float) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail whose pixels are ``mask_um_per_px`` wide."""
    from PIL import Image
    from scipy import ndimage as ndi

    hsv = np.asarray(Image.fromarray(thumb).convert("HSV"))
    sat = hsv[..., 1]
    if params.median_px > 1:
        sat = ndi.median_filter(sat, size=params.median_px, mode="nearest")
    mask = sat > saturation_threshold(sat, params.min_saturation)
    if params.pen:
        pen = pen_mask(thumb, hsv)
        if params.median_px > 1:
            pen = ndi.binary_dilation(pen, iterations=max(1, params.median_px // 2))
        mask &= ~pen
    if params.close_px > 1:
        k = np.ones((params.close_px, params.close_px), bool)
        mask = ndi.binary_closing(np.pad(mask, params.close_px), structure=k)[
            params.close_px:-params.close_px, params.close_px:-params.close_px]
    px_mm2 = (mask_um_per_px / 1000.0) ** 2
    return _filter_areas(mask, params.min_tissue_mm2 / px_mm2, params.min_hole_mm2 / px_mm2, params.max_holes)


def _filter_areas(mask: np.ndarray, min_tissue_px: float, min_hole_px: float, max_holes: int) -> np.ndarray:
    """CLAM's contour filter on a raster: small holes filled, the ``max_holes`` largest big holes kept per
    piece, pieces whose tissue area (holes excluded) is below ``min_tissue_px`` dropped."""
    from scipy import ndimage as ndi

    filled = ndi.binary_fill_holes(mask)
    holes = filled & ~mask
    hole_lab, n_holes = ndi.label(holes)
    keep_hole = np.zeros(n_holes + 1, bool)
    if n_holes:
        hole_area = np.bincount(hole_lab.ravel(), minlength=n_holes + 1)
        piece_lab, _ = ndi.label(filled)
        # the piece each hole lies in (any of its pixels: a hole is inside exactly one piece)
        idx = ndi.minimum_position(hole_lab, hole_lab, index=np.arange(1, n_holes + 1))
        owner = np.array([piece_lab[p] for p in idx])
        for piece in np.unique(owner):
            ids = np.flatnonzero(owner == piece) + 1
            big = ids[hole_area[ids] > min_hole_px]
            big = big[np.argsort(-hole_area[big], kind="stable")][:max_holes]
            keep_hole[big] = True
    tissue = filled & ~keep_hole[hole_lab]
    lab, n = ndi.label(filled)
    if n:
        area = np.bincount(lab.ravel(), weights=tissue.ravel().astype(np.float64), minlength=n + 1)
        ok = area > min_tissue_px
        ok[0] = False
        tissue &= ok[lab]
    return tissue


def _coverage(n_tiles: int, tile0: int, n_px: int, px0: int) -> "Any":
    """Sparse (n_tiles, n_px): length of level-0 overlap between tile i [i*tile0, (i+1)*tile0) and mask
    pixel j [j*px0, (j+1)*px0)."""
    from scipy import sparse

    rows, cols, vals = [], [], []
    for i in range(n_tiles):
        a, b = i * tile0, (i + 1) * tile0
        j0, j1 = a // px0, min(n_px, -(-b // px0))
        j = np.arange(j0, j1)
        ov = np.minimum(b, (j + 1) * px0) - np.maximum(a, j * px0)
        rows.append(np.full(len(j), i))
        cols.append(j)
        vals.append(ov.astype(np.float64))
    if not rows:
        return sparse.csr_matrix((0, n_px))
    return sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                             shape=(n_tiles, n_px))


def tile_grid(mask: np.ndarray, mask_downsample: int, slide_size: tuple[int, int], tile0: int,
              min_tissue: float) -> tuple[np.ndarray, np.ndarray]:
    """(coords (N, 2) int64 level-0 top-left x, y in row-major order, tissue fraction (N,)) of the
    whole tiles inside the slide whose tissue fraction is >= ``min_tissue``."""
    W, H = slide_size
    nx, ny = W // tile0, H // tile0
    if nx == 0 or ny == 0:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    cx = _coverage(nx, tile0, mask.shape[1], mask_downsample)
    cy = _coverage(ny, tile0, mask.shape[0], mask_downsample)
    frac = np.asarray((cy @ (cx @ mask.T.astype(np.float64)).T)) / float(tile0 * tile0)
    ys, xs = np.nonzero(frac >= min_tissue - 1e-9)
    coords = np.stack([xs * tile0, ys * tile0], axis=1).astype(np.int64)
    return coords, frac[ys, xs].astype(np.float32)


__all__ = ["TissueParams", "tissue_mask", "tile_grid", "otsu", "pen_mask", "saturation_threshold",
           "GLASS_MAX_SATURATION"]
