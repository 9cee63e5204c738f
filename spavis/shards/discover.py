"""Turn the INPUT arguments of build-shards into a sorted list of slices with provenance.

A folder holding ``slice.json`` (or a folder whose sub-folders hold one: a fetch cache) is
a fetched slice; any other folder or file is a local slice named after itself. Inputs are
hashed file by file so the manifest can say exactly what a corpus was built from.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

from spavis.errors import ReaderError, SpavisError, SpavisWarning
from spavis.format.io import not_regular
from spavis.format.io import sha256_file as _sha256_file
from spavis.spaceranger import INTERNAL_DIRS
from spavis.sources.sidecar import FIELDS as SIDECAR_FIELDS
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
    return _sha256_file(path, chunk_size=chunk)


def _list_files(root: Path) -> tuple[str, ...]:
    """Every input file under ``root`` (relative), refusing anything that is no regular file.

    A FIFO, a device (e.g. a link to /dev/zero), a socket or a dangling link in a slice folder
    would hang or break hashing and the readers (a FIFO blocks, /dev/zero never ends): the build
    stops here, before any file is opened, with one line naming the path.
    """
    what = not_regular(root)
    if what is None:
        return (root.name,)
    if what != "a folder":
        raise _refuse(root, what)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _IGNORED.search(d))
        for name in filenames:
            if _IGNORED.search(name):
                continue
            path = Path(dirpath, name)
            what = not_regular(path)
            if what is not None:
                raise _refuse(path, what)
            out.append(path.relative_to(root).as_posix())
    return tuple(sorted(out))


def _refuse(path: Path, what: str) -> ReaderError:
    link = f" (a link to {os.path.realpath(path)})" if path.is_symlink() else ""
    return ReaderError(f"{path}: is {what}{link}, not a regular file; build-shards reads only regular files, "
                       "so remove it or move it out of the slice folder.")


def _local_id(path: Path) -> str:
    name = path.name
    for suffix in (".gz",) + _SLICE_SUFFIXES + (".csv",):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")
    return name or "slice"


def _fetched(folder: Path) -> SliceInput:
    files = _list_files(folder)  # slice.json included: refused before it is read if no regular file
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
    return SliceInput(slide_id, folder.resolve(), data_path, meta, files)


def _local(path: Path) -> SliceInput:
    # The slice.json defaults of a fetched slice, minus the fetch-only fields.
    meta = {k: v for k, v in copy.deepcopy(SIDECAR_FIELDS).items() if k not in ("revision", "data_path", "files")}
    meta.update(slide_id=_local_id(path), source="local")
    root = path.resolve()
    marker = root / "generated.json" if root.is_dir() else None
    if marker is not None and marker.is_file():  # written by spavis.simulate: label it as generated
        try:
            gen = json.loads(marker.read_text())
        except ValueError:
            gen = {}
        if gen.get("generated"):
            meta.update(
                source="generated",
                license="CC0-1.0",
                citation=str(gen.get("label") or "generated by spavis.simulate (not measured data)"),
            )
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


_DATA_FILE = re.compile(r"(\.h5ad|\.h5|_count\.csv(\.gz)?|matrix\.mtx(\.gz)?)$", re.IGNORECASE)


def _has_data(folder: Path, depth: int = 0) -> bool:
    """True when a count matrix lies in ``folder`` (depth <= 3, as the readers search)."""
    try:
        children = sorted(folder.iterdir())
    except OSError:
        return False
    for child in children:
        if _IGNORED.search(child.name):
            continue
        if child.is_file() and _DATA_FILE.search(child.name):
            return True
        if child.is_dir() and depth < 3 and _has_data(child, depth + 1):
            return True
    return False


def _local_collection(folder: Path) -> list[Path]:
    """Sub-folders that are slices when ``folder`` is a folder of local slices, else [].

    A folder is a collection when it holds no matrix itself, no Space Ranger-internal
    sub-folder (spatial/, filtered_feature_bc_matrix/, outs/) and at least two
    sub-folders with a count matrix each.
    """
    children = [c for c in sorted(folder.iterdir()) if not _IGNORED.search(c.name)]
    if any(c.is_file() and _DATA_FILE.search(c.name) for c in children):
        return []
    if any(c.is_dir() and c.name.lower() in INTERNAL_DIRS for c in children):
        return []
    slices = [c for c in children if c.is_dir() and _has_data(c)]
    return slices if len(slices) >= 2 else []


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
            members = _local_collection(path)
            if members:
                slices.extend(_local(m) for m in members)
                continue
        slices.append(_local(path))
    if not slices:
        raise ReaderError("no input slices given to build-shards.")
    by_id: dict[str, SliceInput] = {}
    for s in slices:
        other = by_id.get(s.slide_id)
        if other is not None and other.root != s.root:
            if not _same_slice(other, s):
                raise SpavisError(
                    f"slide_id {s.slide_id!r} is used by both {other.root} and {s.root}; "
                    "rename one of them (or its slice.json slide_id) so every slide id is unique."
                )
            warnings.warn(f"{s.root}: the same slice as {other.root} (a link or an identical copy); "
                          f"counted once as {s.slide_id!r}.", SpavisWarning, stacklevel=2)
            continue
        by_id[s.slide_id] = s
    return [by_id[k] for k in sorted(by_id)]


def _same_slice(a: SliceInput, b: SliceInput) -> bool:
    """Same files reached twice: one resolved path (a symlink), or identical content (a copy)."""
    if a.root.resolve() == b.root.resolve():
        return True
    if a.files != b.files:
        return False
    return hash_input(a).input_sha256 == hash_input(b).input_sha256


def drop_duplicate_inputs(slices: list[SliceInput]) -> list[SliceInput]:
    """Keep one slice per ``input_sha256`` (the first by slide_id), warning about the others.

    A slice reached through a symlink or copied under another name would otherwise be
    counted twice, biasing gene statistics and leaking between training and evaluation.
    """
    kept: dict[str, SliceInput] = {}
    # the name of the real folder wins over the name of a link to it, then the first slide_id
    for s in sorted(slices, key=lambda s: (s.slide_id != _local_id(s.root), s.slide_id)):
        first = kept.get(s.input_sha256)
        if first is not None:
            how = "the same folder reached through a link" if s.root == first.root else "a copy"
            warnings.warn(
                f"slide {s.slide_id!r} ({s.root}) has the same input files as slide {first.slide_id!r} "
                f"({first.root}): {how} (same input_sha256). It is counted once, as {first.slide_id!r}.",
                SpavisWarning, stacklevel=2)
            continue
        kept[s.input_sha256] = s
    return sorted(kept.values(), key=lambda s: s.slide_id)


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
