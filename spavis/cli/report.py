"""`spavis report CORPUS --out DIR`: the corpus composition as figures and one HTML page."""
from __future__ import annotations

from pathlib import Path

import typer

from spavis.cli import app
from spavis.cli._common import err_console, friendly_errors


@app.command("report")
@friendly_errors
def report_cmd(
    corpus: Path = typer.Argument(..., help="A built corpus (the --out of build-shards)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for index.html, the PNGs and summary.json."),
) -> None:
    """Slides/spots by source, organ, condition; spots per slide; genes per spot; coordinates, images,
    gene mapping, top genes (reads slides.parquet, genes.parquet and one shard column only)."""
    from spavis.report import corpus_report

    page = corpus_report(corpus, out)
    err_console.print(f"report written to {page}")
