"""One line per warning in the spavis command line, in the main process and in build workers.

Why: a library's ``warnings.warn`` (anndata's "Variable names are not unique", zarr's
ZarrUserWarning, PIL's DecompressionBombWarning) would otherwise print Python's two-line
``path/to/module.py:123: SomeWarning: ...`` + source line into the CLI output. Here every
warning becomes one ``warning: <message> (<Category> from <package>)`` line; spavis's own
warnings keep their plain ``warning: <message>``; deprecation notices about the libraries'
own APIs (DeprecationWarning, PendingDeprecationWarning, FutureWarning) go to the
``spavis.warnings`` log only. ``--debug`` / ``SPAVIS_DEBUG=1`` restores Python's format.

The CLI sets ``ROUTE_ENV`` before any worker starts, so the build's fork server (and every
worker forked from it) installs the same routing (spavis.shards._preload). Standard library
only, outside spavis.cli (whose import loads every command): workers import it first.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from typing import Callable

from spavis.errors import SpavisWarning, debug_enabled

__all__ = ["ROUTE_ENV", "one_line", "route_warnings"]

ROUTE_ENV = "SPAVIS_ONE_LINE_WARNINGS"
_LOG_ONLY = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
log = logging.getLogger("spavis.warnings")


def _origin(filename: str) -> str:
    """The package that warned ("anndata", "zarr", "PIL"), from the warning's file name."""
    path = str(filename).replace("\\", "/")
    m = re.search(r"/(?:site|dist)-packages/([^/]+)", path)
    if m:
        return re.sub(r"\.py$", "", m.group(1))
    m = re.search(r"/(spavis|stamp)/", path)
    return m.group(1) if m else os.path.basename(path).removesuffix(".py") or "python"


def one_line(message, category: type[Warning], filename: str) -> str | None:
    """The one line a warning is shown as, or None when it goes to the log only."""
    text = " ".join(str(message).split())
    if issubclass(category, SpavisWarning):
        return text
    if issubclass(category, _LOG_ONLY):
        return None
    return f"{text} ({category.__name__} from {_origin(filename)})"


def _stderr(text: str) -> None:
    try:
        sys.stderr.write(f"warning: {text}\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # stderr closed: nothing to show it on
        pass


def route_warnings(echo: Callable[[str], None] | None = None) -> None:
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
