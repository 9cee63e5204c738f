"""`spavis build-shards`, `subset`, `validate`, `info` (thin wrappers over spavis.shards)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from spavis.cli import app
from spavis.cli._common import friendly_errors
from spavis.shards.config import BuildConfig

_DEFAULTS = BuildConfig()

console = Console()
err = Console(stderr=True)


@app.command("build-shards")
@friendly_errors
def build_shards_cmd(
    inputs: List[Path] = typer.Argument(
        ..., help="Slice folders/files, or folders of fetched slices (each with slice.json)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output corpus directory."),
    vocab: str = typer.Option(_DEFAULTS.vocab, "--vocab", help="Vocabulary preset (stamp-v1, gencode48-pc-mt) or vocab.json."),
    min_genes: int = typer.Option(_DEFAULTS.min_genes, "--min-genes", min=0, help="Drop spots with fewer detected vocabulary genes."),
    k_neighbors: int = typer.Option(_DEFAULTS.k_neighbors, "--k-neighbors", min=1, help="Spatial neighbours stored per spot."),
    max_spots_per_shard: int = typer.Option(
        _DEFAULTS.max_spots_per_shard, "--max-spots-per-shard", min=1, help="Spots per Parquet file (a slide never spans two files)."
    ),
    workers: int = typer.Option(
        1, "--workers", "-j", min=1, help="Worker processes preparing slices and writing shards (same bytes for any N)."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing corpus at --out that was built from other slices."
    ),
    work_dir: Optional[Path] = typer.Option(
        None, "--work-dir", help="Keep prepared slices here (default: a temporary .spavis-work-* next to --out)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    obs_columns: Optional[str] = typer.Option(
        None, "--obs-columns", help="Annotation columns to carry into the rows and Zarr obs, e.g. layer,region."
    ),
    annotations: Optional[Path] = typer.Option(
        None, "--annotations", help="CSV keyed by barcode (or spot_id; optional slide_id) holding --obs-columns."
    ),
    with_images: bool = typer.Option(
        False, "--with-images",
        help="Also cut a 224 px patch (112 µm, 0.5 µm/px) and region (336 µm) per spot from each slide's H&E "
             "image into data/paired/ and the Zarr images/ group.",
    ),
) -> None:
    """Build a harmonized, sharded Parquet + Zarr corpus (resumable; a re-run with the same inputs is a no-op)."""
    from spavis.shards import build_shards

    start = time.perf_counter()
    config = BuildConfig(vocab=vocab, min_genes=min_genes, k_neighbors=k_neighbors,
                         max_spots_per_shard=max_spots_per_shard, with_images=with_images,
                         obs_columns=obs_columns or (), annotations=annotations)
    try:
        result = build_shards(inputs, out, config, workers=workers, work_dir=work_dir, progress=not quiet,
                              overwrite=overwrite)
    except KeyboardInterrupt as exc:  # Ctrl-C: the workers are already stopped; one line, status 130
        kept = getattr(exc, "spavis_work_dir", None)
        tail = f"; prepared slices kept in {kept[0]} ({kept[1]:,.1f} MB): rerun to resume" if kept else ""
        err.print(f"interrupted: {out} left unchanged{tail}", highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(130) from None
    manifest = json.loads((result / "manifest.json").read_text())
    s = manifest["summary"]
    err.print(
        f"[green]✓[/] {result}: {s['n_slides']} slides, {s['n_spots']:,} spots in "
        f"{s['n_expression_files']} file(s), vocabulary {manifest['vocabulary']['name']} "
        f"({time.perf_counter() - start:.1f} s)",
        highlight=False,
    )
    if with_images:
        from spavis.shards.images import image_summary

        for line in image_summary(result):
            err.print(f"  {line}", highlight=False, markup=False)


@app.command("subset")
@friendly_errors
def subset_cmd(
    corpus: str = typer.Argument(..., help="A corpus folder, or a Hub dataset ORG/NAME (optionally @REVISION)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder of the new corpus."),
    where: Optional[str] = typer.Option(
        None, "--where", help="SQL WHERE clause over slides.parquet (polars SQL), e.g. \"organ = 'brain' AND "
        "n_spots >= 1000\"; also n_spots and has_image."),
    slides: Optional[str] = typer.Option(None, "--slides", help="Slide ids to keep, comma-separated (with --where: both)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub corpora: branch, tag or commit."),
    workers: int = typer.Option(1, "--workers", "-j", min=1, help="Processes writing expression files (same bytes for any N)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace another corpus at --out."),
) -> None:
    """Carve a complete corpus of some slides out of a built one (local or Hub), without the raw slices."""
    from spavis.shards.subset import subset

    start = time.perf_counter()
    res = subset(corpus, out, where=where, slides=slides, revision=revision, workers=workers, overwrite=overwrite)
    state = "up to date" if res.up_to_date else f"{time.perf_counter() - start:.1f} s"
    err.print(f"[green]✓[/] {res.out}: {len(res.slide_ids)} slides, {res.n_spots:,} spots in {res.n_files} file(s), "
              f"a subset of {res.parent} (build {res.parent_build_key[:12]}) ({state})", highlight=False)


@app.command("validate")
@friendly_errors
def validate_cmd(
    directory: Path = typer.Argument(..., help="A build-shards output directory, or a Hub dataset ORG/NAME."),
    quick: bool = typer.Option(False, "--quick", help="Skip the Parquet-vs-Zarr and gene-sum recomputation."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub corpora: branch, tag or commit."),
    deep: bool = typer.Option(False, "--deep", help="Hub corpora: download the revision and check everything."),
    full: bool = typer.Option(False, "--full", help="Decode every paired patch/region image and check its size "
                              "(default: a sample per slide)."),
) -> None:
    """Re-check checksums, schema and Parquet-vs-Zarr consistency; exit 1 on any mismatch."""
    from spavis.format.hub import is_repo_id
    from spavis.shards import validate

    if is_repo_id(directory):
        from spavis.publish import validate_hub

        report = validate_hub(str(directory), revision, deep=deep)
    else:
        report = validate(directory, deep=not quick, full=full)
    report.raise_for_errors()
    checked = ", ".join(f"{v} {k}" for k, v in report.checked.items())
    console.print(f"[green]✓[/] {directory}: valid ({checked})", highlight=False)


@app.command("info")
@friendly_errors
def info_cmd(
    directory: Path = typer.Argument(..., help="A build-shards output directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Summarize a corpus: slides, spots, vocabulary, parameters, sources, organs, conditions."""
    from spavis.shards import info

    data = info(directory)
    if as_json:
        console.print_json(json.dumps(data))
        return
    voc = data["vocabulary"] or {}
    t = Table(title=f"spavis corpus {data['path']}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    rows = [
        ("format", f"{data['format']} (spavis {data['spavis_version']})"),
        ("vocabulary", f"{voc.get('name')} — {voc.get('n_genes', 0):,} genes, {data['n_genes_detected']:,} detected"),
        ("slides", f"{data['n_slides']:,}"),
        ("spots kept", f"{data['n_spots']:,} of {data['n_spots_in_tissue']:,} in tissue ({data['n_spots_input']:,} input)"),
        ("spots per slide", ", ".join(f"{k} {v:,.0f}" for k, v in data["spots_per_slide"].items())),
        ("genes per spot (mean)", f"{data['mean_genes_per_spot']:,.1f}"),
        ("expression files", str(data["n_expression_files"])),
        ("size", f"{data['size_bytes'] / 1e6:,.1f} MB"),
        ("parameters", ", ".join(f"{k}={v}" for k, v in (data["parameters"] or {}).items())),
        ("without coordinates", str(data["slides_without_coordinates"])),
        ("non-integer counts", str(data["slides_with_noninteger_counts"])),
        ("without µm/px scale", str(data.get("slides_without_um_per_px"))),
        ("with warnings", str(data.get("slides_with_warnings"))),
    ]
    for key in ("sources", "organs", "conditions", "species"):
        rows.append((key, ", ".join(f"{k} {v}" for k, v in data[key].items())))
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)
