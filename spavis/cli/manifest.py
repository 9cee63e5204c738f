"""`spavis manifest validate|summary|build`: thin wrappers over spavis.manifests."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from spavis.cli import app
from spavis.cli._common import friendly_errors

manifest_app = typer.Typer(help="Check, summarize and rebuild slice manifests (manifests/*.csv).",
                           no_args_is_help=True)
app.add_typer(manifest_app, name="manifest")


@manifest_app.command("validate")
@friendly_errors
def validate_cmd(files: List[Path] = typer.Argument(..., help="Manifest CSV/TSV file(s) or names like hest-v1.")) -> None:
    """Check manifests against manifests/schema.json; exit 1 naming every bad row."""
    from spavis.manifests import ManifestError, validate_manifest

    err = Console(stderr=True)
    bad = 0
    for f in files:
        try:
            problems = validate_manifest(f)
        except ManifestError as exc:
            problems = [str(exc)]
        if problems:
            bad += 1
            err.print(f"[bold red]{f}: {len(problems)} problem(s)[/]", highlight=False)
            for p in problems:
                err.print(f"  {p}", highlight=False, soft_wrap=True)
        else:
            Console().print(f"{f}: ok", highlight=False)
    if bad:
        raise typer.Exit(1)


@manifest_app.command("summary")
@friendly_errors
def summary_cmd(files: List[Path] = typer.Argument(..., help="Manifest file(s)."),
                as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
                plot: Optional[Path] = typer.Option(
                    None, "--plot", help="Also write a composition PNG (slices by source, organ, condition) "
                    "into this folder, e.g. docs/figures.")) -> None:
    """Corpus composition (slices by source, organ, condition, license) of the given manifests."""
    from spavis.manifests import load_manifest, summarize

    rows = [r for f in files for r in load_manifest(f)]
    summary = summarize(rows)
    if plot is not None:
        from spavis.report import manifest_figures

        name = "+".join(Path(str(f)).stem for f in files) if len(files) <= 4 else "manifests"
        for path in manifest_figures(rows, plot, name=name):
            Console(stderr=True).print(f"figure written to {path}", highlight=False)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    out = Console()
    out.print(f"{summary['n_slices']} slices", highlight=False)
    for key in ("by_source", "by_condition", "by_organ", "by_license"):
        out.print(f"[bold]{key[3:]}[/]: " + ", ".join(f"{k} {v}" for k, v in summary[key].items()),
                  highlight=False, soft_wrap=True)


@manifest_app.command("build")
@friendly_errors
def build_cmd(
    src: Optional[Path] = typer.Option(None, "--src", help="Folder of the source tables [default: ../shared/data/manifests]."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder [default: manifests/]."),
    check: bool = typer.Option(False, "--check", help="Only check that the files in --out are current."),
) -> None:
    """Rebuild manifests/*.csv + schema.json from the public source tables (runs manifests/build_manifests.py)."""
    from spavis.errors import SpavisError

    script = Path(__file__).resolve().parents[2] / "manifests" / "build_manifests.py"
    if not script.is_file():
        raise SpavisError(f"{script}: not found; `manifest build` runs from a source checkout of the project.")
    cmd = [sys.executable, str(script)]
    if src is not None:
        cmd += ["--src", str(src)]
    if out is not None:
        cmd += ["--out", str(out)]
    if check:
        cmd.append("--check")
    raise typer.Exit(subprocess.call(cmd))
