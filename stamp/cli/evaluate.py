"""``stamp evaluate TASK --model M [--model M2 ...] --data CORPUS --label COL --out DIR``."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from stamp.cli._common import err_console, friendly_errors


def register(app: typer.Typer) -> None:
    @app.command("evaluate")
    @friendly_errors
    def evaluate_cmd(
        task: str = typer.Argument(..., help="linear-probe, cluster, predict-expression, several comma-separated, or all."),
        model: Optional[List[str]] = typer.Option(
            None, "--model", help="Model folder (RUN, RUN/model) or Hub repo id; repeat to compare several."),
        data: str = typer.Option(..., "--data", help="Evaluation corpus (shard directory or Hub dataset id)."),
        label: Optional[str] = typer.Option(
            None, "--label", help="Annotation column (build-shards --obs-columns); needed by linear-probe and cluster."),
        out: Path = typer.Option(..., "--out", help="Output folder: results.csv, results.md, figures."),
        modality: str = typer.Option("gene", "--modality", help="gene, image or fused features (image/fused: an aligned "
                                     "StampModel and a corpus built with --with-images; spots without a patch are "
                                     "excluded and counted in results.md)."),
        no_baselines: bool = typer.Option(False, "--no-baselines", help="Skip the random-init and PCA baselines."),
        seed: int = typer.Option(0, "--seed", help="Seeds folds, heads, Leiden and the random-init baseline."),
        device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if present)."),
        batch_size: int = typer.Option(256, "--batch-size", min=1, help="Spots per encoder forward pass."),
        knn_k: int = typer.Option(50, "--knn-k", min=1, help="predict-expression: neighbours of the BLEEP-style query."),
        n_hvgs: int = typer.Option(5000, "--n-hvgs", min=1, help="predict-expression: target genes (top HVGs)."),
        no_figures: bool = typer.Option(False, "--no-figures", help="Only results.csv and results.md."),
        no_progress: bool = typer.Option(False, "--no-progress"),
    ) -> None:
        """Score encoders on labelled slices (same folds for every model, baselines in the same run)."""
        from stamp.evaluate import evaluate

        evaluate(task, model or [], data, out=out, label=label, modality=modality, baselines=not no_baselines,
                 seed=seed, device=device, batch_size=batch_size, figures=not no_figures, progress=not no_progress,
                 knn_k=knn_k, n_hvgs=n_hvgs)
        err_console.print(f"results written to {out / 'results.md'} and {out / 'results.csv'}")
