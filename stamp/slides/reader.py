"""Reading whole-slide images: OpenSlide for vendor formats, tifffile for plain pyramidal TIFFs.

:func:`open_slide` returns a :class:`Slide` whatever the backend: level-0 size, the pyramid's
levels and downsamples, the scale in µm/px (and where it came from), ``read_region`` (RGB
uint8, glass-white outside the image) and ``read_thumbnail`` (built band by band from the
closest pyramid level, so a slide without a small level is never decoded whole).

Scale, in order: OpenSlide's ``openslide.mpp-x/y`` (filled from the Aperio ``MPP``, the TIFF
resolution tags, the vendor's metadata), the Aperio ``MPP`` of the description and the TIFF
``XResolution``/``YResolution`` with their ``ResolutionUnit`` (tifffile path), then, with a
warning, the objective power (20x taken as 0.5 µm/px: 10 / power). A slide with none of these is
refused unless the caller passes ``um_per_px``.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from stamp.errors import SlideError

log = logging.getLogger(__name__)

#: File name endings read as slides when a folder is given (OpenSlide's formats + TIFF).
SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".tif", ".tiff", ".vms", ".vmu", ".svslide", ".bif", ".dcm")
#: µm/px of 1x objective power: 20x -> 0.5 µm/px (the usual convention, used only with a warning).
UM_PER_PX_AT_1X = 10.0
_FINGERPRINT_CHUNK = 1 << 20


def slide_name(path: str | os.PathLike) -> str:
    """The slide's id: its file name without the extension (``.ome.tif`` counts as one)."""
    name = Path(path).name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def fingerprint(path: str | os.PathLike) -> str:
    """sha256 of the size, first and last MiB of the file: cheap on a 3 GB slide, changes when it does."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        h.update(fh.read(_FINGERPRINT_CHUNK))
        if size > _FINGERPRINT_CHUNK:
            fh.seek(max(size - _FINGERPRINT_CHUNK, _FINGERPRINT_CHUNK))
            h.update(fh.read(_FINGERPRINT_CHUNK))
    return h.hexdigest()


@dataclass(frozen=True)
class Scale:
    """µm per level-0 pixel and the metadata it came from."""

    x: float
    y: float
    source: str


def _to_rgb(rgba: np.ndarray) -> np.ndarray:
    """Non-premultiplied RGBA -> RGB on white: transparent areas (outside the scan) read as glass."""
    if rgba.shape[-1] == 3:
        return rgba
    if bool((rgba[..., 3] == 255).all()):  # the usual case: inside the scan
        return np.ascontiguousarray(rgba[..., :3])
    a = rgba[..., 3:4].astype(np.uint16)
    rgb = (rgba[..., :3].astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return rgb.astype(np.uint8)


class Slide:
    """One open slide. Subclasses implement ``_read(x0, y0, level, w, h)`` (level-0 location)."""

    backend = "?"

    def __init__(self, path: Path, dimensions: tuple[int, int], level_dimensions: list[tuple[int, int]],
                 level_downsamples: list[float], scale: Optional[Scale], vendor: str) -> None:
        self.path = path
        self.name = slide_name(path)
        self.dimensions = dimensions
        self.level_dimensions = level_dimensions
        self.level_downsamples = level_downsamples
        self.scale = scale
        self.vendor = vendor

    @property
    def level_count(self) -> int:
        return len(self.level_downsamples)

    @property
    def um_per_px(self) -> float:
        """Mean of x and y µm/px (slides are square-pixel in practice)."""
        if self.scale is None:
            raise SlideError(f"{self.path}: no scale in the file; pass --slide-um-per-px (µm per level-0 pixel)")
        return (self.scale.x + self.scale.y) / 2

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample is at most ``downsample`` (never coarser than asked)."""
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1 + 1e-3) and ds >= self.level_downsamples[best]:
                best = i
        return best

    def read_region(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 (h, w, 3) of ``level`` whose top-left is level-0 pixel (x, y); white outside."""
        return self._read(int(x), int(y), int(level), int(w), int(h))

    def read_tile(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        """The pixels of :meth:`read_region` as (h, w, 3) RGB or (h, w, 4) opaque RGBA uint8: the tile loader's
        hot path (a backend that decodes RGBA skips the copy that drops alpha; :mod:`stamp.models.pixels` reads both)."""
        return self.read_region(x, y, level, w, h)

    def read_thumbnail(self, downsample: int, *, band_rows: int = 256) -> np.ndarray:
        """RGB uint8 image of the slide at 1/``downsample`` (integer), pixel (i, j) covering level-0
        [j*ds, (j+1)*ds) x [i*ds, (i+1)*ds); read in bands from the closest finer level (memory bounded)."""
        from PIL import Image

        ds = int(downsample)
        W, H = self.dimensions
        tw, th = -(-W // ds), -(-H // ds)
        level = self.best_level(ds)
        lds = self.level_downsamples[level]
        lw, _ = self.level_dimensions[level]
        f = ds / lds  # level pixels per thumbnail pixel
        # a band holds at most ~64 M level pixels (256 MB RGBA) whatever the pyramid
        band_rows = max(1, min(band_rows, int(64e6 / max(1.0, tw * f * f))))
        out = np.empty((th, tw, 3), np.uint8)
        for r0 in range(0, th, band_rows):
            r1 = min(th, r0 + band_rows)
            y0f, y1f = r0 * f, r1 * f
            ly0 = int(np.floor(y0f))
            ly1 = int(np.ceil(y1f))
            cols = int(np.ceil(tw * f))
            band = self._read(0, int(round(ly0 * lds)), level, cols, ly1 - ly0)
            img = Image.fromarray(band)
            if f == 1 and ly0 == y0f:
                small = band[: r1 - r0, :tw]
            else:
                small = np.asarray(img.resize((tw, r1 - r0), Image.BOX if f >= 1 else Image.BILINEAR,
                                              box=(0, y0f - ly0, tw * f, y1f - ly0)))
            out[r0:r1] = small
        return out

    def close(self) -> None:
        pass

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _read(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError


class OpenSlideSlide(Slide):
    backend = "openslide"

    def __init__(self, path: Path, handle) -> None:
        self._h = handle
        props = dict(handle.properties)
        super().__init__(path, tuple(handle.dimensions), [tuple(d) for d in handle.level_dimensions],
                         [float(d) for d in handle.level_downsamples], _openslide_scale(props, path),
                         props.get("openslide.vendor", "?"))
        self.properties = props

    def _read(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        return _to_rgb(np.asarray(self._h.read_region((x, y), level, (w, h))))

    def read_tile(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        # inside the scan (alpha all 255) OpenSlide's RGBA buffer is handed on as it is; partly outside it is
        # composited on white as read_region does
        rgba = np.asarray(self._h.read_region((int(x), int(y)), int(level), (int(w), int(h))))
        return rgba if rgba[..., 3].min() == 255 else _to_rgb(rgba)

    def close(self) -> None:
        self._h.close()


def _float(value) -> Optional[float]:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) and v > 0 else None


def _objective_scale(power, path: Path) -> Optional[Scale]:
    p = _float(power)
    if p is None:
        return None
    um = UM_PER_PX_AT_1X / p
    log.warning("%s: no µm/px in the file; using the objective power %gx as %.4g µm/px (10 / power), "
                "pass --slide-um-per-px if the scanner differs", path, p, um)
    return Scale(um, um, f"objective power {p:g}x (assumed)")


def _openslide_scale(props: dict, path: Path) -> Optional[Scale]:
    x, y = _float(props.get("openslide.mpp-x")), _float(props.get("openslide.mpp-y"))
    if x and y:
        return Scale(x, y, "openslide.mpp-x/y")
    aperio = _float(props.get("aperio.MPP"))
    if aperio:
        return Scale(aperio, aperio, "aperio.MPP")
    tiff = _resolution_scale(props.get("tiff.XResolution"), props.get("tiff.YResolution"),
                             props.get("tiff.ResolutionUnit"))
    if tiff:
        return tiff
    return _objective_scale(props.get("openslide.objective-power") or props.get("aperio.AppMag"), path)


_UNIT_UM = {"centimeter": 1e4, "cm": 1e4, "3": 1e4, "inch": 25400.0, "2": 25400.0, "millimeter": 1e3, "mm": 1e3,
            "micrometer": 1.0, "um": 1.0, "µm": 1.0}


def _resolution_scale(xres, yres, unit) -> Optional[Scale]:
    """TIFF resolution (pixels per unit) -> µm/px; ``None`` without a physical unit (ResolutionUnit NONE)."""
    key = str(unit).strip().lower().split(".")[-1] if unit is not None else ""
    if key not in _UNIT_UM:
        return None
    x, y = _float(xres), _float(yres)
    if not (x and y):
        return None
    return Scale(_UNIT_UM[key] / x, _UNIT_UM[key] / y, f"TIFF resolution ({key})")


class TiffSlide(Slide):
    """A plain pyramidal TIFF (pages or SubIFDs, tiled or stripped) through tifffile + zarr: only the
    tiles a region touches are decoded."""

    backend = "tifffile"

    def __init__(self, path: Path) -> None:
        import tifffile

        self._tif = tifffile.TiffFile(path)
        if not len(self._tif.pages) or not self._tif.series:
            self._tif.close()
            raise SlideError(f"{path}: a TIFF without images (truncated or empty file); copy it again")
        series = self._tif.series[0]
        levels = list(series.levels)
        dims = []
        for lv in levels:
            axes = lv.axes
            shape = dict(zip(axes, lv.shape))
            if "X" not in shape or "Y" not in shape or shape.get("S", shape.get("C", 3)) not in (3, 4):
                raise SlideError(f"{path}: not an RGB slide (axes {axes}, shape {lv.shape}); "
                                 "export it as RGB pyramidal TIFF")
            dims.append((int(shape["X"]), int(shape["Y"])))
        self._axes = levels[0].axes
        self._levels = levels
        self._arrays: list = [None] * len(levels)
        page = levels[0].keyframe
        scale = _tiff_scale(page, path)
        super().__init__(path, dims[0], dims, [dims[0][0] / d[0] for d in dims], scale, "tifffile")

    def _array(self, level: int):
        if self._arrays[level] is None:
            import zarr

            store = self._tif.series[0].aszarr(level=level)
            arr = zarr.open(store, mode="r")
            if not hasattr(arr, "shape"):  # a multiscale group: its arrays are named by level
                arr = arr[str(level)]
            self._arrays[level] = arr
        return self._arrays[level]

    def _read(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        lx, ly = int(round(x / ds)), int(round(y / ds))
        out = np.full((h, w, 3), 255, np.uint8)
        x0, y0, x1, y1 = max(lx, 0), max(ly, 0), min(lx + w, lw), min(ly + h, lh)
        if x1 > x0 and y1 > y0:
            arr = self._array(level)
            if self._axes.startswith("S"):  # planar (S, Y, X)
                part = np.moveaxis(np.asarray(arr[:3, y0:y1, x0:x1]), 0, -1)
            else:
                part = np.asarray(arr[y0:y1, x0:x1])[..., :4]
                part = _to_rgb(part) if part.shape[-1] == 4 else part[..., :3]
            out[y0 - ly:y1 - ly, x0 - lx:x1 - lx] = part.astype(np.uint8, copy=False)
        return out

    def close(self) -> None:
        self._tif.close()


def _tiff_scale(page, path: Path) -> Optional[Scale]:
    desc = page.description or ""
    m = re.search(r"\bMPP\s*=\s*([0-9.eE+-]+)", desc)
    if m and _float(m.group(1)):
        v = float(m.group(1))
        return Scale(v, v, "aperio.MPP")
    tags = page.tags
    xr, yr, unit = tags.get("XResolution"), tags.get("YResolution"), tags.get("ResolutionUnit")
    if xr is not None and yr is not None and unit is not None:
        def frac(v):
            v = v.value
            return v[0] / v[1] if isinstance(v, tuple) and v[1] else v

        scale = _resolution_scale(frac(xr), frac(yr), getattr(unit.value, "name", unit.value))
        if scale:
            return scale
    m = re.search(r"\bAppMag\s*=\s*([0-9.]+)", desc)
    return _objective_scale(m.group(1), path) if m else None


def open_slide(path: str | os.PathLike, *, um_per_px: Optional[float] = None) -> Slide:
    """Open a slide with OpenSlide (vendor formats, Aperio, generic tiled TIFF), else tifffile (plain
    pyramidal TIFF). ``um_per_px`` overrides the file's scale; without either the slide is refused."""
    path = Path(path)
    if not path.exists():
        raise SlideError(f"{path}: no such slide file")
    if path.is_dir():
        raise SlideError(f"{path}: a folder, not a slide file")
    slide: Optional[Slide] = None
    os_error = None
    try:
        import openslide

        if openslide.OpenSlide.detect_format(str(path)) is not None:
            slide = OpenSlideSlide(path, openslide.OpenSlide(str(path)))
    except Exception as exc:  # openslide.OpenSlideError / OpenSlideUnsupportedFormatError and friends
        os_error = exc
    tiff = path.suffix.lower() in (".tif", ".tiff", ".svs", ".btf", ".tf8", ".tf2")
    if slide is None and tiff:
        try:
            slide = TiffSlide(path)
        except SlideError:
            raise
        except Exception as exc:
            raise SlideError(f"{path}: not a readable slide ({type(exc).__name__}: {exc}); "
                             "check the file is complete") from None
    elif slide is not None and slide.vendor == "generic-tiff" and tiff:
        # OpenSlide's generic TIFF reads top-level pages only: a pyramid in SubIFDs (OME-TIFF) is tifffile's
        try:
            other = TiffSlide(path)
        except Exception:
            other = None
        if other is not None and other.level_count > slide.level_count:
            slide.close()
            slide = other
        elif other is not None:
            other.close()
    if slide is None:
        why = f" ({os_error})" if os_error else ""
        raise SlideError(f"{path}: not a slide format OpenSlide or tifffile can read{why}")
    if um_per_px is not None:
        slide.scale = Scale(float(um_per_px), float(um_per_px), "--slide-um-per-px")
    elif slide.scale is None:
        slide.close()
        raise SlideError(f"{path}: no scale (µm/px) in the file; pass --slide-um-per-px (µm per level-0 pixel)")
    return slide


__all__ = ["Slide", "Scale", "open_slide", "slide_name", "fingerprint", "SLIDE_SUFFIXES"]
