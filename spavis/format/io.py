"""Atomic writes, sha256 and file modes: the one helper module every spavis and stamp writer uses.

Why one module: a crash, Ctrl-C or a full disk must never leave a half-written file or
folder under its final name, and outputs must be readable by the user's group as the
umask allows (``tempfile.mkstemp``/``mkdtemp`` create 0600/0700, which would leak into
published models, corpora and caches). Every temporary here is a hidden sibling of its
target (same file system, so the final ``os.replace`` is atomic) created with the
umask-respecting default mode, and is removed when the write fails.

Dependency-free (standard library only) so ``stamp`` may import it (layering rule).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import stat
import threading
import uuid
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Mapping

__all__ = [
    "json_dumps", "hash_file", "NotRegularFileError", "not_regular", "open_regular", "sha256_file",
    "tree_sha256", "digest_lines", "tree_size",
    "current_umask", "file_mode", "dir_mode", "apply_umask",
    "temp_sibling", "atomic_open", "atomic_path", "atomic_write_bytes", "atomic_write_text", "atomic_write_json",
    "make_temp_dir", "publish_dir", "atomic_dir", "remove_tree",
]

_CHUNK = 1 << 20
_umask_lock = threading.Lock()


# --------------------------------------------------------------------------- content


def json_dumps(obj: Any) -> str:
    """Canonical JSON (sorted keys, 2-space indent, trailing newline) so metadata files are byte-stable."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n"


class NotRegularFileError(OSError):
    """A path that is no regular file (a FIFO, a device such as /dev/zero, a socket) where one is read.

    Reading one would block forever (a FIFO without writer) or never end (/dev/zero), so only
    regular files are ever opened for hashing or reading inputs. The message is one line that
    names the path and the fix.
    """

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno 22]"
        return str(self.strerror)


def not_regular(path: str | os.PathLike) -> str | None:
    """What ``path`` is when it is no regular file ("a FIFO", "a character device", ...), else None.

    Symlinks are followed: a link to /dev/zero is a character device, a dangling link is
    "a link to nothing".
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "a link to nothing" if os.path.islink(path) else "missing"
    if stat.S_ISREG(mode):
        return None
    for test, what in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return "not a regular file"


def _not_regular_error(path: str | os.PathLike, what: str) -> NotRegularFileError:
    link = f" (a link to {os.path.realpath(path)})" if os.path.islink(path) else ""
    return NotRegularFileError(
        errno.EINVAL, f"{path}: is {what}{link}, not a regular file; only regular files are read, so remove it "
        "or move it out of the input folder")


def open_regular(path: str | os.PathLike) -> IO[bytes]:
    """Open a regular file for binary reading; NotRegularFileError for anything else, without blocking.

    ``O_NONBLOCK`` makes opening a FIFO return at once (instead of waiting for a writer); the
    opened file is then checked with ``fstat`` (no race with a swapped path) and switched
    back to blocking reads.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _not_regular_error(path, not_regular(path) or "not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def hash_file(path: str | os.PathLike, *hashes: Any, chunk_size: int = _CHUNK) -> tuple[str, ...]:
    """Feed a file once, in 1 MiB blocks, to every ``hashlib`` object given; their hex digests.

    One read for several digests (sha256 + md5 for a download, sha256 + git blob id for a
    Hub file). Only a regular file is read (``open_regular``): a FIFO or /dev/zero would never end.
    """
    with open_regular(path) as fh:
        while block := fh.read(chunk_size):
            for h in hashes:
                h.update(block)
    return tuple(h.hexdigest() for h in hashes)


def sha256_file(path: str | os.PathLike, *, chunk_size: int = _CHUNK) -> str:
    """Hex sha256 of a file, streamed (constant memory)."""
    return hash_file(path, hashlib.sha256(), chunk_size=chunk_size)[0]


def tree_sha256(root: str | os.PathLike, *, include: Callable[[str], bool] | None = None) -> tuple[str, int]:
    """Digest of a folder: sha256 over sorted ``"<relative posix path>\\t<sha256>\\n"`` lines, and the file count.

    ``include(rel)`` selects the files that count (default: all), e.g. only what a build wrote.
    """
    root = Path(root)
    shas = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            p = Path(dirpath, name)
            rel = p.relative_to(root).as_posix()
            if include is None or include(rel):
                shas[rel] = sha256_file(p)
    return digest_lines(shas), len(shas)


def digest_lines(shas: Mapping[str, str]) -> str:
    """The one digest of a set of files: sha256 over sorted ``"<path>\\t<sha256>\\n"`` lines."""
    return hashlib.sha256("".join(sorted(f"{rel}\t{sha}\n" for rel, sha in shas.items())).encode()).hexdigest()


def tree_size(root: str | os.PathLike) -> int:
    """Total bytes of the regular files under ``root``."""
    return sum(f.stat().st_size for f in Path(root).rglob("*") if f.is_file())


# --------------------------------------------------------------------------- modes


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else under a lock."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """Mode a plain ``open(path, 'w')`` would give a new file (0o666 minus the umask)."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """Mode a plain ``mkdir`` would give a new folder (0o777 minus the umask)."""
    return 0o777 & ~current_umask()


def apply_umask(path: str | os.PathLike, *, recursive: bool = False) -> None:
    """Give ``path`` (and, if ``recursive``, everything under it) the umask's default mode.

    For files and folders made by third-party code with private modes (``tempfile``,
    ``safetensors``/``torch`` savers that go through mkstemp); executables keep their x bits.
    """
    paths = [Path(path)]
    if recursive and paths[0].is_dir():
        paths += list(paths[0].rglob("*"))
    fmode, dmode = file_mode(), dir_mode()
    for p in paths:
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            continue
        if stat.S_ISDIR(st.st_mode):
            os.chmod(p, dmode)
        elif st.st_mode & 0o111:
            os.chmod(p, dmode)  # keep executables executable (as far as the umask allows)
        else:
            os.chmod(p, fmode)


# --------------------------------------------------------------------------- files


def temp_sibling(path: str | os.PathLike, tag: str = "tmp") -> Path:
    """A unique hidden name beside ``path`` (same folder, so renaming it onto ``path`` is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{tag}-{uuid.uuid4().hex[:12]}")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", *, fsync: bool = False, **kwargs: Any) -> Iterator[IO]:
    """Open a hidden temporary beside ``path``; on success it replaces ``path``, on any error it is removed.

    ``mode`` is ``"w"``/``"wb"`` (text or binary). The file gets the umask's default mode.
    Parent folders are created.
    """
    if mode not in ("w", "wb", "wt"):
        raise ValueError(f"atomic_open writes whole files; mode must be 'w' or 'wb', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies, unlike mkstemp
    try:
        with os.fdopen(fd, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename is None:
            # a failed write() names no file; name the target so the one-line error can
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, tag: str = "tmp") -> Iterator[Path]:
    """A hidden temporary name beside ``path`` for a writer that wants a file name, not a handle
    (safetensors' ``save_file``, h5py): on success the file gets the umask's mode (such savers leave
    0600) and replaces ``path``; on any error it is removed. Parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path, tag)
    try:
        yield tmp
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically (temp + rename); returns ``path``."""
    with atomic_open(path, "wb", fsync=fsync) as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8", fsync: bool = False) -> Path:
    """Write ``text`` to ``path`` atomically; returns ``path``."""
    return atomic_write_bytes(path, text.encode(encoding), fsync=fsync)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, fsync: bool = False) -> Path:
    """Write ``obj`` as canonical JSON (:func:`json_dumps`) atomically; returns ``path``."""
    return atomic_write_text(path, json_dumps(obj), fsync=fsync)


# --------------------------------------------------------------------------- folders


def make_temp_dir(final: str | os.PathLike, tag: str = "tmp") -> Path:
    """Create an empty hidden folder beside ``final`` (umask mode) to stage its contents in."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(final, tag)
    tmp.mkdir()
    return tmp


def remove_tree(path: str | os.PathLike) -> None:
    """Remove a file or folder if present (never follows a symlinked folder)."""
    p = Path(path)
    if p.is_symlink() or p.is_file():
        p.unlink(missing_ok=True)
    elif p.exists():
        shutil.rmtree(p, ignore_errors=True)


def publish_dir(src: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Move the finished folder ``src`` to ``dest``, replacing an existing ``dest``.

    Readers never see a half-written ``dest``: an old ``dest`` is first renamed aside, the
    new one renamed in, then the old one deleted. (Two renames, so there is an instant
    with no ``dest``; there is never a mixed one.)
    """
    src, dest = Path(src), Path(dest)
    if dest.exists() or dest.is_symlink():
        old = temp_sibling(dest, "old")
        os.replace(dest, old)
        try:
            os.replace(src, dest)
        except BaseException:
            os.replace(old, dest)  # put the previous version back
            raise
        remove_tree(old)
    else:
        os.replace(src, dest)
    return dest


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, tag: str = "tmp") -> Iterator[Path]:
    """Stage a folder: yields an empty hidden sibling of ``final``; publishes it on success, removes it on error."""
    tmp = make_temp_dir(final, tag)
    try:
        yield tmp
        publish_dir(tmp, final)
    except BaseException:
        remove_tree(tmp)
        raise
