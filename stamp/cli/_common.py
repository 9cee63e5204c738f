"""CLI helpers of ``stamp``: print expected errors as one line (no traceback) and exit 1."""
from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

from rich.console import Console

from spavis.format import CorpusError, SpavisError
from stamp.errors import StampError

F = TypeVar("F", bound=Callable)
err_console = Console(stderr=True)

# Errors that reach a stamp command from the shard reader (spavis.format, its one public module).
CORPUS_ERRORS: tuple[type[BaseException], ...] = (CorpusError, SpavisError)
FRIENDLY_ERRORS = (StampError, *CORPUS_ERRORS)


def friendly_errors(func: F) -> F:
    """Print a StampError (or an error of spavis.format) as ``error: <message>`` and exit with status 1."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except FRIENDLY_ERRORS as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]
