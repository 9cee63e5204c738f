"""Safe extraction of downloaded archives: tar (plain, .gz, .bz2, .xz) and zip.

GEO ships Visium data as ``GSEnnnn_RAW.tar`` and as per-sample ``*_spatial.tar.gz`` /
``*_filtered_feature_bc_matrix.zip`` packs. They come from the internet, so every selected
member is checked before anything is written: absolute paths, ``..`` components,
symlinks, hard links, devices/FIFOs are refused and the total extracted size is capped
(also while streaming, in case a header lies). Only requested members are extracted, each
to a temp name then renamed, so a crash never leaves a truncated member under its real
name. For tar, Python's own ``tarfile.data_filter`` runs on top where available.
"""
from __future__ import annotations

import os
import posixpath
import stat
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterable, Mapping

from spavis.errors import FetchError, UnsafeArchiveError  # noqa: F401
from spavis.format.io import temp_sibling

DEFAULT_MAX_BYTES = 50 * 1024**3  # 50 GB: larger than any single Visium series we know



@dataclass(frozen=True)
class Member:
    """One archive entry, format independent."""

    name: str
    size: int
    kind: str  # file | dir | link | special
    linkname: str = ""


class _Reader:
    """Members + a way to open one, for tar or zip (chosen by content, not by name)."""

    def __init__(self, path: Path):
        self.path = path
        self._zip: zipfile.ZipFile | None = None
        self._tar: tarfile.TarFile | None = None
        try:
            if zipfile.is_zipfile(path):
                self._zip = zipfile.ZipFile(path)
            else:
                self._tar = tarfile.open(path)
        except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as exc:
            raise FetchError(f"{path}: not a readable tar/zip archive ({exc}); delete it and fetch again.") from None
        try:
            self.members = self._list()
        except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
            self.close()
            raise FetchError(f"{path}: the archive is corrupt ({exc}); delete it and fetch again.") from None

    def _list(self) -> list[Member]:
        if self._zip is not None:
            out = []
            for i in self._zip.infolist():
                ftype = stat.S_IFMT(i.external_attr >> 16)  # Unix type bits; 0 from most zip tools
                if ftype == stat.S_IFLNK:
                    kind = "link"
                elif i.is_dir() or ftype == stat.S_IFDIR:
                    kind = "dir"
                elif ftype and ftype != stat.S_IFREG:
                    kind = "special"
                else:
                    kind = "file"
                out.append(Member(i.filename, i.file_size, kind))
            return out
        assert self._tar is not None
        self._tar_info = {m.name: m for m in self._tar.getmembers()}
        return [Member(m.name, m.size, "link" if (m.issym() or m.islnk()) else
                       "file" if m.isfile() else "dir" if m.isdir() else "special", m.linkname)
                for m in self._tar_info.values()]

    def open(self, member: Member, root: Path) -> IO[bytes]:
        if self._zip is not None:
            return self._zip.open(member.name)
        info = self._tar_info[member.name]
        filt = getattr(tarfile, "data_filter", None)
        if filt is not None:
            try:
                filt(info, str(root))  # the stdlib's own checks, on top of ours
            except tarfile.FilterError as exc:
                raise UnsafeArchiveError(f"{self.path}: member {member.name!r} rejected ({exc}).") from None
        src = self._tar.extractfile(info)  # type: ignore[union-attr]
        if src is None:
            raise UnsafeArchiveError(f"{self.path}: member {member.name!r} has no data.")
        return src

    def close(self) -> None:
        for h in (self._zip, self._tar):
            if h is not None:
                h.close()

    def __enter__(self) -> "_Reader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_member(path: Path, m: Member) -> None:
    name = m.name
    norm = posixpath.normpath(name.replace("\\", "/"))
    if name.startswith(("/", "\\")) or os.path.isabs(name) or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchiveError(f"{path}: member {name!r} has an absolute path; refusing to extract.")
    if norm == ".." or norm.startswith("../") or ".." in Path(name.replace("\\", "/")).parts:
        raise UnsafeArchiveError(f"{path}: member {name!r} points outside the folder ('..'); refusing.")
    if m.kind == "link":
        raise UnsafeArchiveError(f"{path}: member {name!r} is a link ({m.linkname!r}); refusing.")
    if m.kind == "special":
        raise UnsafeArchiveError(f"{path}: member {name!r} is a device, FIFO or other special file; refusing.")


def list_members(path: str | os.PathLike, *, files_only: bool = True) -> list[str]:
    """Names of the regular files (or, with ``files_only=False``, of all entries) in a tar/zip."""
    with _Reader(Path(path)) as r:
        return [m.name for m in r.members if m.kind == "file" or not files_only]


def safe_extract(
    path: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    members: Iterable[str] | Mapping[str, str] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    flatten: bool = False,
) -> list[Path]:
    """Extract (only ``members`` when given) from a tar/zip ``path`` into ``dest``; return the paths.

    ``members`` may map member name -> relative target path (to put files where a reader
    expects them). Raises UnsafeArchiveError before writing anything when a selected member
    is unsafe or the selected members together exceed ``max_bytes``; FetchError when a
    requested member is missing. ``flatten`` drops folders inside the archive.
    """
    path, dest = Path(path), Path(dest)
    targets: dict[str, str] | None
    if members is None:
        targets = None
    elif isinstance(members, Mapping):
        targets = dict(members)
    else:
        targets = {n: n for n in dict.fromkeys(members)}
    with _Reader(path) as reader:
        by_name = {m.name: m for m in reader.members}
        if targets is None:
            selected = [(m, m.name) for m in reader.members]
        else:
            missing = [n for n in targets if n not in by_name]
            if missing:
                raise FetchError(f"{path}: missing member(s) {', '.join(missing)}.")
            selected = [(by_name[n], t) for n, t in targets.items()]
        total = 0
        for m, target in selected:
            _check_member(path, m)
            if target != m.name:
                _check_member(path, Member(target, 0, "file"))
            total += max(m.size, 0)
        if total > max_bytes:
            raise UnsafeArchiveError(
                f"{path}: the selected members hold {total} bytes, over the {max_bytes}-byte cap; refusing."
            )
        dest.mkdir(parents=True, exist_ok=True)
        root = dest.resolve()
        out: list[Path] = []
        budget = [max_bytes]
        for m, target in selected:
            rel = Path(target).name if flatten else Path(posixpath.normpath(target.replace("\\", "/")))
            final = (root / rel).resolve()
            if root != final and root not in final.parents:
                raise UnsafeArchiveError(f"{path}: member {m.name!r} escapes {dest}; refusing.")
            if m.kind == "dir":
                if not flatten:
                    final.mkdir(parents=True, exist_ok=True)
                continue
            final.parent.mkdir(parents=True, exist_ok=True)
            _extract_file(lambda: reader.open(m, root), m, final, path, budget)
            out.append(final)
        return out


def _extract_file(open_src: Callable[[], IO[bytes]], m: Member, target: Path, path: Path,
                  budget: list[int]) -> None:
    tmp = temp_sibling(target)  # umask mode (mkstemp would leave extracted files 0600)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    written = 0
    try:
        with os.fdopen(fd, "wb") as fh, open_src() as src:
            while chunk := src.read(1 << 20):
                written += len(chunk)
                budget[0] -= len(chunk)
                if written > m.size or budget[0] < 0:  # header lies about the size: stop a bomb early
                    raise UnsafeArchiveError(f"{path}: member {m.name!r} is larger than its header says.")
                fh.write(chunk)
        if written != m.size:
            raise FetchError(f"{path}: member {m.name!r} is truncated; delete the archive and fetch again.")
        os.replace(tmp, target)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        Path(tmp).unlink(missing_ok=True)
        raise FetchError(f"{path}: the archive is corrupt ({exc}); delete it and fetch again.") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
