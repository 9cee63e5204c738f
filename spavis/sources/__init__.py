"""Fetch public Visium slices into a local cache: ``CACHE/<source>/<slide_id>/`` + slice.json.

Each source module (geo, hest, stimage, stomicsdb, sodb, tenx) exposes
``fetch_slices(ids, rows, *, cache, workers, with_images) -> list[Path]`` and uses the
one downloader in ``spavis.sources.download``. A module that also exposes
``plan_slices(ids, rows, *, cache, with_images) -> list[SliceTask]`` (resolve ids, list
files; no slice data yet) gets its slices fetched ``workers`` at a time by ``fetch``,
under one progress display and with at most ``workers`` transfers in flight overall.
Modules load lazily so that, e.g., GEOparse is imported only when GEO is used.
"""
from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Iterator, Sequence

from spavis.errors import FetchError
from spavis.format.progress import transfers
from spavis.sources.parallel import SliceTask, download_slots, run_slices

SOURCE_NAMES = ("geo", "hest", "stimage", "stomicsdb", "sodb", "tenx")


class _LazySources(Mapping):
    """``SOURCES['geo']`` imports ``spavis.sources.geo`` on first use."""

    def __getitem__(self, name: str) -> ModuleType:
        if name not in SOURCE_NAMES:
            raise KeyError(name)
        return importlib.import_module(f"spavis.sources.{name}")

    def __iter__(self) -> Iterator[str]:
        return iter(SOURCE_NAMES)

    def __len__(self) -> int:
        return len(SOURCE_NAMES)


SOURCES: Mapping[str, ModuleType] = _LazySources()


def cache_root() -> Path:
    """``$SPAVIS_CACHE`` or ``~/.cache/spavis`` (read at call time)."""
    env = os.environ.get("SPAVIS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "spavis"


def _matches(row, wanted: set[str]) -> bool:
    keys = {row.slide_id, *(row.accession or [])}
    return bool({k.upper() for k in keys if k} & wanted)


def select_rows(rows: Sequence, source: str, *, ids: Sequence[str] | None = None,
                organ: str | None = None, limit: int | None = None) -> list:
    """Manifest rows of ``source`` filtered by id/accession, organ (case-insensitive) and limit."""
    out = [r for r in rows if (r.source or source) == source]
    if ids:
        wanted = {i.strip().upper() for i in ids}
        out = [r for r in out if _matches(r, wanted)]
    if organ:
        o = organ.strip().lower()
        out = [r for r in out if (r.organ or "").lower() == o]
    if limit is not None:
        out = out[: max(0, limit)]
    return out


def fetch(
    source: str,
    ids: Sequence[str] | None = None,
    *,
    manifest: str | os.PathLike | None = None,
    cache: str | os.PathLike | None = None,
    workers: int = 4,
    with_images: bool = False,
    limit: int | None = None,
    organ: str | None = None,
) -> list[Path]:
    """Fetch slices of ``source`` by id (``ids``) or from a manifest; return slice folders.

    With a manifest, ``ids``/``organ``/``limit`` filter its rows (ids match slide_id or any
    accession). Without one, ``ids`` are resolved by the source itself (e.g. GSE/GSM for GEO).
    Re-running is cheap: verified files are skipped without downloading.
    """
    if source not in SOURCE_NAMES:
        raise FetchError(f"unknown source {source!r}; choose one of {', '.join(SOURCE_NAMES)}.")
    ids = [i for i in (ids or []) if i and i.strip()]
    rows: list = []
    if manifest is not None:
        from spavis.manifests import load_manifest

        all_rows = load_manifest(manifest)
        rows = select_rows(all_rows, source, ids=ids, organ=organ, limit=limit)
        if not rows:
            raise FetchError(
                f"{manifest}: no {source} rows match"
                + (f" ids {', '.join(ids)}" if ids else "")
                + (f" organ {organ!r}" if organ else "")
                + "; check --source/--id/--organ against the manifest."
            )
        ids = []
    elif not ids:
        raise FetchError(f"nothing to fetch from {source}: give --id ACCESSION or --manifest FILE.")
    elif organ or limit is not None:
        raise FetchError("--organ and --limit filter a manifest's rows; add --manifest FILE.")
    root = Path(cache).expanduser() if cache is not None else cache_root()
    root.mkdir(parents=True, exist_ok=True)
    module = SOURCES[source]
    workers = max(1, int(workers))
    with download_slots(workers), transfers():
        plan = getattr(module, "plan_slices", None)
        if plan is None:
            return module.fetch_slices(ids, rows, cache=root, workers=workers, with_images=with_images)
        return run_slices(plan(ids, rows, cache=root, with_images=with_images), workers)


__all__ = ["SOURCES", "SOURCE_NAMES", "SliceTask", "cache_root", "fetch", "run_slices", "select_rows"]
