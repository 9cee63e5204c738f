"""GENERATED H&E-like whole-slide images for generated slices (never real tissue).

The texture of every pixel follows the spatial domain of the nearest in-tissue spot, so a
model that sees only a patch can tell domains apart (what patch -> spot retrieval needs):
per domain an eosin tint, a nuclei density and size, and a fibre direction and period.
Each domain's texture is rendered once as a seamless 768 px tile (nuclei discs placed by
hashing cell coordinates, a whole number of fibre periods) and every image pixel gathers
from the texture of its domain, so a whole slide costs about as much as copying it; the
same seed gives the same bytes. The picture is written tile by tile as a pyramidal,
JPEG-compressed TIFF (as HEST and scanners do), so memory stays at one tile.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

GLASS = np.array([243, 241, 244], np.float32)
LABEL = "GENERATED H&E-like image (spavis.images_synthetic) - synthetic, not a real tissue scan"
TILE = 256


def _domain_styles(n_domains: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, 0x4E5])
    k = np.arange(n_domains)
    return {
        "eosin": np.clip(np.array([226, 150, 186])[None, :] + rng.normal(0, 22, (n_domains, 3)), 120, 245),
        "nucleus": np.clip(np.array([80, 45, 125])[None, :] + rng.normal(0, 18, (n_domains, 3)), 20, 160),
        "density": 0.12 + 0.7 * ((k * 0.618034 + rng.uniform(0, 1)) % 1.0),  # spread over 0.12..0.82
        "cell_um": rng.uniform(7.0, 16.0, n_domains),
        "angle": rng.uniform(0, np.pi, n_domains),
        "period_um": rng.uniform(6.0, 30.0, n_domains),
    }


def _hash01(a: np.ndarray, b: np.ndarray, c: int, salt: int) -> np.ndarray:
    """Uniform [0, 1) from integer coordinates (a cheap integer hash; identical everywhere)."""
    h = (a.astype(np.uint64) * np.uint64(0x9E3779B1) ^ b.astype(np.uint64) * np.uint64(0x85EBCA77)
         ^ np.uint64((c * 0xC2B2AE3D + salt) & 0xFFFFFFFF))
    h ^= h >> np.uint64(15)
    h *= np.uint64(0x2C1B3C6D)
    h ^= h >> np.uint64(12)
    h *= np.uint64(0x297A2D39)
    h ^= h >> np.uint64(15)
    return (h & np.uint64(0xFFFFFF)).astype(np.float32) / np.float32(1 << 24)


def domain_texture(k: int, size: int, *, um_per_px: float, styles: dict[str, np.ndarray], seed: int) -> np.ndarray:
    """RGB float32 (size, size, 3): the texture of domain ``k`` (nuclei discs on fibred eosin).

    Seamless when tiled: a whole number of nucleus cells and of fibre periods fit in ``size``.
    """
    n_cells = max(1, round(size * um_per_px / styles["cell_um"][k]))
    cell = size / n_cells  # pixels
    p = np.arange(size) + 0.5
    c = np.floor(p / cell).astype(np.int64)
    gy, gx = np.meshgrid(np.arange(n_cells), np.arange(n_cells), indexing="ij")
    present = _hash01(gy, gx, k, seed) < styles["density"][k]  # per nucleus cell
    rad = 0.22 + 0.18 * _hash01(gy, gx, k, seed + 1)
    oy = (_hash01(gy, gx, k, seed + 2) - 0.5) * 0.3
    ox = (_hash01(gy, gx, k, seed + 3) - 0.5) * 0.3
    iy, ix = c[:, None], c[None, :]
    f = p / cell - c
    fy, fx = f[:, None], f[None, :]
    nucleus = present[iy, ix] & ((fy - 0.5 - oy[iy, ix]) ** 2 + (fx - 0.5 - ox[iy, ix]) ** 2 < rad[iy, ix] ** 2)
    a, cycles = styles["angle"][k], size * um_per_px / styles["period_um"][k]
    ny, nx = round(cycles * math.sin(a)), round(cycles * math.cos(a))
    fibre = np.sin(2 * np.pi * (nx * p[None, :] + ny * p[:, None]) / size)
    colour = np.where(nucleus[:, :, None], styles["nucleus"][k].astype(np.float32),
                      styles["eosin"][k].astype(np.float32) * (1.0 + 0.08 * fibre[:, :, None]))
    grain = (np.random.default_rng([seed, k, 0x6A1]).random((size, size), np.float32) - 0.5) * 14.0
    return np.clip(colour + grain[:, :, None], 0, 255).astype(np.float32)


class TextureBank:
    """One pre-rendered texture per domain (plus glass), tiled over the image: each output pixel
    is one gather, so a whole-slide picture costs about as much as copying it. The period
    (768 px, ~560 µm at Visium's 0.72 µm/px) is wider than a region (336 µm)."""

    def __init__(self, n_domains: int, *, um_per_px: float, styles: dict[str, np.ndarray], seed: int,
                 size: int = 768):
        self.size = size
        bank = [domain_texture(k, size, um_per_px=um_per_px, styles=styles, seed=seed) for k in range(n_domains)]
        glass = np.broadcast_to(GLASS, (size, size, 3))
        self.bank = np.stack(bank + [glass]).astype(np.uint8)  # index n_domains = glass

    def gather(self, dom: np.ndarray, y0: int, x0: int) -> np.ndarray:
        h, w = dom.shape
        yy = ((y0 + np.arange(h)) % self.size)[:, None]
        xx = ((x0 + np.arange(w)) % self.size)[None, :]
        if (dom < 0).all():  # glass only (most tiles of a capture area's margin)
            return np.broadcast_to(self.bank[-1, 0, 0], (h, w, 3)).copy()
        d = np.where(dom < 0, self.bank.shape[0] - 1, dom)
        return self.bank[d, yy, xx]


def render_tile(y0: int, x0: int, h: int, w: int, *, tree, spot_domain: np.ndarray, um_per_px: float,
                bank: TextureBank, reach_um: float = 75.0) -> np.ndarray:
    """RGB uint8 (h, w, 3) of the image window starting at (y0, x0): each pixel takes the
    texture of the nearest in-tissue spot's domain (glass beyond ``reach_um``)."""
    step = 4  # domain lookup on a 4 px grid (sub-cellular detail does not need per-pixel queries)
    gy = (np.arange(y0, y0 + h, step) + step / 2) * um_per_px
    gx = (np.arange(x0, x0 + w, step) + step / 2) * um_per_px
    qy, qx = np.meshgrid(gy, gx, indexing="ij")
    dist, idx = tree.query(np.column_stack([qx.ravel(), qy.ravel()]), k=1)
    dom = np.where(dist <= reach_um, spot_domain[idx], -1).reshape(qy.shape)
    dom = np.repeat(np.repeat(dom, step, 0), step, 1)[:h, :w]
    return bank.gather(dom, y0, x0)


def write_he_tiff(path: str | Path, adata, *, um_per_px: float, height: int, width: int, seed: int,
                  levels: int = 2) -> Path:
    """Write the generated H&E of a generated slice (``adata``: obs pxl_row/pxl_col/domain) as a
    pyramidal tiled TIFF whose level 0 is the full-resolution pixel grid of the coordinates."""
    import tifffile
    from scipy.spatial import cKDTree

    obs = adata.obs
    xy = np.column_stack([obs["pxl_col"].to_numpy(np.float64), obs["pxl_row"].to_numpy(np.float64)]) * um_per_px
    codes = obs["domain"].cat.codes.to_numpy() if hasattr(obs["domain"], "cat") else obs["domain"].to_numpy()
    n_domains = int(len(obs["domain"].cat.categories)) if hasattr(obs["domain"], "cat") else int(codes.max()) + 1
    tree = cKDTree(xy)
    styles = _domain_styles(n_domains, seed)
    banks: dict[int, TextureBank] = {}
    res = 1e4 / um_per_px  # pixels per centimetre: the TIFF records the scale too
    opts = dict(tile=(TILE, TILE), photometric="rgb", compression="jpeg", compressionargs={"level": 90},
                metadata=None)

    def tiles(h: int, w: int, factor: int):
        for ty in range(0, h, TILE):
            for tx in range(0, w, TILE):
                th, tw = min(TILE, h - ty), min(TILE, w - tx)
                # a coarser level is rendered at its own scale (cheap; the texture is statistical)
                if factor not in banks:
                    banks[factor] = TextureBank(n_domains, um_per_px=um_per_px * factor, styles=styles, seed=seed)
                tile = render_tile(ty, tx, th, tw, tree=tree, spot_domain=codes, um_per_px=um_per_px * factor,
                                   bank=banks[factor])
                full = np.full((TILE, TILE, 3), 255, np.uint8)
                full[:th, :tw] = tile
                yield full

    path = Path(path)
    with tifffile.TiffWriter(path, bigtiff=False) as tw:
        shapes = []
        for i in range(levels):
            f = 2**i
            if i and (height // f < TILE or width // f < TILE):
                break
            shapes.append((height // f, width // f, f))
        for i, (h, w, f) in enumerate(shapes):
            kw = dict(opts, resolution=(res / f, res / f), resolutionunit="CENTIMETER")
            if i == 0:
                kw["subifds"] = len(shapes) - 1
                kw["description"] = LABEL  # the file says what it is, wherever it is copied
            else:
                kw["subfiletype"] = 1
            tw.write(tiles(h, w, f), shape=(h, w, 3), dtype=np.uint8, **kw)
    return path
