"""A prepared slide's AnnData Zarr store: written once by ``prepare_slice``, its X read back by the shard writer.

Why not plain ``adata.write_zarr``: zarr 3 routes every chunk of every array through its asyncio
machinery (a thread hand-off per call, an all-fill-value check per chunk, the codec on a pool
thread), which cost a generated slide (11 M nonzeros, ~280 files) ~0.3 s of CPU, more than
compressing its counts. Here anndata still writes every element and the consolidated metadata,
into an in-memory store dumped to disk in sorted key order; only the three arrays of each CSR
matrix (``X``, ``obsp``) get their chunks encoded here, with the compressor, chunk grid and
fill-value rule zarr chose for them, so the files are byte-identical to ``adata.write_zarr``
(tests/test_build.py compares them). Anything this module does not recognise (zarr 2,
non-default anndata settings) takes anndata's own path.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["write_zarr_store", "read_zarr_csr"]

_CSR_SPEC = ("csr_matrix", "0.1.0")


def write_zarr_store(adata, path: Path) -> None:
    """Write AnnData as a Zarr (format 2) directory store, strings kept as strings.

    The bytes are those of ``adata.write_zarr(path, convert_strings_to_categoricals=False)``.
    No categorical conversion: symbols and barcodes are (nearly) unique, so it only cost a
    natural sort of 20k symbols per worker (~0.4 s); annotation columns arrive categorical
    already (spavis.shards.annotations).
    """
    import zarr

    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        store_cls = getattr(getattr(zarr, "storage", None), "MemoryStore", None)
        store = store_cls() if store_cls is not None else None
        mapping = getattr(store, "_store_dict", None)
        if store is None or not isinstance(mapping, dict):  # zarr 2: anndata's own path
            adata.write_zarr(path, convert_strings_to_categoricals=False)
            return
        _write_anndata(adata, store)
    path.mkdir(parents=True)
    made = {path}
    for key in sorted(mapping):
        buf = mapping[key]
        target = path / key
        if target.parent not in made:
            target.parent.mkdir(parents=True, exist_ok=True)
            made.add(target.parent)
        with open(target, "wb") as f:  # the buffer's memory as is, no bytes copy
            f.write(buf.as_numpy_array().data if hasattr(buf, "as_numpy_array") else bytes(buf))


def _write_anndata(adata, store) -> None:
    """``anndata.io.write_zarr`` into ``store`` (format 2), CSR matrices through ``_write_csr``."""
    import anndata as ad
    import zarr
    from anndata.experimental import write_dispatched

    group = zarr.open_group(store, mode="w", zarr_format=2)
    group.attrs.setdefault("encoding-type", "anndata")
    group.attrs.setdefault("encoding-version", "0.1.0")
    fast = not getattr(ad.settings, "write_csr_csc_indices_with_min_possible_dtype", False)

    def callback(write_func, parent, key, elem, *, dataset_kwargs, iospec) -> None:
        if fast and not dataset_kwargs and (iospec.encoding_type, iospec.encoding_version) == _CSR_SPEC:
            _write_csr(parent, key, elem)
        else:
            write_func(parent, key, elem, dataset_kwargs=dataset_kwargs)

    write_dispatched(group, "/", adata, callback=callback, dataset_kwargs={})
    zarr.consolidate_metadata(store)


def _write_csr(parent, key: str, matrix) -> None:
    """What anndata's ``write_sparse_compressed`` writes for a CSR matrix, chunks encoded here.

    Same calls for the group, its attributes (in anndata's order: shape, then the encoding) and
    the array metadata (zarr picks the chunk grid and compressor); the chunks are then encoded
    with that compressor and put in the store directly, instead of through ``arr[...] = values``.
    """
    group = parent.require_group(key)
    group.attrs["shape"] = matrix.shape
    for name in ("data", "indices", "indptr"):
        values = np.asarray(getattr(matrix, name))
        arr = group.create_array(name, shape=values.shape, dtype=values.dtype)
        _put_chunks(arr, values)
    group.attrs.setdefault("encoding-type", _CSR_SPEC[0])
    group.attrs.setdefault("encoding-version", _CSR_SPEC[1])


def _put_chunks(arr, values: np.ndarray) -> None:
    """Encode a 1-D array's chunks as zarr does for format 2 and store them.

    Zarr's rules, kept: every chunk is full size (the last one padded with the fill value) and a
    chunk equal to the fill value everywhere is not written. One thread (no blosc threads): a
    build's workers are its parallelism.
    """
    from numcodecs import blosc
    from zarr.core.buffer import default_buffer_prototype

    meta = arr.metadata
    (chunk,) = meta.chunks
    fill = meta.fill_value if meta.fill_value is not None else 0
    compressor = meta.compressor
    store_dict = arr.store_path.store._store_dict
    prefix = arr.store_path.path
    buffer = default_buffer_prototype().buffer
    n = values.shape[0]
    previous = blosc.use_threads
    blosc.use_threads = False
    try:
        for i in range(-(-n // chunk) if n else 0):
            part = values[i * chunk: (i + 1) * chunk]
            if part.shape[0] < chunk:
                padded = np.full(chunk, fill, dtype=values.dtype)
                padded[: part.shape[0]] = part
                part = padded
            if np.all(part == fill):
                continue
            part = np.ascontiguousarray(part)
            encoded = compressor.encode(part) if compressor is not None else part.tobytes()
            store_dict[f"{prefix}/{meta.encode_chunk_key((i,))}"] = buffer.from_bytes(bytes(encoded))
    finally:
        blosc.use_threads = previous


def read_zarr_csr(group: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(data, indices, indptr) of a CSR matrix that anndata wrote into a Zarr v2 group.

    The chunk files of our own stores are decoded directly (numcodecs, in order), which
    skips zarr's async machinery; anything unexpected falls back to zarr itself.
    """
    return tuple(_read_zarr_1d(Path(group) / name) for name in ("data", "indices", "indptr"))  # type: ignore[return-value]


def _read_zarr_1d(path: Path) -> np.ndarray:
    import numcodecs

    meta: dict[str, Any] = json.loads((path / ".zarray").read_text())
    if len(meta["shape"]) != 1 or meta.get("filters") or meta.get("order", "C") != "C":
        import zarr

        return np.asarray(zarr.open_array(str(path), mode="r")[:])
    n, chunk = int(meta["shape"][0]), int(meta["chunks"][0])
    dtype = np.dtype(meta["dtype"])
    codec = numcodecs.get_codec(meta["compressor"]) if meta.get("compressor") else None
    out = np.empty(n, dtype=dtype)  # every element is written below: no zero-filled pages first
    for i in range(-(-n // chunk) if n else 0):
        f = path / str(i)
        try:
            raw = f.read_bytes()
        except FileNotFoundError:  # a chunk zarr skipped because it is all fill_value
            out[i * chunk: min(n, (i + 1) * chunk)] = meta.get("fill_value") or 0
            continue
        stop = min(n, (i + 1) * chunk)
        if codec is not None and stop - i * chunk == chunk:
            codec.decode(raw, out=out[i * chunk: stop])  # straight into place (a full chunk)
            continue
        seg = np.frombuffer(codec.decode(raw) if codec else raw, dtype=dtype)
        out[i * chunk: stop] = seg[: stop - i * chunk]
    return out
