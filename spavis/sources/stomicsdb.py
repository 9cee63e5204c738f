"""STOmicsDB: the CNGB file tree of spatial datasets, one h5ad per section.

Real layout (``SPAVIS_STOMICSDB_URL``, default ``https://ftp.cngb.org/pub/stomics``), an
nginx-style HTML index: ``<base>/<STT project>/Analysis/<STSA analysis>/<STTS section>/<files>``
(e.g. ``STT0000124/Analysis/STSA0000877/STTS0001449/...``). We list the tree by parsing
the index pages and fetch each section's ``.h5ad`` (the first, sorted, when there are
several). Ids: ``STTnnnnnnn`` (every section of a project) or ``STT…/STSA…/STTS…``
(one section). CNGB publishes no checksums in the tree, so sha256 is recorded only.
"""
from __future__ import annotations

import os
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Sequence

from spavis.errors import FetchError
from spavis.sources import download, sidecar

DEFAULT_BASE = "https://ftp.cngb.org/pub/stomics"
LICENSE = "STOmicsDB/CNGBdb public data, see the original publication"


def base_url() -> str:
    return os.environ.get("SPAVIS_STOMICSDB_URL", DEFAULT_BASE).rstrip("/")


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            href = dict(attrs).get("href")
            if href and not href.startswith(("?", "#", "/", "..")) and "://" not in href:
                self.links.append(href)


def list_dir(url: str) -> list[str]:
    """Entry names of an HTML index page (folders end with '/')."""
    url = url.rstrip("/") + "/"
    resp = download.thread_session().get(url, timeout=download.RetryPolicy.from_env().timeout)
    if resp.status_code == 404:
        raise FetchError(f"STOmicsDB: {url} was not found (HTTP 404); check the accession.")
    if resp.status_code != 200:
        raise FetchError(f"STOmicsDB: {url} answered HTTP {resp.status_code}; retry later.")
    p = _Links()
    p.feed(resp.text)
    return sorted(set(p.links))


def sections(project: str) -> list[tuple[str, str]]:
    """(section path relative to base, h5ad name) for every section with an h5ad."""
    out = []
    analysis = f"{base_url()}/{project}/Analysis"
    for stsa in [d for d in list_dir(analysis) if d.endswith("/")]:
        for stts in [d for d in list_dir(f"{analysis}/{stsa}") if d.endswith("/")]:
            rel = f"{project}/Analysis/{stsa}{stts}".rstrip("/")
            h5ads = [f for f in list_dir(f"{base_url()}/{rel}") if f.lower().endswith(".h5ad")]
            if h5ads:
                out.append((rel, h5ads[0]))
    return out


def fetch_slices(ids: Sequence[str], rows: Sequence[Any], *, cache: Path, workers: int = 4,
                 with_images: bool = False) -> list[Path]:
    todo: list[tuple[str, str | None, Any]] = []
    for i in ids:
        i = i.strip().strip("/")
        if re.fullmatch(r"STT\d+", i):
            found = sections(i)
            if not found:
                raise FetchError(f"STOmicsDB {i}: no section with an .h5ad under {base_url()}/{i}/Analysis/.")
            todo += [(rel, name, None) for rel, name in found]
        elif re.fullmatch(r"STT\d+/(Analysis/)?STSA\d+/STTS\d+", i):
            parts = i.split("/")
            todo.append((f"{parts[0]}/Analysis/{parts[-2]}/{parts[-1]}", None, None))
        else:
            raise FetchError(f"{i!r} is not a STOmicsDB id; use STTnnnnnnn or STTnnnnnnn/STSAnnnnnnn/STTSnnnnnnn.")
    for row in rows:
        rel = (getattr(row, "extra", None) or {}).get("path")
        if not rel:
            raise FetchError(f"manifest row {row.slide_id}: STOmicsDB rows need extra.path (STT…/Analysis/STSA…/STTS…).")
        todo.append((rel.strip("/"), (row.expected_files or [None])[0], row))
    return [_fetch_one(rel, name, row, Path(cache), workers) for rel, name, row in todo]


def _fetch_one(rel: str, name: str | None, row: Any, cache: Path, workers: int) -> Path:
    if name is None:
        h5ads = [f for f in list_dir(f"{base_url()}/{rel}") if f.lower().endswith(".h5ad")]
        if not h5ads:
            raise FetchError(f"STOmicsDB {rel}: no .h5ad in {base_url()}/{rel}/.")
        name = h5ads[0]
    sid = row.slide_id if row is not None else rel.rsplit("/", 1)[-1]
    url = f"{base_url()}/{rel}/{name}"
    checks = dict(getattr(row, "checksums", None) or {}).get(name, "")
    with sidecar.slice_folder(cache, "stomicsdb", sid) as folder:
        known = folder.known(name)
        rec = download.fetch_file(url, folder.path / name, size=known.get("size"),
                                  sha256=known.get("sha256"),
                                  md5=checks[4:] if checks.startswith("md5:") else None,
                                  label=f"STOmicsDB {sid}")
        meta = {k: getattr(row, k, None) for k in ("organ", "species", "condition", "technology", "license", "citation")} if row is not None else {}
        sidecar.write_sidecar(
            folder.path, slide_id=sid, source="stomicsdb", accession=[p for p in rel.split("/") if p != "Analysis"],
            organ=meta.get("organ"), species=meta.get("species") or None,
            condition=meta.get("condition") or "unknown", technology=meta.get("technology") or None,
            license=meta.get("license") or LICENSE, citation=meta.get("citation"),
            data_path=name, files=download.iter_records([rec], folder.path), source_urls=[url],
        )
    return folder.final
