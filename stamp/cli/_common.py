"""CLI helpers of ``stamp``: one-line errors, the debug switch and the shared number validators.

Every command is wrapped in :func:`friendly_errors`, so a mistake prints one line that names
the file and the fix instead of a traceback: a ``StampError``; an error of the shard reader
(``spavis.format``); an OS error such as permission denied, a read-only folder, a full disk
or quota (``spavis.errors.describe_os_error``, for every writer at once); Ctrl-C (exit 130).
``STAMP_DEBUG=1`` (or ``SPAVIS_DEBUG=1``, or ``stamp --debug``) re-raises, so the traceback
is there when wanted. Numbers are checked at parse time by the callbacks below (typer prints
a usage line and exits 2), one validator per kind of number, shared by every command.
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Callable, TypeVar

import typer
from rich.console import Console

from spavis.errors import DEBUG_ENV as SPAVIS_DEBUG_ENV
from spavis.errors import describe_os_error
from spavis.format import CorpusError, SpavisError
from stamp.errors import StampError

F = TypeVar("F", bound=Callable)
err_console = Console(stderr=True)
DEBUG_ENV = "STAMP_DEBUG"

__all__ = [
    "err_console", "friendly_errors", "enable_debug", "setup_logging", "debug_enabled", "CORPUS_ERRORS", "FRIENDLY_ERRORS",
    "positive_int", "non_negative_int", "positive_float", "non_negative_float", "probability",
]

# Errors that reach a stamp command from the shard reader (spavis.format, its one public module).
CORPUS_ERRORS: tuple[type[BaseException], ...] = (CorpusError, SpavisError)
FRIENDLY_ERRORS = (StampError, *CORPUS_ERRORS)


def debug_enabled() -> bool:
    """True when ``STAMP_DEBUG`` or ``SPAVIS_DEBUG`` is 1/true/yes/on: show tracebacks."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in (DEBUG_ENV, SPAVIS_DEBUG_ENV))


def enable_debug() -> None:
    """Turn tracebacks on for this process and the processes it starts (torchrun workers, loaders)."""
    os.environ[DEBUG_ENV] = "1"


def setup_logging() -> None:
    """Library log records as ``warning: <message>`` lines on stderr (no logger names, no timestamps)."""
    import logging

    class _Lower(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            return f"{record.levelname.lower()}: {record.getMessage()}"

    from spavis.errors import route_warnings

    route_warnings()  # library warnings (torch, PIL, zarr) as one line each, as in the spavis CLI
    handler = logging.StreamHandler()
    handler.setFormatter(_Lower())
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(handler)
        root.setLevel(logging.WARNING)


def _fail(message: str, code: int = 1) -> None:
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(code)


def friendly_errors(func: F) -> F:
    """Print expected failures as one red line (exit 1; Ctrl-C exits 130); debug mode shows tracebacks."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            if debug_enabled():
                raise
            err_console.print("[bold red]interrupted[/] (checkpoints and finished outputs are kept; run the "
                              "command again, with --resume for pretrain)", highlight=False)
            sys.exit(130)
        except FRIENDLY_ERRORS as exc:
            if debug_enabled():
                raise
            line = describe_os_error(exc.__cause__) if isinstance(exc.__cause__, OSError) else None
            _fail(f"{exc} ({line})" if line else str(exc))
        except Exception as exc:  # OS problems anywhere below (our code, torch, safetensors, pyarrow, zarr)
            line = describe_os_error(exc, action="write" if _is_write(exc) else "access")
            if line is None or debug_enabled():
                raise
            _fail(f"{line} (set {DEBUG_ENV}=1 for the traceback)")

    return wrapper  # type: ignore[return-value]


def _is_write(exc: BaseException) -> bool:
    import errno

    return getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


# ----------------------------------------------------------------------------- validators
# Usable as ``typer.Option(..., callback=positive_float)``; None (option not given) passes.


def _check(ok: Callable[[float], bool], wanted: str):
    def callback(value):
        if value is not None and not ok(value):
            raise typer.BadParameter(f"{value} is not {wanted}.")
        return value

    callback.__doc__ = f"typer callback: the value must be {wanted}."
    return callback


positive_int = _check(lambda v: v >= 1, "a positive integer (>= 1)")
non_negative_int = _check(lambda v: v >= 0, "a non-negative integer (>= 0)")
positive_float = _check(lambda v: v > 0 and v != float("inf"), "a positive finite number (> 0)")
non_negative_float = _check(lambda v: v >= 0 and v != float("inf"), "a non-negative finite number (>= 0)")
probability = _check(lambda v: 0 < v < 1, "a probability in (0, 1)")
