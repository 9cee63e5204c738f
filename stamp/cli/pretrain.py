"""``stamp pretrain``: a thin typer wrapper over :func:`stamp.training.gene.pretrain` (and, with
``--stage align``, :func:`stamp.training.align.align` through :mod:`stamp.cli.align`).

The options mirror :class:`stamp.training.gene.PretrainArgs` field by field with the same defaults
(``tests/test_robustness_stamp.py`` checks it; :data:`API_ONLY` lists the fields without an
option, :data:`RENAMED` the ones spelled differently). Numbers are checked by the shared
validators of :mod:`stamp.cli._common`. With ``--resume`` only the options given on the
command line are compared with the run's (``RUN/train_args.json``); the rest are taken from it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from stamp.cli._common import (
    err_console,
    friendly_errors,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
)

API_ONLY = ("extra",)  # PretrainArgs fields with no command-line option
RENAMED = {"progress": "no_progress"}  # field -> CLI parameter (inverted flag)
RESUME_OPTIONAL = ("stage", "data")  # required, except with --resume (then read from the run)


def _stage(value: Optional[str]) -> Optional[str]:
    from stamp.training.gene import STAGES

    if value is not None and value not in (*STAGES, "align"):
        raise typer.BadParameter(f"{value!r} is not one of {', '.join((*STAGES, 'align'))}.")
    return value


def _cgr_targets(value: str) -> str:
    if value not in ("masked", "all"):
        raise typer.BadParameter(f"{value!r} is not 'masked' or 'all'.")
    return value


def _given(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def register(app: typer.Typer) -> None:
    """Add ``stamp pretrain`` to the typer app."""

    @app.command("pretrain")
    @friendly_errors
    def pretrain_cmd(
        ctx: typer.Context,
        stage: Optional[str] = typer.Option(None, "--stage", callback=_stage,
                                            help="gene (IGR, independent spots) or spatial (IGR + CGR). "
                                                 "Required unless --resume."),
        data: Optional[str] = typer.Option(None, "--data", help="Shard directory or Hub dataset id. "
                                                                "Required unless --resume."),
        out: Path = typer.Option(..., "--out", help="Run folder (checkpoints, metrics.jsonl, model/)."),
        config: str = typer.Option("base", "--config", help="base, tiny or a config JSON file."),
        init: Optional[str] = typer.Option(None, "--init", help="Start from a run, model folder or Hub model "
                                                                "(stage 2: RUN1); its vocabulary must match."),
        max_steps: Optional[int] = typer.Option(None, "--max-steps", callback=positive_int,
                                                help="Optimizer steps (default: one pass). May change on --resume."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", callback=positive_int,
                                                 help="Spots per micro-batch and process (default 128; "
                                                      "spatial 216 = 24 groups of 9)."),
        grad_accum: int = typer.Option(1, "--grad-accum", callback=positive_int, help="Micro-batches per step."),
        lr: float = typer.Option(1e-4, "--lr", callback=positive_float, help="Peak learning rate."),
        min_lr: float = typer.Option(1e-5, "--min-lr", callback=non_negative_float,
                                     help="Learning-rate floor of the cosine schedule."),
        warmup_steps: int = typer.Option(5000, "--warmup-steps", callback=non_negative_int,
                                         help="Linear warm-up steps."),
        weight_decay: float = typer.Option(1e-4, "--weight-decay", callback=non_negative_float),
        clip_norm: float = typer.Option(1.0, "--clip-norm", callback=positive_float,
                                        help="Gradient clipping (global L2 norm)."),
        mask_prob: float = typer.Option(0.15, "--mask-prob", callback=probability,
                                        help="Share of gene tokens selected for IGR."),
        cgr_targets: str = typer.Option("masked", "--cgr-targets", callback=_cgr_targets,
                                        help="CGR scores the seed's masked positions, or 'all' (authors' code)."),
        max_distance_um: Optional[float] = typer.Option(None, "--max-distance-um", callback=positive_float,
                                                        help="D_max of a spatial group (default 400 µm)."),
        save_every: int = typer.Option(1000, "--save-every", callback=positive_int, help="Checkpoint every N steps."),
        keep_checkpoints: Optional[int] = typer.Option(3, "--keep-checkpoints", callback=positive_int,
                                                       help="Checkpoints kept (oldest removed)."),
        seed: int = typer.Option(0, "--seed", callback=non_negative_int),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint "
                                                            "(its options are reused; only --max-steps may change)."),
        stop_after: Optional[int] = typer.Option(None, "--stop-after", callback=positive_int,
                                                 help="Stop (with a checkpoint) after this step without changing "
                                                      "the schedule (preemptible jobs)."),
        device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if present)."),
        no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
        vision: Optional[str] = typer.Option(None, "--vision", help="align: uni, tiny, a vision config JSON or "
                                                                    "a UNI weights file (default uni)."),
        vision_weights: Optional[str] = typer.Option(None, "--vision-weights", help="align: trunk weights "
                                                     "(hf-hub:ORG/NAME or a file; 'none' = random init)."),
        freeze_gene: bool = typer.Option(False, "--freeze-gene", help="align: keep the gene encoder fixed."),
        freeze_vision: bool = typer.Option(False, "--freeze-vision", help="align: keep the ViT trunk fixed."),
        embed_dim: Optional[int] = typer.Option(None, "--embed-dim", callback=positive_int,
                                                help="align: shared embedding width (default 512)."),
        epochs: Optional[int] = typer.Option(None, "--epochs", callback=positive_int,
                                             help="align: passes over the paired spots (default 30)."),
        gather_with_grad: bool = typer.Option(True, "--gather-with-grad/--no-gather-with-grad",
                                              help="align: gradients also through the other ranks' embeddings "
                                                   "(the exact gradient of the global-batch loss)."),
        loader_threads: Optional[int] = typer.Option(None, "--loader-threads", callback=non_negative_int,
                                                     help="align: PNG decoding threads per process (default: "
                                                          "one per core, at most 16)."),
    ) -> None:
        """Pretrain the gene encoder (stages gene, spatial) or align it with a ViT (stage align)."""
        from stamp.cli.align import is_align_run, run_align

        if stage == "align" or (resume and stage is None and is_align_run(out)):
            run_align(ctx)
            return

        from stamp.training.gene import PretrainArgs, pretrain, read_run_args

        values = dict(stage=stage, data=data, out=str(out), config=config, init=init, max_steps=max_steps,
                      batch_size=batch_size, grad_accum=grad_accum, lr=lr, min_lr=min_lr, warmup_steps=warmup_steps,
                      weight_decay=weight_decay, clip_norm=clip_norm, mask_prob=mask_prob, cgr_targets=cgr_targets,
                      max_distance_um=max_distance_um, save_every=save_every, keep_checkpoints=keep_checkpoints,
                      seed=seed, resume=resume, stop_after=stop_after, device=device, progress=not no_progress)
        if resume:
            given = {name for name in values  # options typed on the command line (or set through the env)
                     if _given(ctx, RENAMED.get(name, name))}
            stored = read_run_args(out)
            merged = {**stored, **{k: v for k, v in values.items() if k in given},
                      "out": str(out), "resume": True, "stop_after": stop_after, "progress": not no_progress}
            args = PretrainArgs(**merged)
        else:
            missing = [f"--{n}" for n in RESUME_OPTIONAL if values[n] is None]
            if missing:
                raise typer.BadParameter(f"{' and '.join(missing)} required (unless --resume continues a run)")
            args = PretrainArgs(**values)
        model_dir = pretrain(args)
        err_console.print(f"model written to {model_dir}")
