"""The ``stamp`` command line's settings of the shared kit (:mod:`spavis.format.console`).

Every command is wrapped in :func:`friendly_errors`, so a mistake prints one line that names the
file and the fix instead of a traceback: a ``StampError``; an error of the shard reader
(``spavis.format``: ``CorpusError`` and the other ``SpavisError``); an OS error such as permission
denied, a read-only folder, a full disk or quota; Ctrl-C (exit 130). ``STAMP_DEBUG=1`` (or
``SPAVIS_DEBUG=1``, or ``stamp --debug``) re-raises. Numbers are checked at parse time by the
shared validators (typer prints a usage line and exits 2).
"""
from __future__ import annotations

from spavis.errors import SpavisError
from spavis.format.console import (err_console, error_wrapper, non_negative_float, non_negative_int, positive_float,
                                   positive_int, probability)
from stamp.errors import StampError

DEBUG_ENV = "STAMP_DEBUG"

__all__ = [
    "err_console", "friendly_errors", "DEBUG_ENV", "positive_int", "non_negative_int", "positive_float",
    "non_negative_float", "probability",
]

# SpavisError covers the shard reader's CorpusError: what reaches a stamp command from spavis.format
friendly_errors = error_wrapper((StampError, SpavisError), debug_env=DEBUG_ENV,
                                interrupted="checkpoints and finished outputs are kept; run the command again, "
                                            "with --resume for pretrain")
