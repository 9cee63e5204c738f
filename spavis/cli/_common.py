"""Shared CLI helpers: one-line errors, the debug switch and number validators.

Every command is wrapped in :func:`friendly_errors`, so a mistake prints one line that
names the file and the fix instead of a traceback: a ``SpavisError``; an OS error such as
permission denied, a read-only folder, a full disk or quota (``describe_os_error``, for
every writer at once); Ctrl-C. ``SPAVIS_DEBUG=1`` or ``spavis --debug`` re-raises, so the
traceback is there when wanted. Numbers are checked at parse time: typer's own ranges
(``min=1``) where they fit, else the callbacks below (both print a usage line, exit 2).
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Callable, TypeVar

import typer
from rich.console import Console

from spavis.errors import DEBUG_ENV, SpavisError, debug_enabled, describe_os_error
from spavis.format.io import NotRegularFileError

F = TypeVar("F", bound=Callable)
err_console = Console(stderr=True)

__all__ = [
    "err_console", "friendly_errors", "enable_debug", "show_warnings",
    "positive_int", "non_negative_int", "positive_float", "non_negative_float", "fraction",
]


def _fail(message: str, code: int = 1) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True, markup=True)
    sys.exit(code)


def friendly_errors(func: F) -> F:
    """Print expected failures as one red line (exit 1; Ctrl-C exits 130); ``--debug`` shows tracebacks."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            if debug_enabled():
                raise
            err_console.print("[bold red]interrupted[/] (finished work is kept; run the command again to resume)",
                              highlight=False)
            sys.exit(130)
        except (SpavisError, NotRegularFileError) as exc:  # the latter: a FIFO/device where a file is read
            if debug_enabled():
                raise
            _fail(_escape(str(exc)))
        except Exception as exc:  # OS problems anywhere below (our code, pyarrow, h5py, zarr)
            line = describe_os_error(exc)
            if line is None or debug_enabled():
                raise
            _fail(_escape(line) + f" [dim](set {DEBUG_ENV}=1 for the traceback)[/]")

    return wrapper  # type: ignore[return-value]


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def enable_debug() -> None:
    """Turn tracebacks on for this process and the worker processes it starts."""
    os.environ[DEBUG_ENV] = "1"


def show_warnings() -> None:
    """Print every warning as one yellow ``warning:`` line (not Python's two-line format), here and in
    the worker processes this command starts (spavis._warnings: library deprecations go to the log)."""
    from spavis._warnings import ROUTE_ENV, route_warnings

    os.environ[ROUTE_ENV] = "1"  # inherited by build workers, which route their warnings alike
    route_warnings(lambda text: err_console.print(f"[yellow]warning:[/] {_escape(text)}", highlight=False,
                                                  soft_wrap=True))


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
positive_float = _check(lambda v: v > 0 and v == v and v != float("inf"), "a positive finite number (> 0)")
non_negative_float = _check(lambda v: v >= 0 and v != float("inf"), "a non-negative finite number (>= 0)")
fraction = _check(lambda v: 0 < v <= 1, "a fraction in (0, 1]")
