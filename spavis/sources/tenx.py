"""10x Genomics public Visium datasets (``cf.10xgenomics.com``), listed in ``manifests/tenx-v1.csv``.

10x publishes each dataset as loose Space Ranger outputs under
``https://cf.10xgenomics.com/samples/spatial-exp/<version>/<name>/``; the manifest row
names the two a slice needs in ``extra.urls`` (file name -> URL):
``<name>_filtered_feature_bc_matrix.h5`` and ``<name>_spatial.tar.gz``. With images,
the full-resolution ``extra.image_urls`` (``<name>_image.tif``) come too.

Per slice ``CACHE/tenx/<slide_id>/``: the h5 under its 10x name, the pack unpacked
(safely, only what a reader needs; hires image only with images) into ``spatial/`` and then
deleted (slice.json lists it under ``archives``; unpacked files carry ``<pack url>#<member>``).
``read_slice`` reads the folder as a Space Ranger output.

``--id`` takes a slide id or a 10x dataset name (the row's accession) and looks it up in the
bundled ``tenx-v1`` manifest. ``SPAVIS_TENX_URL`` (read at call time) replaces the
``https://cf.10xgenomics.com`` prefix of manifest URLs (mirrors, tests). 10x publishes no
checksums with the files: sha256 is recorded, md5/sha256 verified where a manifest has it.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Sequence

from spavis.errors import FetchError
from spavis.sources import archive, download, sidecar
from spavis.sources.parallel import SliceTask, run_slices
from spavis.sources.visium import check_complete, pack_targets, role_of

DEFAULT_BASE = "https://cf.10xgenomics.com"
BUNDLED_MANIFEST = "tenx-v1"
LICENSE = "CC BY 4.0 (10x Genomics)"
CITATION = "10x Genomics public dataset, https://www.10xgenomics.com/datasets"
SOURCE = "tenx"


def base_url() -> str:
    return os.environ.get("SPAVIS_TENX_URL", DEFAULT_BASE).rstrip("/")


def map_url(url: str) -> str:
    """A manifest URL on the 10x CDN, moved onto ``SPAVIS_TENX_URL`` when set."""
    return base_url() + url[len(DEFAULT_BASE):] if url.startswith(DEFAULT_BASE + "/") else url


def slice_urls(row: Any, with_images: bool = False) -> dict[str, str]:
    """File name -> URL of one manifest row (h5 + spatial pack, + full-res images)."""
    urls = dict((getattr(row, "extra", None) or {}).get("urls") or {})
    roles = {role_of(name) for name in urls}
    if not {"h5", "spatial_pack"} <= roles:
        raise FetchError(f"manifest row {row.slide_id}: extra.urls must list a …_filtered_feature_bc_matrix.h5 "
                         "and a …_spatial.tar.gz URL (see manifests/tenx-v1.csv).")
    if with_images:
        urls.update({u.rsplit("/", 1)[-1]: u for u in (row.extra.get("image_urls") or [])})
    return {name: map_url(url) for name, url in urls.items()}


def resolve_ids(ids: Sequence[str]) -> list:
    """Rows of the bundled tenx-v1 manifest for slide ids / 10x dataset names."""
    from spavis.manifests import load_manifest
    from spavis.sources import select_rows

    rows = load_manifest(BUNDLED_MANIFEST)
    out: dict[str, Any] = {}
    for i in ids:
        found = select_rows(rows, SOURCE, ids=[i])
        if not found:
            raise FetchError(f"10x: {i!r} is not in the bundled {BUNDLED_MANIFEST} manifest; use a slide_id or "
                             "accession from manifests/tenx-v1.csv, or pass --manifest FILE with its row.")
        out.update((r.slide_id, r) for r in found)
    return list(out.values())


def plan_slices(ids: Sequence[str], rows: Sequence[Any], *, cache: Path,
                with_images: bool = False) -> list[SliceTask]:
    """One task per manifest row (bare ids are looked up in the bundled manifest)."""
    todo = {r.slide_id: r for r in [*resolve_ids(ids), *rows]} if ids else {r.slide_id: r for r in rows}
    for row in todo.values():
        slice_urls(row, with_images)  # refuse a bad row before anything downloads
    return [SliceTask(sid, lambda row=row: _fetch_one(row, Path(cache), with_images)) for sid, row in todo.items()]


def fetch_slices(ids: Sequence[str], rows: Sequence[Any], *, cache: Path, workers: int = 4,
                 with_images: bool = False) -> list[Path]:
    """Fetch 10x datasets into ``CACHE/tenx/<slide_id>/``."""
    return run_slices(plan_slices(ids, rows, cache=cache, with_images=with_images), workers)


def _unpacked(folder: sidecar.SliceFolder, pack_url: str, with_images: bool) -> dict[str, dict] | None:
    """Entries of files an earlier fetch unpacked from ``pack_url`` if all still verify by size;
    None when the pack must be fetched again (also for a first ``--with-images`` run)."""
    files = (folder.record or {}).get("files", {})
    kept = {name: dict(meta) for name, meta in files.items() if str(meta.get("url", "")).startswith(pack_url + "#")}
    intact = all((folder.path / name).is_file() and (folder.path / name).stat().st_size == meta.get("size")
                 for name, meta in kept.items())
    if not kept or not intact or (with_images and not any(role_of(n) == "hires" for n in kept)):
        return None
    return kept


def _unpack(pack: Path, url: str, dest: Path, label: str, with_images: bool) -> dict[str, dict]:
    """Extract the spatial files a reader needs from the pack into ``dest/spatial/``."""
    targets = pack_targets("spatial_pack", archive.list_members(pack, files_only=False), with_images=with_images)
    if not any(role_of(t) == "positions" for t in targets.values()):
        raise FetchError(f"{label}: {url} holds no tissue positions file; this is not a Space Ranger spatial pack.")
    entries = {}
    for member, path in zip(targets, archive.safe_extract(pack, dest, members=targets)):
        sha, _ = download.hash_file(path)
        entries[path.relative_to(dest).as_posix()] = {"size": path.stat().st_size, "sha256": sha, "md5": None,
                                                      "url": f"{url}#{member}"}
    return entries


def _fetch_one(row: Any, cache: Path, with_images: bool) -> Path:
    label = f"10x {row.slide_id}"
    urls = slice_urls(row, with_images)
    pack = next(name for name in urls if role_of(name) == "spatial_pack")
    checksums = dict(getattr(row, "checksums", None) or {})
    with sidecar.slice_folder(cache, SOURCE, row.slide_id) as folder:
        archives_dir = folder.path / ".archives"  # the pack waits here until unpacked (hidden from readers)
        entries = _unpacked(folder, urls[pack], with_images) or {}
        archives = dict((folder.record or {}).get("archives") or {}) if entries else {}
        jobs = []
        for name, url in urls.items():
            if name == pack and entries:
                continue
            known = {} if name == pack else folder.known(name)
            digests = download.expected_digests(checksums.get(name))
            jobs.append(download.Job(url=url, dest=(archives_dir if name == pack else folder.path) / name,
                                     size=known.get("size"), sha256=digests["sha256"] or known.get("sha256"),
                                     md5=digests["md5"], label=label))
        for rec in download.download_many(jobs, workers=len(jobs)):
            if rec.path.parent == archives_dir:
                archives[rec.path.name] = rec.sidecar_entry()
                entries.update(_unpack(rec.path, rec.url, folder.path, label, with_images))
            else:
                entries.update(download.iter_records([rec], folder.path))
        shutil.rmtree(archives_dir, ignore_errors=True)
        for name, meta in ((folder.record or {}).get("files") or {}).items():  # e.g. images of an earlier run
            if name not in entries and (folder.path / name).is_file():
                entries[name] = meta
        check_complete(entries, label, "the downloaded files")
        sidecar.write_sidecar(
            folder.path, slide_id=row.slide_id, source=SOURCE, accession=list(row.accession) or [row.slide_id],
            data_path=".", files=entries, archives=archives, source_urls=list(urls.values()),
            **sidecar.row_fields(row, organ=None, species="Homo sapiens", condition="unknown", technology="Visium",
                                 license=LICENSE, citation=CITATION))
    return folder.final


__all__ = ["BUNDLED_MANIFEST", "DEFAULT_BASE", "base_url", "fetch_slices", "map_url", "plan_slices",
           "resolve_ids", "slice_urls"]
