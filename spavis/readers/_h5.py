"""Whole-dataset reads of 1-D HDF5 arrays, decoding deflate (+ shuffle) chunks without HDF5's filter pipeline.

Why: reading a 10x count matrix is the largest cost of a build after Parquet encoding. For a
generated slide's 11 M nonzeros ``dataset[:]`` took 0.16 s (int32 data) + 0.29 s (int64 indices)
of CPU; reading the raw chunks (``H5Dchunk_iter`` for their places, one ``pread`` each) and
inflating them with zlib-ng (imagecodecs) and numcodecs' shuffle took 0.10 s + 0.16 s. The
result is the same array: any dataset this does not cover (other filters, a chunk stored with
a filter skipped, missing chunks, a non-numeric type, no ``chunk_iter`` in h5py) is read by h5py.
"""
from __future__ import annotations

import os
import zlib

import numpy as np

__all__ = ["read_1d"]

_DEFLATE = 1  # h5z.FILTER_DEFLATE
_SHUFFLE = 2  # h5z.FILTER_SHUFFLE


class _TooWide(Exception):
    """A value does not fit the narrower type asked for."""


def read_1d(dataset, *, narrow_to: np.dtype | type | None = None) -> np.ndarray:
    """``dataset[:]`` for a 1-D HDF5 dataset, in native byte order.

    ``narrow_to=np.int32`` for a little-endian 64-bit integer dataset stored with shuffle (10x
    ``indices``): when every value is in [0, 2**31) the result is int32, built from the low four
    byte planes of each shuffled chunk only (the high planes are checked to be zero), which halves
    the unshuffling and spares scipy its range scan and int64 -> int32 copy (0.08 s a generated
    slide). Otherwise, or on any other path, the values come in the dataset's own type.
    """
    plan = _plan(dataset)
    if plan is not None:
        if narrow_to is not None and plan[0] and _narrowable(dataset.dtype, np.dtype(narrow_to)):
            try:
                return _read_chunks(dataset, *plan, narrow_to=np.dtype(narrow_to))
            except _TooWide:
                pass
            except Exception:  # noqa: BLE001 - anything odd in the raw chunks: HDF5 reads them (and reports)
                plan = None
    if plan is not None:
        try:
            return _read_chunks(dataset, *plan)
        except Exception:  # noqa: BLE001 - anything odd in the raw chunks: HDF5 reads them (and reports)
            pass
    values = dataset[:]
    return values if values.dtype.isnative else values.astype(values.dtype.newbyteorder("="))


def _plan(dataset) -> tuple[bool, list] | None:
    """(shuffled, chunk places) when the fast path applies, else None."""
    if dataset.ndim != 1 or dataset.chunks is None or dataset.dtype.kind not in "iuf" or not hasattr(
            dataset.id, "chunk_iter"):
        return None
    f = dataset.file
    if f.driver != "sec2" or f.userblock_size:  # chunk addresses are offsets in this one plain file
        return None
    dcpl = dataset.id.get_create_plist()
    filters = [dcpl.get_filter(i)[0] for i in range(dcpl.get_nfilters())]
    if filters not in ([_DEFLATE], [_SHUFFLE, _DEFLATE]):
        return None
    places: list = []
    dataset.id.chunk_iter(places.append)
    (chunk,) = dataset.chunks
    if len(places) != -(-dataset.shape[0] // chunk) or any(p.filter_mask for p in places):
        return None  # unwritten chunks (fill value) or a chunk stored with a filter skipped
    return filters[0] == _SHUFFLE, places


def _inflater():
    try:
        import imagecodecs

        if imagecodecs.ZLIBNG.available:
            def inflate_ng(raw: bytes, out: np.ndarray) -> None:
                if len(imagecodecs.zlibng_decode(raw, out=out)) != out.nbytes:
                    raise ValueError("a chunk inflates to the wrong size")

            return inflate_ng
    except (ImportError, AttributeError):
        pass

    def inflate(raw: bytes, out: np.ndarray) -> None:
        data = zlib.decompress(raw, bufsize=out.nbytes)
        if len(data) != out.nbytes:
            raise ValueError("a chunk inflates to the wrong size")
        out[:] = np.frombuffer(data, np.uint8)

    return inflate


def _narrowable(src: np.dtype, dst: np.dtype) -> bool:
    return (src.kind in "iu" and src.itemsize == 8 and src.byteorder in "<=" and np.little_endian
            and dst == np.dtype(np.int32))


def _read_chunks(dataset, shuffled: bool, places: list, narrow_to: np.dtype | None = None) -> np.ndarray:
    """Inflate (and unshuffle) every chunk into place; ``narrow_to``: see ``read_1d`` (shuffled only)."""
    import numcodecs

    n = dataset.shape[0]
    (chunk,) = dataset.chunks
    dtype = dataset.dtype
    out = np.empty(n, narrow_to if narrow_to is not None else dtype)
    width = out.dtype.itemsize  # bytes per value written: the low byte planes when narrowing
    raw_out = out.view(np.uint8)
    scratch = np.empty(chunk * dtype.itemsize, np.uint8)
    planes = scratch[: chunk * width]
    inflate = _inflater()
    unshuffle = numcodecs.Shuffle(elementsize=width) if shuffled and width > 1 else None
    fd = os.open(dataset.file.filename, os.O_RDONLY)
    try:
        for place in places:
            start = place.chunk_offset[0]
            stop = min(n, start + chunk)
            raw = os.pread(fd, place.size, place.byte_offset)
            if len(raw) != place.size:
                raise OSError("short read")
            inflate(raw, scratch)
            if narrow_to is not None and (scratch[chunk * width:].any()
                                          or (scratch[chunk * (width - 1): chunk * width] & 0x80).any()):
                raise _TooWide  # a value >= 2**31 (or negative) in this chunk
            target = raw_out[start * width: stop * width]
            if unshuffle is None:
                target[:] = planes[: target.size]
            elif stop - start == chunk:
                unshuffle.decode(planes, out=target)
            else:  # the last chunk is stored full size: unshuffle it whole, keep the front
                target[:] = np.frombuffer(unshuffle.decode(planes), np.uint8)[: target.size]
    finally:
        os.close(fd)
    return out if out.dtype.isnative else out.astype(out.dtype.newbyteorder("="))
