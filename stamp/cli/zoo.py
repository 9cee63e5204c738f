"""``stamp models`` (the catalogue table, ``set-means``) and ``stamp convert`` (released checkpoint -> this layout)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

COLUMNS = ("name", "kind", "dim", "parameters", "license", "commercial", "gated", "cached", "hub_id")


def _millions(n) -> str:
    if not n:
        return "?"
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def register(app) -> None:
    """Add ``stamp models`` (+ ``set-means``) and ``stamp convert`` to a typer app."""
    import typer

    from stamp.cli._common import err_console, friendly_errors

    models_app = typer.Typer(help="The model zoo: list the catalogue, register the released means once.",
                             no_args_is_help=False)

    @models_app.callback(invoke_without_command=True)
    @friendly_errors
    def models_cmd(
        ctx: typer.Context,
        kind: Optional[str] = typer.Option(None, "--kind", help="Only image or gene encoders (aligned models count "
                                                               "as both)."),
        as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON (one object per model)."),
    ) -> None:
        """List the zoo: name, kind, dim, parameters, licence, commercial use, gated, cached (load with --model NAME)."""
        if ctx.invoked_subcommand is not None:
            return
        import json

        from stamp.zoo.catalogue import catalogue_notes
        from stamp.errors import UsageError
        from stamp.zoo.resolve import model_table

        if kind not in (None, "image", "gene", "aligned"):
            raise UsageError(f"--kind {kind!r}: use image, gene or aligned")
        rows = model_table(kind)
        if as_json:
            print(json.dumps(rows, indent=1))
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(title="stamp model zoo", show_lines=False)
        for col in COLUMNS:
            table.add_column(col)
        for row in rows:
            values = dict(row, parameters=_millions(row.get("parameters")))
            if row.get("means") == "needed":
                values["cached"] = f"{row['cached']} (means needed)"
            table.add_row(*(str(values.get(c, "")) for c in COLUMNS))
        Console(width=200).print(table)
        for name, why in catalogue_notes().items():
            err_console.print(f"not in the zoo: {name}: {why}", soft_wrap=True)

    @models_app.command("set-means")
    @friendly_errors
    def set_means_cmd(
        name: str = typer.Argument(..., help="Catalogue name (stamp-v1, stamp-v1-gene or nicheformer)."),
        file: Path = typer.Argument(..., help="The means file: the released Visium_mean.npy (stamp-v1), a "
                                              "technology-mean .npy of Nicheformer's repository (nicheformer)."),
    ) -> None:
        """Register a model's gene means once; --model NAME then works in every command without --means."""
        from stamp.zoo.resolve import set_means

        out = set_means(name, file)
        err_console.print(f"means for {name} kept in {out}; --model {name} needs no --means from now on")

    @models_app.command("load")
    @friendly_errors
    def load_cmd(
        source: str = typer.Argument(..., help="Catalogue name, run / model folder or Hub repo id."),
        weights: Optional[Path] = typer.Option(None, "--weights", help="Weights file or folder downloaded by hand "
                                                                       "(gated or offline use)."),
        means: Optional[Path] = typer.Option(None, "--means", help="Released gene means file (if not set once)."),
        kind: Optional[str] = typer.Option(None, "--kind", help="image or gene: one side of an aligned model."),
        revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision."),
    ) -> None:
        """Load a model once (download, convert, check strictly) and print what it is as JSON."""
        import json

        from stamp.zoo.factory import load

        enc = load(source, device="cpu", means=means, kind=kind, weights=weights, revision=revision)
        print(json.dumps({"name": enc.name, "kind": enc.kind, "embed_dim": enc.embed_dim,
                          "transform": repr(enc.transform) if enc.transform is not None else None,
                          "provenance": enc.provenance.to_dict()}, indent=1))

    app.add_typer(models_app, name="models")

    @app.command("convert")
    @friendly_errors
    def convert_cmd(
        source: str = typer.Argument(..., help="Released checkpoint: a file (.bin/.pt/.ckpt/.safetensors) or a "
                                               "Hub repo id (downloads the registry entry's file)."),
        out: Path = typer.Option(..., "--out", help="Output folder (config.json, model.safetensors, tokenizer, card)."),
        from_format: str = typer.Option("stamp-released", "--from", help="Source format: stamp-released."),
        name: str = typer.Option("stamp-v1", "--name", help="Registry entry giving the architecture "
                                                           "(stamp-v1: full model, stamp-v1-gene: gene encoder)."),
        means: Optional[Path] = typer.Option(None, "--means", help="The released means file (Visium_mean.npy): "
                                                                   "included in the output's tokenizer files and "
                                                                   "registered once for --model NAME."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out folder."),
        revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision (repo id sources)."),
    ) -> None:
        """Convert the authors' released STAMP checkpoint into this project's layout; prints the mapping."""
        from stamp.zoo.catalogue import get_pretrained
        from stamp.zoo.convert import SOURCE_FORMATS, ConvertError, convert_released
        from stamp.hub_access import download_file, is_repo_id

        if from_format not in SOURCE_FORMATS:
            raise ConvertError(f"--from {from_format!r}: supported source formats are {', '.join(SOURCE_FORMATS)}")
        entry = get_pretrained(name)
        if entry.library != "stamp" or not entry.file:
            raise ConvertError(f"--name {name}: a {entry.library} encoder loads as is (--model {name}); only "
                               "released STAMP checkpoints are converted")
        path, source_id = Path(source).expanduser(), None
        if not path.exists() and is_repo_id(source):
            path = download_file(source, entry.file, revision=revision,
                                 terms_url=entry.page if source == entry.hub_id else None)
            source_id = f"{source}@{path.parent.name}"
        elif path.is_dir():
            if not (path / entry.file).is_file():
                raise ConvertError(f"{path}: folder without {entry.file}; pass the checkpoint file itself")
            path = path / entry.file
        report = convert_released(path, out, name=entry, means=means, overwrite=overwrite, source_id=source_id,
                                  load_name=str(out))
        print(report.summary())
        if means is not None:
            from stamp.zoo.resolve import set_means

            set_means(entry.name, means)
        err_console.print(f"converted to {out} (load it with from_pretrained({str(out)!r}))")
