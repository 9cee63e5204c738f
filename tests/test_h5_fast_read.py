"""spavis.readers._h5.read_1d: raw deflate / shuffle chunks decoded outside HDF5 give what h5py gives.

The expected values are h5py's own reads of files written here with h5py; layouts the fast path
does not cover (lzf, fletcher32, contiguous, unwritten chunks) must fall back to h5py.
"""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from spavis.readers._h5 import _plan, read_1d

LAYOUTS = {
    "gzip+shuffle": dict(compression="gzip", shuffle=True, chunks=(1000,)),
    "gzip": dict(compression="gzip", compression_opts=4, chunks=(1000,)),
    "lzf": dict(compression="lzf", chunks=(1000,)),
    "fletcher32": dict(compression="gzip", shuffle=True, fletcher32=True, chunks=(1000,)),
    "contiguous": dict(),
}
FAST = {"gzip+shuffle", "gzip"}


@pytest.mark.parametrize("dtype", ["<i8", ">i4", "<f4", "<u2", "|i1"])
def test_read_1d_equals_h5py(tmp_path, dtype):
    values = ((np.arange(10_007) * 7919) % 251 - 40).astype(np.int64)
    values = np.abs(values).astype(dtype) if dtype.endswith("u2") else values.astype(dtype)
    path = tmp_path / "m.h5"
    with h5py.File(path, "w") as f:
        for name, kw in LAYOUTS.items():
            f.create_dataset(name, data=values, **kw)
        part = f.create_dataset("unwritten", shape=values.shape, dtype=dtype, chunks=(1000,), compression="gzip")
        part[:1500] = values[:1500]  # chunks 2.. never written: HDF5 reads them as the fill value
    with h5py.File(path, "r") as f:
        for name in [*LAYOUTS, "unwritten"]:
            got, want = read_1d(f[name]), f[name][:]
            assert (_plan(f[name]) is not None) == (name in FAST), name
            assert got.dtype == want.dtype.newbyteorder("=") and got.dtype.isnative, name
            np.testing.assert_array_equal(got, want, err_msg=name)


def test_read_1d_corrupt_chunk_is_reported_by_hdf5(tmp_path):
    path = tmp_path / "m.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.arange(5000, dtype=np.int64), chunks=(1000,), compression="gzip", shuffle=True)
    with h5py.File(path, "r") as f:
        places = []
        f["x"].id.chunk_iter(places.append)
        offset = places[2].byte_offset + places[2].size // 2
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))
    with h5py.File(path, "r") as f, pytest.raises(OSError):
        read_1d(f["x"])  # the fast path fails, h5py reads the chunk and raises its own error


def test_read_1d_narrows_shuffled_int64_when_every_value_fits(tmp_path):
    path = tmp_path / "m.h5"
    small = np.arange(0, 3_000_000, 301, dtype=np.int64)
    large = small.copy()
    large[7_000] = 2**31  # one value that does not fit an int32 (chunk 7 of 10)
    with h5py.File(path, "w") as f:
        for name, values in (("small", small), ("large", large)):
            f.create_dataset(name, data=values, chunks=(1000,), compression="gzip", shuffle=True)
        f.create_dataset("plain", data=small, chunks=(1000,), compression="gzip")
    with h5py.File(path, "r") as f:
        got = read_1d(f["small"], narrow_to=np.int32)
        assert got.dtype == np.int32 and np.array_equal(got, small)
        for name, values in (("large", large), ("plain", small)):  # no narrowing: int64, equal
            got = read_1d(f[name], narrow_to=np.int32)
            assert got.dtype == np.int64 and np.array_equal(got, values), name
