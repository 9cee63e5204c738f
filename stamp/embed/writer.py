"""The one embeddings writer: every embeddings file stamp writes says which model wrote it.

Every producer (``stamp embed`` on a corpus, ``--modality image|fused``, ``--images FOLDER``,
``--zarr``) hands rows to the writers here, so the provenance record and the atomic-write rules
live in one place:

* :func:`model_record`: ``{stamp_model, stamp_model_name, stamp_model_revision,
  stamp_model_license, stamp_model_hub_id, stamp_model_kind, stamp_model_sha256,
  stamp_model_dir, stamp_embedding}`` from the encoder's :class:`~stamp.zoo.encoder.Provenance`
  (strings; empty when unknown). ``stamp_model`` is what the user passed.
* :class:`ParquetEmbeddings`: ``<id column>`` (string) + ``embedding`` (list<float32>), written to a
  hidden temp file and renamed on success (no partial file on failure); the record is the
  schema metadata ``stamp.model`` (JSON). :func:`read_model_record` reads it back.
* :func:`write_feature_bag`: one whole-slide feature bag (h5: ``features``, ``coords``, the model
  record and tiling attributes; ``stamp embed-slides``), hidden temp file renamed when complete.
* :class:`ZarrObsmWriter`: ``obsm['X_stamp']`` of every slide store of a local corpus, all slides
  or none, under an exclusive lock on the corpus's ``zarr/`` folder (one writer at a time); the
  record goes into the array's attributes and each store's consolidated metadata is rewritten
  with :func:`spavis.format.zarrstore.consolidate_anndata` (AnnData elements only, so
  ``images/`` never reaches ``anndata.read_zarr``).

Zarr steps (``ZarrObsmWriter``):

1. stage: every store gets ``obsm/X_stamp.staging/g/X_stamp``, filled batch by batch. The
   staging folder has no Zarr metadata of its own, so readers (zarr, anndata) do not see
   it, and ``spavis validate`` ignores ``obsm/X_*``;
2. once every spot of every slide is written (and the Parquet is complete), swap: each
   store's old ``X_stamp`` is moved aside, the staged one renamed in, consolidated metadata
   rewritten. Renames only, so this takes milliseconds for the whole corpus.

A failure in step 1 changes no store (staging is removed); an interruption in step 2 is
completed by rerunning the command (it re-stages and swaps every slide). A second writer on the
same corpus is refused at once (or waits ``wait`` seconds): two writers sharing staging folders
left arrays of zeros with chunk files missing.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spavis.format.io import apply_umask, remove_tree, sha256_file, temp_sibling
from stamp.errors import EmbedError

logger = logging.getLogger(__name__)

__all__ = ["PARQUET_METADATA_KEY", "OBSM_KEY", "STAGING", "model_record", "read_model_record",
           "ParquetEmbeddings", "write_parquet", "ZarrObsmWriter", "zarr_writer_lock", "write_feature_bag", "write_h5"]

PARQUET_METADATA_KEY = b"stamp.model"
OBSM_KEY = "X_stamp"
STAGING = f"{OBSM_KEY}.staging"
RECORD_KEYS = ("stamp_model", "stamp_model_name", "stamp_model_revision", "stamp_model_license",
               "stamp_model_hub_id", "stamp_model_kind", "stamp_model_sha256", "stamp_model_dir", "stamp_embedding")


# ----------------------------------------------------------------------------- provenance
def _local_weights(source: str, *, known_sha: str | None) -> tuple[str, str]:
    """(folder, sha256 of model.safetensors) for a model given as a local path; ('', '') otherwise.

    Only local paths: a Hub id or zoo name carries its revision in the provenance instead
    (no network request here). The weights are hashed only when the loader did not (``stamp.load``
    records the hash in the provenance: ``known_sha``)."""
    if not source or not Path(source).exists():
        return "", known_sha or ""
    from stamp.zoo.resolve import resolve_model_source

    try:
        folder = resolve_model_source(source)
    except Exception:  # noqa: BLE001 — provenance is best effort; the model already loaded
        return "", known_sha or ""
    weights = folder / "model.safetensors"
    return str(folder.resolve()), known_sha or (sha256_file(weights) if weights.is_file() else "")


def model_record(encoder: Any, source: str | os.PathLike | None = None, embedding: str = "") -> dict[str, str]:
    """Which model wrote an embedding (module docstring): name, revision, license, ... as strings."""
    prov = encoder.provenance
    if source is not None and not isinstance(source, (str, os.PathLike)):  # an Encoder given as the model
        source = None
    src = str(source if source is not None else (prov.source or prov.name))
    folder, sha = _local_weights(src, known_sha=prov.weights_sha256)
    return {
        "stamp_model": src,
        "stamp_model_name": str(prov.name or src),
        "stamp_model_revision": str(prov.revision or ""),
        "stamp_model_license": str(prov.license or "unknown"),
        "stamp_model_hub_id": str(prov.hub_id or ""),
        "stamp_model_kind": str(encoder.kind),
        "stamp_model_sha256": str(sha),
        "stamp_model_dir": folder,
        "stamp_embedding": str(embedding),
    }


def read_model_record(path: str | os.PathLike) -> dict[str, str]:
    """The record of an embeddings Parquet written by stamp ({} when it has none)."""
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(PARQUET_METADATA_KEY)
    return json.loads(raw) if raw else {}


# ----------------------------------------------------------------------------- Parquet
class ParquetEmbeddings:
    """``with ParquetEmbeddings(out, "spot_id", record) as w: w.write(ids, emb)``: atomic on success."""

    def __init__(self, out: str | os.PathLike, id_name: str, record: dict[str, str]) -> None:
        self.out = Path(out)
        self.id_name = id_name
        self.schema = pa.schema([(id_name, pa.string()), ("embedding", pa.list_(pa.float32()))],
                                metadata={PARQUET_METADATA_KEY: json.dumps(record, sort_keys=True)})
        self.rows = 0
        self._tmp: Path | None = None
        self._writer: pq.ParquetWriter | None = None

    def __enter__(self) -> "ParquetEmbeddings":
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = temp_sibling(self.out)
        self._writer = pq.ParquetWriter(self._tmp, self.schema, compression="zstd")
        return self

    def write(self, ids: list[str], emb: np.ndarray) -> None:
        emb = np.asarray(emb, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[0] != len(ids):
            raise EmbedError(f"{self.out}: {len(ids)} ids but embeddings of shape {emb.shape}")
        flat = pa.array(emb.ravel(), pa.float32())
        offsets = pa.array(np.arange(0, emb.size + 1, max(1, emb.shape[1]), dtype=np.int32))
        self._writer.write_table(pa.table({self.id_name: pa.array(ids, pa.string()),
                                           "embedding": pa.ListArray.from_arrays(offsets, flat)}, schema=self.schema))
        self.rows += len(ids)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self._writer is not None:
                self._writer.close()
            if exc_type is None:
                apply_umask(self._tmp)
                os.replace(self._tmp, self.out)
        finally:
            if self._tmp is not None:
                self._tmp.unlink(missing_ok=True)


def write_parquet(out: str | os.PathLike, id_name: str, chunks: Iterable[tuple[list[str], np.ndarray]],
                  record: dict[str, str]) -> Path:
    """Write every (ids, embeddings) chunk to ``out`` (atomic); returns ``out``."""
    with ParquetEmbeddings(out, id_name, record) as writer:
        for ids, emb in chunks:
            writer.write(ids, emb)
    return Path(out)


# ----------------------------------------------------------------------------- Zarr
@contextlib.contextmanager
def zarr_writer_lock(zarr_dir: str | os.PathLike, *, wait: float = 0.0) -> Iterator[None]:
    """Hold an exclusive lock on a corpus's ``zarr/`` folder (``flock`` on the folder itself: no lock
    file in the corpus, released by the kernel when the process dies, even on SIGKILL).

    Another holder: wait up to ``wait`` seconds, then one-line :class:`EmbedError`."""
    zarr_dir = Path(zarr_dir)
    try:
        import fcntl
    except ImportError:  # not POSIX: a lock file in the temp folder, keyed by the folder's real path
        import hashlib
        import tempfile

        from filelock import FileLock, Timeout

        key = hashlib.sha256(str(zarr_dir.resolve()).encode()).hexdigest()[:16]
        lock = FileLock(os.path.join(tempfile.gettempdir(), f"stamp-embed-{key}.lock"))
        try:
            lock.acquire(timeout=max(wait, 0))
        except Timeout:
            raise EmbedError(_busy(zarr_dir, wait)) from None
        try:
            yield
        finally:
            lock.release()
        return
    try:
        fd = os.open(zarr_dir, os.O_RDONLY)
    except FileNotFoundError:
        raise EmbedError(f"{zarr_dir}: no Zarr folder; --zarr needs a corpus built by `spavis build-shards` "
                         "(it writes zarr/<slide_id>.zarr)") from None
    try:
        deadline = time.monotonic() + max(wait, 0.0)
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise EmbedError(_busy(zarr_dir, wait)) from None
                if not told:
                    logger.warning("%s: another `stamp embed --zarr` is writing these stores; waiting up to %g s",
                                   zarr_dir, wait)
                    told = True
                time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        yield
    finally:
        os.close(fd)  # releases the lock


def _busy(zarr_dir: Path, wait: float) -> str:
    waited = f"still busy after {wait:g} s" if wait > 0 else "busy"
    return (f"{zarr_dir}: another `stamp embed --zarr` is writing these Zarr stores ({waited}); let it finish, "
            "or pass --wait SECONDS to queue behind it")


def _zarr_format(store: Path) -> int:
    return 3 if (store / "zarr.json").is_file() and not (store / ".zgroup").is_file() else 2


def _store_n_obs(store: Path) -> int:
    import zarr

    group = zarr.open_group(str(store), mode="r", use_consolidated=False)
    return int(group["obs"][group["obs"].attrs["_index"]].shape[0])


class ZarrObsmWriter:
    """The staged ``X_stamp`` of every slide store (steps 1 and 2 of the module docstring).

    Take :func:`zarr_writer_lock` on the corpus's ``zarr/`` folder around the whole life of a
    writer (``stamp.embed.genes.embed_corpus`` does)."""

    def __init__(self, corpus: Any, width: int, record: dict[str, str], key: str = OBSM_KEY) -> None:
        import zarr
        from anndata.io import write_elem

        self.key = key
        self.staging_name = f"{key}.staging"
        self.stores: dict[str, Path] = {}
        self.arrays: dict[str, Any] = {}
        self.seen: dict[str, np.ndarray] = {}
        self.pending: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        self.record = record
        try:
            for sid in corpus.slides["slide_id"].astype(str):
                store = corpus.zarr_path(sid)
                n_obs = _store_n_obs(store)
                stage = store / "obsm" / self.staging_name
                remove_tree(stage)  # a previous, interrupted run (the lock rules out a live one)
                stage.mkdir(parents=True)
                group = zarr.open_group(str(stage / "g"), mode="w", zarr_format=_zarr_format(store))
                write_elem(group, key, np.zeros((n_obs, width), dtype=np.float32))
                self.stores[sid] = store
                self.arrays[sid] = group[key]
                self.seen[sid] = np.zeros(n_obs, dtype=bool)
        except BaseException:
            self.discard()
            raise

    def write(self, slide_ids: list[str], spot_index: np.ndarray, emb: np.ndarray) -> None:
        """Buffer a batch's rows; a slide's rows go to its staged array (one write) once the
        batches move on to other slides (corpus order keeps a slide's spots together)."""
        sids = np.asarray(slide_ids, dtype=object)
        present = list(dict.fromkeys(slide_ids))
        for sid in [k for k in self.pending if k not in present]:
            self._flush(sid)
        for sid in present:
            rows = np.flatnonzero(sids == sid)
            self.pending.setdefault(sid, []).append((spot_index[rows], emb[rows]))

    def _flush(self, sid: str) -> None:
        parts = self.pending.pop(sid, [])
        if not parts:
            return
        idx = np.concatenate([p[0] for p in parts])
        emb = np.concatenate([p[1] for p in parts])
        seen = self.seen.get(sid)
        if seen is None or idx.max(initial=-1) >= seen.size:
            raise EmbedError(f"{self.stores.get(sid, sid)}: the shards list spots of slide {sid} that its "
                             "Zarr store does not hold; rebuild the corpus (spavis build-shards)")
        order = np.argsort(idx)
        if not seen.any() and np.array_equal(idx[order], np.arange(seen.size)):
            self.arrays[sid][...] = emb[order]  # the whole slide at once (the usual case)
        else:
            self.arrays[sid].oindex[idx[order], :] = emb[order]
        seen[idx] = True

    def check_complete(self) -> None:
        for sid in list(self.pending):
            self._flush(sid)
        for sid, seen in self.seen.items():
            if not seen.all():
                raise EmbedError(f"{self.stores[sid]}: {int((~seen).sum())} of {seen.size} spots of slide {sid} are "
                                 "not in the shards; rebuild the corpus so shards and Zarr stores agree")

    def swap(self) -> None:
        """Step 2: move each staged array into place (renames), record the model, consolidate."""
        from spavis.format.zarrstore import consolidate_anndata

        for sid, store in self.stores.items():
            stage = store / "obsm" / self.staging_name
            staged = stage / "g" / self.key
            self.arrays[sid].attrs.update(self.record)
            apply_umask(staged, recursive=True)
            final = store / "obsm" / self.key
            if final.exists():
                os.replace(final, temp_sibling(stage / "old", "old"))
            os.replace(staged, final)
            consolidate_anndata(store)  # AnnData elements only: images/ stays out of anndata's sight
            remove_tree(stage)

    def discard(self) -> None:
        for store in self.stores.values():
            remove_tree(store / "obsm" / self.staging_name)


# ----------------------------------------------------------------------------- h5 feature bags
def write_h5(path: str | os.PathLike, datasets: dict[str, np.ndarray], attrs: dict[str, Any],
             dataset_attrs: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write named arrays + root attributes to an h5 file atomically (hidden temporary, then rename):
    readers never see half a file. String arrays are stored as h5 variable-length strings; dict/list
    attributes as JSON; None attributes are left out."""
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        with h5py.File(tmp, "w", track_order=True) as f:
            for name, data in datasets.items():
                arr = np.asarray(data)
                if arr.dtype.kind in "OUS":
                    d = f.create_dataset(name, data=np.asarray([str(x) for x in arr], dtype=object),
                                         dtype=h5py.string_dtype(), track_times=False)
                else:
                    d = f.create_dataset(name, data=arr, track_times=False)
                for k, v in (dataset_attrs or {}).get(name, {}).items():
                    d.attrs[k] = v
            for k, v in attrs.items():
                if v is None:
                    continue
                f.attrs[k] = json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_feature_bag(path: str | os.PathLike, features: np.ndarray, coords: np.ndarray, attrs: dict[str, Any],
                      dataset_attrs: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write a whole-slide feature bag (``features`` float32, ``coords`` int64 (N, 2), root attributes, the
    datasets' attributes: their CLAM / TRIDENT meanings are decided in ``stamp.slides.bags``) atomically
    with :func:`write_h5`."""
    features = np.ascontiguousarray(features, np.float32)
    coords = np.ascontiguousarray(coords, np.int64).reshape(-1, 2)
    if len(features) != len(coords):
        raise ValueError(f"{len(features)} feature rows for {len(coords)} coords")
    return write_h5(path, {"features": features, "coords": coords}, attrs, dataset_attrs)
