"""``stamp finetune``: a thin typer wrapper over :func:`stamp.training.finetune.finetune` (``--method
contrastive``, the paper's ‡ rows) and :func:`stamp.evaluate.adapter.stamp_con` (``--method adapter``,
STAMP_Con + BLEEP). Options left out take the protocol's defaults (the dataclasses'); with ``--resume``
the run's own options are read back and any given option must match them (the run contract)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from stamp.cli._common import err_console, friendly_errors

CONTRASTIVE_ONLY = ("weights", "n_hvgs", "hvg_sample", "embed_dim", "max_steps", "grad_accum", "weight_decay",
                    "clip_norm", "save_every", "resume", "stop_after", "loader_threads")
ADAPTER_ONLY = ("patience", "knn_k", "means")


def register(app: typer.Typer) -> None:
    @app.command("finetune")
    @friendly_errors
    def finetune_cmd(
        ctx: typer.Context,
        model: Optional[str] = typer.Option(None, "--model", help="contrastive: an image encoder of the zoo (plip, "
                                            "conch, a timm / transformers / open_clip folder or Hub repo); adapter: "
                                            "an aligned model (a STAMP model or a `stamp finetune` run)."),
        data: Optional[str] = typer.Option(None, "--data", help="Paired corpus (built with --with-images)."),
        out: Path = typer.Option(..., "--out", help="contrastive: the run folder (RUN/model is an aligned model); "
                                 "adapter: the results folder."),
        method: str = typer.Option("contrastive", "--method", help="contrastive (ST-supervised fine-tuning of the "
                                   "image encoder, the ‡ rows) or adapter (STAMP_Con + BLEEP, leave one slide out)."),
        weights: Optional[str] = typer.Option(None, "--weights", help="The base encoder's weights downloaded by "
                                              "hand (gated or offline)."),
        n_hvgs: int = typer.Option(1500, "--n-hvgs", min=1, help="contrastive: genes of the gene projection "
                                   "(highly variable); adapter: target genes (default 5000)."),
        hvg_sample: int = typer.Option(50_000, "--hvg-sample", min=1, help="Paired spots the genes are ranked on."),
        embed_dim: int = typer.Option(32, "--embed-dim", min=1, help="Width of the shared space."),
        epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Epochs (contrastive 15, adapter 20)."),
        max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, help="Optimizer steps (default: epochs "
                                                "over the corpus)."),
        batch_size: int = typer.Option(256, "--batch-size", min=1),
        grad_accum: int = typer.Option(1, "--grad-accum", min=1),
        lr: Optional[float] = typer.Option(None, "--lr", min=0.0, help="Learning rate (contrastive: Adam 5e-5; "
                                           "adapter: AdamW 1e-3)."),
        weight_decay: float = typer.Option(0.2, "--weight-decay", min=0.0),
        clip_norm: float = typer.Option(1e9, "--clip-norm", min=0.0, help="Gradient clipping (default: none)."),
        patience: int = typer.Option(5, "--patience", min=1, help="adapter: early-stopping patience (epochs)."),
        knn_k: int = typer.Option(50, "--knn-k", min=1, help="adapter: references of BLEEP's query."),
        means: Optional[Path] = typer.Option(None, "--means", help="adapter: gene means file for models that ship "
                                             "none (stamp-v1)."),
        seed: int = typer.Option(0, "--seed"),
        save_every: int = typer.Option(1000, "--save-every", min=1),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in --out (same options)."),
        stop_after: Optional[int] = typer.Option(None, "--stop-after", min=1, help="Stop (checkpointed) after this "
                                                 "many steps; --resume continues."),
        device: Optional[str] = typer.Option(None, "--device"),
        loader_threads: int = typer.Option(0, "--loader-threads", min=0),
        no_progress: bool = typer.Option(False, "--no-progress"),
    ) -> None:
        """Fine-tune an image encoder with spatial transcriptomics (the ‡ rows), or adapt an aligned model
        (STAMP_Con + BLEEP expression prediction)."""
        from stamp.errors import UsageError

        given = {n for n in ctx.params
                 if getattr(ctx.get_parameter_source(n), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")}
        if method == "adapter":
            wrong = sorted(given & set(CONTRASTIVE_ONLY) - {"n_hvgs"})
            if wrong:
                raise UsageError(f"--{wrong[0].replace('_', '-')} belongs to --method contrastive")
            if not model or not data:
                raise UsageError("--method adapter needs --model (an aligned model) and --data (a paired corpus)")
            from stamp.evaluate.adapter import AdapterOptions, stamp_con

            opts = AdapterOptions(epochs=epochs or 20, patience=patience, lr=1e-3 if lr is None else lr,
                                  batch_size=batch_size, knn_k=knn_k, n_hvgs=n_hvgs if "n_hvgs" in given else 5000,
                                  seed=seed, device=device)
            stamp_con(model, data, out, options=opts, means=means, progress=not no_progress)
            from stamp.evaluate.results import table1_section

            err_console.print(f"results written to {out / 'results.md'} and {out / 'results.csv'}")
            print(table1_section((out / "results.md").read_text()) or (out / "results.md").read_text())
            return
        if method != "contrastive":
            raise UsageError(f"--method {method!r}: choose contrastive or adapter")
        wrong = sorted(given & set(ADAPTER_ONLY))
        if wrong:
            raise UsageError(f"--{wrong[0].replace('_', '-')} belongs to --method adapter")
        from dataclasses import fields

        from stamp.training.finetune import FinetuneArgs, finetune, read_run_args

        known = {f.name for f in fields(FinetuneArgs)}
        kwargs = {n: ctx.params[n] for n in given if n in known and n not in ("out",)}
        kwargs.update(out=str(out), progress=not no_progress, resume=resume, stop_after=stop_after)
        if resume:
            kwargs = {**read_run_args(out), **kwargs}
        elif not model or not data:
            raise UsageError("stamp finetune needs --model (an image encoder) and --data (a paired corpus)")
        path = finetune(FinetuneArgs(**kwargs))
        err_console.print(f"model written to {path} (an aligned model: stamp embed / stamp evaluate --model {out})")
