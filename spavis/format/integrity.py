"""A copy of a corpus against its ``manifest.json``: the one check of the listed files, the one Zarr digest.

Why one module: four readers compare a corpus with what its build recorded, and each had its own
loop and wording: ``open_corpus`` (cheap: presence, sizes, stray shards), ``spavis validate``
(every sha256), ``spavis publish`` (the local files, hashed once, before any upload) and
``spavis validate ORG/NAME`` (the Hub's listing). They differ only in where the files are, so a
copy is described by :class:`LocalCopy` (a folder) or :class:`ListedCopy` (sizes and hashes
known up front: the Hub's tree, or files already hashed) and :func:`check` does the rest.

A Zarr store is one output with one digest (:func:`store_digest`): sha256 over sorted
``"<path in the store>\\t<sha256>\\n"`` lines of the files a build writes
(``schema.zarr_build_file``: not ``.zmetadata``, not ``obsm/X_*`` added later by
``stamp embed --zarr``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from spavis.format import schema as S
from spavis.format.io import digest_lines, sha256_file, tree_sha256

__all__ = ["Problem", "LocalCopy", "ListedCopy", "check", "store_digest", "store_digest_of", "summary"]


def store_digest_of(shas: Mapping[str, str]) -> tuple[str, int]:
    """(digest, number of files) of a Zarr store from ``{path inside the store: sha256}``; only the
    files a build writes count."""
    built = {rel: sha for rel, sha in shas.items() if S.zarr_build_file(rel)}
    return digest_lines(built), len(built)


def store_digest(store: str | os.PathLike) -> tuple[str, int]:
    """(digest, number of files) of a Zarr store folder, as manifest.json records it."""
    return tree_sha256(store, include=S.zarr_build_file)


def _walk(root: Path, under: str = "") -> Iterator[str]:
    """Paths (posix, relative to ``root``) of the regular files below ``root / under``."""
    start = root / under if under else root
    for dirpath, dirnames, filenames in os.walk(start):
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath, name).relative_to(root).as_posix()


@dataclass(frozen=True)
class Problem:
    """One difference between a copy and its manifest: ``path`` (relative to the corpus) and what is wrong."""

    path: str
    what: str

    def __str__(self) -> str:
        return f"{self.path}: {self.what}"


class LocalCopy:
    """A corpus folder on disk (nothing is read until asked)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def size(self, rel: str) -> int | None:
        p = self.root / rel
        return p.stat().st_size if p.is_file() else None

    def has_store(self, rel: str) -> bool:
        return (self.root / rel).is_dir()

    def store(self, rel: str) -> dict[str, str]:
        return {f[len(rel) + 1:]: f for f in _walk(self.root, rel)} if self.has_store(rel) else {}

    def paths(self, under: str = "") -> Iterable[str]:
        return _walk(self.root, under) if (self.root / under).is_dir() else ()

    def sha256(self, rel: str) -> str:
        return sha256_file(self.root / rel)


class ListedCopy:
    """A copy whose files are known up front: ``{path: size or None}`` and a sha256 per path."""

    def __init__(self, files: Mapping[str, int | None], sha256: Callable[[str], str]) -> None:
        self.files = files
        self._sha = sha256
        self._stores: dict[str, dict[str, str]] | None = None

    def size(self, rel: str) -> int | None:
        """The listed size; None when absent, -1 when present with no known size."""
        if rel not in self.files:
            return None
        size = self.files[rel]
        return -1 if size is None else int(size)

    def _by_store(self) -> dict[str, dict[str, str]]:
        if self._stores is None:  # one pass, not stores x files
            self._stores = {}
            for rel in self.files:
                parts = rel.split("/", 2)
                if len(parts) == 3 and parts[0] == S.ZARR_DIR:
                    self._stores.setdefault(f"{parts[0]}/{parts[1]}", {})[parts[2]] = rel
        return self._stores

    def has_store(self, rel: str) -> bool:
        return bool(self.store(rel))

    def store(self, rel: str) -> dict[str, str]:
        return self._by_store().get(rel, {})

    def paths(self, under: str = "") -> Iterable[str]:
        return [p for p in self.files if not under or p.startswith(under.rstrip("/") + "/")]

    def sha256(self, rel: str) -> str:
        return self._sha(rel)


def check(manifest: Mapping[str, Any], copy: LocalCopy | ListedCopy, *, hashes: bool = True,
          kinds: Iterable[str] | None = None, only: Iterable[str] | None = None, strays: str | None = "",
          allowed: Iterable[str] = (), in_store: Callable[[str], bool] | None = None) -> list[Problem]:
    """Every difference between ``copy`` and ``manifest["outputs"]``.

    Each listed output (of ``kinds`` and, given ``only``, at those paths; default all) must be there
    (a Zarr store: its folder) with its listed size and, with ``hashes``, its sha256 (a Zarr store:
    :func:`store_digest_of`). ``strays``: the folder whose unlisted files are reported ("" the whole
    copy, e.g. ``data/expression`` for the shards only, None none); ``manifest.json`` and ``allowed``
    are never strays, nor a file inside a listed store for which ``in_store(path in the store)`` holds
    (default: every file; embeddings are added there).
    """
    wanted = None if kinds is None else set(kinds)
    paths = None if only is None else set(only)
    problems: list[Problem] = []
    covered = {S.MANIFEST_FILE, *allowed}
    stores: list[str] = []
    for entry in manifest.get("outputs") or []:
        rel, kind = str(entry.get("path", "")), entry.get("kind")
        covered.add(rel)
        if kind == "zarr":
            stores.append(rel + "/")
        if (wanted is not None and kind not in wanted) or (paths is not None and rel not in paths):
            continue
        want = entry.get("sha256")
        if kind == "zarr":
            inner = copy.store(rel) if hashes else None
            if not (inner if hashes else copy.has_store(rel)):
                problems.append(Problem(rel, "listed in manifest.json but missing"))
            elif hashes:
                digest, _ = store_digest_of({k: copy.sha256(v) for k, v in inner.items()})
                if digest != want:
                    problems.append(Problem(rel, f"Zarr store digest {digest[:12]}… does not match manifest.json "
                                                 f"({str(want)[:12]}…)"))
            continue
        size = copy.size(rel)
        if size is None:
            problems.append(Problem(rel, "listed in manifest.json but missing"))
        elif entry.get("size") is not None and size >= 0 and size != int(entry["size"]):
            problems.append(Problem(rel, f"{size} bytes, manifest.json says {entry['size']}"))
        elif hashes and (got := copy.sha256(rel)) != want:
            problems.append(Problem(rel, f"sha256 {got[:12]}… does not match manifest.json ({str(want)[:12]}…)"))
    if strays is not None:
        def belongs(rel: str) -> bool:
            store = next((s for s in stores if rel.startswith(s)), None)
            return store is not None and (in_store is None or in_store(rel[len(store):]))

        problems += [Problem(rel, "not listed in manifest.json (unexpected file)") for rel in copy.paths(strays)
                     if rel not in covered and not belongs(rel)]
    return problems


def summary(problems: list[Problem], most: int = 5) -> str:
    """The first ``most`` problems in one line (``...; and N more``)."""
    head = "; ".join(str(p) for p in problems[:most])
    return head + (f"; and {len(problems) - most} more" if len(problems) > most else "")
