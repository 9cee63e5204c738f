"""The `spavis` command line: one typer app, one module per command group (thin wrappers)."""
from __future__ import annotations

import importlib

import typer

from spavis.errors import DEBUG_ENV
from spavis.format.console import main_options

HELP = "Curate 10x Visium slices into a harmonized, sharded Parquet + Zarr corpus."
app = typer.Typer(name="spavis", help=HELP, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  pretty_exceptions_short=True)


def _version() -> str:
    from spavis import __version__

    return __version__


main_options(app, version=_version, debug_env=DEBUG_ENV, help=HELP)


# Each module registers its commands on `app` when imported.
for _name in ("genes", "shards", "fetch", "manifest", "simulate", "publish", "report"):
    importlib.import_module(f"spavis.cli.{_name}")
