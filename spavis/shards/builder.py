"""`spavis build-shards`: discover -> prepare each slice -> write the shards, in worker processes.

The Snakemake pipeline calls the same steps one by one; ``build_shards`` chains them with
a resumable work directory so a killed build continues where it stopped and a re-run with
unchanged inputs and parameters does nothing. One scheduler feeds one pool of workers
(``--workers``; 1 = everything inline): slices are prepared in slide_id order, and each
expression file (its boundaries follow from spot counts alone) is encoded, written and
hashed by a worker too. The main process only links Zarr stores, merges gene sums and
writes the small metadata files (and, while the fork server starts, prepares the first slice).
"""
from __future__ import annotations

import json
import os
import shutil
from collections import deque
from concurrent.futures import FIRST_COMPLETED, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Iterable, Sequence

from spavis.errors import BuildError, SpavisError
from spavis.format.progress import counter
from spavis.format.schema import CARD_FILE, MANIFEST_FILE, ZARR_CONSOLIDATED, zarr_build_file
from spavis.shards.card import config_description
from spavis.shards.config import BuildConfig
from spavis.shards.discover import SliceInput, discover_inputs, drop_duplicate_inputs, hash_inputs
from spavis.shards.prepare import prepare_slice, slide_metadata, tree_size
from spavis.shards.workers import broken_pool_error, in_thread, make_pool, refuse_spawned_reimport
from spavis.shards.write import (
    CorpusWriter,
    build_key,
    input_entry,
    stale_staging_dirs,
    write_shard,
)

__all__ = ["build_shards", "is_up_to_date", "LOCK_TIMEOUT_S"]

LOCK_TIMEOUT_S = 2.0  # a second build into the same --out (or work dir) waits this long, then fails


def is_up_to_date(out: Path, vocab, params: dict[str, Any], slices: Sequence[SliceInput]) -> bool:
    """True when ``out`` already holds a corpus built from exactly these inputs and parameters."""
    try:
        manifest = json.loads((Path(out) / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return False
    entries = [input_entry(s.slide_id, "", s.input_sha256, [], slide_metadata(s)) for s in slices]
    key = build_key(vocab, params, entries)
    return manifest.get("build_key") == key and _card_names_build(Path(out), key)


def _card_names_build(out: Path, key: str) -> bool:
    """The card's configs carry the build key (cards written before they did are rewritten by a rebuild).

    Without it ``datasets.load_dataset(out)`` could return rows cached for another corpus.
    """
    try:
        return config_description(key) in (out / CARD_FILE).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False


def build_shards(
    inputs: Iterable[str | os.PathLike],
    out: str | os.PathLike,
    config: BuildConfig | None = None,
    *,
    workers: int = 1,
    work_dir: str | os.PathLike | None = None,
    progress: bool = False,
    overwrite: bool = False,
    **settings: Any,
) -> Path:
    """Build (or resume, or skip when up to date) the corpus for ``inputs`` in ``out``.

    ``config`` (a ``BuildConfig``) carries every setting that decides the output: vocabulary,
    ``min_genes``, ``k_neighbors``, ``max_spots_per_shard``, ``with_images``, ``obs_columns``,
    ``annotations`` (see BuildConfig). For scripts, those settings may instead be given as
    keywords (``build_shards(inputs, out, min_genes=50)`` is ``BuildConfig.from_settings(min_genes=50)``),
    but not both. The keywords here say only how the build runs and never change a byte:
    ``workers`` processes prepare slices and write shards.

    ``with_images`` adds a 224 px patch (112 µm) and region (336 µm) per spot of every slide
    with an H&E image: ``data/paired/`` + the Zarr ``images/`` group (spavis.shards.images).

    ``obs_columns`` ("layer,region") carries annotation columns into the rows and the Zarr obs,
    from ``annotations`` (a CSV keyed by barcode) or the slides' own obs (spavis.shards.annotations).

    An existing corpus at ``out`` is replaced only when each of its slides is among the inputs
    with the same files (other parameters, or slides added), unless ``overwrite``; files in it that the
    build did not write (notes, embeddings added later) stop the build, whatever ``overwrite``.
    A second build into the same ``out`` fails after ``LOCK_TIMEOUT_S`` while one runs.

    Prepared slices go to ``work_dir`` (default ``<out parent>/.spavis-work-<out name>``,
    removed after success; a given ``work_dir`` is kept for later incremental builds). After a
    failure or Ctrl-C the default work dir is kept only if it holds prepared slices (a rerun
    resumes from them); the error then says where it is and how big. The corpus is staged in a
    hidden ``.<out name>.tmp-*`` folder beside ``out``; those of killed builds are removed by the
    next build into the same parent folder.
    """
    refuse_spawned_reimport()
    if config is not None and settings:
        raise TypeError(f"build_shards: give the output settings in config (a BuildConfig) or as keywords, not "
                        f"both (got config and {', '.join(sorted(settings))}); use config.replace(...).")
    cfg = config if config is not None else BuildConfig.from_settings(**settings)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise BuildError(f"--workers must be an integer of at least 1 (got {workers!r}).")
    vocab_obj = cfg.vocabulary  # resolved once for the whole build
    out = Path(out).expanduser().resolve()
    slices = discover_inputs(inputs)
    slices = drop_duplicate_inputs(hash_inputs(slices, workers))  # a linked/copied slice counts once
    params = cfg.params()
    _remove_dead_staging(out.parent)
    if is_up_to_date(out, vocab_obj, params, slices):
        return out
    _check_out_dir(out)

    with _lock(out.parent / f".{out.name}.spavis-lock", f"another build-shards is writing {out}"):
        if is_up_to_date(out, vocab_obj, params, slices):  # the build we waited for made it
            return out
        _check_replace(out, slices, overwrite)
        default_work = work_dir is None
        work = Path(work_dir) if work_dir is not None else out.parent / f".spavis-work-{out.name}"
        work.mkdir(parents=True, exist_ok=True)
        try:
            with _lock(work / ".lock", f"another build-shards is using the work dir {work}"):
                _build(slices, out, work, cfg, params, workers, progress, move_stores=default_work)
        except BaseException as exc:
            _report_work_dir(exc, work, default_work)
            raise
        if default_work:
            shutil.rmtree(work, ignore_errors=True)
    return out


def _remove_dead_staging(parent: Path) -> None:
    """Remove the hidden staging folders of killed builds into any --out of ``parent`` (writer provably dead)."""
    for stale in stale_staging_dirs(parent):
        shutil.rmtree(stale, ignore_errors=True)


def _lock(path: Path, what: str):
    """A file lock that gives up after LOCK_TIMEOUT_S with one line naming the lock."""
    import contextlib

    from filelock import FileLock, Timeout

    @contextlib.contextmanager
    def held():
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path))
        try:
            lock.acquire(timeout=LOCK_TIMEOUT_S)
        except Timeout:
            raise BuildError(f"{what} (lock {path} is held); wait for it to finish, or build into "
                             "another --out / --work-dir.") from None
        try:
            yield
        finally:
            # Unlinked while still held, so nothing is left beside --out; a build waiting on the
            # old inode sees it unlinked and retries on a new file (filelock >= 4 checks st_nlink).
            path.unlink(missing_ok=True)
            lock.release()

    return held()


def _check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST_FILE).is_file())):
        raise BuildError(f"{out}: exists and is not a spavis corpus; choose an empty or new --out.")


def _check_replace(out: Path, slices: Sequence[SliceInput], overwrite: bool) -> None:
    """Refuse to replace a corpus of other slides (without --overwrite) or one holding files we did not write."""
    _check_out_dir(out)
    try:
        manifest = json.loads((out / MANIFEST_FILE).read_text())
    except FileNotFoundError:
        return  # absent or an empty folder
    except (OSError, ValueError) as exc:
        if not overwrite:
            raise BuildError(f"{out / MANIFEST_FILE}: unreadable ({exc}); pass --overwrite to replace this "
                             "corpus, or choose another --out.") from None
        manifest = {}
    old = {i.get("slide_id"): i.get("sha256") for i in manifest.get("inputs", [])}
    new = {s.slide_id: s.input_sha256 for s in slices}
    removed = sorted(k for k in old if k not in new)
    changed = sorted(k for k in old if k in new and old[k] != new[k])
    if (removed or changed) and not overwrite:
        parts = []
        if removed:
            parts.append(f"{len(removed)} of its {len(old)} slides are not among the inputs (e.g. {removed[0]})")
        if changed:
            parts.append(f"{len(changed)} slides have other input files (e.g. {changed[0]})")
        raise BuildError(f"{out}: holds a corpus built from other inputs: {'; '.join(parts)}. Pass --overwrite "
                         "to replace it, or choose another --out.")
    foreign = _foreign_files(out, manifest)
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise BuildError(f"{out}: holds files the build did not write ({', '.join(foreign[:3])}{more}); "
                         "move them out of the corpus folder first (a rebuild never deletes them).")


def _foreign_files(out: Path, manifest: dict) -> list[str]:
    """Files under ``out`` that no build wrote (not in the manifest, not build files of a listed Zarr store)."""
    from spavis.format.integrity import LocalCopy, check

    return [p.path for p in check(manifest, LocalCopy(out), hashes=False, kinds=(),
                                  in_store=lambda inner: zarr_build_file(inner) or inner == ZARR_CONSOLIDATED)]


def _report_work_dir(exc: BaseException, work: Path, default_work: bool) -> None:
    """After a failure: drop a default work dir that holds nothing to resume from, else say where it is."""
    if default_work and not list(work.glob("*/prepared.json")):
        shutil.rmtree(work, ignore_errors=True)
        return
    size = tree_size(work) / 1e6
    note = (f"prepared slices are kept in {work} ({size:,.1f} MB): a rerun resumes from them; "
            "delete the folder to start over.")
    exc.spavis_work_dir = (str(work), size)  # type: ignore[attr-defined]
    if isinstance(exc, SpavisError) and exc.args and isinstance(exc.args[0], str):
        exc.args = (f"{exc.args[0]} ({note})", *exc.args[1:])
    elif hasattr(exc, "add_note") and not isinstance(exc, KeyboardInterrupt):
        exc.add_note(note)


def _build(slices, out, work, cfg: BuildConfig, params, workers, progress, *, move_stores: bool = False) -> None:
    # left by a killed build (we hold the out lock): named .OUT.tmp-* (earlier versions: OUT.tmp-*)
    for stale in [*out.parent.glob(f".{out.name}.tmp-*"), *out.parent.glob(f"{out.name}.tmp-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    for stale in work.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    # old copies renamed aside by spavis.format.io.publish_dir when a kill hit the swap
    for stale in [*out.parent.glob(f".{out.name}.old-*"), *work.glob(".*.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    kwargs = cfg.prepare_kwargs()  # the vocabulary by name/path when it has one (cheap to send to workers)
    writer = CorpusWriter(out, vocab=cfg.vocabulary, params=params, max_spots_per_shard=cfg.max_spots_per_shard,
                          move_stores=move_stores)
    pool = make_pool(min(workers, max(1, len(slices))))
    _warm_up_card_imports()
    try:
        with counter("{task.fields[current]}", enabled=progress, elapsed=True) as bar:
            _schedule(slices, work, kwargs, writer, pool, workers, bar)
        pool.close()
        writer.commit()
    except BrokenProcessPool as exc:
        pool.stop()
        writer.abort()
        raise broken_pool_error(exc) from None
    except BaseException:
        pool.stop()  # Ctrl-C or a failed slice: kill the workers now, wait for none
        writer.abort()
        raise


def _warm_up_card_imports() -> None:
    """Import what the commit needs in a thread while the slices are prepared.

    ``datasets`` (the card's feature YAML) and matplotlib's Figure and Agg canvas (the card's
    composition figure), ~1 s together: with workers the main process mostly waits, and
    inline most of the work (HDF5 reads, compression, Parquet encoding) releases the GIL,
    so the imports run beside it instead of adding to the serial tail of the build.
    """
    import importlib
    import threading

    def load() -> None:
        for name in ("datasets", "matplotlib.figure", "matplotlib.backends.backend_agg"):
            try:
                importlib.import_module(name)
            except Exception:  # the commit reports a real import problem itself
                pass

    threading.Thread(target=load, name="spavis-warm-imports", daemon=True).start()


def _schedule(slices, work, kwargs, writer: CorpusWriter, pool, workers: int, bar) -> None:
    """Run prepare and shard jobs on ``pool``, at most ``workers`` at a time, slices first.

    Slices are prepared in slide_id order and handed to the writer in that order; every
    expression file a slide completes becomes a job. Slices go first: prepared slices wait on
    disk, and the last file can only start once its last slide is prepared, so this shortens
    the critical path. Memory stays one slide (or one shard) per worker. Once every slide is
    in, the writer's summary files are written here while the workers encode the last files.

    With one worker (inline pool) an expression file is encoded on a thread of this process
    while the next slices are prepared here: Parquet encoding, Zarr reads and hashing release
    the GIL, so the second core is used without a second process. One such write at a time;
    output is unchanged (each file is written by one job, results are merged by part).
    """
    ptask = bar.add_task("prepare slices", total=len(slices), current="")
    wtask = bar.add_task("write shards", total=None, current="")
    todo = deque(slices)
    jobs: deque = deque()
    prepared: dict[int, str] = {}
    position = {s.slide_id: i for i, s in enumerate(slices)}
    next_slide = 0
    running: dict[Any, tuple[str, Any]] = {}
    written = 0
    local = 0  # running jobs of this process (not of the pool)
    write_beside = workers <= 1  # inline pool: encode a file on a thread while slices are prepared
    if workers > 1 and len(todo) > 1:
        # The fork server is still importing (~1.5 s) and the first submit below waits for it:
        # meanwhile a thread of this process prepares the first slice on the otherwise idle core.
        s = todo.popleft()
        bar.update(ptask, current=s.slide_id)
        running[in_thread(prepare_slice, s, work, **kwargs)] = ("local slice", s)
        local = 1
    while todo or jobs or running:
        while len(running) - local < workers and (jobs or todo):
            if jobs and write_beside and not any(k == "local shard" for k, _ in running.values()):
                job = jobs.popleft()
                running[in_thread(write_shard, job)] = ("local shard", job)
                local += 1
                continue
            if todo:
                s = todo.popleft()
                bar.update(ptask, current=s.slide_id)
                running[pool.submit(prepare_slice, s, work, **kwargs)] = ("slice", s)
            else:
                job = jobs.popleft()
                running[pool.submit(write_shard, job)] = ("shard", job)
        if next_slide > len(slices) and not jobs:
            writer.prepare_commit()  # genes, slides, card: while the workers encode the last files
        done, _ = wait(list(running), return_when=FIRST_COMPLETED)
        for fut in sorted(done, key=lambda f: _order(running[f], position)):
            kind, what = running.pop(fut)
            if kind in ("local slice", "local shard"):
                kind, local = kind.removeprefix("local "), local - 1
            result = fut.result()  # a failed job raises here: the build stops
            if kind == "shard":
                writer.shard_done(result)
                written += 1
                bar.update(wtask, completed=written, current=f"part {what.part}")
                continue
            prepared[position[what.slide_id]] = str(result)
            bar.update(ptask, advance=1, current=what.slide_id)
            while next_slide in prepared:
                jobs.extend(writer.add(prepared.pop(next_slide)))
                next_slide += 1
            if next_slide == len(slices):
                jobs.extend(writer.finish())
                next_slide += 1
                bar.update(wtask, total=writer.n_parts)


def _order(entry: tuple[str, Any], position: dict[str, int]) -> tuple[int, int]:
    kind, what = entry
    return (0, what.part) if kind.endswith("shard") else (1, position[what.slide_id])
