"""slice.json: the provenance sidecar that fetch writes and build-shards reads.

Written atomically (temp file + os.replace) so a crash never leaves a half-written
sidecar that would make an incomplete folder look fetched.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from spavis.errors import FetchError
from spavis.format.io import NotRegularFileError, atomic_open, open_regular

SIDECAR_NAME = "slice.json"
from spavis.format.vocabulary import CONDITIONS  # noqa: E402  (defined once, in spavis.format)

# Field order of the contract in docs/architecture.md; unknown extra fields are kept.
FIELDS: dict[str, Any] = {
    "slide_id": None,
    "source": None,
    "accession": [],
    "organ": None,
    "species": "Homo sapiens",
    "condition": "unknown",
    "technology": "Visium",
    "license": None,
    "citation": None,
    "revision": None,
    "data_path": ".",
    "files": {},
}


def write_sidecar(folder: str | os.PathLike, **fields: Any) -> Path:
    """Write ``folder/slice.json`` atomically; missing contract fields get their defaults."""
    folder = Path(folder)
    if not fields.get("slide_id"):
        raise ValueError("write_sidecar needs slide_id")
    if not fields.get("source"):
        raise ValueError("write_sidecar needs source")
    record: dict[str, Any] = {k: fields.pop(k, default) for k, default in FIELDS.items()}
    record.update(fields)
    acc = record["accession"]
    record["accession"] = [acc] if isinstance(acc, str) else list(acc or [])
    if record["condition"] not in CONDITIONS:
        record["condition"] = "unknown"
    record["files"] = {name: dict(meta) for name, meta in sorted(dict(record["files"]).items())}
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / SIDECAR_NAME
    with atomic_open(target, "w", fsync=True, encoding="utf-8") as fh:
        json.dump(record, fh, indent=2, ensure_ascii=False)
        fh.write("\n")
    return target


ROW_FIELDS = ("organ", "species", "condition", "technology", "license", "citation")


def row_fields(row: Any | None, **defaults: Any) -> dict[str, Any]:
    """Sidecar fields where a manifest row's non-empty values win over the source's defaults."""
    out = dict(defaults)
    if row is not None:
        for key in ROW_FIELDS:
            value = getattr(row, key, None)
            if value:
                out[key] = value
    return out


def read_sidecar(folder: str | os.PathLike) -> dict[str, Any]:
    """Read ``folder/slice.json`` (or the file itself) with contract defaults filled in."""
    path = Path(folder)
    if path.is_dir():
        path = path / SIDECAR_NAME
    try:
        with open_regular(path) as fh:  # a FIFO named slice.json would block a plain read forever
            data = json.loads(fh.read().decode("utf-8"))
    except NotRegularFileError as exc:
        raise FetchError(str(exc)) from None
    except UnicodeDecodeError as exc:
        raise FetchError(f"{path}: slice.json is not UTF-8 text ({exc}); delete it and fetch again.") from None
    except FileNotFoundError:
        raise FetchError(f"{path}: no slice.json here; fetch the slice again with `spavis fetch`.") from None
    except json.JSONDecodeError as exc:
        raise FetchError(f"{path}: slice.json is not valid JSON ({exc}); delete it and fetch again.") from None
    if not isinstance(data, dict):
        raise FetchError(f"{path}: slice.json must hold a JSON object; delete it and fetch again.")
    record = {k: (list(v) if isinstance(v, list) else (dict(v) if isinstance(v, dict) else v))
              for k, v in FIELDS.items()}
    record.update(data)
    return record


def has_sidecar(folder: str | os.PathLike) -> bool:
    """True when the folder holds a slice.json (i.e. it is a fetched slice)."""
    return (Path(folder) / SIDECAR_NAME).is_file()


# --- slice folders: lock + staging -------------------------------------------------

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


@dataclass
class SliceFolder:
    """Where a source writes one slice. ``path`` is the working folder; ``final`` the result.

    A first fetch works in a hidden staging folder (``CACHE/<source>/.staging/<id>``) that
    is renamed to ``final`` only once ``slice.json`` is written, so build-shards never sees
    half a slice. A re-run of a complete slice works in ``final`` itself (files still land
    atomically and slice.json is rewritten last).
    """

    path: Path
    final: Path
    record: dict[str, Any] | None  # the existing slice.json, if the slice was fetched before

    def known(self, name: str) -> dict[str, Any]:
        """size/sha256/md5 recorded for ``name`` by an earlier fetch (for cheap skipping)."""
        if not self.record:
            return {}
        meta = self.record.get("files", {}).get(name) or {}
        return {k: meta.get(k) for k in ("size", "sha256", "md5") if meta.get(k) is not None}


def check_slide_id(slide_id: str) -> str:
    """Slide ids become folder names: refuse anything that could escape the cache."""
    if not _SAFE_ID.match(slide_id or ""):
        raise FetchError(f"{slide_id!r} is not a valid slide id (letters, digits, '.', '_', '-').")
    return slide_id


@contextlib.contextmanager
def slice_folder(cache: str | os.PathLike, source: str, slide_id: str, *,
                 lock_timeout: float | None = None) -> Iterator[SliceFolder]:
    """Lock ``CACHE/<source>/<slide_id>`` and yield where to write it (see SliceFolder).

    Two fetches of one slice serialize on a filelock; the second one then finds the files
    verified and downloads nothing. ``lock_timeout`` (s; env SPAVIS_LOCK_TIMEOUT; default
    wait forever) turns a stuck lock into a FetchError naming the lock file.
    """
    from filelock import FileLock, Timeout

    check_slide_id(slide_id)
    root = Path(cache) / source
    final = root / slide_id
    (root / ".locks").mkdir(parents=True, exist_ok=True)
    lock_path = root / ".locks" / f"{slide_id}.lock"
    if lock_timeout is None:
        lock_timeout = float(os.environ.get("SPAVIS_LOCK_TIMEOUT", "-1"))
    lock = FileLock(str(lock_path), timeout=lock_timeout)
    try:
        lock.acquire()
    except Timeout:
        raise FetchError(
            f"{final}: another spavis fetch is writing this slice (lock {lock_path}). Wait for it "
            "to finish; if no fetch is running, delete the lock file."
        ) from None
    try:
        if has_sidecar(final):
            yield SliceFolder(final, final, read_sidecar(final))
            return
        staging = root / ".staging" / slide_id
        staging.mkdir(parents=True, exist_ok=True)
        yield SliceFolder(staging, final, None)
        if not has_sidecar(staging):
            raise FetchError(f"{final}: the source wrote no slice.json; the slice is incomplete.")
        if final.exists():
            # A leftover folder without slice.json (older layout or manual copy): merge into it.
            for item in sorted(staging.iterdir(), key=lambda p: p.name == SIDECAR_NAME):
                os.replace(item, final / item.name)  # slice.json moves last
            staging.rmdir()
        else:
            os.replace(staging, final)
    finally:
        lock.release()


def fetch_file_slice(cache: str | os.PathLike, source: str, slide_id: str, *, url: str, name: str,
                     row: Any | None, accession: list[str], label: str, defaults: dict[str, Any],
                     md5: str | None = None) -> Path:
    """A slice that is one downloaded file (an h5ad): lock, fetch (verified), write slice.json.

    ``md5`` is a digest the source publishes; a manifest row's checksum wins over it, and
    the row's organ/species/… win over ``defaults``.
    """
    from spavis.sources import download

    digests = download.expected_digests(dict(getattr(row, "checksums", None) or {}).get(name))
    with slice_folder(cache, source, slide_id) as folder:
        known = folder.known(name)
        rec = download.fetch_file(url, folder.path / name, size=known.get("size"),
                                  sha256=digests["sha256"] or known.get("sha256"),
                                  md5=digests["md5"] or md5, label=label)
        write_sidecar(folder.path, slide_id=slide_id, source=source, accession=accession, data_path=name,
                      files=download.iter_records([rec], folder.path), source_urls=[url],
                      **row_fields(row, **defaults))
    return folder.final
