"""``stamp pretrain --stage gene|spatial``: stage 1 (IGR on independent spots) and stage 2 (IGR + CGR
on spatial groups). The run contract (run folder, resume, checkpoints, NaN stop, metrics) is
:mod:`stamp.training.run`; this module holds what the gene stages add: their arguments, the gene
encoder and tokenizer, the token loader and the IGR/CGR step.

One function, :func:`pretrain`, shared by the CLI, tests and ``torchrun``. Defaults follow
the authors' released training code (the values behind the paper's Table 3): AdamW, lr
1e-4, weight decay 1e-4, 5,000 linear warm-up steps, cosine decay with a floor of 1e-5,
15% masking. Multi-GPU / multi-node: launch with ``torchrun``; the process group is set
up from the environment (NCCL on GPU, gloo on CPU) and each rank reads a different
subset of shards. Checkpoints are pickle-free (:mod:`stamp.training.checkpoint`) and ``resume``
continues exactly: the data stream is a pure function of (seed, rank, epoch) and the
checkpoint records how many batches of the current epoch were consumed.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from spavis.format.progress import counter
from stamp.constants import GROUP_SIZE, METRICS_FILE
from stamp.data.tokens import Batch
from stamp.errors import DataError, TrainingError
from stamp.models.gene_encoder import StampGeneEncoder, create_gene_encoder as create_model
from stamp.training.objectives import StampForPretraining
from stamp.training import run as contract
from stamp.training.run import (Dist, RunSpec, autocast_for, data_info, ddp_wrap, distributed, finish_run,
                                no_sync_unless, pick_device, resume_state, train_steps)

logger = logging.getLogger(__name__)

STAGES = ("gene", "spatial")

@dataclass
class PretrainArgs:
    """Everything that defines a pretraining run (saved to RUN/train_args.json)."""

    stage: str
    data: str
    out: str
    config: str = "base"
    init: str | None = None
    max_steps: int | None = None  # None: one pass over this rank's data
    batch_size: int | None = None  # spots per micro-batch and rank (spatial: whole groups of 9)
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 5000
    weight_decay: float = 1e-4
    clip_norm: float = 1.0
    mask_prob: float = 0.15
    cgr_targets: str = "masked"
    max_distance_um: float | None = None
    save_every: int = 1000
    keep_checkpoints: int | None = 3
    seed: int = 0
    resume: bool = False
    stop_after: int | None = None  # stop (and checkpoint) after this step; schedule unchanged
    progress: bool = True
    device: str | None = None
    extra: dict = field(default_factory=dict)

    # (field, predicate, what it must be): the Python API checks what the CLI callbacks check
    _RULES = (("max_steps", lambda v: v >= 1, ">= 1"), ("batch_size", lambda v: v >= 1, ">= 1"),
              ("grad_accum", lambda v: v >= 1, ">= 1"), ("lr", lambda v: 0 < v < math.inf, "> 0"),
              ("min_lr", lambda v: 0 <= v < math.inf, ">= 0"), ("warmup_steps", lambda v: v >= 0, ">= 0"),
              ("weight_decay", lambda v: 0 <= v < math.inf, ">= 0"), ("clip_norm", lambda v: 0 < v < math.inf, "> 0"),
              ("mask_prob", lambda v: 0 < v < 1, "in (0, 1)"), ("max_distance_um", lambda v: 0 < v < math.inf, "> 0"),
              ("save_every", lambda v: v >= 1, ">= 1"), ("keep_checkpoints", lambda v: v >= 1, ">= 1"),
              ("seed", lambda v: v >= 0, ">= 0"), ("stop_after", lambda v: v >= 1, ">= 1"))

    def validate(self) -> "PretrainArgs":
        """Raise :class:`~stamp.errors.UsageError` naming every out-of-range number."""
        from stamp.errors import UsageError

        bad = [f"--{name.replace('_', '-')} {getattr(self, name)!r} must be {wanted}"
               for name, ok, wanted in self._RULES
               if getattr(self, name) is not None and not ok(getattr(self, name))]
        if self.stage not in STAGES:
            bad.append(f"--stage {self.stage!r} must be one of {', '.join(STAGES)}")
        if self.cgr_targets not in ("masked", "all"):
            bad.append(f"--cgr-targets {self.cgr_targets!r} must be 'masked' or 'all'")
        if bad:
            raise UsageError("; ".join(bad))
        return self

    def micro_batch(self) -> int:
        if self.batch_size is not None:
            return int(self.batch_size)
        return 24 * GROUP_SIZE if self.stage == "spatial" else 128


# ----------------------------------------------------------------------------- the run contract's view
def _presets() -> list[str]:
    from stamp.models.gene_encoder import preset_names

    return preset_names()


# Options that belong to one invocation, not to the run: they may differ on --resume.
# (max_steps may change too: the new value is recorded and the schedule follows it.)
INVOCATION_FIELDS = ("resume", "stop_after", "progress", "device", "save_every", "keep_checkpoints", "max_steps")
PATH_FIELDS = ("data", "init", "config")
SPEC = RunSpec(PretrainArgs, STAGES, INVOCATION_FIELDS, PATH_FIELDS, presets=_presets)


def normalize_paths(args: PretrainArgs) -> PretrainArgs:
    """``args`` with ``out`` and local ``data``/``init``/``config`` paths absolute (stored so in the run)."""
    return contract.normalize_paths(args, SPEC)


def read_run_args(out) -> dict:
    """The options a gene-stage run was started with (RUN/train_args.json), paths absolute."""
    return contract.read_run_args(out, SPEC)


def resume_differences(stored: dict, args: PretrainArgs) -> list[str]:
    """``--option stored (now given)`` for every run-defining option that differs."""
    return contract.resume_differences(stored, args, INVOCATION_FIELDS)


# ----------------------------------------------------------------------------- data
def make_loader(corpus, tokenizer, args: PretrainArgs, context_length: int, d: Dist):
    """Endless, resumable token batches for this rank (``stamp.data.tokens.TokenBatchLoader``).

    Each rank reads its own shards; the order is a pure function of (seed, epoch), so a
    checkpoint only records the loader's position.
    """
    from stamp.data.batching import D_MAX_UM
    from stamp.data.tokens import TokenBatchLoader

    spatial = args.stage == "spatial"
    return TokenBatchLoader(
        corpus, tokenizer, mode="spatial" if spatial else "spots",
        batch_size=args.micro_batch(), groups_per_batch=max(1, args.micro_batch() // GROUP_SIZE),
        group_size=GROUP_SIZE,
        d_max_um=args.max_distance_um if args.max_distance_um is not None else D_MAX_UM,
        context_length=context_length, seed=args.seed, rank=d.rank, world_size=d.world, epochs=None,
    )


def _load_tokenizer(args: PretrainArgs, corpus, context_length: int):
    from stamp.tokenizer import GeneTokenizer

    if args.init:
        from stamp.zoo.resolve import resolve_model_source

        model_dir = resolve_model_source(args.init)
        if (model_dir / "tokenizer_config.json").is_file():
            return GeneTokenizer.from_pretrained(model_dir)
    return GeneTokenizer.from_corpus(corpus, max_length=context_length)


VOCABULARY_FIX = ("stage 2 must use shards built with the same vocabulary as stage 1 "
                  "(`spavis build-shards --vocab`)")


def _build_model(args: PretrainArgs, n_genes: int) -> StampGeneEncoder:
    torch.manual_seed(args.seed)
    if args.init:
        from stamp.zoo.resolve import resolve_model_source

        return create_model(resolve_model_source(args.init), n_genes=n_genes)
    return create_model(args.config, n_genes=n_genes)


# ----------------------------------------------------------------------------- main loop
def pretrain(args: PretrainArgs, *, on_step: Callable[[dict], None] | None = None) -> Path:
    """Run (or resume) pretraining; returns the ``RUN/model`` folder.

    Raises :class:`TrainingError` when the loss becomes NaN/inf: the optimizer step is
    skipped, nothing is saved, and the last good checkpoint stays the latest one.
    """
    from spavis.format import open_corpus

    args.validate()
    if args.stage == "spatial" and not args.init and not args.resume:
        logger.warning("spatial stage without --init: training IGR + CGR from a random encoder")
    with distributed() as d:
        return _pretrain(args, d, open_corpus, on_step)


def _pretrain(args: PretrainArgs, d: Dist, open_corpus, on_step) -> Path:
    args, resume_from = contract.prepare_run(args, d, SPEC)
    run = Path(args.out)
    if args.stage == "spatial" and args.micro_batch() % GROUP_SIZE:
        raise TrainingError(f"--batch-size {args.micro_batch()} must be a multiple of {GROUP_SIZE} in the spatial stage")
    device = pick_device(args, d)
    corpus = open_corpus(args.data)
    contract.pin_hub_revision(args, corpus, d)
    n_genes = int(len(corpus.genes))
    model = _build_model(args, n_genes)
    context = model.config.context_length
    tokenizer = _load_tokenizer(args, corpus, context)
    contract.check_vocabulary(tokenizer, corpus, model=args.init or "the tokenizer", data=args.data,
                              fix=VOCABULARY_FIX)
    spatial = args.stage == "spatial"
    if not model.config.heads:
        raise TrainingError(f"{args.init}: an inference-only encoder (config heads=false, e.g. a converted release) "
                            "has no IGR/CGR heads to pretrain; start from a pretraining run or a preset config")
    model.cgr_head.requires_grad_(spatial)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    loader = make_loader(corpus, tokenizer, args, context, d)
    n_spots_total = int(corpus.n_spots)
    if args.max_steps is None:
        per_step = args.micro_batch() * args.grad_accum * d.world
        args.max_steps = max(1, n_spots_total // per_step)
    total = int(args.max_steps)
    if args.warmup_steps >= total and d.main:
        logger.warning("warm-up (%d steps) is not shorter than the run (%d steps)", args.warmup_steps, total)

    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + d.rank)
    step, spots_seen = resume_state(resume_from, resume=args.resume, model=model, optimizer=optimizer, gen=gen,
                                    loader=loader, d=d, metrics_path=run / METRICS_FILE)

    pretraining = StampForPretraining(model, spatial=spatial, cgr_targets=args.cgr_targets, mask_prob=args.mask_prob)
    forward: Callable = ddp_wrap(pretraining, device, d)  # DDP runs the encoder and both heads in one forward
    autocast = autocast_for(device)

    stream = iter(loader)
    run_data = data_info(corpus, args.data, n_spots_total)
    stop_at = min(total, args.stop_after) if args.stop_after else total

    def next_batch() -> Batch:
        try:
            return next(stream)
        except StopIteration:
            raise TrainingError(
                f"{args.data}: rank {d.rank} got no batch from its shards; the data is smaller than one "
                f"batch of {args.micro_batch()} spots (lower --batch-size)"
            ) from None

    # No loop without progress: every rank fetches its first batch before any collective, so a
    # corpus too small for one batch stops at once on every rank (with the loader's numbers).
    pending: list[Batch] = []
    failure: Exception | None = None
    try:
        pending.append(next_batch())
    except (DataError, TrainingError) as exc:
        failure = exc
    if d.world > 1:
        flag = torch.tensor([1.0 if failure else 0.0], device=device)
        dist.all_reduce(flag)
        if failure is None and flag.item() > 0:
            failure = TrainingError(f"{args.data}: another rank cannot form a batch (see its error); "
                                    "lower --batch-size or use fewer processes")
    if failure is not None:
        raise failure

    def micro_step(last: bool) -> tuple[list[float], int]:
        """IGR (+ CGR) on one micro-batch: loss, igr, cgr, correct, masked; and its spots."""
        batch = pending.pop() if pending else next_batch()
        ids = batch.input_ids
        masked = pretraining.mask(ids, generator=gen)
        with no_sync_unless(forward, last, d):
            with autocast:
                out = forward(ids.to(device), masked.input_ids.to(device), masked.labels.to(device), batch.groups)
            (out.loss / args.grad_accum).backward()
        return [out.loss.item(), out.igr_loss.item(), out.cgr_loss.item() if out.cgr_loss is not None else 0.0,
                out.igr_correct, out.igr_total], ids.shape[0]

    def metrics(*, step: int, sums, loss: float, lr: float, grad_norm: float, n_spots: int, dt: float) -> dict:
        return {
            "step": step,
            "loss": loss,
            "igr_loss": float(sums[1]) / args.grad_accum,
            "cgr_loss": float(sums[2]) / args.grad_accum if spatial else None,
            "igr_acc": float(sums[3] / sums[4]) if sums[4] > 0 else None,
            "lr": lr,
            "grad_norm": grad_norm,
            "spots": n_spots,
            "spots_per_s": n_spots / dt if dt > 0 else None,
            "epoch": loader.state_dict()["epoch"],
        }

    schedule = {"name": "linear-warmup-cosine-floor", "lr": args.lr, "min_lr": args.min_lr,
                "warmup": args.warmup_steps, "total": total}
    model.train()
    with counter("loss {task.fields[loss]}", "{task.fields[sps]} spots/s", enabled=args.progress and d.main) as bar:
        task = bar.add_task("pretrain", total=stop_at, completed=step, loss="-", sps="-")

        def show(m: dict) -> None:
            bar.update(task, completed=m["step"], loss=f"{m['loss']:.4f}", sps=f"{m['spots_per_s']:.0f}")

        step, spots_seen, last_metrics = train_steps(
            run=run, d=d, device=device, model=model, optimizer=optimizer, params=params, gen=gen, args=args,
            total=total, step=step, spots_seen=spots_seen, n_sums=5, n_mean=3, micro_step=micro_step,
            metrics=metrics, position=loader.state_dict, checkpoint_state={"stage": args.stage, "schedule": schedule},
            on_metrics=show, on_step=on_step)

    info = {
        "stage": args.stage,
        "steps": step,
        "total_steps": total,
        "spots_seen": spots_seen * d.world,
        "init": args.init,
        "data": run_data,
        "train": {k: v for k, v in asdict(args).items()
                  if k in ("config", "batch_size", "grad_accum", "lr", "min_lr", "warmup_steps", "weight_decay",
                           "clip_norm", "mask_prob", "cgr_targets", "seed", "max_steps")} | {"world_size": d.world},
        "final_metrics": {k: v for k, v in last_metrics.items() if v is not None and k != "step"},
        "license": "other",
    }
    from stamp.cards import write_model_card

    return finish_run(run, info, d=d, model=model, tokenizer=tokenizer, write_card=write_model_card)


__all__ = ["PretrainArgs", "STAGES", "SPEC", "pretrain", "make_loader", "normalize_paths", "read_run_args",
           "resume_differences"]
