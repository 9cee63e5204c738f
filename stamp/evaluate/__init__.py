"""``stamp evaluate``: score encoders on labelled slices with the paper's protocols, baselines in the same run.

    from stamp.evaluate import evaluate
    df = evaluate("cluster", ["runs/gene"], "dlpfc-corpus/", label="layer", out="eval/")

Tasks (:mod:`stamp.evaluate.tasks`): ``linear-probe`` (one linear layer on frozen features,
leave-one-slide-out or stratified 5-fold), ``cluster`` (Leiden per slide; ARI / NMI /
silhouette), ``predict-expression`` (BLEEP-style top-K retrieval and a 3-layer MLP on
the top 5,000 HVGs; MSE / PCC-V / PCC-E). Every model given plus the baselines
(:mod:`stamp.evaluate.features`: the first model's architecture with random weights, and
PCA of log-CP10K HVGs) is scored on the same folds. Output: ``results.csv``,
``results.md`` and PNG figures in ``out``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from stamp.evaluate.data import EvalData, EvaluateError, load_eval_data
from stamp.evaluate.features import (
    MODALITIES,
    FeatureSet,
    check_modality,
    default_device,
    image_spots,
    model_features,
    pca_features,
)
from stamp.evaluate.tasks import RUNNERS, TASKS, n_steps

__all__ = ["evaluate", "EvaluateError", "EvalData", "FeatureSet", "TASKS", "MODALITIES", "load_eval_data",
           "feature_sets"]


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), disable=not enabled)


def feature_sets(models: Sequence[str], data: EvalData, *, modality: str = "gene", device: str | None = None,
                 seed: int = 0, baselines: bool = True, batch_size: int = 256, bar=None,
                 corpus=None) -> list[FeatureSet]:
    """Features of every model, then the baselines (random-init of the first model's architecture, PCA).

    ``modality`` image / fused read patches from ``corpus`` (every spot of ``data`` must have one)."""
    check_modality(modality)
    sets: list[FeatureSet] = []
    per_model = data.n_spots * (2 if modality == "fused" else 1)
    task = bar.add_task("features", total=per_model * (len(models) + (1 if baselines and models else 0))) \
        if bar is not None else None
    tick = (lambda n: bar.advance(task, n)) if bar is not None else None
    for i, model in enumerate(models):
        got = model_features(model, data, device=device, batch_size=batch_size, seed=seed, progress=tick,
                             with_random=baselines and i == 0, modality=modality, corpus=corpus)
        sets.extend(got)
    if baselines:
        sets.append(pca_features(data, seed=seed))
    names = [s.name for s in sets]
    for s in sets:  # two models from folders of the same name: keep every row apart
        if names.count(s.name) > 1:
            s.name = f"{s.name}#{[x for x in sets if x.name == s.name].index(s) + 1}"
    # random-init / pca first would be confusing: order = given models, random-init, pca
    order = {"model": 0, "random-init": 1, "pca": 2}
    return sorted(sets, key=lambda s: order[s.kind])


def describe_slides(corpus) -> callable:
    """slide id -> caption naming the slide's source; GENERATED slides say so."""
    slides = corpus.slides
    source = dict(zip(slides["slide_id"].astype(str), slides["source"].fillna("unknown").astype(str)))

    def describe(slide: str) -> str:
        if slide not in source:
            kinds = sorted(set(source.values()))
            gen = " (GENERATED slices from spavis.simulate)" if "generated" in kinds else ""
            return f"{slide} of corpus {Path(str(corpus.root)).name}: sources {', '.join(kinds)}{gen}"
        s = source[slide]
        return f"{slide} — {'GENERATED data (spavis.simulate), not tissue' if s == 'generated' else f'source: {s}'}"

    return describe


def evaluate(task: str, models: Sequence[str | os.PathLike], data: str | os.PathLike, *, out: str | os.PathLike,
             label: str | None = None, modality: str = "gene", baselines: bool = True, seed: int = 0,
             device: str | None = None, batch_size: int = 256, figures: bool = True, progress: bool = True,
             knn_k: int = 50, n_hvgs: int = 5000):
    """Run ``task`` (one, comma-separated ones, or ``"all"``) for every model plus the baselines; returns the
    results DataFrame.

    Writes ``out/results.csv``, ``out/results.md`` and figures (each file atomically).
    """
    import torch

    from spavis.format import open_corpus
    from stamp.evaluate import figures as fig
    from stamp.evaluate.results import write_results

    tasks = list(TASKS) if task == "all" else [t.strip() for t in task.split(",") if t.strip()]
    for t in tasks:
        if t not in TASKS:
            raise EvaluateError(f"unknown task {t!r}: choose one of {', '.join(TASKS)} or all")
    if not models and not baselines:
        raise EvaluateError("nothing to evaluate: give --model, or keep the baselines")
    device = device or default_device()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    check_modality(modality)
    corpus = open_corpus(data)
    ev = load_eval_data(corpus, label)
    describe = describe_slides(corpus)
    rows: list[dict] = []
    notes = [f"corpus: {data} ({len(ev.slides)} slides, {ev.n_spots:,} spots; {describe('*')})"]
    if modality != "gene" and models:
        # spots without an H&E patch cannot have image features: every feature set (baselines
        # included) is scored on the imaged spots only, so all rows share the same folds
        imaged = image_spots(corpus, ev)
        if not imaged.any():
            raise EvaluateError(f"{data}: no spot has an H&E patch; --modality {modality} needs slides with images")
        if not imaged.all():
            notes.append(f"--modality {modality}: {int((~imaged).sum()):,} of {ev.n_spots:,} spots have no H&E "
                         f"patch and are excluded (every model and baseline is scored on the other "
                         f"{int(imaged.sum()):,})")
            ev = ev.subset(imaged)
    notes += [f"labels: {label}" if label else "labels: none", f"features: {modality}; seed {seed}; device {device}",
              "baselines: random-init = the first model's architecture with fresh weights (same tokenizer); "
              "pca = 50 PCs of log-CP10K, top-2,000 Seurat v3 HVGs (expression only, whatever the modality)"]
    with _progress(progress) as bar, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sets = feature_sets([str(m) for m in models], ev, modality=modality, device=device, seed=seed,
                            baselines=baselines, batch_size=batch_size, bar=bar, corpus=corpus)
        for t in tasks:
            ptask = bar.add_task(t, total=n_steps(t, ev, len(sets)))
            kwargs = {"k": knn_k, "n_hvgs": n_hvgs} if t == "predict-expression" else {}
            got, extras = RUNNERS[t](ev, sets, seed=seed, device=device, tick=lambda: bar.advance(ptask), **kwargs)
            rows.extend(got)
            if not figures:
                continue
            if t == "cluster":
                fig.cluster_maps(out, ev, extras["clusters"], label=label, describe=describe)
            elif t == "linear-probe":
                fig.confusion_matrices(out, extras["y"], extras["pred"], extras["classes"], caption=describe("*"))
            else:
                fig.expression_maps(out, ev, extras, describe=describe)
    title = f"stamp evaluate {' + '.join(tasks)}"
    return write_results(out, rows, title=title, notes=notes)
