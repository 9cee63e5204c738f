"""``stamp evaluate``: score encoders on labelled slices with the paper's protocols, baselines in the same run.

    from stamp.evaluate import evaluate
    df = evaluate("cluster", ["runs/gene"], "dlpfc-corpus/", label="layer", out="eval/")

Tasks (:mod:`stamp.evaluate.tasks`): ``linear-probe`` (one linear layer on frozen features,
leave-one-slide-out or stratified 5-fold), ``cluster`` (Leiden per slide; ARI / NMI /
silhouette / Calinski-Harabasz), ``predict-expression`` (heads ``knn`` = BLEEP-style top-K
retrieval, closed-form ``ridge``, 3-layer ``mlp``, on the top 5,000 HVGs; MSE / PCC-V / PCC-E).
HEST-Benchmark is :func:`stamp.evaluate.hest.hest_bench` (``stamp evaluate hest-bench``).
Models are loaded with :func:`stamp.load`. Every model given plus the baselines
(:mod:`stamp.evaluate.features`: the first model's architecture with random weights, and
PCA of log-CP10K HVGs) is scored on the same folds. Output: ``results.csv``,
``results.md`` and PNG figures in ``out``.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Mapping, Sequence

from spavis.format.progress import counter
from stamp.evaluate.data import EvalData, EvaluateError, load_eval_data
from stamp.evaluate.features import (
    MODALITIES,
    FeatureSet,
    check_modality,
    default_device,
    image_spots,
    model_features,
    model_names,
    pca_features,
)
from stamp.evaluate.tasks import LABEL_TASKS, RUNNERS, TASKS, check_heads, check_task, n_steps

__all__ = ["evaluate", "EvaluateError", "EvalData", "FeatureSet", "TASKS", "MODALITIES", "load_eval_data",
           "feature_sets"]


def feature_sets(models: Sequence[str], data: EvalData, *, modality: str = "gene", device: str | None = None,
                 seed: int = 0, baselines: bool = True, batch_size: int = 256, bar=None,
                 corpus=None, means: str | os.PathLike | None = None,
                 weights: Mapping[str, str | os.PathLike] | None = None) -> list[FeatureSet]:
    """Features of every model, then the baselines (random-init of the first model's architecture, PCA).

    Every model gets a unique name (:func:`stamp.evaluate.features.model_names`; the same model twice
    is refused). ``modality`` image / fused read patches from ``corpus`` (every spot of ``data`` must
    have one)."""
    from stamp.zoo.concat import weights_of_model

    check_modality(modality)
    names = model_names(models)
    sets: list[FeatureSet] = []
    per_model = data.n_spots * (2 if modality == "fused" else 1)
    task = bar.add_task("features", total=per_model * (len(models) + (1 if baselines and models else 0))) \
        if bar is not None else None
    tick = (lambda n: bar.advance(task, n)) if bar is not None else None
    for i, (model, name) in enumerate(zip(models, names)):
        sets.extend(model_features(model, data, device=device, batch_size=batch_size, seed=seed, progress=tick,
                                   with_random=baselines and i == 0, modality=modality, corpus=corpus, name=name,
                                   means=means, weights=weights_of_model(model, weights)))
    if baselines:
        sets.append(pca_features(data, seed=seed))
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


@contextlib.contextmanager
def output_folder(out: Path):
    """``out`` for the run's files; when this run created it and then fails, it is removed again (a failed
    run leaves no empty or half-filled results folder behind)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise EvaluateError(f"--out {out}: a file, not a folder; give a folder for the results")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        yield out
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise


@contextlib.contextmanager
def torch_threads(n: int | None):
    """torch's CPU threads set to ``n`` inside the block (unchanged when None), restored after."""
    import torch

    if not n:
        yield
        return
    if n < 1:
        raise EvaluateError(f"--threads {n}: give a positive number of threads")
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def evaluate(task: str, models: Sequence[str | os.PathLike], data: str | os.PathLike, *, out: str | os.PathLike,
             label: str | None = None, modality: str = "gene", baselines: bool = True, seed: int = 0,
             device: str | None = None, batch_size: int = 256, figures: bool = True, progress: bool = True,
             knn_k: int = 50, n_hvgs: int = 5000, heads: Sequence[str] | None = None,
             means: str | os.PathLike | None = None, threads: int | None = None,
             weights: Mapping[str, str | os.PathLike] | None = None):
    """Run ``task`` (one, comma-separated ones, or ``"all"``) for every model plus the baselines; returns the
    results DataFrame.

    Writes ``out/results.csv``, ``out/results.md`` and figures (each file atomically). ``heads``:
    predict-expression heads (default all of :data:`stamp.evaluate.tasks.HEADS`). ``threads``: torch CPU
    threads for the run (default: torch's own, every core; 1 on a machine shared with other jobs, where
    threads that wait for each other cost more than they give). ``weights``: model (as given) -> the files of
    that zoo name downloaded by hand (``stamp.load(model, weights=...)``); a part of an ``A+B`` model may be
    named too.
    """
    import torch

    from spavis.format import open_corpus
    from stamp.evaluate import figures as fig
    from stamp.evaluate.results import write_results

    tasks = list(TASKS) if task == "all" else [t.strip() for t in task.split(",") if t.strip()]
    for t in tasks:
        if t not in TASKS:
            raise EvaluateError(f"unknown task {t!r}: choose one of {', '.join(TASKS)}, all (or hest-bench alone)")
    if not models and not baselines:
        raise EvaluateError("nothing to evaluate: give --model, or keep the baselines")
    heads = check_heads(heads)
    models = [str(m) for m in models]
    from stamp.zoo.concat import weight_targets

    unknown = sorted(set(map(str, weights or {})) - weight_targets(models))
    if unknown:
        raise EvaluateError(f"--weights for {', '.join(unknown)}, which is not among the --model given (nor a part "
                            "of an A+B)")
    model_names(models)  # the same model twice: refused before anything is read
    for t in tasks:
        if t in LABEL_TASKS and not label:
            raise EvaluateError(f"{t} needs labels: pass --label COLUMN (an annotation column of the corpus, "
                                "`spavis build-shards --obs-columns COLUMN`)")
    device = device or default_device()
    check_modality(modality)
    corpus = open_corpus(data)
    ev = load_eval_data(corpus, label)
    describe = describe_slides(corpus)
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
    for t in tasks:
        check_task(t, ev)  # too few labelled spots / classes: one line before any encoder runs
    notes += [f"labels: {label}" if label else "labels: none", f"features: {modality}; seed {seed}; device {device}",
              "baselines: random-init = the first model's architecture with fresh weights (same tokenizer); "
              "pca = 50 PCs of log-CP10K, top-2,000 Seurat v3 HVGs (expression only, whatever the modality)"]
    rows: list[dict] = []
    with output_folder(Path(out)) as out, counter(enabled=progress, elapsed=True) as bar, torch.random.fork_rng(devices=[]), \
            torch_threads(threads):
        torch.manual_seed(seed)
        sets = feature_sets(models, ev, modality=modality, device=device, seed=seed,
                            baselines=baselines, batch_size=batch_size, bar=bar, corpus=corpus, means=means,
                            weights=weights)
        for t in tasks:
            ptask = bar.add_task(t, total=n_steps(t, ev, len(sets)))
            kwargs = {"k": knn_k, "n_hvgs": n_hvgs, "heads": heads} if t == "predict-expression" else {}
            got, extras = RUNNERS[t](ev, sets, seed=seed, device=device, tick=lambda: bar.advance(ptask), **kwargs)
            rows.extend(got)
            notes.extend(extras.get("notes", []))
            if not figures:
                continue
            if t == "cluster":
                fig.cluster_maps(out, ev, extras["clusters"], label=label, describe=describe)
            elif t == "linear-probe":
                fig.confusion_matrices(out, extras["y"], extras["pred"], extras["classes"], caption=describe("*"))
            else:
                fig.expression_maps(out, ev, extras, describe=describe)
        if not rows:
            raise EvaluateError(f"{data}: no fold could be scored (too few spots or labelled spots per fold)")
        title = f"stamp evaluate {' + '.join(tasks)}"
        return write_results(out, rows, title=title, notes=notes, marks={s.name: s.marks for s in sets})
