"""``stamp tokenize``: a thin typer wrapper over :func:`stamp.training.tokenize.tokenize_corpus`.

``register(app)`` adds the command to the ``stamp`` app (stamp/cli/__init__.py calls it);
``tokenize_corpus`` is re-exported here for code written before it moved.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from stamp.tokenizer import MEAN_COLUMNS
from stamp.training.tokenize import tokenize_corpus

__all__ = ["register", "tokenize_corpus"]


def register(app) -> None:
    """Add ``stamp tokenize`` to a typer app."""
    import typer

    from stamp.cli._common import err_console, friendly_errors, positive_int

    @app.command("tokenize")
    @friendly_errors
    def tokenize_cmd(
        data: str = typer.Option(..., "--data", help="Shard directory (spavis build-shards --out) or Hub dataset id."),
        out: Path = typer.Option(..., "--out", help="Output Parquet file (spot_id, input_ids)."),
        mean: str = typer.Option("nonzero_mean_cp10k", "--mean", help=f"Gene mean column: {' or '.join(MEAN_COLUMNS)}."),
        compat: Optional[str] = typer.Option(None, "--compat", help="'stamp-v1': reproduce the released STAMP tokenizer."),
        means: Optional[Path] = typer.Option(None, "--means", help="Means file (.npy/.csv/.txt/.parquet), one per vocabulary gene."),
        max_length: Optional[int] = typer.Option(None, "--max-length", callback=positive_int,
                                                 help="Tokens kept per spot (1500; stamp-v1: 4096)."),
    ) -> None:
        """Rank-tokenize every spot of a corpus into a Parquet file."""
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        summary = tokenize_corpus(data, out, mean=mean, compat=compat, means=means, max_length=max_length)
        err_console.print(
            f"wrote {summary['n_spots']} spots to {summary['out']} ({summary['mode']}, {summary['max_length']} tokens, "
            f"means {summary['mean_source']}); {summary['n_empty']} spots had no vocabulary gene (all padding)",
            highlight=False,
        )
