"""`spavis publish`: thin wrapper over :func:`spavis.publish.publish`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from spavis.cli import app
from spavis.cli._common import friendly_errors

err = Console(stderr=True, soft_wrap=True)  # no wrapping: ids and paths stay greppable


@app.command("publish")
@friendly_errors
def publish_cmd(
    corpus: Path = typer.Argument(..., help="A `spavis build-shards` output folder."),
    repo_id: Optional[str] = typer.Option(None, "--repo-id", help="Hub dataset ORG/NAME (created if needed)."),
    private: bool = typer.Option(False, "--private", help="Create the dataset private (ignored if it exists)."),
    gated: Optional[str] = typer.Option(
        None, "--gated", help="Readers must accept the dataset's terms on the Hub: auto or manual approval."),
    revision_tag: Optional[str] = typer.Option(
        None, "--revision-tag", help="Also tag the published commit with this name (e.g. v1.0)."),
    allow_unknown_license: bool = typer.Option(
        False, "--allow-unknown-license", help="Publish slides without a recorded license (listed as unknown)."),
    local_dir: Optional[Path] = typer.Option(
        None, "--local-dir", help="Write the repository layout to this folder (instead of, or besides, the Hub)."),
    files_per_commit: int = typer.Option(256, "--files-per-commit", min=1, help="Files per Hub commit (large corpora)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only the final line."),
) -> None:
    """Upload a corpus to the Hugging Face Hub in resumable commits and tag it build-<build_key>.

    An interrupted publish, run again, uploads only what is missing. The token comes from HF_TOKEN or `hf auth login` and is never printed.
    """
    from spavis.publish import publish

    res = publish(corpus, repo_id, local_dir=local_dir, private=private, gated=gated, revision_tag=revision_tag,
                  allow_unknown_license=allow_unknown_license, max_files_per_commit=files_per_commit,
                  echo=None if quiet else (lambda msg: err.print(msg, highlight=False)))
    if res.unknown_license_slides:
        err.print(f"[yellow]warning:[/] {len(res.unknown_license_slides)} slide(s) without a recorded license "
                  "(listed as unknown in the dataset card)", highlight=False)
    where = []
    if res.repo_id:
        where.append(f"{res.repo_id}@{res.commit[:12] if res.commit else '?'} (tag {res.tag}"
                     + (f", {res.extra_tag}" if res.extra_tag else "") + f"; {res.n_uploaded} of {res.n_files} "
                     f"files uploaded in {res.n_commits} commit(s))")
    if res.local_dir:
        where.append(str(res.local_dir))
    err.print(f"[green]✓[/] published {corpus} ({res.license}) to " + " and ".join(where), highlight=False)
