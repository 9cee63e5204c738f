"""``stamp finetune --model IMAGE_ENCODER --data PAIRED_CORPUS --out RUN``: the paper's ‡ protocol.

Any image encoder of the zoo (a catalogue name such as ``plip`` or ``conch``, a timm / transformers /
open_clip folder or Hub repo) is fine-tuned with spatial transcriptomics as supervision, after Chen et
al. 2024 (STimage-1K4M): the whole image encoder, a linear image projection and a linear gene projection
are trained with CLIP's symmetric InfoNCE between each H&E patch and its spot's expression
(:class:`stamp.models.finetune.STFinetuneModel`).

The spot's expression: the run's ``n_hvgs`` highly variable genes (Seurat v3 on raw counts, ranked on at
most ``hvg_sample`` paired spots drawn with the seed; :mod:`stamp.data.expression`), counts per 10,000 of
the spot's total, log1p. Defaults are the paper's settings: Adam lr 5e-5 (constant; STimage-1K4M's
betas (0.9, 0.98), eps 1e-6, weight decay 0.2), 15 epochs, batch 256, 1,500 genes; ``--max-steps`` for
short runs; gradients are not clipped unless ``--clip-norm`` says so.

The run contract is every stage's (:mod:`stamp.training.run`): ``train_args.json`` with absolute paths,
``--resume`` refusing changed options, a Hub corpus pinned to its commit, pickle-free checkpoints, exact
resume (the paired loader's plan is a pure function of (seed, rank, epoch)), ``metrics.jsonl``, the NaN
stop, ``RUN/model`` swapped in whole with a model card, then ``run.json``. The base encoder's weights
sha256 and the gene list's fingerprint are recorded. ``RUN`` is an aligned model: ``stamp embed`` and
``stamp evaluate`` take it like any other (``stamp.load(RUN)``).
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from stamp.constants import METRICS_FILE
from stamp.data.paired import PairedBatchLoader, decode_rows
from stamp.errors import TrainingError
from stamp.training import run as contract
from stamp.training.run import (Dist, RunSpec, autocast_for, data_info, ddp_wrap, distributed, finish_run,
                                no_sync_unless, pick_device, resume_state, train_steps)

logger = logging.getLogger(__name__)

STAGE = "finetune"
METHODS = ("contrastive", "adapter")


@dataclass
class FinetuneArgs:
    """Everything that defines a fine-tuning run (saved to RUN/train_args.json)."""

    model: str
    data: str
    out: str
    weights: Optional[str] = None  # the base encoder's weights downloaded by hand (gated / offline)
    n_hvgs: int = 1500
    hvg_sample: int = 50_000
    embed_dim: int = 32
    epochs: int = 15
    max_steps: Optional[int] = None  # None: `epochs` passes over this rank's paired spots
    batch_size: int = 256
    grad_accum: int = 1
    lr: float = 5e-5
    min_lr: Optional[float] = None  # None: the lr (a constant rate, as the protocol)
    warmup_steps: int = 0
    weight_decay: float = 0.2
    betas: list = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    clip_norm: float = 1e9  # no clipping (the protocol); set e.g. 1.0 to clip
    save_every: int = 1000
    keep_checkpoints: Optional[int] = 3
    seed: int = 0
    resume: bool = False
    stop_after: Optional[int] = None
    progress: bool = True
    device: Optional[str] = None
    loader_threads: int = 0
    stage: str = STAGE
    extra: dict = field(default_factory=dict)


def _presets() -> list[str]:
    from stamp.zoo.catalogue import list_pretrained

    return list_pretrained()


from stamp.training.align import INVOCATION_FIELDS  # noqa: E402  (the same options of one invocation)

PATH_FIELDS = ("data", "model", "weights")
SPEC = RunSpec(FinetuneArgs, (STAGE,), INVOCATION_FIELDS, PATH_FIELDS, presets=_presets)


# ----------------------------------------------------------------------------- data
def paired_counts(corpus, sample: int, seed: int):
    """(raw counts of at most ``sample`` paired spots drawn with ``seed``, all corpus genes) for the gene ranking."""
    import pyarrow.parquet as pq

    from spavis.format import rows_to_csr
    from stamp.data.paired import _EXPR_COLUMNS, paired_pairs
    import scipy.sparse as sp

    pairs = paired_pairs(corpus)
    sizes = [pq.ParquetFile(p).metadata.num_rows for p, _ in pairs]
    total = int(sum(sizes))
    keep = np.sort(np.random.default_rng([seed, 17]).choice(total, size=min(sample, total), replace=False))
    mats, start = [], 0
    for (paired, expr_file), n in zip(pairs, sizes):
        rows = keep[(keep >= start) & (keep < start + n)] - start
        start += n
        if rows.size:
            table = pq.read_table(expr_file, columns=_EXPR_COLUMNS).take(rows)
            mats.append(rows_to_csr(table, corpus.n_genes))
    return sp.vstack(mats, format="csr")


def select_genes(corpus, n_hvgs: int, sample: int, seed: int) -> tuple[list[str], list[str], str]:
    """(Ensembl ids, symbols, ranking flavour) of the run's genes, best first."""
    from stamp.data.expression import variable_genes

    counts = paired_counts(corpus, sample, seed)
    cols, flavor = variable_genes(counts, n_hvgs)
    genes = corpus.genes
    ids = genes["ensembl_id"].astype(str).to_numpy()[cols].tolist()
    symbols = genes["symbol"].fillna("").astype(str).to_numpy()[cols].tolist()
    return ids, symbols, flavor


@dataclass
class FinetuneBatch:
    expression: torch.Tensor  # (B, n_genes) float32
    patch: torch.Tensor  # (B, 224, 224, 3) uint8
    spot_ids: list
    position: Optional[dict] = None

    def __len__(self) -> int:
        return len(self.spot_ids)


class ExpressionPairedLoader(PairedBatchLoader):
    """The paired loader's plan, order and exact resume (:class:`~stamp.data.paired.PairedBatchLoader`), with
    batches of (expression over the run's genes, patch): regions are not decoded."""

    def __init__(self, corpus, inputs, **kwargs: Any) -> None:
        super().__init__(corpus, None, **kwargs)
        self.inputs = inputs

    def _batch(self, parts, pool) -> FinetuneBatch:
        import pyarrow as pa

        from spavis.format import rows_to_csr

        exprs, cells = [], []
        for (images, expr), rows, path in parts:
            idx = pa.array(rows)
            exprs.append(expr.take(idx))
            spots = images.column("spot_id").take(idx).to_pylist()
            values = images.column("patch").take(idx).to_pylist()
            cells += [(v, f"{path} row {int(r)} (spot_id {sp}) patch") for v, r, sp in zip(values, rows, spots)]
        expr = pa.concat_tables(exprs)
        expression = self.inputs(rows_to_csr(expr, self.corpus.n_genes))["expression"]
        return FinetuneBatch(expression=expression, patch=torch.from_numpy(np.stack(decode_rows(pool, cells))),
                             spot_ids=[str(s) for s in expr.column("spot_id").to_pylist()])


# ----------------------------------------------------------------------------- model
def build_model(args: FinetuneArgs, genes: list[str], symbols: list[str]):
    """(STFinetuneModel, the base Encoder, ExpressionInput): the base image encoder from the zoo with its
    weights, two fresh projections (seeded)."""
    import stamp
    from stamp.models.finetune import ExpressionInput, FinetuneConfig, STFinetuneModel

    base = stamp.load(args.model, weights=args.weights, device="cpu", kind="image")
    arch = getattr(base, "architecture", None)
    if base.kind != "image" or arch is None:
        raise TrainingError(f"--model {args.model}: a {base.kind} model; stamp finetune trains an image encoder of "
                            "the zoo (a catalogue name such as plip or conch, or a timm / transformers / open_clip "
                            "folder or Hub repo)")
    module = base.module
    with torch.no_grad():
        probe = module(torch.zeros(1, 3, base.input_size, base.input_size))
    torch.manual_seed(args.seed)
    config = FinetuneConfig(image_encoder=arch, image_dim=int(probe.shape[-1]), n_genes=len(genes),
                            embed_dim=args.embed_dim)
    return STFinetuneModel(module, config), base, ExpressionInput(genes, symbols)


def _check(args: FinetuneArgs) -> None:
    for name in ("batch_size", "grad_accum", "epochs", "n_hvgs", "embed_dim", "hvg_sample"):
        if getattr(args, name) < 1:
            raise TrainingError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.lr > 0:
        raise TrainingError(f"--lr must be positive, got {args.lr}")


def finetune(args: FinetuneArgs, *, on_step: Optional[Callable[[dict], None]] = None) -> Path:
    """Run (or resume) the ‡ protocol; returns ``RUN/model``."""
    from spavis.format import open_corpus

    _check(args)
    with distributed() as d:
        return _finetune(args, d, open_corpus, on_step)


def _finetune(args: FinetuneArgs, d: Dist, open_corpus, on_step) -> Path:
    from spavis.format.vocabulary import vocabulary_fingerprint

    args, resume_from = contract.prepare_run(args, d, SPEC)
    if args.min_lr is None:
        args.min_lr = args.lr
    run = Path(args.out)
    device = pick_device(args, d)
    corpus = open_corpus(args.data)
    contract.pin_hub_revision(args, corpus, d)
    genes, symbols, flavor = select_genes(corpus, args.n_hvgs, args.hvg_sample, args.seed)
    model, base, inputs = build_model(args, genes, symbols)
    from stamp.models.gene_inputs import CorpusGenes

    inputs.bind(CorpusGenes.from_table(corpus.genes))
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=args.lr, betas=tuple(args.betas), eps=args.eps,
                                 weight_decay=args.weight_decay)
    loader = ExpressionPairedLoader(corpus, inputs, batch_size=args.batch_size, seed=args.seed, rank=d.rank,
                                    world_size=d.world, epochs=None,
                                    threads=args.loader_threads or min(16, os.cpu_count() or 1))
    if args.max_steps is None:
        args.max_steps = max(1, loader.n_batches(0) // args.grad_accum) * args.epochs
    total = int(args.max_steps)
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + d.rank)
    step, spots_seen = resume_state(resume_from, resume=args.resume, model=model, optimizer=optimizer, gen=gen,
                                    loader=loader, d=d, metrics_path=run / METRICS_FILE)
    forward = ddp_wrap(model, device, d)
    autocast = autocast_for(device)
    from stamp.data.prefetch import prefetch

    stream = prefetch(iter(loader), depth=2, name="finetune-prefetch")
    consumed = {"position": loader.state_dict()}
    normalize = base.transform.normalize
    size = base.input_size

    def pixels(patch: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 224, 224, 3) -> the base encoder's own preprocessing, on the device."""
        from stamp.models.pixels import resize_shorter_and_crop

        x = patch.to(device).permute(0, 3, 1, 2)
        t = base.transform
        if tuple(x.shape[-2:]) != (size, size):  # every patch has one size: one resize for the batch
            x = resize_shorter_and_crop(x, t.resize, t.crop, t.interpolation)
        return normalize(x)

    def micro_step(last: bool) -> tuple[list[float], int]:
        batch = next(stream)
        consumed["position"] = batch.position
        with no_sync_unless(forward, last, d):
            with autocast:
                loss, correct = forward(pixels(batch.patch), batch.expression.to(device))
            (loss / args.grad_accum).backward()
        return [loss.item(), float(correct), float(len(batch))], len(batch)

    def metrics(*, step: int, sums, loss: float, lr: float, grad_norm: float, n_spots: int, dt: float) -> dict:
        return {"step": step, "loss": loss, "pair_acc": float(sums[1] / sums[2]) if sums[2] > 0 else None,
                "logit_scale": float(model.logit_scale.detach().exp()), "lr": lr, "grad_norm": grad_norm,
                "spots": n_spots, "spots_per_s": n_spots / dt if dt > 0 else None,
                "epoch": consumed["position"]["epoch"]}

    def show(m: dict) -> None:
        if args.progress:
            logger.info("step %d/%d loss %.4f pair_acc %s", m["step"], total, m["loss"], m["pair_acc"])

    schedule = {"name": "linear-warmup-cosine", "lr": args.lr, "min_lr": args.min_lr, "warmup": args.warmup_steps,
                "total": total}
    try:
        step, spots_seen, last_metrics = train_steps(
            run=run, d=d, device=device, model=model, optimizer=optimizer, params=params, gen=gen, args=args,
            total=total, step=step, spots_seen=spots_seen, n_sums=3, n_mean=1, micro_step=micro_step, metrics=metrics,
            position=lambda: consumed["position"], checkpoint_state={"stage": STAGE, "schedule": schedule},
            after_step=model.clamp_logit_scale, on_metrics=show, on_step=on_step)
    finally:
        stream.close()  # stops the reader thread (and the loader's decoding pool) now, not at interpreter exit

    prov = base.provenance
    marks = "+".join(m for m in ("V", "L", "G") if m in (str(prov.extra.get("marks") or "V").split("+") + ["G"]))
    model.config.extra.update({
        "base": prov.name, "base_hub_id": prov.hub_id, "base_revision": prov.revision,
        "base_weights_sha256": prov.weights_sha256, "license": prov.license or "other",
        "commercial": prov.commercial, "marks": marks, "genes_fingerprint": vocabulary_fingerprint(genes),
        "gene_ranking": flavor})
    info = {
        "stage": STAGE, "method": "contrastive", "steps": step, "total_steps": total, "spots_seen": spots_seen * d.world,
        "base": {"model": args.model, "name": prov.name, "hub_id": prov.hub_id, "revision": prov.revision,
                 "weights_sha256": prov.weights_sha256, "license": prov.license, "marks": prov.extra.get("marks")},
        "genes": {"n": len(genes), "ranking": flavor, "sample": min(args.hvg_sample, loader.n_spots),
                  "fingerprint": vocabulary_fingerprint(genes)},
        "data": {**data_info(corpus, args.data, loader.n_spots), "paired": True},
        "train": {k: v for k, v in asdict(args).items()
                  if k in ("embed_dim", "batch_size", "grad_accum", "lr", "min_lr", "warmup_steps", "weight_decay",
                           "betas", "eps", "clip_norm", "epochs", "seed", "max_steps", "n_hvgs")}
        | {"world_size": d.world, "optimizer": "Adam"},
        "final_metrics": {k: v for k, v in last_metrics.items() if v is not None and k != "step"},
        "license": "other", "marks": marks,
    }
    from stamp.cards import write_finetuned_card

    return finish_run(run, info, d=d, model=model, tokenizer=inputs, write_card=write_finetuned_card)


def read_run_args(out) -> dict:
    return contract.read_run_args(out, SPEC)


__all__ = ["FinetuneArgs", "finetune", "select_genes", "build_model", "ExpressionPairedLoader", "SPEC", "STAGE",
           "METHODS", "read_run_args"]
