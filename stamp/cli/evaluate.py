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
        task: str = typer.Argument(..., help="linear-probe, cluster, predict-expression, several comma-separated, or all; "
                                   "mil: slide-level ABMIL on feature bags (stamp embed-slides)."),
        model: Optional[List[str]] = typer.Option(
            None, "--model", help="Model folder (RUN, RUN/model) or Hub repo id; repeat to compare several."),
        data: Optional[str] = typer.Option(None, "--data", help="Evaluation corpus (shard directory or Hub dataset id)."),
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
        # --- mil (slide-level ABMIL on feature bags; stamp.slides.mil) ---
        features: Optional[List[Path]] = typer.Option(
            None, "--features", help="mil: features folder of `stamp embed-slides` (repeat to compare encoders)."),
        labels: Optional[Path] = typer.Option(None, "--labels", help="mil: CSV with slide, patient and label "
                                              "(or survival) columns."),
        patient: str = typer.Option("patient", "--patient", help="mil: patient column (a patient's slides = one bag)."),
        slide_column: str = typer.Option("slide", "--slide-column", help="mil: slide column (bag names)."),
        survival: Optional[str] = typer.Option(None, "--survival", help="mil: TIME_COL,EVENT_COL for discrete-time "
                                               "survival (c-index) instead of --label classification."),
        folds: int = typer.Option(5, "--folds", min=2, help="mil: patient-level stratified folds."),
        epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="mil: max epochs (default 50; survival 30)."),
        lr: Optional[float] = typer.Option(None, "--lr", min=0.0, help="mil: Adam lr (default 5e-4; survival 5e-5)."),
        patience: int = typer.Option(5, "--patience", min=1, help="mil: early-stopping patience (epochs)."),
        heatmaps: int = typer.Option(2, "--heatmaps", min=0, help="mil: attention heatmaps for this many patients "
                                     "per class."),
    ) -> None:
        """Score encoders on labelled slices (same folds for every model, baselines in the same run)."""
        if task == "mil":
            from stamp.slides.mil import MilOptions, evaluate_mil

            if not features or labels is None:
                from stamp.errors import UsageError

                raise UsageError("evaluate mil needs --features DIR (repeatable) and --labels CSV")
            opts = MilOptions(folds=folds, epochs=epochs, lr=lr, patience=patience, seed=seed, device=device,
                              baselines=not no_baselines, figures=not no_figures, heatmaps_per_class=heatmaps)
            evaluate_mil(features, labels, label=label, patient=patient, slide_column=slide_column,
                         survival=survival.split(",") if survival else None, out=out, options=opts,
                         progress=not no_progress)
            err_console.print(f"results written to {out / 'results.md'} and {out / 'results.csv'}")
            return
        if data is None:
            from stamp.errors import UsageError

            raise UsageError("pass --data CORPUS (shard directory or Hub dataset id)")
        from stamp.evaluate import evaluate

        evaluate(task, model or [], data, out=out, label=label, modality=modality, baselines=not no_baselines,
                 seed=seed, device=device, batch_size=batch_size, figures=not no_figures, progress=not no_progress,
                 knn_k=knn_k, n_hvgs=n_hvgs)
        err_console.print(f"results written to {out / 'results.md'} and {out / 'results.csv'}")
