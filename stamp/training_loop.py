"""The run contract shared by every ``stamp pretrain`` stage (gene stages and ``--stage align``).

One place for what must behave the same whatever the model: exact resume from a checkpoint
(weights, optimizer, RNG, loader position, ``metrics.jsonl`` cut back to the resumed step),
the collective checkpoint save, the NaN/inf stop, step-sum reduction over ranks and the
``metrics.jsonl`` line. The stage modules keep only their model, batches and losses.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from spavis.format.io import apply_umask, atomic_dir, atomic_write_text
from stamp import checkpoint as ckpt
from stamp.constants import RUN_INFO
from stamp.errors import TrainingError


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


def write_model_dir(run: Path, model: Any, tokenizer: Any, info: dict,
                    write_card: Callable[[Path, dict], None]) -> Path:
    """RUN/model: config.json + model.safetensors + tokenizer files + README card, staged beside
    it and swapped in whole (never a half-written model folder)."""
    final = run / "model"
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
    model_dir = run / "model"
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


__all__ = ["append_metrics", "corpus_licenses", "finish_run", "reduce_step_sums", "resume_state", "save_checkpoint",
           "stop_if_not_finite", "truncate_metrics", "write_model_dir"]
