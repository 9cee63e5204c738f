"""Shared CLI helpers: turn SpavisError into a clean message and exit code."""
from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

from rich.console import Console

from spavis.errors import SpavisError

F = TypeVar("F", bound=Callable)
err_console = Console(stderr=True)


def friendly_errors(func: F) -> F:
    """Print a SpavisError as one red line (no traceback) and exit with status 1."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except SpavisError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]
