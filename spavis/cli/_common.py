"""The ``spavis`` command line's settings of the shared kit (:mod:`spavis.format.console`).

Every command is wrapped in :func:`friendly_errors`, so a mistake prints one line that names the
file and the fix instead of a traceback: a ``SpavisError``; an OS error such as permission denied,
a read-only folder, a full disk or quota; Ctrl-C. ``SPAVIS_DEBUG=1`` or ``spavis --debug``
re-raises. Numbers are checked at parse time: typer's own ranges (``min=1``) where they fit, else
the shared validators (both print a usage line, exit 2).
"""
from __future__ import annotations

from spavis.errors import DEBUG_ENV, SpavisError
from spavis.format.console import (err_console, error_wrapper, fraction, non_negative_float, non_negative_int,
                                   positive_float, positive_int)

__all__ = [
    "err_console", "friendly_errors", "positive_int", "non_negative_int", "positive_float", "non_negative_float",
    "fraction",
]

friendly_errors = error_wrapper((SpavisError,), debug_env=DEBUG_ENV,
                                interrupted="finished work is kept; run the command again to resume")
