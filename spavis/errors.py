"""Every error class spavis raises on purpose, plus the one-line wording of OS errors.

Each message names the offending file or slice and says how to fix it. The CLIs print
these as one line without a traceback (set ``SPAVIS_DEBUG=1`` or pass ``--debug`` to see
it). Standard library only: ``stamp`` imports this module too (``describe_os_error``,
``debug_enabled``), so both command lines word permission and disk-full errors alike.
"""
from __future__ import annotations

import errno
import os
import warnings

__all__ = [
    "SpavisError", "ReaderError", "QCError", "GeneMappingError", "NotHumanError", "FetchError",
    "UnsafeArchiveError", "ValidationError", "CorpusError", "ManifestError", "VocabularyError",
    "GeneTableError", "BiomartError", "BuildError", "SpavisWarning", "describe_os_error", "debug_enabled", "DEBUG_ENV",
    "ROUTE_ENV", "one_line", "route_warnings",
]

DEBUG_ENV = "SPAVIS_DEBUG"


class SpavisError(Exception):
    """Base class of every error spavis raises on purpose (the CLI prints these without a traceback)."""


class ReaderError(SpavisError):
    """An input slice cannot be read (missing, corrupt or unknown layout)."""


class QCError(SpavisError):
    """An input slice violates a QC rule that cannot be repaired (NaN, negative counts, empty)."""


class GeneMappingError(SpavisError):
    """Too few of a slice's features resolve to human genes."""


class NotHumanError(GeneMappingError):
    """A slice's features are not human (mouse Ensembl ids or mouse-style symbols)."""


class FetchError(SpavisError):
    """A download failed in a way retrying will not fix (404, gated, checksum, disk full)."""


class UnsafeArchiveError(FetchError):
    """An archive member would escape the extraction folder, is a link/device, or is too large."""


class ValidationError(SpavisError):
    """A shard directory does not match its manifest or schema."""


class CorpusError(SpavisError):
    """A corpus cannot be opened or read (missing or resized files, corrupt shard, bad argument)."""


class ManifestError(SpavisError):
    """A slice manifest (manifests/*.tsv) is malformed."""


class VocabularyError(SpavisError):
    """A vocabulary preset or vocab.json cannot be loaded."""


class GeneTableError(SpavisError):
    """The gene table (pinned or refreshed) is missing or malformed."""


class BiomartError(SpavisError):
    """Ensembl BioMart cannot be reached or returned something unusable."""


class SpavisWarning(UserWarning):
    """Something was built with less than the input promised (no graph, estimated scale, duplicates)."""


def _format_warning(message, category, filename, lineno, line=None):  # noqa: ANN001
    if issubclass(category, SpavisWarning) or category.__module__.startswith("stamp") and not debug_enabled():
        return f"warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


# SpavisWarnings read as one "warning: ..." line in every process, worker processes of
# build-shards included (Python's format adds the file, line and source of warnings.warn).
_python_format_warning = warnings.formatwarning
warnings.formatwarning = _format_warning


class BuildError(SpavisError):
    """build-shards cannot proceed (inputs, output folder, duplicate slices, workers)."""


class SubsetError(BuildError):
    """`spavis subset` cannot carve the sub-corpus (filter, parent corpus, output folder)."""


class PublishError(SpavisError):
    """`spavis publish` cannot put a corpus on the Hub (integrity, license, token, interrupted upload)."""


_WHAT = {
    errno.EACCES: ("permission denied", "check the permissions of the path, or choose one you can {verb}"),
    errno.EPERM: ("operation not permitted", "check the permissions of the path, or choose one you can {verb}"),
    errno.EROFS: ("read-only file system", "choose a writable location"),
    errno.ENOSPC: ("no space left on the device", "free some space or choose another location "
                   "(output folder, --work-dir, $SPAVIS_CACHE, $TMPDIR)"),
    errno.EDQUOT: ("disk quota exceeded", "free some space within your quota or choose another location"),
    errno.ENOENT: ("no such file or folder", "check the path"),
    errno.ENOTDIR: ("not a folder", "check the path"),
    errno.EISDIR: ("is a folder, expected a file", "check the path"),
}
_MESSAGES = {  # libraries (pyarrow, h5py, zarr) often raise OSError without errno, only this text
    "no space left on device": errno.ENOSPC,
    "disk quota exceeded": errno.EDQUOT,
    "permission denied": errno.EACCES,
    "read-only file system": errno.EROFS,
}


def _errno_of(exc: BaseException) -> int | None:
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in _WHAT:
            return exc.errno
        text = str(exc).lower()
        for needle, code in _MESSAGES.items():
            if needle in text:
                return code
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def describe_os_error(exc: BaseException, *, action: str = "access") -> str | None:
    """One line for an OS-level failure (permission, disk full, read-only, missing path), else None.

    Looks through ``__cause__``/``__context__`` and at the message text, since pyarrow, h5py
    and zarr re-raise OS errors with the errno only in the text. ``action`` ("read",
    "write") completes the advice.
    """
    code = _errno_of(exc)
    if code is None:
        return None
    what, fix = _WHAT[code]
    path = None
    e: BaseException | None = exc
    while e is not None and path is None:
        path = getattr(e, "filename", None)
        e = e.__cause__ or e.__context__
    verb = "write" if action == "write" else ("read" if action == "read" else "use")
    where = f"{path}: " if path else ""
    detail = "" if path else f" ({str(exc).strip().splitlines()[0][:200]})" if str(exc).strip() else ""
    return f"{where}{what}{detail}; {fix.format(verb=verb)}."


def debug_enabled() -> bool:
    """True when ``SPAVIS_DEBUG`` (or stamp's ``STAMP_DEBUG``) is set to a true value (1/true/yes): show
    tracebacks and Python's own warning format."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on") for k in (DEBUG_ENV, "STAMP_DEBUG"))


# ----------------------------------------------------------------------------- one-line warnings
# Why: a library's ``warnings.warn`` (anndata's "Variable names are not unique", zarr's ZarrUserWarning,
# PIL's DecompressionBombWarning, torch's UserWarning) would otherwise print Python's two-line
# ``path/to/module.py:123: SomeWarning: ...`` + source line into a command's output. Both command lines
# (spavis and stamp) route every warning to one ``warning: <message> (<Category> from <package>)`` line;
# their own warnings keep the plain ``warning: <message>``; deprecation notices about the libraries' own
# APIs go to the ``spavis.warnings`` log only. Debug mode restores Python's format. Standard library only.
import logging as _logging  # noqa: E402
import re as _re  # noqa: E402
import sys as _sys  # noqa: E402
from typing import Callable as _Callable  # noqa: E402

ROUTE_ENV = "SPAVIS_ONE_LINE_WARNINGS"
_LOG_ONLY = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
log = _logging.getLogger("spavis.warnings")


def _origin(filename: str) -> str:
    """The package that warned ("anndata", "zarr", "PIL"), from the warning's file name."""
    path = str(filename).replace("\\", "/")
    m = _re.search(r"/(?:site|dist)-packages/([^/]+)", path)
    if m:
        return _re.sub(r"\.py$", "", m.group(1))
    m = _re.search(r"/(spavis|stamp)/", path)
    return m.group(1) if m else os.path.basename(path).removesuffix(".py") or "python"


def one_line(message, category: type[Warning], filename: str) -> str | None:
    """The one line a warning is shown as, or None when it goes to the log only."""
    text = " ".join(str(message).split())
    if issubclass(category, SpavisWarning) or category.__module__.startswith("stamp"):
        return text
    if issubclass(category, _LOG_ONLY):
        return None
    return f"{text} ({category.__name__} from {_origin(filename)})"


def _stderr(text: str) -> None:
    try:
        _sys.stderr.write(f"warning: {text}\n")
        _sys.stderr.flush()
    except (OSError, ValueError):  # stderr closed: nothing to show it on
        pass


def route_warnings(echo: _Callable[[str], None] | None = None) -> None:
    """Show every warning of this process as one line through ``echo`` (default: ``warning: ...`` on stderr)."""
    previous = warnings.showwarning
    if getattr(previous, "_spavis_route", False):
        return
    emit = echo or _stderr

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        if debug_enabled():
            return previous(message, category, filename, lineno, file, line)
        text = one_line(message, category, filename)
        if text is None:
            log.debug("%s: %s (%s:%s)", category.__name__, message, filename, lineno)
            return None
        emit(text)
        return None

    show._spavis_route = True  # type: ignore[attr-defined]
    warnings.showwarning = show
