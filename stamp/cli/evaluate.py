"""``stamp evaluate TASK --model M [--model M2 ...] --data CORPUS --label COL --out DIR``.

``TASK`` is a corpus task (linear-probe, cluster, predict-expression, comma-separated, all) or
``hest-bench`` (HEST-Benchmark task folders with ``--bench-dir``, or a paired corpus with
``--data`` and ``--patient``) or ``mil`` (slide-level ABMIL on feature bags, ``--features`` and
``--labels``). One command; each task family is one block below.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from stamp.cli._common import err_console, friendly_errors


def weights_by_model(values: List[str], models: List[str]) -> dict[str, str]:
    """``--weights MODEL=PATH`` (repeatable), or one bare PATH when a single --model is given."""
    from stamp.evaluate import EvaluateError

    out: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or (name not in models and len(models) == 1 and Path(value).expanduser().exists()):
            if len(models) != 1:  # a bare PATH (one that holds "=" too, e.g. ~/dl/run=3, when it exists)
                raise EvaluateError(f"--weights {value}: with several --model, write --weights MODEL=PATH")
            name, path = models[0], value
        if name in out:
            raise EvaluateError(f"--weights given twice for {name}")
        out[name] = path
    return out


def register(app: typer.Typer) -> None:
    @app.command("evaluate")
    @friendly_errors
    def evaluate_cmd(
        task: str = typer.Argument(..., help="linear-probe, cluster, predict-expression, several comma-separated, "
                                   "all; hest-bench (HEST-Benchmark); mil (slide-level ABMIL on `stamp embed-slides` bags)."),
        model: Optional[List[str]] = typer.Option(
            None, "--model", help="Zoo name (stamp-v1, ...), model folder (RUN, RUN/model) or Hub repo id; repeat to "
                                  "compare several."),
        data: Optional[str] = typer.Option(None, "--data", help="Evaluation corpus (shard directory or Hub dataset "
                                           "id); hest-bench: a paired corpus (--with-images) instead of --bench-dir."),
        label: Optional[str] = typer.Option(
            None, "--label", help="Annotation column (build-shards --obs-columns); needed by linear-probe and cluster."),
        out: Path = typer.Option(..., "--out", help="Output folder: results.csv, results.md, figures."),
        modality: str = typer.Option("gene", "--modality", help="gene, image or fused features (image/fused: an aligned "
                                     "StampModel and a corpus built with --with-images; spots without a patch are "
                                     "excluded and counted in results.md)."),
        no_baselines: bool = typer.Option(False, "--no-baselines", help="Skip the random-init and PCA baselines."),
        seed: Optional[int] = typer.Option(None, "--seed", min=0, max=2**32 - 1, help="Seeds folds, heads, Leiden and the random-init "
                                           "baseline (default 0; hest-bench: 1, HEST's own)."),
        device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if present)."),
        batch_size: int = typer.Option(256, "--batch-size", min=1, help="Spots per encoder forward pass."),
        knn_k: int = typer.Option(50, "--knn-k", min=1, help="predict-expression: neighbours of the BLEEP-style query."),
        n_hvgs: int = typer.Option(5000, "--n-hvgs", min=1, help="predict-expression: target genes (top HVGs)."),
        head: Optional[List[str]] = typer.Option(
            None, "--head", help="predict-expression heads: mlp, ridge, knn (BLEEP query-reference); repeat or "
                                 "comma-separate (default: all three)."),
        means: Optional[Path] = typer.Option(None, "--means", help="Gene means file for models that ship none "
                                             "(the released Visium_mean.npy)."),
        weights: Optional[List[str]] = typer.Option(
            None, "--weights", help="Files of a zoo model downloaded by hand (gated, offline, or not on the Hub such "
                                    "as scgpt-spatial): MODEL=PATH, repeatable; PATH alone with a single --model."),
        bench_dir: Optional[Path] = typer.Option(
            None, "--bench-dir", help="hest-bench: a HEST-Benchmark task folder (splits/, patches/, adata/, "
                                      "var_50genes.json) or a folder of such task folders."),
        patient: Optional[str] = typer.Option(
            None, "--patient", help="Patient column. hest-bench with --data: the slide column naming each slide's "
                                    "patient (leave-one-patient-out); mil: the labels CSV column (a patient's slides "
                                    "= one bag; default 'patient')."),
        threads: Optional[int] = typer.Option(
            None, "--threads", min=1, help="CPU threads for encoders and heads (default: every core; 1 on a machine "
                                           "shared with other jobs)."),
        no_figures: bool = typer.Option(False, "--no-figures", help="Only results.csv and results.md."),
        no_progress: bool = typer.Option(False, "--no-progress"),
        # --- mil (slide-level ABMIL on feature bags; stamp.evaluate.mil) ---
        features: Optional[List[Path]] = typer.Option(
            None, "--features", help="mil: features folder of `stamp embed-slides` (repeat to compare encoders)."),
        labels: Optional[Path] = typer.Option(None, "--labels", help="mil: CSV with slide, patient and label "
                                              "(or survival) columns."),
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
        from stamp.evaluate import EvaluateError

        if task == "mil":
            from stamp.evaluate.mil import MilOptions, evaluate_mil

            if not features or labels is None:
                raise EvaluateError("evaluate mil needs --features DIR (repeatable) and --labels CSV")
            opts = MilOptions(folds=folds, epochs=epochs, lr=lr, patience=patience, seed=0 if seed is None else seed,
                              device=device, baselines=not no_baselines, figures=not no_figures, heatmaps_per_class=heatmaps)
            evaluate_mil(features, labels, label=label, patient=patient or "patient", slide_column=slide_column,
                         survival=survival.split(",") if survival else None, out=out, options=opts,
                         progress=not no_progress)
            err_console.print(f"results written to {out / 'results.md'} and {out / 'results.csv'}")
            return
        if task == "hest-bench":
            from stamp.evaluate.hest import hest_bench

            hest_bench(model or [], out=out, bench_dir=bench_dir, data=data, patient=patient,
                       seed=1 if seed is None else seed, device=device, batch_size=batch_size,
                       figures=not no_figures, progress=not no_progress, means=means, threads=threads,
                       weights=weights_by_model(weights or [], model or []))
            err_console.print(f"results written to {out / 'results.md'} and {out / 'results.csv'}")
            return

        from stamp.evaluate import evaluate

        if data is None:
            raise EvaluateError(f"{task}: pass --data CORPUS (the evaluation corpus)")
        heads = [h for v in head for h in v.split(",")] if head else None
        evaluate(task, model or [], data, out=out, label=label, modality=modality, baselines=not no_baselines,
                 seed=0 if seed is None else seed, device=device, batch_size=batch_size, figures=not no_figures,
                 progress=not no_progress, knn_k=knn_k, n_hvgs=n_hvgs, heads=heads, means=means, threads=threads,
                 weights=weights_by_model(weights or [], model or []))
        from stamp.evaluate.results import table1_section

        table = table1_section((out / "results.md").read_text())
        if table:
            print(table)
        err_console.print(f"results written to {out / 'results.md'} and {out / 'results.csv'}")
