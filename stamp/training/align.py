"""``stamp pretrain --stage align``: stage 3, aligning the gene encoder with a pathology ViT.

Starts from a stage-2 run (``--init RUN2``: its gene encoder and tokenizer) and a vision
encoder (``--vision uni|tiny|CONFIG.json|WEIGHTS.safetensors``), trains the four losses of
:mod:`stamp.models.alignment` on a paired corpus, and writes ``RUN3/model`` as a
:class:`stamp.models.aligned_model.StampModel` (config.json + model.safetensors + tokenizer files +
model card naming the data and every stage that trained it).

The run contract is the gene stages' one (:mod:`stamp.training.run`): ``train_args.json`` fixed
at the start with local paths absolute, ``--resume`` refusing changed options (only
``--max-steps`` and the options of one invocation may change), a Hub corpus pinned to its commit,
the vocabulary of ``--init`` checked against the corpus's by identity, pickle-free checkpoints
(:mod:`stamp.training.checkpoint`) written atomically every ``save_every`` steps, exact ``resume`` (the
paired loader's plan is a pure function of (seed, rank, epoch), the checkpoint stores its position
and the RNG states), ``metrics.jsonl`` (one line per step; lines after a resumed step are dropped
and recomputed), ``torchrun`` for several GPUs or nodes (contrastive candidates gathered over all
ranks), and a NaN/inf loss stops the run without saving. Defaults follow the paper (sec. 4.1) and the
released code: AdamW lr 1e-4, weight decay 1e-3, warm-up then cosine, batch 256, gradient
accumulation 2, 30 epochs.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from stamp.constants import METRICS_FILE, RUN_INFO
from stamp.errors import TrainingError
from stamp.locations import model_folder_of, run_folder_of
from stamp.training import run as contract
from stamp.training.run import (Dist, RunSpec, autocast_for, data_info, ddp_wrap, distributed, finish_run,
                                no_sync_unless, pick_device, resume_state, train_steps)

logger = logging.getLogger(__name__)

STAGE = "align"


@dataclass
class AlignArgs:
    """Everything that defines an alignment run (saved to RUN/train_args.json)."""

    data: str
    out: str
    init: Optional[str] = None  # stage-2 run or model folder (required for a new run)
    vision: str = "uni"
    vision_weights: Optional[str] = None  # None: the config's default weights; "none": random init
    embed_dim: int = 512
    freeze_gene: bool = False
    freeze_vision: bool = False
    epochs: int = 30
    max_steps: Optional[int] = None  # None: `epochs` passes over this rank's paired spots
    batch_size: int = 256
    grad_accum: int = 2
    lr: float = 1e-4
    min_lr: float = 0.0
    warmup_steps: int = 1000
    weight_decay: float = 1e-3
    clip_norm: float = 1.0
    gather_with_grad: bool = True  # exact gradient of the global-batch loss (open_clip --gather-with-grad)
    save_every: int = 1000
    keep_checkpoints: Optional[int] = 3
    seed: int = 0
    resume: bool = False
    stop_after: Optional[int] = None
    progress: bool = True
    device: Optional[str] = None
    loader_threads: int = 0  # PNG decoding threads per process; 0: one per CPU core (at most 16)
    stage: str = STAGE
    extra: dict = field(default_factory=dict)


def _presets() -> list[str]:
    from stamp.models.vision import vision_preset_names
    from stamp.zoo.catalogue import list_pretrained

    # names that are never paths: --vision presets and the zoo's image encoders, --vision-weights none
    return [*vision_preset_names(), *list_pretrained("image"), "none"]


# Options of one invocation (may differ on --resume; a new --max-steps is recorded).
INVOCATION_FIELDS = ("resume", "stop_after", "progress", "device", "save_every", "keep_checkpoints", "max_steps",
                     "loader_threads")
PATH_FIELDS = ("data", "init", "vision", "vision_weights")
SPEC = RunSpec(AlignArgs, (STAGE,), INVOCATION_FIELDS, PATH_FIELDS, presets=_presets,
               needs_init="--stage align needs --init RUN2 (a stage-2 run or model folder with its tokenizer)")
VOCABULARY_FIX = ("align on a corpus built with the vocabulary of stages 1-2 "
                  "(`spavis build-shards --vocab`)")


def read_run_args(out) -> dict:
    """The options an align run was started with (RUN/train_args.json), paths absolute."""
    return contract.read_run_args(out, SPEC)


def resume_differences(stored: dict, args: AlignArgs) -> list[str]:
    """``--option stored (now given)`` for every run-defining option that differs."""
    return contract.resume_differences(stored, args, INVOCATION_FIELDS)


def _lineage(init_dir: Path) -> list[dict]:
    """The stages behind a model folder, oldest first (from run.json files up the --init chain)."""
    chain: list[dict] = []
    seen = set()
    model_dir = init_dir
    while model_dir is not None and str(model_dir) not in seen:
        seen.add(str(model_dir))
        info_path = run_folder_of(model_dir) / RUN_INFO
        if not info_path.is_file():
            break
        info = json.loads(info_path.read_text())
        chain.append({"stage": info.get("stage"), "steps": info.get("steps"),
                      "data": (info.get("data") or {}).get("source"), "generated": (info.get("data") or {}).get("generated")})
        nxt = info.get("init")
        if not nxt:
            break
        model_dir = model_folder_of(nxt)
    return chain[::-1]


def build_model(args: AlignArgs, n_genes: int):
    """(StampModel, tokenizer, init folder): gene encoder + tokenizer from --init, vision from --vision."""
    from stamp.locations import resolve_model_dir
    from stamp.models.gene_encoder import create_gene_encoder as create_model
    from stamp.models.aligned_model import create_stamp_model
    from stamp.tokenizer import GeneTokenizer
    from stamp.zoo.factory import create_vision_encoder

    torch.manual_seed(args.seed)
    init_dir = resolve_model_dir(args.init)
    gene = create_model(init_dir, n_genes=n_genes)
    if not (init_dir / "tokenizer_config.json").is_file():
        raise TrainingError(f"{init_dir}: no tokenizer files; --init must be a stamp pretrain run (stage 2)")
    tokenizer = GeneTokenizer.from_pretrained(init_dir)
    weights = args.vision_weights
    vision = create_vision_encoder(args.vision, weights=None if weights in (None, "none") else weights,
                                   pretrained=weights != "none")
    return create_stamp_model(gene, vision, embed_dim=args.embed_dim), tokenizer, init_dir


def align(args: AlignArgs, *, on_step: Optional[Callable[[dict], None]] = None) -> Path:
    """Run (or resume) the alignment stage; returns the ``RUN/model`` folder."""
    from spavis.format import open_corpus

    with distributed() as d:
        return _align(args, d, open_corpus, on_step)


def _align(args: AlignArgs, d: Dist, open_corpus, on_step) -> Path:
    from stamp.data.paired import PairedBatchLoader

    for name in ("batch_size", "grad_accum", "epochs"):
        if getattr(args, name) < 1:
            raise TrainingError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    args, resume_from = contract.prepare_run(args, d, SPEC)
    run = Path(args.out)
    device = pick_device(args, d)
    corpus = open_corpus(args.data)
    contract.pin_hub_revision(args, corpus, d)
    n_genes = int(len(corpus.genes))
    model, tokenizer, init_dir = build_model(args, n_genes)
    contract.check_vocabulary(tokenizer, corpus, model=str(args.init), data=args.data, fix=VOCABULARY_FIX)
    model.freeze(gene=args.freeze_gene, vision_trunk=args.freeze_vision)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    loader = PairedBatchLoader(corpus, tokenizer, batch_size=args.batch_size,
                               context_length=model.config.gene.context_length, seed=args.seed,
                               rank=d.rank, world_size=d.world, epochs=None,
                               threads=args.loader_threads or min(16, os.cpu_count() or 1))
    n_spots_total = loader.n_spots
    if args.max_steps is None:
        per_epoch = max(1, loader.n_batches(0) // args.grad_accum)
        args.max_steps = per_epoch * args.epochs
    total = int(args.max_steps)

    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + d.rank)
    step, spots_seen = resume_state(resume_from, resume=args.resume, model=model, optimizer=optimizer, gen=gen,
                                    loader=loader, d=d, metrics_path=run / METRICS_FILE)

    forward: Callable = ddp_wrap(model, device, d)
    autocast = autocast_for(device)
    from stamp.data.prefetch import prefetch

    stream = prefetch(iter(loader), depth=2, name="paired-prefetch")
    # what the consumed batches leave (the prefetcher reads ahead): the position a checkpoint stores
    consumed = {"position": loader.state_dict()}
    run_data = {**data_info(corpus, args.data, n_spots_total), "paired": True}
    stop_at = min(total, args.stop_after) if args.stop_after else total

    def micro_step(last: bool) -> tuple[list[float], int]:
        """The four losses on one paired micro-batch: loss, ps, rs, pr, csp, correct, total; and its spots."""
        batch = next(stream)
        consumed["position"] = batch.position
        with no_sync_unless(forward, last, d):
            with autocast:
                out = forward(batch.input_ids.to(device), model.pixels(batch.patch), model.pixels(batch.region),
                              batch.region_cell.to(device), gather_with_grad=args.gather_with_grad)
            (out.loss / args.grad_accum).backward()
        return [out.loss.item(), out.ps.item(), out.rs.item(), out.pr.item(), out.csp.item(), out.csp_correct,
                out.csp_total], len(batch)

    def metrics(*, step: int, sums, loss: float, lr: float, grad_norm: float, n_spots: int, dt: float) -> dict:
        return {
            "step": step, "loss": loss,
            "ps_loss": float(sums[1]) / args.grad_accum, "rs_loss": float(sums[2]) / args.grad_accum,
            "pr_loss": float(sums[3]) / args.grad_accum, "csp_loss": float(sums[4]) / args.grad_accum,
            "csp_acc": float(sums[5] / sums[6]) if sums[6] > 0 else None,
            "logit_scale": float(model.logit_scale.detach().exp()), "lr": lr, "grad_norm": grad_norm,
            "spots": n_spots, "spots_per_s": n_spots / dt if dt > 0 else None,
            "epoch": consumed["position"]["epoch"],
        }

    def show(m: dict) -> None:
        if args.progress:
            logger.info("step %d/%d loss %.4f csp_acc %s", m["step"], stop_at, m["loss"], m["csp_acc"])

    schedule = {"name": "linear-warmup-cosine", "lr": args.lr, "min_lr": args.min_lr, "warmup": args.warmup_steps,
                "total": total}
    model.train()
    step, spots_seen, last_metrics = train_steps(
        run=run, d=d, device=device, model=model, optimizer=optimizer, params=params, gen=gen, args=args, total=total,
        step=step, spots_seen=spots_seen, n_sums=7, n_mean=5, micro_step=micro_step, metrics=metrics,
        position=lambda: consumed["position"], checkpoint_state={"stage": STAGE, "schedule": schedule},
        after_step=model.clamp_logit_scale, on_metrics=show, on_step=on_step)

    info = {
        "stage": STAGE, "steps": step, "total_steps": total, "spots_seen": spots_seen * d.world,
        "init": str(args.init), "stages": _lineage(init_dir) + [{"stage": STAGE, "steps": step, "data": str(args.data),
                                                              "generated": run_data["generated"]}],
        "vision": {"config": model.config.vision.name, "arch": model.config.vision.arch,
                   "weights": "random" if args.vision_weights == "none"
                   else (args.vision_weights or model.config.vision.weights or "random"),
                   "trunk_frozen": args.freeze_vision},
        "gene_frozen": args.freeze_gene, "data": run_data,
        "train": {k: v for k, v in asdict(args).items()
                  if k in ("vision", "embed_dim", "batch_size", "grad_accum", "lr", "min_lr", "warmup_steps",
                           "weight_decay", "clip_norm", "epochs", "seed", "max_steps", "freeze_gene",
                           "freeze_vision", "gather_with_grad")} | {"world_size": d.world},
        "final_metrics": {k: v for k, v in last_metrics.items() if v is not None and k != "step"},
        "license": "other",
    }
    from stamp.cards import write_stamp_model_card

    return finish_run(run, info, d=d, model=model, tokenizer=tokenizer, write_card=write_stamp_model_card)


__all__ = ["AlignArgs", "align", "build_model", "read_run_args", "resume_differences", "SPEC", "STAGE"]
