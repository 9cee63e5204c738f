"""`spavis fetch`: thin wrapper over spavis.sources.fetch."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from spavis.cli import app
from spavis.cli._common import friendly_errors


class Source(str, Enum):
    geo = "geo"
    hest = "hest"
    stimage = "stimage"
    stomicsdb = "stomicsdb"
    sodb = "sodb"
    tenx = "tenx"


@app.command("fetch")
@friendly_errors
def fetch_cmd(
    source: Source = typer.Option(..., "--source", "-s", help="Where the slices come from."),
    ids: Optional[List[str]] = typer.Option(None, "--id", help="Accession/slide id (repeatable), e.g. GSE… or GSM… for GEO, a 10x dataset name for tenx."),
    manifest: Optional[Path] = typer.Option(None, "--manifest", "-m", help="Manifest file listing the slices (see manifests/)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Cache folder [default: $SPAVIS_CACHE or ~/.cache/spavis]."),
    workers: int = typer.Option(4, "--workers", "-j", min=1, help="Concurrent downloads."),
    with_images: bool = typer.Option(False, "--with-images", help="Also fetch full-resolution images where the source has them."),
    limit: Optional[int] = typer.Option(None, "--limit", min=0, help="Only the first N manifest rows (after filters)."),
    organ: Optional[str] = typer.Option(None, "--organ", help="Only manifest rows of this organ."),
) -> None:
    """Download slices (resumable, verified) into CACHE/<source>/<slide_id>/ with a slice.json."""
    from spavis.sources import fetch

    folders = fetch(source.value, ids or None, manifest=manifest, cache=cache, workers=workers,
                    with_images=with_images, limit=limit, organ=organ)
    out = Console()
    for folder in folders:
        out.print(str(folder), highlight=False, soft_wrap=True)
    Console(stderr=True).print(f"[green]{len(folders)} slice(s) ready[/]", highlight=False)
