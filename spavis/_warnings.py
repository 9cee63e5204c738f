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

from spavis.errors import ROUTE_ENV, one_line, route_warnings  # noqa: F401  (defined once, in spavis.errors)

__all__ = ["ROUTE_ENV", "one_line", "route_warnings"]
