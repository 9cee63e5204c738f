"""STOmicsDB: the CNGB file tree of spatial datasets, one h5ad per section.

Real layout (``SPAVIS_STOMICSDB_URL``, default ``https://ftp.cngb.org/pub/stomics``), an
nginx-style HTML index: ``<base>/<STT project>/Analysis/<STSA analysis>/<STTS section>/<files>``
(e.g. ``STT0000124/Analysis/STSA0000877/STTS0001449/...``). We list the tree by parsing
the index pages and fetch each section's ``.h5ad`` (the first, sorted, when there are
several). Ids: ``STTnnnnnnn`` (every section of a project) or ``STT…/STSA…/STTS…``
(one section).

Checksums: CNGB asks submitters for an MD5 per file and its archives ship them as
md5sum-style listings next to the data (``md5sum.txt``, ``md5.txt``, ``md5``, ``<file>.md5``).
Any such listing found in the section folder or one of its parents (nearest wins) is
parsed (GNU ``<md5>  <path>``, BSD ``MD5 (<path>) = <md5>``, or ``<path><tab><md5>``) and
the h5ad's md5 is verified; a manifest checksum takes precedence. sha256 is always recorded.
"""
from __future__ import annotations

import os
import re
import threading
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Sequence

from spavis.errors import FetchError
from spavis.sources import download, sidecar
from spavis.sources.parallel import SliceTask, run_slices

DEFAULT_BASE = "https://ftp.cngb.org/pub/stomics"
LICENSE = "STOmicsDB/CNGBdb public data, see the original publication"
_HEX32 = r"[0-9a-fA-F]{32}"
_MD5_LINES = (
    re.compile(rf"^(?P<md5>{_HEX32})\s+\*?(?P<path>\S.*?)\s*$"),  # GNU md5sum
    re.compile(rf"^MD5\s*\((?P<path>.+)\)\s*=\s*(?P<md5>{_HEX32})\s*$", re.I),  # BSD md5
    re.compile(rf"^(?P<path>\S.*?)[\t,; ]+(?P<md5>{_HEX32})\s*$"),  # table: path, md5
)


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
    p = _Links()
    p.feed(download.get_bytes(url, label="STOmicsDB").decode("utf-8", "replace"))
    return sorted(set(p.links))


def is_md5_listing(name: str) -> bool:
    low = name.lower()
    return not low.endswith("/") and (low.endswith(".md5") or re.fullmatch(r"md5(sum)?s?([._-].*)?", low) is not None)


def parse_md5_listing(text: str, listing_name: str = "") -> dict[str, str]:
    """path -> md5 from an md5sum-style listing. A bare '<md5>' in '<file>.md5' names <file>."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip().lstrip("\ufeff")
        if not line or line.startswith("#"):
            continue
        if re.fullmatch(_HEX32, line) and listing_name.lower().endswith(".md5"):
            out[listing_name[:-4]] = line.lower()
            continue
        for rx in _MD5_LINES:
            m = rx.match(line)
            if m:
                out[m.group("path").strip().removeprefix("./")] = m.group("md5").lower()
                break
    return out


class Tree:
    """Cached index pages and md5 listings of one fetch (thread-safe enough: dict writes)."""

    def __init__(self) -> None:
        self._ls: dict[str, list[str]] = {}
        self._md5: dict[str, dict[str, str]] = {}
        self._lock = threading.Lock()

    def ls(self, rel: str) -> list[str]:
        if rel not in self._ls:
            self._ls[rel] = list_dir(f"{base_url()}/{rel}")
        return self._ls[rel]

    def md5s(self, rel: str) -> dict[str, str]:
        """All md5 entries published in folder ``rel`` (paths relative to it)."""
        with self._lock:
            if rel in self._md5:
                return self._md5[rel]
        try:
            names = self.ls(rel)
        except FetchError:
            names = []  # a parent without an index page simply publishes nothing
        table: dict[str, str] = {}
        for name in sorted(n for n in names if is_md5_listing(n)):
            body = download.get_bytes(f"{base_url()}/{rel}/{name}", label=f"STOmicsDB {rel}")
            table.update(parse_md5_listing(body.decode("utf-8", "replace"), name))
        with self._lock:
            self._md5[rel] = table
        return table

    def published_md5(self, section: str, name: str) -> str | None:
        """The md5 CNGB publishes for ``section/name``: nearest listing first."""
        parts = section.split("/")
        for depth in range(len(parts), 0, -1):
            sub = "/".join(parts[depth:] + [name])
            for path, md5 in self.md5s("/".join(parts[:depth])).items():
                if path == sub or path.endswith("/" + sub):
                    return md5
        return None

    def h5ad(self, section: str) -> str | None:
        found = [f for f in self.ls(section) if f.lower().endswith(".h5ad")]
        return found[0] if found else None


def sections(project: str, tree: Tree | None = None) -> list[tuple[str, str]]:
    """(section path relative to base, h5ad name) for every section with an h5ad."""
    tree = tree or Tree()
    out = []
    analysis = f"{project}/Analysis"
    for stsa in [d for d in tree.ls(analysis) if d.endswith("/")]:
        for stts in [d for d in tree.ls(f"{analysis}/{stsa.rstrip('/')}") if d.endswith("/")]:
            rel = f"{analysis}/{stsa}{stts}".rstrip("/")
            name = tree.h5ad(rel)
            if name:
                out.append((rel, name))
    return out


def plan_slices(ids: Sequence[str], rows: Sequence[Any], *, cache: Path,
                with_images: bool = False) -> list[SliceTask]:
    """Resolve ids/rows to sections (listing the CNGB tree); one task per section."""
    tree = Tree()
    todo: list[tuple[str, str | None, Any]] = []
    for i in ids:
        i = i.strip().strip("/")
        if re.fullmatch(r"STT\d+", i):
            found = sections(i, tree)
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
    return [SliceTask(row.slide_id if row is not None else rel.rsplit("/", 1)[-1],
                      lambda rel=rel, name=name, row=row: _fetch_one(rel, name, row, Path(cache), tree))
            for rel, name, row in todo]


def fetch_slices(ids: Sequence[str], rows: Sequence[Any], *, cache: Path, workers: int = 4,
                 with_images: bool = False) -> list[Path]:
    return run_slices(plan_slices(ids, rows, cache=cache, with_images=with_images), workers)


def _fetch_one(rel: str, name: str | None, row: Any, cache: Path, tree: Tree) -> Path:
    name = name or tree.h5ad(rel)
    if not name:
        raise FetchError(f"STOmicsDB {rel}: no .h5ad in {base_url()}/{rel}/.")
    sid = row.slide_id if row is not None else rel.rsplit("/", 1)[-1]
    return sidecar.fetch_file_slice(
        cache, "stomicsdb", sid, url=f"{base_url()}/{rel}/{name}", name=name, row=row,
        accession=[p for p in rel.split("/") if p != "Analysis"], label=f"STOmicsDB {sid}",
        md5=tree.published_md5(rel, name),
        defaults=dict(organ=None, species=None, condition="unknown", technology=None, license=LICENSE,
                      citation=None))
