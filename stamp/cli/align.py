"""``stamp pretrain --stage align`` and ``stamp embed --modality/--images``: thin wrappers.

The ``pretrain`` command (``stamp/cli/pretrain.py``) owns the options; with ``--stage align``
(or ``--resume`` of an align run) it hands its parsed parameters to :func:`run_align`, which
keeps only the options given on the command line and lets :class:`stamp.training.align.AlignArgs`
supply the stage's own defaults (batch 256, gradient accumulation 2, weight decay 1e-3 ...),
so the gene stages' defaults never leak into stage 3. With ``--resume`` the options given are
laid over the run's (``RUN/train_args.json``), and the run contract refuses any that changed.
"""
from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import typer

from stamp.cli._common import err_console

ALIGN_OPTIONS = ("vision", "vision_weights", "freeze_gene", "freeze_vision", "embed_dim", "epochs",
                 "gather_with_grad", "loader_threads")  # pretrain options only stage 3 reads
ALIGN_API_ONLY = ("stage", "extra")  # AlignArgs fields with no option of their own
GENE_ONLY = ("config", "mask_prob", "cgr_targets", "max_distance_um")  # pretrain options stage 3 refuses


def is_align_run(out: Path) -> bool:
    path = Path(out) / "train_args.json"
    try:
        return json.loads(path.read_text()).get("stage") == "align"
    except (OSError, ValueError):
        return False


def run_align(ctx: typer.Context) -> Path:
    """Build :class:`AlignArgs` from the options given explicitly to ``stamp pretrain`` and run it."""
    from stamp.errors import UsageError
    from stamp.training.align import AlignArgs, align, read_run_args

    params = dict(ctx.params)
    # compare by name: typer may hand out its own ParameterSource enum rather than click's
    given = {n for n in params if getattr(ctx.get_parameter_source(n), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")}
    refused = sorted(n for n in given & set(GENE_ONLY))
    if refused:
        raise UsageError(f"--{refused[0].replace('_', '-')} applies to the gene stages only, not to --stage align")
    known = {f.name for f in fields(AlignArgs)}
    kwargs = {n: params[n] for n in given if n in known and n not in ("stage",)}
    kwargs["out"] = str(params["out"])
    kwargs["progress"] = not params.get("no_progress", False)
    kwargs["resume"] = bool(params.get("resume"))
    if kwargs["resume"]:
        stored = read_run_args(params["out"])  # the run's options; those given must match them
        kwargs = {**stored, **kwargs, "stop_after": params.get("stop_after")}
    elif not params.get("data"):
        raise typer.BadParameter("--data required (a corpus built with --with-images)", param_hint="--data")
    else:
        kwargs["data"] = params["data"]
    model_dir = align(AlignArgs(**kwargs))
    err_console.print(f"model written to {model_dir}")
    return model_dir


def embed_multimodal(model: str, data: str | None, images: Path | None, out: Path, *, modality: str,
                     batch_size: int, device: str | None, progress: bool, means: Path | None = None) -> Path:
    """``stamp embed`` for StampModel folders: ``--modality gene|image|fused`` or ``--images FOLDER``."""
    from stamp.embed.multimodal import embed_image_folder, embed_paired_corpus

    if images is not None:
        path = embed_image_folder(model, images, out, batch_size=batch_size, device=device, progress=progress)
    else:
        path = embed_paired_corpus(model, data, out, modality=modality, batch_size=batch_size, device=device,
                                   progress=progress, means=means)
    err_console.print(f"embeddings written to {path}")
    return path


__all__ = ["ALIGN_OPTIONS", "run_align", "is_align_run", "embed_multimodal"]
