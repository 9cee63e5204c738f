"""The `spavis` command line: one typer app, one module per command group (thin wrappers)."""
from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="spavis",
    help="Curate 10x Visium slices into a harmonized, sharded Parquet + Zarr corpus.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    pretty_exceptions_short=True,
)



def _print_version(value: bool) -> None:
    if value:
        from spavis import __version__

        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the spavis version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks (same as SPAVIS_DEBUG=1)."),
) -> None:
    """Curate 10x Visium slices into a harmonized, sharded Parquet + Zarr corpus."""
    from spavis.cli._common import enable_debug, show_warnings

    if debug:
        enable_debug()
    show_warnings()


# Each module registers its commands on `app` when imported.
for _name in ("genes", "shards", "fetch", "manifest", "simulate", "publish", "report"):
    importlib.import_module(f"spavis.cli.{_name}")
