"""Safe extraction of downloaded tar archives (GEO ``GSEnnnn_RAW.tar`` and friends).

Archives come from the internet, so every member is checked before anything is written:
absolute paths, ``..`` components, symlinks, hard links, devices/FIFOs are refused, the
total extracted size is capped, and only the requested members are extracted. Python's
own ``tarfile`` data filter is applied on top where available (3.12+, backported to
3.8-3.11 security releases). Each file is written to a temp name and renamed, so a
crash never leaves a truncated member under its real name.
"""
from __future__ import annotations

import os
import posixpath
import tarfile
import tempfile
from pathlib import Path
from typing import Iterable

from spavis.errors import FetchError

DEFAULT_MAX_BYTES = 50 * 1024**3  # 50 GB: larger than any single Visium series we know


class UnsafeArchiveError(FetchError):
    """An archive member would escape the destination or is not a regular file/folder."""


def _check_member(tar_path: Path, m: tarfile.TarInfo) -> None:
    name = m.name
    norm = posixpath.normpath(name)
    if name.startswith(("/", "\\")) or os.path.isabs(name) or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchiveError(f"{tar_path}: member {name!r} has an absolute path; refusing to extract.")
    if norm == ".." or norm.startswith("../") or ".." in Path(name).parts:
        raise UnsafeArchiveError(f"{tar_path}: member {name!r} points outside the folder ('..'); refusing.")
    if m.issym() or m.islnk():
        raise UnsafeArchiveError(f"{tar_path}: member {name!r} is a link ({m.linkname!r}); refusing.")
    if not (m.isfile() or m.isdir()):
        raise UnsafeArchiveError(f"{tar_path}: member {name!r} is a device, FIFO or other special file; refusing.")


def list_members(tar_path: str | os.PathLike) -> list[str]:
    """Names of the regular files in an archive."""
    tar_path = Path(tar_path)
    try:
        with tarfile.open(tar_path) as tf:
            return [m.name for m in tf.getmembers() if m.isfile()]
    except (tarfile.TarError, EOFError) as exc:
        raise FetchError(f"{tar_path}: not a readable tar archive ({exc}); delete it and fetch again.") from None


def safe_extract(
    tar_path: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    members: Iterable[str] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    flatten: bool = False,
) -> list[Path]:
    """Extract (only ``members`` when given) from ``tar_path`` into ``dest``; return the paths.

    Raises UnsafeArchiveError before writing anything when a selected member is unsafe or
    the selected members together exceed ``max_bytes``; FetchError when a requested member
    is missing. ``flatten`` drops folders inside the archive (files land directly in dest).
    """
    tar_path, dest = Path(tar_path), Path(dest)
    wanted = None if members is None else list(dict.fromkeys(members))
    try:
        tf = tarfile.open(tar_path)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise FetchError(f"{tar_path}: not a readable tar archive ({exc}); delete it and fetch again.") from None
    with tf:
        try:
            all_members = tf.getmembers()
        except (tarfile.TarError, EOFError) as exc:
            raise FetchError(f"{tar_path}: the archive is corrupt ({exc}); delete it and fetch again.") from None
        if wanted is None:
            selected = all_members
        else:
            by_name = {m.name: m for m in all_members}
            missing = [n for n in wanted if n not in by_name]
            if missing:
                raise FetchError(f"{tar_path}: missing member(s) {', '.join(missing)}.")
            selected = [by_name[n] for n in wanted]
        total = 0
        for m in selected:
            _check_member(tar_path, m)
            total += max(m.size, 0)
        if total > max_bytes:
            raise UnsafeArchiveError(
                f"{tar_path}: the selected members hold {total} bytes, over the {max_bytes}-byte cap; refusing."
            )
        filt = getattr(tarfile, "data_filter", None)
        dest.mkdir(parents=True, exist_ok=True)
        root = dest.resolve()
        out: list[Path] = []
        for m in selected:
            if filt is not None:
                try:
                    m = filt(m, str(root))  # the stdlib's own checks, on top of ours
                except tarfile.FilterError as exc:
                    raise UnsafeArchiveError(f"{tar_path}: member {m.name!r} rejected ({exc}).") from None
            rel = Path(m.name).name if flatten else Path(posixpath.normpath(m.name))
            target = (root / rel).resolve()
            if root != target and root not in target.parents:
                raise UnsafeArchiveError(f"{tar_path}: member {m.name!r} escapes {dest}; refusing.")
            if m.isdir():
                if not flatten:
                    target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            _extract_file(tf, m, target, tar_path)
            out.append(target)
        return out


def _extract_file(tf: tarfile.TarFile, m: tarfile.TarInfo, target: Path, tar_path: Path) -> None:
    src = tf.extractfile(m)
    if src is None:
        raise UnsafeArchiveError(f"{tar_path}: member {m.name!r} has no data.")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    written = 0
    try:
        with os.fdopen(fd, "wb") as fh, src:
            while chunk := src.read(1 << 20):
                written += len(chunk)
                if written > m.size:  # header lies about the size: stop a bomb early
                    raise UnsafeArchiveError(f"{tar_path}: member {m.name!r} is larger than its header says.")
                fh.write(chunk)
        if written != m.size:
            raise FetchError(f"{tar_path}: member {m.name!r} is truncated; delete the archive and fetch again.")
        os.replace(tmp, target)
    except (tarfile.TarError, EOFError) as exc:
        Path(tmp).unlink(missing_ok=True)
        raise FetchError(f"{tar_path}: the archive is corrupt ({exc}); delete it and fetch again.") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
