"""Reading whole-slide images: OpenSlide for vendor formats, tifffile for plain pyramidal TIFFs.

:func:`open_slide` returns a :class:`Slide` whatever the backend: level-0 size, the pyramid's
levels and downsamples, the scale in µm/px (and where it came from), ``read_region`` (RGB
uint8, glass-white outside the image) and ``read_thumbnail`` (built block by block from the
closest pyramid level, so a slide without a small level is never decoded whole).

Scale, in order: OpenSlide's ``openslide.mpp-x/y`` (filled from the Aperio ``MPP``, the TIFF
resolution tags, the vendor's metadata), the Aperio ``MPP`` of the description and the TIFF
``XResolution``/``YResolution`` with their ``ResolutionUnit`` (tifffile path), then, with a
warning, the objective power (20x taken as 0.5 µm/px: 10 / power). A slide with none of these is
refused unless the caller passes ``um_per_px``; a scale outside :data:`PLAUSIBLE_UM_PER_PX` (a header
saying 0.0004 µm/px, a typo in ``--slide-um-per-px``) is refused too, before any size is derived from it.

Only regular files are opened (a FIFO named ``x.svs`` would block). A TIFF-based slide is inspected
with tifffile before OpenSlide sees it: tile data past the end of the file (a truncated copy) or a
broken IFD chain is refused as damaged, a grayscale pyramid as "not an RGB slide", and a pyramid of
more than 8 bits per sample is read by tifffile, its pixels rescaled to uint8 by the spot side's rule
(:func:`spavis.format.imagefile.to_uint8`: 16-bit / 257, never the low byte). tifffile reads regions
tile by tile (``FileHandle.read_segments`` + ``TiffPage.decode``: no zarr, no asyncio tasks left behind
by a failed decode). Any error while decoding pixels becomes one line: the slide is damaged.
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
#: µm per level-0 pixel a slide (or a target scale) can have: 0.05 (beyond any scanner's 100x) to 20 (0.5x).
PLAUSIBLE_UM_PER_PX = (0.05, 20.0)
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".btf", ".tf8", ".tf2", ".ndpi", ".scn", ".bif")
#: OpenSlide vendors whose files tifffile reads the same way (others are trusted to OpenSlide alone).
_TIFF_VENDORS = ("aperio", "generic-tiff")


def slide_name(path: str | os.PathLike) -> str:
    """The slide's id: its file name without the extension (``.ome.tif`` counts as one)."""
    name = Path(path).name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def fingerprint(path: str | os.PathLike) -> str:
    """sha256 of the size, first and last MiB of the file: cheap on a 3 GB slide, changes when it does.
    Only a regular file is opened (:func:`spavis.format.io.open_regular`: a FIFO is refused, not waited on)."""
    from spavis.format.io import open_regular

    try:
        fh = open_regular(path)
    except OSError as exc:
        raise SlideError(_os_reason(path, exc)) from None
    with fh:
        size = os.fstat(fh.fileno()).st_size
        h = hashlib.sha256(str(size).encode())
        h.update(fh.read(_FINGERPRINT_CHUNK))
        if size > _FINGERPRINT_CHUNK:
            fh.seek(max(size - _FINGERPRINT_CHUNK, _FINGERPRINT_CHUNK))
            h.update(fh.read(_FINGERPRINT_CHUNK))
    return h.hexdigest()


def _os_reason(path, exc: OSError) -> str:
    """One line for an OS error on a slide path (a FIFO, a device, permission denied ...)."""
    from spavis.format.io import NotRegularFileError

    if isinstance(exc, NotRegularFileError):
        return str(exc)
    if isinstance(exc, FileNotFoundError):
        return f"{path}: no such slide file"
    return f"{path}: cannot be opened ({exc.strerror or exc})"


def damaged(path) -> SlideError:
    """The one line for pixels that cannot be decoded."""
    return SlideError(f"{path}: unreadable, the file is damaged (truncated or corrupt); copy it again from the source")


def check_scale(um_per_px: float, where: str, fix: str) -> float:
    """``um_per_px`` if it lies in :data:`PLAUSIBLE_UM_PER_PX`, else one line: ``where`` it came from and ``fix``."""
    lo, hi = PLAUSIBLE_UM_PER_PX
    v = float(um_per_px)
    if not (np.isfinite(v) and lo <= v <= hi):
        raise SlideError(f"{where}: {v:g} µm/px is outside the plausible {lo:g}-{hi:g} µm/px; {fix}")
    return v


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
        return self._guarded(self._read, int(x), int(y), int(level), int(w), int(h))

    def read_tile(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        """The pixels of :meth:`read_region` as (h, w, 3) RGB or (h, w, 4) opaque RGBA uint8: the tile loader's
        hot path (a backend that decodes RGBA skips the copy that drops alpha; :mod:`stamp.models.pixels` reads both)."""
        return self.read_region(x, y, level, w, h)

    def _guarded(self, read, *args) -> np.ndarray:
        """``read(*args)``; a decoder's or the backend's error becomes :func:`damaged` (one line)."""
        try:
            return read(*args)
        except (SlideError, MemoryError, KeyboardInterrupt):
            raise
        except Exception as exc:
            raise damaged(self.path) from exc

    def read_thumbnail(self, downsample: int, *, max_block_px: int = 16_000_000) -> np.ndarray:
        """RGB uint8 image of the slide at 1/``downsample`` (an integer, clamped to [1, the slide's longest
        side]), pixel (i, j) the mean of level-0 [j*ds, (j+1)*ds) x [i*ds, (i+1)*ds) (white outside).

        Read from the closest finer level in blocks of at most ``max_block_px`` level pixels (never less
        than one thumbnail pixel), so memory is bounded whatever the slide and the numbers asked."""
        from PIL import Image

        W, H = self.dimensions
        ds = int(min(max(1, int(downsample)), max(W, H)))
        tw, th = -(-W // ds), -(-H // ds)
        level = self.best_level(ds)
        lds = self.level_downsamples[level]
        f = ds / lds  # level pixels per thumbnail pixel (>= 1)
        per_px = max(1.0, f * f)
        cols = tw if tw * per_px <= max_block_px else max(1, int(max_block_px // per_px))
        rows = max(1, min(th, int(max_block_px // (cols * per_px))))
        out = np.empty((th, tw, 3), np.uint8)
        for r0 in range(0, th, rows):
            r1 = min(th, r0 + rows)
            ly0, ly1 = int(np.floor(r0 * f)), int(np.ceil(r1 * f))
            for c0 in range(0, tw, cols):
                c1 = min(tw, c0 + cols)
                lx0, lx1 = int(np.floor(c0 * f)), int(np.ceil(c1 * f))
                block = self._guarded(self._read, int(round(lx0 * lds)), int(round(ly0 * lds)), level,
                                      lx1 - lx0, ly1 - ly0)
                if f == 1:
                    out[r0:r1, c0:c1] = block[: r1 - r0, : c1 - c0]
                    continue
                box = (c0 * f - lx0, r0 * f - ly0, c1 * f - lx0, r1 * f - ly0)
                out[r0:r1, c0:c1] = np.asarray(Image.fromarray(block).resize((c1 - c0, r1 - r0), Image.BOX, box=box))
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
        rgba = self._guarded(lambda: np.asarray(self._h.read_region((int(x), int(y)), int(level), (int(w), int(h)))))
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


#: tifffile's log lines that mean a broken file (a cut IFD chain, image data without offsets).
_TIFF_DAMAGE = ("invalid page offset", "invalid next page", "missing data offset", "missing ByteCounts",
                "missing data ByteCounts")


class _TiffLog(logging.Handler):
    """Collects tifffile's log records while a file is parsed: none reaches the user's terminal; those
    in :data:`_TIFF_DAMAGE` mark the file as damaged (others, e.g. an OME-XML it falls back from, do not)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.errors: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if any(k in message for k in _TIFF_DAMAGE):
            self.errors.append(message)

    def __enter__(self) -> "_TiffLog":
        logger = logging.getLogger("tifffile")
        self._saved = logger.propagate, logger.level
        logger.addHandler(self)
        logger.propagate = False
        logger.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc) -> None:
        logger = logging.getLogger("tifffile")
        logger.removeHandler(self)
        logger.propagate, level = self._saved
        logger.setLevel(level)


_JPEG = (6, 7, 33007, 34892)


class TiffSlide(Slide):
    """A pyramidal TIFF (pages or SubIFDs, tiled or stripped, contiguous or planar, 8 or 16 bits) read with
    tifffile: only the tiles (strips) a region touches are read and decoded, then rescaled to uint8.

    Opening checks what :func:`open_slide` relies on: an RGB image (3 or 4 samples), an IFD chain
    tifffile parses without error and tile data inside the file (a truncated copy is refused at once,
    before a tile is decoded)."""

    backend = "tifffile"

    def __init__(self, path: Path) -> None:
        import tifffile

        with _TiffLog() as tlog:
            try:
                self._tif = tifffile.TiffFile(path)
            except Exception:
                raise damaged(path) from None
            try:
                dims, self._pages = self._inspect(path, tlog)
            except BaseException:
                self._tif.close()
                raise
        page = self._pages[0]
        self.bits = int(page.bitspersample)
        super().__init__(path, dims[0], dims, [dims[0][0] / d[0] for d in dims], _tiff_scale(page, path), "tifffile")

    def _inspect(self, path: Path, tlog: _TiffLog):
        tif = self._tif
        try:
            pages = list(tif.pages)  # the whole IFD chain (a truncated file logs "invalid page offset")
            series = tif.series
        except Exception:
            raise damaged(path) from None
        if tlog.errors or not pages or not series:
            raise damaged(path)
        levels = [lv.keyframe for lv in series[0].levels]
        page = levels[0]
        if page.samplesperpixel < 3 or page.photometric not in (2, 6):  # RGB, YCbCr
            kind = str(getattr(page.photometric, "name", page.photometric)).lower()
            raise SlideError(f"{path}: not an RGB slide ({page.samplesperpixel} sample(s) per pixel, {kind}); "
                             "export it as an RGB pyramidal TIFF")
        size = tif.filehandle.size
        for p in [*pages, *[lv.pages[0] for lv in series[0].levels]]:
            if p.dataoffsets and max(o + c for o, c in zip(p.dataoffsets, p.databytecounts)) > size:
                raise damaged(path)  # a truncated copy: tile data past the end of the file
        dims = []
        for lv in levels:
            if lv.samplesperpixel != page.samplesperpixel or lv.planarconfig != page.planarconfig:
                raise SlideError(f"{path}: pyramid levels differ in their samples ({lv}); export it again")
            dims.append((int(lv.imagewidth), int(lv.imagelength)))
        return dims, [lv_series.pages[0] for lv_series in series[0].levels]

    def _read(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        from spavis.format.imagefile import to_uint8

        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        lx, ly = int(round(x / ds)), int(round(y / ds))
        out = np.full((h, w, 3), 255, np.uint8)
        x0, y0, x1, y1 = max(lx, 0), max(ly, 0), min(lx + w, lw), min(ly + h, lh)
        if x1 > x0 and y1 > y0:
            part = self._region(self._pages[level], x0, y0, x1, y1)
            part = to_uint8(part)
            part = _to_rgb(part[..., :4]) if part.shape[-1] >= 4 else part[..., :3]
            out[y0 - ly:y1 - ly, x0 - lx:x1 - lx] = part
        return out

    def _region(self, page, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """Pixels [y0:y1, x0:x1] of ``page`` in its own dtype, (h, w, samples): the segments touched, decoded."""
        kf = page.keyframe
        H, W, S = kf.imagelength, kf.imagewidth, kf.samplesperpixel
        if kf.is_tiled:
            sh, sw = kf.tilelength, kf.tilewidth
        else:  # strips: full width, rowsperstrip rows
            sh, sw = max(1, min(kf.rowsperstrip or H, H)), W
        nr, nc = -(-H // sh), -(-W // sw)
        planar = kf.planarconfig == 2
        planes = range(S) if planar else range(1)
        index = [p * nr * nc + r * nc + c for p in planes for r in range(y0 // sh, min(nr, -(-y1 // sh)))
                 for c in range(x0 // sw, min(nc, -(-x1 // sw)))]
        out = np.full((y1 - y0, x1 - x0, S), np.iinfo(kf.dtype).max if kf.dtype.kind in "ui" else 1, kf.dtype)
        args: dict = {}
        if kf.compression in _JPEG:
            args.update(jpegtables=page.jpegtables, jpegheader=kf.jpegheader)
        offsets, counts = page.dataoffsets, page.databytecounts
        for data, i in self._tif.filehandle.read_segments([offsets[i] for i in index], [counts[i] for i in index],
                                                           indices=index, sort=True):
            seg, (s, _, sy, sx, _), _ = kf.decode(data, i, **args)
            if seg is None:  # a tile left out of a sparse file: glass
                continue
            seg = seg[0]
            yy0, yy1, xx0, xx1 = max(y0, sy), min(y1, sy + seg.shape[0]), max(x0, sx), min(x1, sx + seg.shape[1])
            if yy1 > yy0 and xx1 > xx0:
                part = seg[yy0 - sy:yy1 - sy, xx0 - sx:xx1 - sx]
                if planar:
                    out[yy0 - y0:yy1 - y0, xx0 - x0:xx1 - x0, s] = part[..., 0]
                else:
                    out[yy0 - y0:yy1 - y0, xx0 - x0:xx1 - x0] = part
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


def _is_tiff(path: Path) -> bool:
    from spavis.format.io import open_regular

    try:
        with open_regular(path) as fh:
            return fh.read(4) in _TIFF_MAGIC
    except OSError as exc:
        raise SlideError(_os_reason(path, exc)) from None


def _openslide(path: Path) -> tuple[Optional[Slide], Optional[Exception]]:
    try:
        import openslide

        if openslide.OpenSlide.detect_format(str(path)) is not None:
            return OpenSlideSlide(path, openslide.OpenSlide(str(path))), None
    except Exception as exc:  # openslide.OpenSlideError / OpenSlideUnsupportedFormatError and friends
        return None, exc
    return None, None


def open_slide(path: str | os.PathLike, *, um_per_px: Optional[float] = None) -> Slide:
    """Open a slide with OpenSlide (vendor formats, Aperio, generic tiled TIFF), else tifffile (SubIFD
    pyramids, stripped TIFFs, more than 8 bits). ``um_per_px`` overrides the file's scale; without either
    the slide is refused, as is a scale outside :data:`PLAUSIBLE_UM_PER_PX` (module docstring)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise SlideError(f"{path}: no such slide file")
    if path.is_dir():
        raise SlideError(f"{path}: a folder, not a slide file")
    if um_per_px is not None:
        check_scale(um_per_px, f"--slide-um-per-px {um_per_px:g}", "pass the slides' µm per level-0 pixel")
    tiff: Optional[TiffSlide] = None
    tiff_error: Optional[SlideError] = None
    if _is_tiff(path):  # opens regular files only: a FIFO is refused before OpenSlide could block on it
        try:
            tiff = TiffSlide(path)
        except SlideError as exc:
            tiff_error = exc
    slide, os_error = _openslide(path) if tiff is None or tiff.bits == 8 else (None, None)
    if slide is not None and tiff_error is not None and slide.vendor in _TIFF_VENDORS:
        slide.close()  # damaged or not RGB: what tifffile found holds for OpenSlide's reading of the same TIFF
        raise tiff_error
    if slide is not None and tiff is not None and slide.vendor == "generic-tiff" \
            and tiff.level_count > slide.level_count:
        slide.close()  # OpenSlide's generic TIFF reads top-level pages only: a SubIFD pyramid is tifffile's
        slide = None
    if slide is None:
        if tiff_error is not None:
            raise tiff_error
        slide, tiff = tiff, None
    if tiff is not None:
        tiff.close()
    if slide is None:
        why = f" ({os_error})" if os_error else ""
        raise SlideError(f"{path}: not a slide format OpenSlide or tifffile can read{why}")
    try:
        if um_per_px is not None:
            slide.scale = Scale(float(um_per_px), float(um_per_px), "--slide-um-per-px")
        elif slide.scale is None:
            raise SlideError(f"{path}: no scale (µm/px) in the file; pass --slide-um-per-px (µm per level-0 pixel)")
        else:
            check_scale(slide.um_per_px, str(path), f"the file's {slide.scale.source} cannot be right: pass "
                        "--slide-um-per-px with the scanner's µm per level-0 pixel")
    except SlideError:
        slide.close()
        raise
    return slide


__all__ = ["Slide", "Scale", "open_slide", "slide_name", "fingerprint", "check_scale", "damaged", "SLIDE_SUFFIXES",
           "PLAUSIBLE_UM_PER_PX", "UM_PER_PX_AT_1X"]
