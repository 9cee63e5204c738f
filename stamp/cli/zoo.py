"""``stamp models`` (the registry table) and ``stamp convert`` (released checkpoint -> this layout)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional


def register(app) -> None:
    """Add ``stamp models`` and ``stamp convert`` to a typer app."""
    import typer

    from stamp.cli._common import err_console, friendly_errors

    @app.command("models")
    @friendly_errors
    def models_cmd() -> None:
        """List the named checkpoints of the model zoo (load them with from_pretrained(NAME))."""
        from rich.console import Console
        from rich.table import Table

        from stamp.registry import get_pretrained, list_pretrained

        rows = [get_pretrained(n).row() for n in list_pretrained()]
        table = Table(title="stamp model zoo", show_lines=False)
        for col in rows[0]:
            table.add_column(col)
        for row in rows:
            table.add_row(*(str(v) for v in row.values()))
        Console(width=160).print(table)

    @app.command("convert")
    @friendly_errors
    def convert_cmd(
        source: str = typer.Argument(..., help="Released checkpoint: a file (.bin/.pt/.ckpt/.safetensors) or a "
                                               "Hub repo id (downloads the registry entry's file)."),
        out: Path = typer.Option(..., "--out", help="Output folder (config.json, model.safetensors, tokenizer, card)."),
        from_format: str = typer.Option("stamp-released", "--from", help="Source format: stamp-released."),
        name: str = typer.Option("stamp-v1", "--name", help="Registry entry giving the architecture "
                                                           "(stamp-v1: full model, stamp-v1-gene: gene encoder)."),
        means: Optional[Path] = typer.Option(None, "--means", help="The released means file (Visium_mean.npy) to "
                                                                   "include in the tokenizer files (local use only)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out folder."),
        revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision (repo id sources)."),
    ) -> None:
        """Convert the authors' released STAMP checkpoint into this project's layout; prints the mapping."""
        from stamp.convert import SOURCE_FORMATS, ConvertError, convert_released
        from stamp.registry import _download, _looks_like_repo_id, get_pretrained

        if from_format not in SOURCE_FORMATS:
            raise ConvertError(f"--from {from_format!r}: supported source formats are {', '.join(SOURCE_FORMATS)}")
        entry = get_pretrained(name)
        path, source_id = Path(source).expanduser(), None
        if not path.exists() and _looks_like_repo_id(source):
            path = _download(source, entry.file, revision=revision, token=None, cache_dir=None,
                             terms_url=entry.terms_url if source == entry.hub_id else None)
            source_id = f"{source}@{path.parent.name}"
        elif path.is_dir():
            if not (path / entry.file).is_file():
                raise ConvertError(f"{path}: folder without {entry.file}; pass the checkpoint file itself")
            path = path / entry.file
        report = convert_released(path, out, name=entry, means=means, overwrite=overwrite, source_id=source_id,
                                  load_name=str(out))
        print(report.summary())
        err_console.print(f"converted to {out} (load it with from_pretrained({str(out)!r}))")
