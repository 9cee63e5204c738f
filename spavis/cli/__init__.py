"""The `spavis` command line: one typer app, one module per command group (thin wrappers)."""
from __future__ import annotations

import importlib

from spavis.errors import DEBUG_ENV
from spavis.format.console import make_app

app = make_app("spavis", "Curate 10x Visium slices into a harmonized, sharded Parquet + Zarr corpus.",
               debug_env=DEBUG_ENV)


# Each module registers its commands on `app` when imported.
for _name in ("genes", "shards", "fetch", "manifest", "simulate", "publish", "report"):
    importlib.import_module(f"spavis.cli.{_name}")
