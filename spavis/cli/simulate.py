"""`spavis simulate`: write GENERATED Visium slices (Space Ranger layout) for demos and benchmarks."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from spavis.cli import app
from spavis.cli._common import err_console, friendly_errors, positive_float


@app.command("simulate")
@friendly_errors
def simulate_cmd(
    out: Path = typer.Argument(..., help="Folder that receives one sub-folder per generated slice."),
    n_slices: int = typer.Option(1, "--n-slices", "-n", min=1, help="How many slices to generate."),
    seed: int = typer.Option(0, "--seed", min=0, help="Base seed; slice i uses seed + i."),
    n_domains: int = typer.Option(5, "--n-domains", min=1, help="Spatial domains per slice."),
    median_umis: float = typer.Option(6000.0, "--median-umis", callback=positive_float, help="Median UMIs per spot."),
    prefix: str = typer.Option("generated", "--prefix", help="Slide ids are PREFIX_000, PREFIX_001, ..."),
    max_row: Optional[int] = typer.Option(
        None, "--max-row", min=1, max=78,
        help="Keep only lattice rows below this (a strip of the capture area): small slices for quick runs.",
    ),
    with_image: bool = typer.Option(
        False, "--with-image",
        help="Also write image.tif: a GENERATED full-resolution H&E-like pyramidal TIFF whose texture follows "
             "each spot's domain (for build-shards --with-images).",
    ),
) -> None:
    """Write GENERATED (not real) Visium v1 slices over the stamp-v1 human genes.

    Each folder holds filtered_feature_bc_matrix.h5, spatial/ and a generated.json marker, so
    `spavis build-shards` reads it like Space Ranger output. Existing slices are kept.
    """
    from spavis.simulate import write_simulated_slice

    out.mkdir(parents=True, exist_ok=True)
    for i in range(n_slices):
        slide_id = f"{prefix}_{i:03d}"
        folder = out / slide_id
        if (folder / "generated.json").is_file():
            err_console.print(f"{folder} exists, kept")
            continue
        write_simulated_slice(folder, slide_id=slide_id, seed=seed + i, n_domains=n_domains,
                              median_umis=median_umis, he_image=with_image, max_row=max_row)
        err_console.print(f"GENERATED slice written: {folder}")
