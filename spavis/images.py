"""Lazy access to a slide's H&E image and exact-geometry patch extraction.

Why this shape:
- Whole-slide images (HEST ``wsis/<id>.tif``, Space Ranger ``--image`` inputs) are multi-GB
  pyramidal TIFFs. They are opened with ``tifffile`` as a Zarr store (``aszarr``): only the
  tiles under a requested window are decoded, and the pyramid level closest to (but not
  coarser than) the wanted scale is used, so a 3 GB slide is never loaded whole.
- Decoded windows are kept in a small LRU cache of blocks aligned to the file's tiles (or
  full-width bands for an untiled, stripped TIFF): spots come in barcode order (spatially
  random), and neighbouring patches share tiles.
- PNG/JPEG images (Space Ranger hires/lowres, STimage PNGs) have no tiles; they are decoded
  once (PIL), which is what their size allows.
- Geometry is exact: a window is resampled by PIL with a float source box, so the centre
  of the output is the requested point to a fraction of a source pixel (no rounding to the
  grid); outside the image is filled with white (glass) and reported as padding.
- Channels are RGB. Grayscale is replicated, RGBA drops alpha, planar (CYX) is transposed;
  each conversion is reported in ``ImageSource.notes``.
"""
from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from spavis.errors import SpavisError
from spavis.format.io import not_regular

PAD_VALUE = 255  # glass: what surrounds tissue on an H&E slide
BLOCK_PX = 1024  # cache granularity (level pixels)
TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".svs", ".ome.tif", ".ome.tiff")
CACHE_ENV = "SPAVIS_IMAGE_CACHE_MB"  # decoded-block cache per opened slide (default 512 MB)


THREADS_ENV = "SPAVIS_IMAGE_THREADS"  # threads resizing + PNG-encoding a slide's cuts (default min(4, CPUs))


def image_threads() -> int:
    """Threads for the GIL-free part of a cut (PIL resize, zlib), read at call time."""
    raw = os.environ.get(THREADS_ENV)
    if raw is None:
        return max(1, min(4, os.cpu_count() or 1))
    try:
        return max(1, int(raw))
    except ValueError:
        raise ImageError(f"{THREADS_ENV}={raw!r} is not a number of threads; set it to e.g. 4 or unset it.") from None


def cache_budget_mb() -> float:
    """The block cache budget, read at call time (like every spavis setting)."""
    try:
        value = float(os.environ.get(CACHE_ENV, "512"))
    except ValueError:
        raise ImageError(f"{CACHE_ENV}={os.environ.get(CACHE_ENV)!r} is not a number of megabytes; "
                         "set it to e.g. 512 or unset it.") from None
    return max(value, 16.0)


# Space Ranger outputs and QC pictures that are not the microscope image it was given (--image)
NOT_FULLRES = ("tissue_hires_image", "tissue_lowres_image", "aligned_fiducials", "detected_tissue_image",
               "cytassist_image", "aligned_tissue_image", "spot_image", "tissue_image_qc", "fiducial")
FULLRES_SUFFIXES = TIFF_SUFFIXES + (".jpg", ".jpeg")


def is_fullres_image_name(name: str) -> bool:
    """True for a file name that looks like a full-resolution H&E (TIFF/JPEG, gzip'd or not),
    not one of Space Ranger's derived pictures. Used by discovery and by fetch (GEO)."""
    low = name.rsplit("/", 1)[-1].lower()
    if low.endswith(".gz"):
        low = low[:-3]
    return low.endswith(FULLRES_SUFFIXES) and not any(t in low for t in NOT_FULLRES)


class ImageError(SpavisError):
    """A slide image cannot be used (unreadable, truncated, does not cover the spots, no calibration)."""


@dataclass
class Level:
    """One resolution of an image: an array-like (H, W, C) and its downsample factor vs level 0."""

    data: Any  # zarr array or numpy array; indexed [y0:y1, x0:x1, ...]
    height: int
    width: int
    factor: float  # level-0 pixels per level pixel
    layout: str = "YXS"  # YXS (interleaved), YX (gray), SYX (planar)
    channels: int = 3


@dataclass
class ImageSource:
    """An opened image: its levels (finest first), the file, and any conversion notes."""

    path: Path
    levels: list[Level]
    notes: list[str] = field(default_factory=list)
    _handle: Any = None
    _temp: Path | None = None  # an inflated copy of a gzip'd TIFF, removed on close

    @property
    def height(self) -> int:
        return self.levels[0].height

    @property
    def width(self) -> int:
        return self.levels[0].width

    def close(self) -> None:
        if self._handle is not None:
            try:
                self._handle.close()
            except Exception:  # noqa: BLE001 — closing must never mask the real error
                pass
            self._handle = None
        if self._temp is not None:
            self._temp.unlink(missing_ok=True)
            self._temp = None

    def __enter__(self) -> "ImageSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def choose_level(self, um_per_px0: float, target_um: float) -> int:
        """The coarsest level still at least as fine as ``target_um`` (finest when none is).

        Coarser than needed would lose resolution; finer decodes more tiles for nothing.
        """
        best = 0
        for i, lv in enumerate(self.levels):
            if um_per_px0 * lv.factor <= target_um * 1.01:
                best = i
        return best


def open_image(path: str | os.PathLike) -> ImageSource:
    """Open a TIFF lazily (tifffile + Zarr store) or decode a PNG/JPEG; ImageError on bad files."""
    path = Path(path)
    what = not_regular(path)
    if what == "missing":
        raise ImageError(f"{path}: image file not found; fetch it again (spavis fetch --with-images).")
    if what is not None:  # a FIFO would block, /dev/zero never ends: only regular files are decoded
        raise ImageError(f"{path}: is {what}, not a regular image file; remove it or move it out of the slice "
                         "folder.")
    name = path.name.lower()
    if name.endswith(".gz"):  # GEO ships images gzipped: no tiles to seek, so decompress once
        return _open_gzip(path, name[:-3])
    if name.endswith(TIFF_SUFFIXES):
        return _open_tiff(path)
    return _open_pil(path)


def _open_gzip(path: Path, inner: str) -> ImageSource:
    """A gzip'd TIFF is inflated to a temporary file (read lazily, deleted on close); a gzip'd
    PNG/JPEG is decoded from memory like any PNG/JPEG."""
    import gzip
    import io
    import shutil
    import tempfile

    tmp = None
    try:
        with gzip.open(path, "rb") as fh:
            if inner.endswith(TIFF_SUFFIXES):
                fd, tmp = tempfile.mkstemp(suffix=".tif", prefix="spavis-image-")
                with os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(fh, out, 1 << 22)
                data = None
            else:
                data = io.BytesIO(fh.read())
    except (OSError, EOFError) as exc:
        if tmp:
            os.unlink(tmp)
        raise ImageError(f"{path}: unreadable gzip ({exc}); the file is truncated, download it again.") from None
    if data is not None:
        return _open_pil(path, data)
    try:
        src = _open_tiff(Path(tmp))
    except ImageError as exc:
        os.unlink(tmp)
        raise ImageError(str(exc).replace(tmp, str(path))) from None
    src.path, src._temp = path, Path(tmp)
    return src


def _layout(shape: tuple[int, ...], axes: str, where: Path) -> tuple[str, int, int, int]:
    axes = axes.upper()
    if axes in ("YX",) and len(shape) == 2:
        return "YX", shape[0], shape[1], 1
    if axes.endswith("YXS") and len(shape) >= 3 and all(s == 1 for s in shape[:-3]):
        return "YXS", shape[-3], shape[-2], shape[-1]
    if axes.endswith(("CYX", "SYX")) and len(shape) >= 3 and all(s == 1 for s in shape[:-3]):
        return "SYX", shape[-2], shape[-1], shape[-3]
    raise ImageError(f"{where}: image axes {axes} {shape} are not a 2-D RGB/gray picture; "
                     "export the H&E as an RGB TIFF.")


@contextmanager
def _quiet_tifffile():
    """tifffile logs what it tolerates (e.g. a corrupted tag list); we raise one clear error instead."""
    log = logging.getLogger("tifffile")
    before = log.disabled
    log.disabled = True
    try:
        yield
    finally:
        log.disabled = before


def _open_tiff(path: Path) -> ImageSource:
    import tifffile
    import zarr

    try:
        with _quiet_tifffile():
            tf = tifffile.TiffFile(path)
            series = tf.series[0] if tf.series else None
    except Exception as exc:  # tifffile raises TiffFileError, ValueError, struct.error, ...
        raise ImageError(f"{path}: unreadable TIFF ({type(exc).__name__}: {exc}); the file is truncated "
                         "or not a TIFF, download it again.") from None
    if series is None:
        tf.close()
        raise ImageError(f"{path}: the TIFF holds no image; the file is truncated or not a TIFF, download it again.")
    try:
        group = zarr.open(series.aszarr(), mode="r")
        arrays = [group[str(i)] for i in range(len(series.levels))] if hasattr(group, "keys") else [group]
        levels, notes = [], []
        w0 = None
        for arr, lv in zip(arrays, series.levels):
            layout, h, w, c = _layout(tuple(arr.shape), lv.axes, path)
            w0 = w0 or w
            if arr.ndim > (2 if layout == "YX" else 3):  # drop leading singleton axes
                arr = _Squeeze(arr, arr.ndim - (2 if layout == "YX" else 3))
            levels.append(Level(arr, h, w, _factor(w0, w), layout, c))
        if np.dtype(series.dtype) != np.uint8:
            notes.append(f"{np.dtype(series.dtype)} pixels rescaled to 8-bit")
    except ImageError:
        tf.close()
        raise
    except Exception as exc:
        tf.close()
        raise ImageError(f"{path}: unreadable TIFF ({type(exc).__name__}: {exc}); download it again.") from None
    _check_complete(tf, series, path)
    src = ImageSource(path, levels, notes, tf)
    _note_channels(src)
    return src


def _check_complete(tf, series, path: Path) -> None:
    """Fail at open, not half-way through a slide, when tiles point past the end of the file."""
    size = path.stat().st_size
    for lv in series.levels:
        for page in lv.pages:
            if page is None or not hasattr(page, "dataoffsets"):
                continue
            ends = [o + c for o, c in zip(page.dataoffsets, page.databytecounts) if c]
            if ends and max(ends) > size:
                tf.close()
                raise ImageError(f"{path}: truncated TIFF (its tiles end at byte {max(ends):,}, the file has "
                                 f"{size:,}); download it again.")


def _factor(w0: int, w: int) -> float:
    """Level-0 pixels per level pixel: the integer k a pyramid used (w = floor or ceil of w0 / k),
    not w0 / w, which is off by up to a pixel at the far edge of a large slide."""
    k = round(w0 / w)
    return float(k) if k >= 1 and w in (w0 // k, -(-w0 // k)) else w0 / w


class _Squeeze:
    """Index an array with leading singleton axes as if they were not there."""

    def __init__(self, arr, lead: int):
        self.arr = arr
        self.lead = lead

    def __getitem__(self, key):
        return self.arr[(0,) * self.lead + tuple(key)]


def _open_pil(path: Path, data=None) -> ImageSource:
    from PIL import Image

    from spavis.format.imagefile import pil_to_rgb

    try:
        with Image.open(path if data is None else data) as im:
            Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, im.width * im.height + 1)
            mode = im.mode
            im.load()
            # other modes: the shared decoding rules (16-bit rescaled to 8-bit, never clipped to white)
            arr = np.asarray(im) if mode in ("RGB", "L", "RGBA", "LA") else pil_to_rgb(im)
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{path}: unreadable image ({exc}); the file is truncated or corrupt, "
                         "download it again.") from None
    src = ImageSource(path, [Level(arr, arr.shape[0], arr.shape[1], 1.0,
                                   "YX" if arr.ndim == 2 else "YXS", 1 if arr.ndim == 2 else arr.shape[2])])
    if mode not in ("RGB", "L", "RGBA", "LA"):
        src.notes.append(f"{mode} image converted to RGB")
    _note_channels(src)
    return src


def from_array(arr: np.ndarray, path: str = "<array>") -> ImageSource:
    """An in-memory image (e.g. the lowres picture a reader already decoded)."""
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        scale = 255.0 if arr.size and float(np.nanmax(arr)) <= 1.0 else 1.0
        arr = np.clip(np.nan_to_num(arr) * scale, 0, 255).astype(np.uint8)
    layout = "YX" if arr.ndim == 2 else "YXS"
    src = ImageSource(Path(path), [Level(arr, arr.shape[0], arr.shape[1], 1.0, layout,
                                         1 if arr.ndim == 2 else arr.shape[2])])
    _note_channels(src)
    return src


def _note_channels(src: ImageSource) -> None:
    lv = src.levels[0]
    if lv.channels == 1 or lv.layout == "YX":
        src.notes.append("grayscale image converted to RGB (channel replicated)")
    elif lv.channels == 2:
        src.notes.append("gray+alpha image converted to RGB (alpha dropped)")
    elif lv.channels == 4:
        src.notes.append("RGBA image converted to RGB (alpha dropped)")
    elif lv.channels != 3:
        raise ImageError(f"{src.path}: {lv.channels} channels; an H&E image has 3 (RGB).")
    if lv.layout == "SYX":
        src.notes.append("planar (channel-first) TIFF read as interleaved RGB")


def _to_rgb(block: np.ndarray, layout: str) -> np.ndarray:
    if layout == "SYX":
        block = np.moveaxis(block, 0, -1)
    if block.dtype != np.uint8:
        info_max = np.iinfo(block.dtype).max if np.issubdtype(block.dtype, np.integer) else 1.0
        block = np.clip(block.astype(np.float64) * (255.0 / info_max), 0, 255).astype(np.uint8)
    if block.ndim == 2:
        block = block[:, :, None]
    c = block.shape[2]
    if c == 1 or c == 2:
        return np.repeat(block[:, :, :1], 3, axis=2)
    return np.ascontiguousarray(block[:, :, :3])


def _block_shape(level: Level) -> tuple[int, int]:
    """Cache blocks aligned to the file's chunks: ~BLOCK_PX square blocks of whole tiles, or
    full-width bands of whole strips for an untiled (stripped) TIFF, whose every read decodes
    complete rows: square blocks would decode the same strips once per block column."""
    chunks = getattr(level.data, "chunks", None) or getattr(getattr(level.data, "arr", None), "chunks", None)
    if not chunks:
        return BLOCK_PX, BLOCK_PX
    if level.layout == "YXS":
        ch, cw = chunks[-3], chunks[-2]
    else:  # YX, or SYX (channel planes first)
        ch, cw = chunks[-2], chunks[-1]
    ch, cw = max(int(ch), 1), max(int(cw), 1)
    bh = -(-BLOCK_PX // ch) * ch
    bw = level.width if cw >= level.width else -(-BLOCK_PX // cw) * cw
    return bh, bw


class WindowReader:
    """Read RGB windows of one level with padding outside the image; decoded blocks are cached (LRU)."""

    def __init__(self, source: ImageSource, level: int = 0, cache_mb: float | None = None):
        self.source = source
        self.level = source.levels[level]
        budget = cache_budget_mb() if cache_mb is None else cache_mb
        self.block_h, self.block_w = _block_shape(self.level)
        self.max_blocks = max(4, int(budget * 2**20 // (self.block_h * self.block_w * 3)))
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._in_memory = isinstance(self.level.data, np.ndarray)

    def _block(self, by: int, bx: int) -> np.ndarray:
        key = (by, bx)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        lv = self.level
        y0, x0 = by * self.block_h, bx * self.block_w
        y1, x1 = min(y0 + self.block_h, lv.height), min(x0 + self.block_w, lv.width)
        block = _to_rgb(self._raw(y0, y1, x0, x1), lv.layout)
        self._cache[key] = block
        if len(self._cache) > self.max_blocks:
            self._cache.popitem(last=False)
        return block

    def _raw(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        lv = self.level
        try:
            with _quiet_tifffile():
                if lv.layout == "SYX":
                    return np.asarray(lv.data[:, y0:y1, x0:x1])
                return np.asarray(lv.data[y0:y1, x0:x1])
        except Exception as exc:  # a truncated file fails here, tile by tile
            raise ImageError(f"{self.source.path}: cannot decode pixels {x0}..{x1} x {y0}..{y1} "
                             f"({type(exc).__name__}: {exc}); the file is truncated or corrupt, "
                             "download it again.") from None

    def iter_blocks(self) -> Iterator[np.ndarray]:
        """Every decoded block of the level as uint8 RGB, row by row, one at a time (not cached):
        a scan of a level of any size in bounded memory."""
        lv = self.level
        if self._in_memory:
            for y0 in range(0, lv.height, self.block_h):
                yield _to_rgb(np.asarray(lv.data[y0:y0 + self.block_h]), lv.layout)
            return
        for y0 in range(0, lv.height, self.block_h):
            for x0 in range(0, lv.width, self.block_w):
                yield _to_rgb(self._raw(y0, min(y0 + self.block_h, lv.height), x0,
                                        min(x0 + self.block_w, lv.width)), lv.layout)

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels [y0, y1) x [x0, x1) of the level as uint8 RGB; outside the image = PAD_VALUE."""
        lv = self.level
        out = np.full((y1 - y0, x1 - x0, 3), PAD_VALUE, np.uint8)
        cy0, cy1 = max(y0, 0), min(y1, lv.height)
        cx0, cx1 = max(x0, 0), min(x1, lv.width)
        if cy0 >= cy1 or cx0 >= cx1:
            return out
        if self._in_memory:
            out[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0] = _to_rgb(np.asarray(lv.data[cy0:cy1, cx0:cx1]), lv.layout)
            return out
        bh, bw = self.block_h, self.block_w
        for by in range(cy0 // bh, (cy1 - 1) // bh + 1):
            for bx in range(cx0 // bw, (cx1 - 1) // bw + 1):
                blk = self._block(by, bx)
                gy0, gx0 = by * bh, bx * bw
                sy0, sy1 = max(cy0, gy0), min(cy1, gy0 + blk.shape[0])
                sx0, sx1 = max(cx0, gx0), min(cx1, gx0 + blk.shape[1])
                out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = blk[sy0 - gy0:sy1 - gy0, sx0 - gx0:sx1 - gx0]
        return out


@dataclass
class Window:
    """Source pixels around one cut (read from the level) and the float box to resample."""

    pixels: np.ndarray | None  # None: the centre is not finite (no position): all padding
    box: tuple[float, float, float, float]
    padded: bool


def read_window(reader: WindowReader, cx: float, cy: float, half: float) -> Window:
    """The pixels under the square of half-width ``half`` (level pixels) centred on the continuous
    point (cx, cy) (pixel i covers [i, i+1)), with a 2 px margin for the resampling filter."""
    lv = reader.level
    left, top, right, bottom = cx - half, cy - half, cx + half, cy + half
    if not all(map(math.isfinite, (left, top, right, bottom))):
        return Window(None, (0.0, 0.0, 0.0, 0.0), True)
    padded = left < -1e-6 or top < -1e-6 or right > lv.width + 1e-6 or bottom > lv.height + 1e-6
    x0, y0 = math.floor(left) - 2, math.floor(top) - 2
    x1, y1 = math.ceil(right) + 2, math.ceil(bottom) + 2
    return Window(reader.read(y0, y1, x0, x1), (left - x0, top - y0, right - x0, bottom - y0), padded)


def resize_window(window: Window, size: int) -> np.ndarray:
    """``size`` x ``size`` RGB of the window's box. PIL's resize takes a float source box, so the
    geometry is exact (no snapping to the grid) and a reduction is anti-aliased. Releases the
    GIL, so windows can be resized on threads."""
    from PIL import Image

    if window.pixels is None:
        return np.full((size, size, 3), PAD_VALUE, np.uint8)
    return np.asarray(Image.fromarray(window.pixels).resize((size, size), Image.BILINEAR, box=window.box))


def resample(reader: WindowReader, cx: float, cy: float, half: float, size: int) -> tuple[np.ndarray, bool]:
    """``read_window`` + ``resize_window``: the cut as an array, and whether it needed padding."""
    w = read_window(reader, cx, cy, half)
    return resize_window(w, size), w.padded


def encode_png(arr: np.ndarray) -> bytes:
    """PNG bytes of an RGB uint8 array (deterministic: fixed zlib level 1, no metadata)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)  # level 6: 4x slower, 8% smaller
    return buf.getvalue()
