"""Turn the INPUT arguments of build-shards into a sorted list of slices with provenance.

A folder holding ``slice.json`` (or a folder whose sub-folders hold one: a fetch cache) is
a fetched slice; any other folder or file is a local slice named after itself. Inputs are
hashed file by file so the manifest can say exactly what a corpus was built from.
"""
from __future__ import annotations

import hashlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

from spavis.errors import ReaderError, SpavisError
from spavis.sources.sidecar import SIDECAR_NAME, read_sidecar

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SLICE_SUFFIXES = (".h5ad", ".h5", ".hdf5")
_IGNORED = re.compile(r"(^\.|\.part$|\.tmp$|^__pycache__$)")


@dataclass(frozen=True)
class SliceInput:
    """One slice to build: where it is, what it is called, and where it came from."""

    slide_id: str
    root: Path  # the folder or file the user gave (every file under it is hashed)
    data_path: Path  # what spavis.read_slice is handed
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)
    files: tuple[str, ...] = ()  # paths relative to root (root's own name for a file)
    sha256: tuple[tuple[str, str], ...] | None = None  # (relpath, sha256) once hashed

    @property
    def input_sha256(self) -> str:
        """One digest over every input file (relative path + content)."""
        if self.sha256 is None:
            raise ValueError(f"{self.slide_id}: inputs not hashed yet (call hash_inputs)")
        h = hashlib.sha256()
        for rel, digest in self.sha256:
            h.update(f"{rel}\t{digest}\n".encode())
        return h.hexdigest()

    def file_records(self) -> list[dict[str, Any]]:
        """Manifest entries: relative path, size and sha256 of every input file."""
        if self.sha256 is None:
            raise ValueError(f"{self.slide_id}: inputs not hashed yet (call hash_inputs)")
        base = self.root if self.root.is_dir() else self.root.parent
        return [
            {"path": rel, "size": (base / rel).stat().st_size, "sha256": digest}
            for rel, digest in self.sha256
        ]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Streamed sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _list_files(root: Path) -> tuple[str, ...]:
    if root.is_file():
        return (root.name,)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _IGNORED.search(d))
        for name in filenames:
            if _IGNORED.search(name):
                continue
            out.append(Path(dirpath, name).relative_to(root).as_posix())
    return tuple(sorted(out))


def _local_id(path: Path) -> str:
    name = path.name
    for suffix in (".gz",) + _SLICE_SUFFIXES + (".csv",):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")
    return name or "slice"


def _fetched(folder: Path) -> SliceInput:
    meta = read_sidecar(folder)
    slide_id = str(meta.get("slide_id") or "")
    if not _SAFE_ID.match(slide_id):
        raise SpavisError(
            f"{folder / SIDECAR_NAME}: slide_id {slide_id!r} is not usable as a file name "
            "(letters, digits, '.', '_' and '-' only); fix slice.json or fetch the slice again."
        )
    data_path = (folder / str(meta.get("data_path") or ".")).resolve()
    if not data_path.exists():
        raise ReaderError(
            f"{folder / SIDECAR_NAME}: data_path {meta.get('data_path')!r} does not exist; "
            "the fetch is incomplete, run `spavis fetch` again."
        )
    return SliceInput(slide_id, folder.resolve(), data_path, meta, _list_files(folder))


def _local(path: Path) -> SliceInput:
    meta = {
        "slide_id": _local_id(path),
        "source": "local",
        "accession": [],
        "organ": None,
        "species": "Homo sapiens",
        "condition": "unknown",
        "technology": "Visium",
        "license": None,
        "citation": None,
    }
    root = path.resolve()
    return SliceInput(meta["slide_id"], root, root, meta, _list_files(root))


def _sidecar_folders(folder: Path) -> list[Path]:
    """Folders under ``folder`` holding slice.json, not descending into a found slice."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        if SIDECAR_NAME in filenames:
            found.append(Path(dirpath))
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if not _IGNORED.search(d))
    return sorted(found)


def discover_inputs(inputs: Iterable[str | os.PathLike]) -> list[SliceInput]:
    """Slices named by INPUT arguments, sorted by slide_id; duplicate ids are an error."""
    slices: list[SliceInput] = []
    for raw in inputs:
        path = Path(raw).expanduser()
        if not path.exists():
            raise ReaderError(f"{path}: input does not exist; check the path given to build-shards.")
        if path.is_dir():
            fetched = _sidecar_folders(path)
            if fetched:
                slices.extend(_fetched(f) for f in fetched)
                continue
            if not _list_files(path):
                raise ReaderError(f"{path}: folder is empty; point build-shards at a slice folder or file.")
        slices.append(_local(path))
    if not slices:
        raise ReaderError("no input slices given to build-shards.")
    by_id: dict[str, SliceInput] = {}
    for s in slices:
        other = by_id.get(s.slide_id)
        if other is not None and other.root != s.root:
            raise SpavisError(
                f"slide_id {s.slide_id!r} is used by both {other.root} and {s.root}; "
                "rename one of them (or its slice.json slide_id) so every slide id is unique."
            )
        by_id[s.slide_id] = s
    return [by_id[k] for k in sorted(by_id)]


def hash_input(s: SliceInput) -> SliceInput:
    """The same slice with every input file's sha256 filled in."""
    if s.sha256 is not None:
        return s
    base = s.root if s.root.is_dir() else s.root.parent
    return replace(s, sha256=tuple((rel, sha256_file(base / rel)) for rel in s.files))


def hash_inputs(slices: list[SliceInput], workers: int = 1) -> list[SliceInput]:
    """Hash every slice's files (threads: hashlib releases the GIL on large reads)."""
    if workers <= 1 or len(slices) <= 1:
        return [hash_input(s) for s in slices]
    with ThreadPoolExecutor(max_workers=min(workers, 8)) as pool:
        return list(pool.map(hash_input, slices))
