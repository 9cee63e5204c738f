"""One way to turn an image file (or image bytes) into uint8 RGB, shared by build-shards and stamp.

Why here: ``spavis build-shards`` (H&E pictures), the paired shards' PNG cells and ``stamp embed
--images`` must agree on what a picture's pixels are. Rules:

* every mode becomes uint8 (H, W, 3) RGB: grayscale replicated, alpha dropped, palette / CMYK
  converted;
* more than 8 bits per channel is **rescaled** to 0-255 by the type's range (16-bit 65535 -> 255),
  never clipped: PIL's own ``convert("RGB")`` of a 16-bit grayscale picture clips everything
  above 255 to white;
* a picture above ``max_pixels`` is refused in one line before its pixels are decoded (instead of
  PIL's ``DecompressionBombError`` traceback or a ``DecompressionBombWarning`` on stderr);
* a truncated or unknown file is one line naming it.

TIFFs PIL cannot read (16-bit RGB, planar) go through ``tifffile``; whole-slide images are not
for this module (``spavis.images`` reads those window by window).
"""
from __future__ import annotations

import io
import os
import threading
import warnings
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from spavis.errors import SpavisError

__all__ = ["ImageFileError", "MAX_PIXELS", "read_image_file", "pil_to_rgb", "to_uint8", "to_rgb"]

MAX_PIXELS = 100_000_000  # 100 megapixels (~300 MB as RGB): a picture, not a whole slide
_TIFF_SUFFIXES = (".tif", ".tiff")
_DIRECT = ("RGB",)
_SIXTEEN = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_WARNINGS = threading.Lock()


class ImageFileError(SpavisError):
    """An image file is unreadable, or too large to read whole. ``reason``: the problem without the
    file name and the fix (for callers that name the file their own way)."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


def to_uint8(arr: np.ndarray) -> np.ndarray:
    """Any pixel type -> uint8: integers rescaled by their type's range (uint16: / 257), floats in
    [0, 1] scaled by 255 (floats above 1 taken as 0-255), then clipped. uint8 passes unchanged."""
    arr = np.asarray(arr)
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.integer):
        top = float(np.iinfo(arr.dtype).max)
        return np.clip(arr.astype(np.float64) * (255.0 / top), 0, 255).astype(np.uint8)
    x = np.nan_to_num(arr.astype(np.float64))
    scale = 255.0 if x.size and float(x.max()) <= 1.0 else 1.0
    return np.clip(x * scale, 0, 255).astype(np.uint8)


def to_rgb(arr: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1-4) or planar (C, H, W) pixels of any type -> contiguous uint8 (H, W, 3)."""
    arr = np.asarray(arr)
    while arr.ndim > 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 2, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # planar (channel-first)
    arr = to_uint8(arr)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"pixels of shape {arr.shape} are not an RGB or grayscale picture")
    if arr.shape[2] < 3:
        return np.ascontiguousarray(np.repeat(arr[:, :, :1], 3, axis=2))
    return np.ascontiguousarray(arr[:, :, :3])


def pil_to_rgb(im: Any) -> np.ndarray:
    """A PIL image of any mode -> uint8 (H, W, 3) RGB by the module's rules (16-bit rescaled)."""
    mode = im.mode
    if mode in _DIRECT:
        return np.array(im)  # writable (torch.from_numpy wants it)
    if mode in _SIXTEEN:
        arr = np.asarray(im)
        if mode == "I":  # 32-bit container; what Pillow gives for 16-bit pictures in some versions
            arr = np.clip(arr, 0, 65535).astype(np.uint16)
        return to_rgb(arr.astype(np.uint16, copy=False))
    if mode == "F":
        return to_rgb(np.asarray(im, dtype=np.float32))
    return np.array(im.convert("RGB"))


def _name(source: Any, name: str | None) -> str:
    if name:
        return name
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return "an image"


def read_image_file(source: str | os.PathLike | bytes | BinaryIO, *, max_pixels: int | None = MAX_PIXELS,
                    name: str | None = None) -> tuple[np.ndarray, str]:
    """(uint8 (H, W, 3) RGB pixels, the picture's original mode) of a file, bytes or file object.

    ``max_pixels``: refuse larger pictures before decoding them (None: no limit beyond PIL's).
    Raises :class:`ImageFileError` with one line naming ``name`` (default: the path)."""
    from PIL import Image, UnidentifiedImageError

    where = _name(source, name)
    data = io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray, memoryview)) else source
    try:
        with _WARNINGS:  # catch_warnings swaps process-wide state: one thread at a time, header parse only
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(data)
        with im:
            _check_size(where, im.width, im.height, max_pixels)
            mode = im.mode
            im.load()
            return pil_to_rgb(im), mode
    except ImageFileError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageFileError(f"{where}: {_too_large(exc)}, larger than the {(max_pixels or 0) / 1e6:,.0f} megapixels "
                             "an image file may have to be read whole; cut it into tiles first (e.g. 224 px "
                             "patches)", f"{_too_large(exc)}, too large") from None
    except UnidentifiedImageError as exc:
        if isinstance(source, (str, os.PathLike)) and Path(source).suffix.lower() in _TIFF_SUFFIXES:
            return _read_tiff(Path(source), where, max_pixels)
        raise ImageFileError(f"{where}: not a readable image ({exc}); remove or re-export it", str(exc)) from None
    except (OSError, ValueError, SyntaxError, EOFError, TypeError) as exc:
        if isinstance(source, (str, os.PathLike)) and Path(source).suffix.lower() in _TIFF_SUFFIXES:
            return _read_tiff(Path(source), where, max_pixels)
        raise ImageFileError(f"{where}: not a readable image ({exc}); remove or re-export it", str(exc)) from None


def _too_large(exc: BaseException) -> str:
    import re

    m = re.search(r"\((\d+) pixels\)", str(exc))
    return f"{int(m.group(1)) / 1e6:,.0f} megapixels" if m else "too many pixels"


def _check_size(where: str, width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise ImageFileError(
            f"{where}: {width} x {height} pixels ({width * height / 1e6:,.0f} megapixels) is larger than the "
            f"{max_pixels / 1e6:,.0f} megapixels an image file may have to be read whole; cut it into tiles first "
            "(e.g. 224 px patches)", f"{width} x {height} pixels, too large")


def _read_tiff(path: Path, where: str, max_pixels: int | None) -> tuple[np.ndarray, str]:
    try:
        import tifffile

        with tifffile.TiffFile(path) as tf:
            series = tf.series[0]
            shape = tuple(series.shape)
            axes = series.axes
            h = shape[axes.index("Y")] if "Y" in axes else shape[-2]
            w = shape[axes.index("X")] if "X" in axes else shape[-1]
            _check_size(where, int(w), int(h), max_pixels)
            arr = series.asarray()
            rgb = to_rgb(arr)
    except ImageFileError:
        raise
    except Exception as exc:  # noqa: BLE001 — tifffile raises many kinds
        raise ImageFileError(f"{where}: not a readable image ({type(exc).__name__}: {exc}); "
                             "remove or re-export it", f"{type(exc).__name__}: {exc}") from None
    return rgb, f"{np.dtype(arr.dtype)} TIFF"
