"""What readers see of a slide's AnnData Zarr store: its consolidated metadata and its chunks.

A slide store ``zarr/<slide_id>.zarr`` holds the AnnData elements (``X``, ``obs``, ``obsm`` ...)
and, for corpora built with ``--with-images``, an ``images/`` group beside them. ``anndata.read_zarr``
passes every top-level group it sees to ``AnnData(...)``, so ``images`` must stay out of what it
sees: the consolidated metadata (``.zmetadata``, which zarr and anndata read instead of listing
folders) lists the AnnData elements only. Anyone who adds to a store (``stamp embed --zarr``
writes ``obsm/X_stamp``) rewrites it with :func:`consolidate_anndata`, never with
``zarr.consolidate_metadata`` (which would list ``images/`` and break ``read_zarr``).

:func:`missing_chunks` tells whether an array's chunk files are all there: zarr reads a missing
chunk as the fill value (zeros) without a word, so an array whose writer was interrupted or
raced another writer looks complete to every reader.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from spavis.format.io import atomic_write_text
from spavis.format.schema import ZARR_CONSOLIDATED

__all__ = ["ANNDATA_ELEMENTS", "consolidate_anndata", "hidden_entries", "missing_chunks", "array_paths"]

# The top-level groups/arrays of an AnnData store (what anndata.write_zarr writes; what read_zarr accepts).
ANNDATA_ELEMENTS = ("X", "layers", "obs", "obsm", "obsp", "raw", "uns", "var", "varm", "varp")
_V2_META = (".zgroup", ".zarray", ".zattrs")
_V3_META = "zarr.json"


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _walk_v2(store: Path, rel: str, out: dict[str, dict]) -> None:
    """Metadata documents of the node at ``rel`` and below; folders without .zgroup/.zarray are not nodes."""
    here = store / rel if rel else store
    prefix = f"{rel}/" if rel else ""
    if (here / ".zarray").is_file():
        for name in (".zarray", ".zattrs"):
            if (here / name).is_file():
                out[prefix + name] = _load(here / name)
        return
    if not (here / ".zgroup").is_file():
        return
    for name in (".zgroup", ".zattrs"):
        if (here / name).is_file():
            out[prefix + name] = _load(here / name)
    for child in sorted(os.listdir(here)):
        if child.startswith(".") or not (here / child).is_dir():
            continue
        if not rel and child not in ANNDATA_ELEMENTS:
            continue  # images/ and anything else that is not AnnData: not for anndata's eyes
        _walk_v2(store, prefix + child, out)


def consolidate_anndata(store: str | os.PathLike) -> Path:
    """Rewrite the store's consolidated metadata so that it lists the AnnData elements only.

    Zarr v2 stores (what ``spavis build-shards`` writes): ``.zmetadata`` built from the metadata
    files on disk, written atomically. Zarr v3 stores: ``zarr.consolidate_metadata`` then the
    non-AnnData top-level entries dropped from ``zarr.json``. Also repairs a store whose
    consolidated metadata an older ``stamp embed --zarr`` had made list ``images/``.
    """
    store = Path(store)
    if (store / _V3_META).is_file() and not (store / ".zgroup").is_file():
        import zarr

        zarr.consolidate_metadata(str(store))
        doc = _load(store / _V3_META)
        meta = ((doc.get("consolidated_metadata") or {}).get("metadata")) or {}
        for key in [k for k in meta if k.split("/", 1)[0] not in ANNDATA_ELEMENTS]:
            del meta[key]
        atomic_write_text(store / _V3_META, json.dumps(doc, indent=2))
        return store / _V3_META
    meta: dict[str, dict] = {}
    _walk_v2(store, "", meta)
    return atomic_write_text(store / ZARR_CONSOLIDATED,
                             json.dumps({"metadata": meta, "zarr_consolidated_format": 1}, indent=4, sort_keys=True))


def hidden_entries(store: str | os.PathLike) -> list[str]:
    """Top-level names the store's consolidated metadata lists that are not AnnData elements (should be [])."""
    store = Path(store)
    try:
        if (store / ZARR_CONSOLIDATED).is_file():
            keys = _load(store / ZARR_CONSOLIDATED).get("metadata", {})
        elif (store / _V3_META).is_file():
            keys = ((_load(store / _V3_META).get("consolidated_metadata") or {}).get("metadata")) or {}
        else:
            return []
    except (OSError, ValueError, AttributeError):
        return []
    tops = {k.split("/", 1)[0] for k in keys if "/" in k}
    return sorted(t for t in tops if t not in ANNDATA_ELEMENTS)


def array_paths(group: str | os.PathLike) -> list[Path]:
    """Every array folder at or under ``group`` (v2 ``.zarray`` or v3 ``zarr.json`` of node_type array)."""
    group = Path(group)
    found = []
    for dirpath, dirs, files in os.walk(group):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        here = Path(dirpath)
        if ".zarray" in files or (_V3_META in files and _is_v3_array(here)):
            found.append(here)
            dirs[:] = []
    return found


def _is_v3_array(path: Path) -> bool:
    try:
        return _load(path / _V3_META).get("node_type") == "array"
    except (OSError, ValueError):
        return False


def missing_chunks(array: str | os.PathLike) -> tuple[int, int]:
    """(missing, expected) chunk files of one array folder; (0, 0) for layouts it does not know.

    A writer that skips chunks equal to the fill value (zarr 3's default) leaves files missing on
    purpose: use this on arrays whose every chunk is written (embeddings), not on flag arrays.
    """
    array = Path(array)
    try:
        if (array / ".zarray").is_file():
            meta = _load(array / ".zarray")
            shape, chunks = meta["shape"], meta["chunks"]
            sep = meta.get("dimension_separator") or "."
            prefix = ""
        else:
            meta = _load(array / _V3_META)
            shape = meta["shape"]
            grid = meta.get("chunk_grid", {}).get("configuration", {})
            chunks = grid["chunk_shape"]
            if any(c.get("name") == "sharding_indexed" for c in meta.get("codecs", []) if isinstance(c, dict)):
                return 0, 0
            enc = meta.get("chunk_key_encoding") or {"name": "default"}
            sep = (enc.get("configuration") or {}).get("separator") or ("/" if enc.get("name") == "default" else ".")
            prefix = f"c{sep}" if enc.get("name") == "default" else ""
    except (OSError, ValueError, KeyError, TypeError):
        return 0, 0
    counts = [math.ceil(s / c) if c else 0 for s, c in zip(shape, chunks)]
    if not counts:  # a 0-d array: one chunk
        keys = ["c" if prefix else "0"]
        expected = 1
    else:
        expected = math.prod(counts)
        if expected == 0:
            return 0, 0
        import itertools

        keys = (prefix + sep.join(map(str, idx)) for idx in itertools.product(*(range(n) for n in counts)))
    missing = sum(1 for k in keys if not (array / k).is_file())
    return missing, expected
