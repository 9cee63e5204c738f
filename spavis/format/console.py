"""What both command lines (``spavis`` and ``stamp``) share: one-line errors, ``--version`` /
``--debug``, one-line warnings and log records, and the number validators.

Why one module: a failure, a warning or a bad number must read the same in both tools, and the
two copies had drifted (different debug hints, different warning routes, one validator accepting
NaN). It lives in ``spavis.format`` because ``stamp`` may import only ``spavis.format(.*)`` and
``spavis.errors``; only the two ``cli`` packages import it (library code prints nothing).

* :func:`error_wrapper` makes a CLI's ``friendly_errors`` decorator: its package's errors and an
  OS error (permission denied, read-only folder, disk full, quota: ``describe_os_error``) print
  as one red ``error:`` line (exit 1), Ctrl-C as one line (exit 130); debug mode
  (``SPAVIS_DEBUG`` / ``STAMP_DEBUG`` / ``--debug``) re-raises so the traceback is there.
* :func:`make_app` makes a CLI's typer app with ``--version`` and ``--debug``, running
  :func:`setup_output` before every command.
* Validators (``typer.Option(..., callback=positive_float)``) print a usage line and exit 2.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
from typing import Callable, TypeVar

import typer
from rich.console import Console

from spavis.errors import debug_enabled, describe_os_error

F = TypeVar("F", bound=Callable)
err_console = Console(stderr=True)

__all__ = [
    "err_console", "error_wrapper", "make_app", "setup_output", "escape",
    "positive_int", "non_negative_int", "positive_float", "non_negative_float", "fraction", "probability",
]


def escape(text: str) -> str:
    """``text`` printed as is by rich (square brackets are not markup)."""
    from rich.markup import escape as _escape

    return _escape(text)


def _fail(message: str, hint: str = "", code: int = 1) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}{hint}", highlight=False, soft_wrap=True)
    sys.exit(code)


def error_wrapper(errors: tuple[type[BaseException], ...], *, debug_env: str,
                  interrupted: str) -> Callable[[F], F]:
    """A ``friendly_errors`` decorator for one command line.

    ``errors``: the classes printed as their message (the package's own errors); ``debug_env``:
    the variable the traceback hint names; ``interrupted``: what Ctrl-C says is kept.
    """
    from spavis.format.io import NotRegularFileError  # a FIFO / device where a file is read

    expected = (*errors, NotRegularFileError)

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
                err_console.print(f"[bold red]interrupted[/] ({escape(interrupted)})", highlight=False)
                sys.exit(130)
            except expected as exc:
                if debug_enabled():
                    raise
                line = describe_os_error(exc.__cause__) if isinstance(exc.__cause__, OSError) else None
                _fail(f"{exc} ({line})" if line else str(exc))
            except Exception as exc:  # OS problems anywhere below (our code, torch, pyarrow, h5py, zarr)
                line = describe_os_error(exc)
                if line is None or debug_enabled():
                    raise
                _fail(line, f" [dim](set {debug_env}=1 for the traceback)[/]")

        return wrapper  # type: ignore[return-value]

    return friendly_errors


# ----------------------------------------------------------------------------- warnings and log records
class _OneLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def setup_output() -> None:
    """Warnings and library log records as one ``warning: ...`` line each, here and in worker processes.

    Every ``warnings.warn`` (ours plain; a library's with its category and package; deprecations of
    libraries' own APIs only in the log) goes through :func:`spavis.errors.route_warnings`; log
    records of WARNING and above print as ``<level>: <message>``. huggingface_hub installs its own
    stderr handler, which printed each of its retry warnings a second time: it is removed, so its
    records print once, like everyone's.
    """
    from spavis.errors import ROUTE_ENV, route_warnings

    os.environ[ROUTE_ENV] = "1"  # inherited by build workers and loaders, which route their warnings alike
    route_warnings(lambda text: err_console.print(f"[yellow]warning:[/] {escape(text)}", highlight=False,
                                                  soft_wrap=True))
    root = logging.getLogger()
    if not root.handlers:  # an embedding application's own logging setup is kept
        handler = logging.StreamHandler()
        handler.setFormatter(_OneLine())
        root.addHandler(handler)
        root.setLevel(logging.WARNING)
    import huggingface_hub.utils.logging  # noqa: F401  (~10 ms; it adds its handler on import)

    hf = logging.getLogger("huggingface_hub")
    for h in list(hf.handlers):
        if type(h) is logging.StreamHandler:
            hf.removeHandler(h)


def make_app(package: str, help: str, *, debug_env: str) -> typer.Typer:
    """The typer app of ``package``'s command line, with what every one has: ``--version`` (eager, the
    package's ``__version__``), ``--debug`` (sets ``debug_env``), short tracebacks without locals, and
    :func:`setup_output` before any command."""
    app = typer.Typer(name=package, help=help, no_args_is_help=True, pretty_exceptions_show_locals=False,
                      pretty_exceptions_short=True)

    def print_version(value: bool) -> None:
        if value:
            import importlib

            typer.echo(importlib.import_module(package).__version__)
            raise typer.Exit()

    def main(
        show_version: bool = typer.Option(False, "--version", callback=print_version, is_eager=True,
                                          help=f"Print the {app.info.name} version and exit."),
        debug: bool = typer.Option(False, "--debug", help=f"Show full tracebacks (same as {debug_env}=1)."),
    ) -> None:
        if debug:
            os.environ[debug_env] = "1"  # this process and the processes it starts (workers, torchrun)
        setup_output()

    main.__doc__ = help
    app.callback()(main)
    return app


# ----------------------------------------------------------------------------- validators
# Usable as ``typer.Option(..., callback=positive_float)``; None (option not given) passes.
def _check(ok: Callable[[float], bool], wanted: str):
    def callback(value):
        if value is not None and not ok(value):
            raise typer.BadParameter(f"{value} is not {wanted}.")
        return value

    callback.__doc__ = f"typer callback: the value must be {wanted}."
    return callback


def _finite(v: float) -> bool:
    return v == v and v not in (float("inf"), float("-inf"))


positive_int = _check(lambda v: v >= 1, "a positive integer (>= 1)")
non_negative_int = _check(lambda v: v >= 0, "a non-negative integer (>= 0)")
positive_float = _check(lambda v: _finite(v) and v > 0, "a positive finite number (> 0)")
non_negative_float = _check(lambda v: _finite(v) and v >= 0, "a non-negative finite number (>= 0)")
fraction = _check(lambda v: 0 < v <= 1, "a fraction in (0, 1]")
probability = _check(lambda v: 0 < v < 1, "a probability in (0, 1)")
