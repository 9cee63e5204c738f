"""The ``stamp`` command line: thin typer wrappers over stamp's public functions."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from spavis.format.console import make_app
from stamp.cli._common import DEBUG_ENV, err_console, friendly_errors, positive_int

app = make_app("stamp", "STAMP encoders: tokenize, pretrain (gene, spatial, align), finetune, evaluate, publish, "
               "embed, models.", debug_env=DEBUG_ENV)


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
    evaluation: Optional[list[Path]] = typer.Option(None, "--eval", help="`stamp evaluate --out` folder whose "
                                                    "results go into the model card (repeatable)."),
) -> None:
    """Upload RUN/model (weights, config, tokenizer, model card) to the Hugging Face Hub, or to --local-dir."""
    from stamp.hub import PublishError, export_model, publish

    if (repo_id is None) == (local_dir is None):
        raise PublishError("pass exactly one of --repo-id ORG/NAME (Hub) or --local-dir DIR (local folder)")
    if local_dir is not None:
        path = export_model(run, local_dir, overwrite=overwrite, evaluation=evaluation or ())
        err_console.print(f"published to {path} (load it with from_pretrained({str(path)!r}))")
        return
    url = publish(run, repo_id, private=private, revision=revision, evaluation=evaluation or ())
    err_console.print(f"published {repo_id}: {url}")


@app.command("embed")
@friendly_errors
def embed_cmd(
    model: str = typer.Option(..., "--model", help="Any encoder `stamp.load` takes: a zoo / registry name (see "
                              "`stamp models`), a model folder (RUN, RUN/model) or a Hub repo id."),
    data: Optional[str] = typer.Option(None, "--data", help="Shard directory or Hub dataset id."),
    out: Path = typer.Option(..., "--out", help="Output Parquet (spot_id or image, embedding)."),
    modality: str = typer.Option("gene", "--modality", help="gene (gene or aligned model), image (image or "
                                 "aligned model) or fused (gene + image concatenated; aligned model)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Embed the image files of this folder "
                                          "(no expression; image or aligned model) instead of --data."),
    zarr: bool = typer.Option(False, "--zarr", help="Also write obsm['X_stamp'] into DATA/zarr/<slide>.zarr "
                              "(--modality gene)."),
    wait: float = typer.Option(0.0, "--wait", min=0.0, help="With --zarr: wait up to SECONDS for another "
                               "`stamp embed --zarr` writing the same corpus (default: refuse at once)."),
    batch_size: int = typer.Option(256, "--batch-size", callback=positive_int),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if present)."),
    no_progress: bool = typer.Option(False, "--no-progress"),
    means: Optional[Path] = typer.Option(None, "--means", help="Gene means file for models whose tokenizer ships "
                                         "none: the released Visium_mean.npy for stamp-v1 / stamp-v1-gene."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Weights file or folder downloaded by hand for "
                                           "a zoo name (gated or offline use)."),
) -> None:
    """One embedding per spot (gene, image or fused) or per image file, with any encoder; --zarr: all
    slides or none, one writer per corpus."""
    from stamp.embed.genes import embed_corpus
    from stamp.embed.multimodal import MODALITIES, embed_image_folder, embed_paired_corpus
    from stamp.errors import UsageError

    if modality not in MODALITIES:
        raise UsageError(f"--modality {modality!r} must be one of {', '.join(MODALITIES)}")
    if (data is None) == (images is None):
        raise UsageError("pass exactly one of --data SHARDS or --images FOLDER")
    if zarr and (images is not None or modality != "gene"):
        raise UsageError("--zarr writes spot embeddings of the gene side (--modality gene with --data); drop it")
    if weights is not None:
        import stamp

        model = stamp.load(model, weights=weights, device=device, means=means,
                           kind="image" if images is not None or modality == "image" else None)
    if images is not None:
        path = embed_image_folder(model, images, out, batch_size=batch_size, device=device,
                                  progress=not no_progress)
    elif modality != "gene":
        path = embed_paired_corpus(model, data, out, modality=modality, batch_size=batch_size, device=device,
                                   progress=not no_progress, means=means)
    else:
        path = embed_corpus(model, data, out, batch_size=batch_size, zarr=zarr, device=device,
                            progress=not no_progress, means=means, wait=wait)
    err_console.print(f"embeddings written to {path}")


# Each command module adds its commands to `app`.
from stamp.cli import evaluate as _evaluate, pretrain as _pretrain, tokenize as _tokenize, zoo as _zoo  # noqa: E402
from stamp.cli import finetune as _finetune  # noqa: E402

for _module in (_pretrain, _tokenize, _evaluate, _zoo, _finetune):
    _module.register(app)
from stamp.cli import slides as _slides  # noqa: E402  (embed-slides)

_slides.register(app)
