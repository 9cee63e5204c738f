"""The run contract every ``stamp pretrain`` stage follows (gene, spatial, align), in one place.

A run folder (``--out RUN``) behaves the same whatever the model:

* **Options fixed at the start**: ``RUN/train_args.json`` holds every option with local paths
  absolute (:func:`normalize_paths`), so a run resumes from any working directory. Folders
  written before paths were stored absolute are read with relative paths resolved against the
  run folder's parent (:func:`read_run_args`).
* **--resume refuses changed options** (:func:`resume_differences`): only the options of one
  invocation (:attr:`RunSpec.invocation_fields`: ``--stop-after``, ``--device``, ``--max-steps``
  ...) may differ; ``--max-steps`` is recorded anew and the schedule follows it.
* **A Hub corpus is pinned** (:func:`pin_hub_revision`): ``--data ORG/NAME`` is recorded as
  ``ORG/NAME@<commit>`` so ``--resume`` reads the bytes the run started on.
* **The vocabulary is checked by identity** (:func:`check_vocabulary`, through
  :func:`spavis.format.vocabulary.require_same_vocabulary`), never by length.
* **Exact resume and checkpoints** (:func:`resume_state`, :func:`save_checkpoint`): weights,
  optimizer, RNG and loader position; ``metrics.jsonl`` cut back to the resumed step; pickle-free
  (:mod:`stamp.training.checkpoint`), written collectively and renamed atomically.
* **The NaN stop** (:func:`stop_if_not_finite`): a NaN/inf loss saves nothing and names the last
  good checkpoint. **Metrics**: one ``metrics.jsonl`` line per optimizer step (:func:`append_metrics`),
  step sums reduced over ranks (:func:`reduce_step_sums`).
* **Publishing** (:func:`finish_run`): ``RUN/model`` swapped in whole, then ``RUN/run.json``.

The stage modules (:mod:`stamp.training.gene`, :mod:`stamp.training.align`) hold only what
differs: their arguments, model, batches and losses. This module imports nothing of
``stamp.evaluate``, ``stamp.embed.genes*`` or slide reading (``tests/test_layering_training.py``).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from spavis.format.io import apply_umask, atomic_dir, atomic_write_text
from stamp.training import checkpoint as ckpt
from stamp.constants import ARGS_FILE, METRICS_FILE, RUN_INFO
from stamp.errors import TrainingError
from stamp.locations import MODEL_SUBDIR

__all__ = [
    "Dist", "RunSpec", "init_distributed", "distributed", "pick_device", "lr_at", "absolute_path",
    "normalize_paths", "read_run_args", "resume_differences", "pin_hub_revision", "prepare_run",
    "check_vocabulary", "truncate_metrics", "append_metrics", "resume_state", "save_checkpoint",
    "reduce_step_sums", "stop_if_not_finite", "train_steps", "ddp_wrap", "autocast_for", "no_sync_unless",
    "write_model_dir", "finish_run", "corpus_licenses",
    "generated_fraction", "data_info",
]


# ----------------------------------------------------------------------------- what differs per stage
@dataclass(frozen=True)
class RunSpec:
    """What a stage tells the run contract about its arguments (a dataclass with ``out``, ``data``,
    ``resume``, ``stage``, ``max_steps``, ``stop_after``, ``device``)."""

    args_type: type
    stages: tuple[str, ...]  # the --stage values this args type runs (resume refuses a run of another)
    invocation_fields: tuple[str, ...]  # options of one invocation: may differ on --resume
    path_fields: tuple[str, ...]  # local paths stored absolute
    presets: Callable[[], Iterable[str]] = tuple  # names that are never paths (presets win over files)
    needs_init: str | None = None  # message when a new run lacks --init (None: --init optional)


# ----------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    """This process's place in the run: rank, world size, local rank, and whether it created the group."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def init_distributed() -> Dist:
    """Join the process group torchrun describes in the environment (no-op for one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        owns = True
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns)


@contextlib.contextmanager
def distributed() -> Iterator[Dist]:
    """:func:`init_distributed` for one run; the process group it created is destroyed afterwards."""
    d = init_distributed()
    ok = False
    try:
        yield d
        ok = True
    finally:
        if d.owns_group and dist.is_initialized():
            if ok:
                # every rank leaves together: gloo aborts a rank whose peer tears its pairs down mid-send
                dist.barrier()
            dist.destroy_process_group()


def pick_device(args: Any, d: Dist) -> torch.device:
    """``args.device`` when given; else this rank's GPU, or the CPU."""
    if args.device:
        return torch.device(args.device)
    if torch.cuda.is_available():
        torch.cuda.set_device(d.local_rank)
        return torch.device("cuda", d.local_rank)
    return torch.device("cpu")


# ----------------------------------------------------------------------------- schedule
def lr_at(step: int, *, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up to ``lr`` then cosine decay to ``min_lr``; never below ``min_lr``."""
    if warmup > 0 and step <= warmup:
        value = lr * step / warmup
    else:
        span = max(1, total - warmup)
        progress = min(1.0, (step - warmup) / span)
        value = min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(min_lr, value)


# ----------------------------------------------------------------------------- run folder
def absolute_path(value: str | None, base: Path | None = None, presets: Iterable[str] = ()) -> str | None:
    """A local path as an absolute path (relative ones against ``base`` or the cwd); Hub ids,
    preset names and anything that is not a file unchanged."""
    if value is None:
        return None
    if str(value) in set(presets):  # presets win over same-named files, as the loaders do
        return str(value)
    p = Path(str(value)).expanduser()
    if not p.is_absolute() and base is not None and (base / p).exists():
        return str((base / p).resolve())
    if p.exists():
        return str(p.resolve())
    return str(value)


def normalize_paths(args: Any, spec: RunSpec) -> Any:
    """``args`` with ``out`` and the local paths of ``spec.path_fields`` absolute (stored so in the run)."""
    args.out = str(Path(args.out).expanduser().resolve())
    presets = tuple(spec.presets())
    for name in spec.path_fields:
        setattr(args, name, absolute_path(getattr(args, name), presets=presets))
    return args


def read_run_args(out: str | os.PathLike, spec: RunSpec) -> dict:
    """The options a run was started with (RUN/train_args.json), as ``spec.args_type`` fields; paths
    stored relative (runs made before paths were stored absolute) are resolved against the run
    folder's parent. A run of another stage is refused with the ``--stage`` to resume it with."""
    run = Path(out)
    saved = run / ARGS_FILE
    if not saved.is_file():
        raise TrainingError(f"{run}: nothing to resume (no {ARGS_FILE}); start without --resume")
    try:
        stored = json.loads(saved.read_text())
    except json.JSONDecodeError as exc:
        raise TrainingError(f"{saved}: not valid JSON ({exc}); the run folder is damaged, start a new --out") from None
    if not isinstance(stored, dict):
        raise TrainingError(f"{saved}: not a train_args.json object; the run folder is damaged, start a new --out")
    stage = stored.get("stage")
    if stage is not None and stage not in spec.stages:
        raise TrainingError(f"{run} is a {stage!r} run; resume it with --stage {stage}")
    presets = tuple(spec.presets())
    for name in spec.path_fields:
        stored[name] = absolute_path(stored.get(name), run.resolve().parent, presets)
    known = set(spec.args_type.__dataclass_fields__)
    return {k: v for k, v in stored.items() if k in known}


def resume_differences(stored: dict, args: Any, invocation_fields: Iterable[str]) -> list[str]:
    """``--option stored (now given)`` for every run-defining option that differs."""
    skip = set(invocation_fields) | {"out"}
    diffs = []
    for name, value in asdict(args).items():
        if name in skip or name not in stored:
            continue
        if name == "data" and isinstance(value, str) and str(stored[name]).startswith(value + "@"):
            continue  # a Hub corpus is pinned to the commit it started on; the bare id names the same run
        if stored[name] != value:
            diffs.append(f"--{name.replace('_', '-')} {stored[name]!r} (now {value!r})")
    return diffs


def _write_args(path: Path, record: dict) -> None:
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True) + "\n")


def pin_hub_revision(args: Any, corpus: Any, d: Dist) -> None:
    """Record a Hub corpus as ``ORG/NAME@<commit>`` so ``--resume`` reads the bytes the run started on."""
    repo_id, revision = getattr(corpus, "repo_id", None), getattr(corpus, "revision", None)
    if not repo_id or not revision or "@" in str(args.data):
        return
    args.data = f"{repo_id}@{revision}"
    saved = Path(args.out) / ARGS_FILE
    if d.main and saved.is_file():
        _write_args(saved, {**json.loads(saved.read_text()), "data": args.data})


def prepare_run(args: Any, d: Dist, spec: RunSpec) -> tuple[Any, Path | None]:
    """Start or resume the run in ``args.out``: ``(args to run with, checkpoint to resume from)``.

    A new run needs an empty (or absent) folder and writes ``train_args.json``; ``--resume``
    refuses changed run-defining options, keeps the stored ones and takes only the invocation
    options from ``args`` (a new ``max_steps`` is recorded).
    """
    args = normalize_paths(args, spec)
    out = Path(args.out)
    saved = out / ARGS_FILE
    latest = ckpt.latest_checkpoint(out)
    if args.resume:
        stored = read_run_args(out, spec)
        diffs = resume_differences(stored, args, spec.invocation_fields)
        if diffs:
            raise TrainingError(
                f"{out} was started with other options: {'; '.join(diffs)}. Resume with the run's options "
                "(only --max-steps may change), or start a new run in another --out"
            )
        merged = {**stored, "out": args.out, "resume": True}
        for name in spec.invocation_fields:
            value = getattr(args, name)
            if value is not None or name == "stop_after":  # a stop point belongs to one invocation
                merged[name] = value
        new = spec.args_type(**merged)
        if d.main and new.max_steps != stored.get("max_steps"):
            _write_args(saved, {**json.loads(saved.read_text()), **{k: stored[k] for k in spec.path_fields},
                                "max_steps": new.max_steps})
        return new, latest
    if latest is not None or (out / MODEL_SUBDIR).exists():
        raise TrainingError(f"{out} already holds a run; pass --resume to continue it or choose a new --out")
    if spec.needs_init and not args.init:
        raise TrainingError(spec.needs_init)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        apply_umask(out)
        _write_args(saved, asdict(args))
        (out / METRICS_FILE).unlink(missing_ok=True)
    d.barrier()
    return args, None


def check_vocabulary(tokenizer: Any, corpus: Any, *, model: str, data: str, fix: str) -> None:
    """The tokenizer (of ``--init``, or built from the corpus) must hold the corpus's genes in its
    order: compared by identity, not by length (two vocabularies of one size give garbage silently)."""
    from spavis.format.vocabulary import require_same_vocabulary

    require_same_vocabulary(tokenizer.gene_ids, corpus.genes["ensembl_id"].astype(str).tolist(),
                            a_name=model, b_name=data, fix=fix, error=TrainingError)


# ----------------------------------------------------------------------------- metrics
def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines after ``step`` (they are recomputed identically on resume)."""
    if not path.is_file():
        return
    kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    atomic_write_text(path, "".join(ln + "\n" for ln in kept))


def append_metrics(path: Path, metrics: dict) -> None:
    """One ``metrics.jsonl`` line per optimizer step (main rank only; callers check)."""
    with path.open("a") as fh:
        fh.write(json.dumps(metrics) + "\n")


def reduce_step_sums(sums: torch.Tensor, n_spots: int, *, n_mean: int, device: torch.device,
                     d: Any) -> tuple[torch.Tensor, int]:
    """Sum one step's per-rank totals over all ranks; the first ``n_mean`` entries (losses) become
    means over ranks, the rest (counts) stay sums. Returns the sums and the spots of the global step."""
    if d.world <= 1:
        return sums, n_spots
    sums = sums.to(device)
    dist.all_reduce(sums)
    sums = sums.cpu()
    sums[:n_mean] /= d.world
    counted = torch.tensor([n_spots], dtype=torch.float64, device=device)
    dist.all_reduce(counted)
    return sums, int(counted.item())


# ----------------------------------------------------------------------------- checkpoints, NaN stop
def resume_state(resume_from: Path | None, *, resume: bool, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, gen: torch.Generator, loader: Any, d: Any,
                 metrics_path: Path) -> tuple[int, int]:
    """``(step, spots_seen)`` to start from: restores weights, optimizer, RNG and the loader
    position from ``resume_from`` (a checkpoint, or None for a fresh start) and cuts
    ``metrics.jsonl`` back to that step, so the resumed run rewrites the same lines."""
    step, spots_seen = 0, 0
    if resume_from is not None:
        ckpt.load_model_weights(model, resume_from)
        ckpt.load_optimizer(optimizer, resume_from)
        ckpt.restore_rng(resume_from, d.rank, gen)
        state = ckpt.read_state(resume_from)
        if state.get("world", 1) != d.world:
            raise TrainingError(
                f"{resume_from} was written by {state.get('world')} processes; resume with the same number"
            )
        pos = ckpt.read_position(resume_from, d.rank)
        step, spots_seen = state["step"], pos["spots_seen"]
        loader.load_state_dict(pos["loader"])
        if d.main:
            truncate_metrics(metrics_path, step)
    elif resume and d.main:
        truncate_metrics(metrics_path, 0)
    d.barrier()
    return step, spots_seen


def save_checkpoint(run: Path, at_step: int, *, d: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    gen: torch.Generator, position: dict, spots_seen: int, state: dict,
                    keep: int | None) -> None:
    """Write ``RUN/checkpoints/step-N`` collectively: every rank its loader position and RNG,
    the main rank the weights and optimizer, then an atomic rename (``state`` lands in state.json
    next to ``step`` and ``world``)."""
    stage_dir = ckpt.staging_dir(run, at_step)
    if d.main:
        shutil.rmtree(stage_dir, ignore_errors=True)
    d.barrier()
    ckpt.write_rank_part(stage_dir, d.rank, {"loader": position, "spots_seen": spots_seen}, gen)
    if d.main:
        ckpt.write_main_part(stage_dir, model, optimizer, {})
    d.barrier()
    if d.main:
        ckpt.finalize(run, at_step, {"step": at_step, "world": d.world, **state}, keep=keep)
    d.barrier()


def stop_if_not_finite(loss: float, step: int, run: Path, optimizer: torch.optim.Optimizer) -> None:
    """The NaN contract: a NaN/inf loss drops the gradients, saves nothing and raises
    :class:`TrainingError` naming the last good checkpoint (still the latest one)."""
    if math.isfinite(loss):
        return
    optimizer.zero_grad(set_to_none=True)
    last = ckpt.latest_checkpoint(run)
    raise TrainingError(
        f"loss became {loss} at step {step + 1} of {run}; training stopped without saving. "
        f"Last good checkpoint: {last or 'none'}. Lower --lr or raise --warmup-steps, then "
        "--resume from it (or restart)."
    )


# ----------------------------------------------------------------------------- the optimizer loop
def train_steps(*, run: Path, d: Dist, device: torch.device, model: torch.nn.Module,
                optimizer: torch.optim.Optimizer, params: list, gen: torch.Generator, args: Any, total: int,
                step: int, spots_seen: int, n_sums: int, n_mean: int,
                micro_step: Callable[[bool], tuple[list[float], int]], metrics: Callable[..., dict],
                position: Callable[[], dict], checkpoint_state: dict,
                after_step: Callable[[], None] | None = None, on_metrics: Callable[[dict], None] | None = None,
                on_step: Callable[[dict], None] | None = None) -> tuple[int, int, dict]:
    """The optimizer loop every stage runs, from ``step`` to ``args.stop_after`` (or ``total``).

    Per step: the learning rate of :func:`lr_at`; ``args.grad_accum`` calls of ``micro_step(last)``
    (the stage's forward and backward of one micro-batch; ``last``: the micro-batch whose backward
    synchronises DDP gradients), each returning ``n_sums`` per-micro-batch totals (loss first) and
    its spots; the totals reduced over ranks (:func:`reduce_step_sums`, the first ``n_mean``
    averaged); the NaN stop (:func:`stop_if_not_finite`); gradient clipping to ``args.clip_norm``;
    the optimizer step and ``after_step``; then ``metrics(step=, sums=, loss=, lr=, grad_norm=,
    n_spots=, dt=)`` (the stage's ``metrics.jsonl`` line, appended by the main rank and handed to
    ``on_metrics`` there and to ``on_step`` on every rank) and a checkpoint every ``args.save_every``
    steps and at the last one (``checkpoint_state`` + the last metrics in trainer_state.json,
    ``position()`` the loader position). Returns ``(step, spots_seen, last metrics)``.
    """
    import time

    last_metrics: dict = {}
    metrics_path = run / METRICS_FILE
    stop_at = min(total, args.stop_after) if args.stop_after else total
    while step < stop_at:
        t0 = time.perf_counter()
        lr = lr_at(step + 1, lr=args.lr, min_lr=args.min_lr, warmup=args.warmup_steps, total=total)
        for group in optimizer.param_groups:
            group["lr"] = lr
        sums = torch.zeros(n_sums, dtype=torch.float64)
        n_spots = 0
        for micro in range(args.grad_accum):
            values, spots = micro_step(micro == args.grad_accum - 1)
            sums += torch.tensor(values, dtype=torch.float64)
            n_spots += spots
        spots_seen += n_spots
        sums, n_spots = reduce_step_sums(sums, n_spots, n_mean=n_mean, device=device, d=d)
        loss = float(sums[0]) / args.grad_accum
        stop_if_not_finite(loss, step, run, optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()
        step += 1
        dt = time.perf_counter() - t0
        last_metrics = metrics(step=step, sums=sums, loss=loss, lr=lr, grad_norm=float(grad_norm), n_spots=n_spots,
                               dt=dt)
        if d.main:
            append_metrics(metrics_path, last_metrics)
            if on_metrics is not None:
                on_metrics(last_metrics)
        if on_step is not None:
            on_step(last_metrics)
        if step % args.save_every == 0 or step == stop_at:
            save_checkpoint(run, step, d=d, model=model, optimizer=optimizer, gen=gen, position=position(),
                            spots_seen=spots_seen, keep=args.keep_checkpoints,
                            state={**checkpoint_state, "metrics": last_metrics})
    return step, spots_seen, last_metrics


def ddp_wrap(module: torch.nn.Module, device: torch.device, d: Dist) -> Any:
    """``module`` itself for one process; under torchrun, DistributedDataParallel over it."""
    if d.world <= 1:
        return module
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def autocast_for(device: torch.device) -> Any:
    """bf16 autocast on CUDA, nothing elsewhere (every stage trains in the same precision)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def no_sync_unless(forward: Any, last: bool, d: Dist) -> Any:
    """DDP's ``no_sync()`` for every micro-batch but the last of a step (gradients all-reduced once)."""
    return forward.no_sync() if d.world > 1 and not last else contextlib.nullcontext()


# ----------------------------------------------------------------------------- publishing
def write_model_dir(run: Path, model: Any, tokenizer: Any, info: dict,
                    write_card: Callable[[Path, dict], None]) -> Path:
    """RUN/model: config.json + model.safetensors + tokenizer files + README card, staged beside
    it and swapped in whole (never a half-written model folder)."""
    final = run / MODEL_SUBDIR
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_card(tmp, info)
        apply_umask(tmp, recursive=True)  # savers that go through mkstemp would leave 0600 files
    return final


def finish_run(run: Path, info: dict, *, d: Any, model: Any, tokenizer: Any,
               write_card: Callable[[Path, dict], None]) -> Path:
    """Publish a finished run (main rank): ``RUN/model`` (:func:`write_model_dir`), then ``RUN/run.json``
    (``info``: what the card and the next stage's ``--init`` read). Returns ``RUN/model``."""
    model_dir = run / MODEL_SUBDIR
    if d.main:
        model_dir = write_model_dir(run, model, tokenizer, info, write_card)
        atomic_write_text(run / RUN_INFO, json.dumps(info, indent=2, sort_keys=True) + "\n")
    d.barrier()
    return model_dir


def corpus_licenses(slides) -> list[str]:
    """The licenses of a corpus's slides (for the model card); slides without one are counted, never dropped."""
    licenses = sorted({str(x) for x in slides["license"].dropna()}) if "license" in slides else []
    if "license" in slides and slides["license"].isna().any():
        licenses.append(f"unknown ({int(slides['license'].isna().sum())} slide(s) without a recorded license)")
    return licenses


def generated_fraction(slides) -> float:
    """Share of a corpus's spots that come from generated slices (``slides.parquet`` source == "generated")."""
    if not len(slides) or "source" not in slides:
        return 0.0
    gen = (slides["source"] == "generated").to_numpy()
    if "n_spots_kept" in slides and slides["n_spots_kept"].notna().all():
        counts = slides["n_spots_kept"].to_numpy(dtype=np.float64)
        if counts.sum() > 0:
            return round(float(counts[gen].sum() / counts.sum()), 6)
    return round(float(gen.mean()), 6)


def data_info(corpus: Any, data: str, n_spots: int) -> dict:
    """``run.json`` "data": where the corpus came from (the exact Hub commit), its size, licenses and
    how much of it was generated (what the model card states)."""
    slides = corpus.slides
    fraction = generated_fraction(slides)
    repo_id = getattr(corpus, "repo_id", None)
    return {
        "source": str(data),
        "hub_id": repo_id,
        # the exact corpus commit (open_corpus pins a Hub id to one), so the model card can point at it
        "hub_revision": getattr(corpus, "revision", None) if repo_id else None,
        "n_spots": n_spots,
        "n_slides": int(len(slides)),
        "n_genes": int(len(corpus.genes)),
        "licenses": corpus_licenses(slides),
        "generated": fraction == 1.0,  # every spot generated (spavis.simulate), none measured
        "generated_fraction": fraction,  # share of spots from generated slices (0.0: all measured)
    }
