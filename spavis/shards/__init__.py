"""`spavis build-shards`: discover -> prepare each slice (in parallel) -> write the corpus.

The Snakemake pipeline calls the same three steps one by one; ``build_shards`` chains them
with a resumable work directory so a killed build continues where it stopped and a
re-run with unchanged inputs and parameters does nothing. It pipelines the last two:
each slide is merged into the corpus (Parquet encoding in the main process) as soon as
it and every slide before it are prepared, while worker processes prepare later slides.
"""
from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Iterable, Sequence

from spavis.shards.discover import SliceInput, discover_inputs, hash_inputs
from spavis.shards.info import info
from spavis.shards.prepare import prepare_slice, resolve_vocab, slide_metadata
from spavis.format.schema import MANIFEST_FILE
from spavis.shards.validate import ValidationReport, validate
from spavis.shards.write import (
    DEFAULT_MAX_SPOTS_PER_SHARD,
    build_key,
    input_entry,
    write_corpus,
    write_corpus_in_order,
)

__all__ = [
    "SliceInput",
    "ValidationReport",
    "build_shards",
    "discover_inputs",
    "info",
    "is_up_to_date",
    "prepare_slice",
    "validate",
    "write_corpus",
    "write_corpus_in_order",
    "DEFAULT_MAX_SPOTS_PER_SHARD",
]


def build_params(vocab, min_genes: int, k_neighbors: int, max_spots_per_shard: int) -> dict[str, Any]:
    """The parameters that decide the output bytes (workers and input order do not)."""
    return {
        "vocab": vocab.name,
        "min_genes": int(min_genes),
        "k_neighbors": int(k_neighbors),
        "max_spots_per_shard": int(max_spots_per_shard),
    }


def _annotation_params(params: dict[str, Any], obs_columns, annotations) -> tuple[tuple[str, ...], dict | None]:
    """Record --obs-columns / --annotations in ``params`` (they decide the bytes); prepare_slice's args."""
    from spavis.shards.annotations import AnnotationError, annotations_param, parse_obs_columns

    columns = parse_obs_columns(obs_columns)
    if annotations is not None and not columns:
        raise AnnotationError("--annotations needs --obs-columns naming the columns to take from it")
    if not columns:
        return (), None
    recorded = annotations_param(annotations)
    params["obs_columns"] = list(columns)
    if recorded is not None:
        params["annotations"] = recorded
        return columns, {"path": str(Path(annotations).resolve()), **recorded}
    return columns, None


def is_up_to_date(out: Path, vocab, params: dict[str, Any], slices: Sequence[SliceInput]) -> bool:
    """True when ``out`` already holds a corpus built from exactly these inputs and parameters."""
    try:
        manifest = json.loads((Path(out) / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return False
    entries = [input_entry(s.slide_id, "", s.input_sha256, [], slide_metadata(s)) for s in slices]
    return manifest.get("build_key") == build_key(vocab, params, entries)


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[current]}"),
        console=Console(stderr=True),
        disable=not enabled,
        transient=False,
    )


def build_shards(
    inputs: Iterable[str | os.PathLike],
    out: str | os.PathLike,
    *,
    vocab: Any = "stamp-v1",
    min_genes: int = 100,
    k_neighbors: int = 8,
    max_spots_per_shard: int = DEFAULT_MAX_SPOTS_PER_SHARD,
    workers: int = 1,
    work_dir: str | os.PathLike | None = None,
    progress: bool = False,
    obs_columns: str | Sequence[str] | None = None,
    annotations: str | os.PathLike | None = None,
) -> Path:
    """Build (or resume, or skip when up to date) the corpus for ``inputs`` in ``out``.

    ``obs_columns`` ("layer,region") carries annotation columns into the rows and the Zarr obs,
    from ``annotations`` (a CSV keyed by barcode) or the slides' own obs (spavis.shards.annotations).

    Prepared slices go to ``work_dir`` (default ``<out parent>/.spavis-work-<out name>``,
    removed after success; a given ``work_dir`` is kept for later incremental builds).
    """
    vocab_obj = resolve_vocab(vocab)
    out = Path(out).expanduser().resolve()
    slices = discover_inputs(inputs)
    slices = hash_inputs(slices, workers)
    params = build_params(vocab_obj, min_genes, k_neighbors, max_spots_per_shard)
    obs_columns, annotations = _annotation_params(params, obs_columns, annotations)
    if is_up_to_date(out, vocab_obj, params, slices):
        return out
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST_FILE).is_file())):
        from spavis.errors import SpavisError

        raise SpavisError(f"{out}: exists and is not a spavis corpus; choose an empty or new --out.")

    default_work = work_dir is None
    work = Path(work_dir) if work_dir is not None else out.parent / f".spavis-work-{out.name}"
    work.mkdir(parents=True, exist_ok=True)
    try:
        _build_locked(slices, out, work, vocab, vocab_obj, params, min_genes, k_neighbors,
                      max_spots_per_shard, workers, progress, obs_columns, annotations)
    except BaseException:
        # keep prepared slices for a resumed build; drop a default work dir holding none
        if default_work and not list(work.glob("*/prepared.json")):
            shutil.rmtree(work, ignore_errors=True)
        raise
    if default_work:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _build_locked(slices, out, work, vocab, vocab_obj, params, min_genes, k_neighbors,
                  max_spots_per_shard, workers, progress, obs_columns=(), annotations=None) -> None:
    from filelock import FileLock

    with FileLock(str(work / ".lock")):
        for stale in out.parent.glob(f"{out.name}.tmp-*"):  # left by a killed build; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        for stale in work.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        # the vocabulary travels to workers by name/path when it has one (cheap to pickle)
        vocab_arg = vocab if isinstance(vocab, (str, os.PathLike)) else vocab_obj
        with _progress(progress) as bar:
            task = bar.add_task("prepare slices", total=len(slices), current="")
            wtask = bar.add_task("write shards", total=len(slices), current="")
            prepared = _prepared_in_order(slices, work, vocab_arg, min_genes, k_neighbors, workers, bar, task,
                                          obs_columns, annotations)
            try:
                write_corpus_in_order(
                    prepared,
                    out,
                    vocab=vocab_obj,
                    params=params,
                    max_spots_per_shard=max_spots_per_shard,
                    progress=lambda sid: bar.update(wtask, advance=1, current=sid),
                )
            finally:
                prepared.close()  # on failure: stop the workers before the error propagates
            bar.update(wtask, completed=len(slices), current="done")


def _prepared_in_order(slices, work, vocab, min_genes, k_neighbors, workers, bar, task,
                       obs_columns=(), annotations=None):
    """Yield each slice's prepared dir in slide_id order, as soon as it and its predecessors are ready.

    With several workers the slices are submitted in slide_id order to spawned processes;
    a failure of any slice is raised at the next step, not only when its turn comes.
    """
    kwargs = {"vocab": vocab, "min_genes": min_genes, "k_neighbors": k_neighbors}
    if obs_columns:
        kwargs |= {"obs_columns": obs_columns, "annotations": annotations}
    if workers <= 1 or len(slices) <= 1:
        for s in slices:
            bar.update(task, current=s.slide_id)
            dest = prepare_slice(s, work, **kwargs)
            bar.update(task, advance=1)
            yield dest
        return
    # spawn: forking a process that already runs pyarrow/BLAS threads can deadlock
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"))
    try:
        futures = [pool.submit(prepare_slice, s, work, **kwargs) for s in slices]
        slide_of = {fut: s.slide_id for fut, s in zip(futures, slices)}
        pending = set(futures)
        next_i = 0
        while next_i < len(futures):
            if not futures[next_i].done():
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    if fut.exception() is not None:
                        raise fut.exception()
                    bar.update(task, advance=1, current=slide_of[fut])
                continue
            yield futures[next_i].result()
            next_i += 1
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
