"""The ``stamp`` command line: thin typer wrappers over stamp.train / stamp.hub / stamp.embed."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from stamp.cli._common import err_console, friendly_errors

app = typer.Typer(name="stamp", help="STAMP gene encoder: tokenize, pretrain, publish, embed.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)


@app.command("pretrain")
@friendly_errors
def pretrain_cmd(
    stage: str = typer.Option(..., "--stage", help="gene (IGR, independent spots) or spatial (IGR + CGR)."),
    data: str = typer.Option(..., "--data", help="Shard directory or Hub dataset id."),
    out: Path = typer.Option(..., "--out", help="Run folder (checkpoints, metrics.jsonl, model/)."),
    config: str = typer.Option("base", "--config", help="base, tiny or a config JSON file."),
    init: Optional[str] = typer.Option(None, "--init", help="Start from a run or model folder (stage 2: RUN1)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Optimizer steps (default: one pass)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Spots per micro-batch and process "
                                             "(default 128; spatial 216 = 24 groups of 9)."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per optimizer step."),
    lr: float = typer.Option(1e-4, "--lr", help="Peak learning rate."),
    min_lr: float = typer.Option(1e-5, "--min-lr", help="Learning-rate floor of the cosine schedule."),
    warmup_steps: int = typer.Option(5000, "--warmup-steps", help="Linear warm-up steps."),
    weight_decay: float = typer.Option(1e-4, "--weight-decay"),
    clip_norm: float = typer.Option(1.0, "--clip-norm", help="Gradient clipping (global L2 norm)."),
    save_every: int = typer.Option(1000, "--save-every", help="Checkpoint every N steps."),
    seed: int = typer.Option(0, "--seed"),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    stop_after: Optional[int] = typer.Option(None, "--stop-after", help="Stop (with a checkpoint) after this "
                                             "step without changing the schedule (preemptible jobs)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
) -> None:
    """Pretrain the gene encoder (run it under `torchrun` for several GPUs or nodes)."""
    from stamp.train import PretrainArgs, pretrain

    args = PretrainArgs(stage=stage, data=data, out=str(out), config=config, init=init, max_steps=max_steps,
                        batch_size=batch_size, grad_accum=grad_accum, lr=lr, min_lr=min_lr,
                        warmup_steps=warmup_steps, weight_decay=weight_decay, clip_norm=clip_norm,
                        save_every=save_every, seed=seed, resume=resume, stop_after=stop_after,
                        progress=not no_progress)
    model_dir = pretrain(args)
    err_console.print(f"model written to {model_dir}")


@app.command("publish")
@friendly_errors
def publish_cmd(
    run: Path = typer.Argument(..., help="Run folder (or its model/ folder)."),
    repo_id: Optional[str] = typer.Option(None, "--repo-id", help="Hub model repo, ORG/NAME."),
    local_dir: Optional[Path] = typer.Option(
        None, "--local-dir", help="Publish to this local folder instead of the Hub (same files)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="With --local-dir: replace an existing folder."),
    private: bool = typer.Option(False, "--private"),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch to push to."),
) -> None:
    """Upload RUN/model (weights, config, tokenizer, model card) to the Hugging Face Hub, or to --local-dir."""
    from stamp.hub import PublishError, export_model, publish

    if (repo_id is None) == (local_dir is None):
        raise PublishError("pass exactly one of --repo-id ORG/NAME (Hub) or --local-dir DIR (local folder)")
    if local_dir is not None:
        path = export_model(run, local_dir, overwrite=overwrite)
        err_console.print(f"published to {path} (load it with from_pretrained({str(path)!r}))")
        return
    url = publish(run, repo_id, private=private, revision=revision)
    err_console.print(f"published {repo_id}: {url}")


@app.command("embed")
@friendly_errors
def embed_cmd(
    model: str = typer.Option(..., "--model", help="Model folder (RUN, RUN/model) or Hub repo id."),
    data: str = typer.Option(..., "--data", help="Shard directory or Hub dataset id."),
    out: Path = typer.Option(..., "--out", help="Output Parquet (spot_id, embedding)."),
    zarr: bool = typer.Option(False, "--zarr", help="Also write obsm['X_stamp'] into DATA/zarr/<slide>.zarr."),
    batch_size: int = typer.Option(256, "--batch-size"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if present)."),
    no_progress: bool = typer.Option(False, "--no-progress"),
) -> None:
    """One embedding per spot (mean of the last layer over the spot's gene tokens)."""
    from stamp.embed import embed_corpus

    path = embed_corpus(model, data, out, batch_size=batch_size, zarr=zarr, device=device,
                        progress=not no_progress)
    err_console.print(f"embeddings written to {path}")


from stamp.cli.tokenize import register as _register_tokenize  # noqa: E402

_register_tokenize(app)


from stamp.cli.zoo import register as _register_zoo  # noqa: E402

_register_zoo(app)

