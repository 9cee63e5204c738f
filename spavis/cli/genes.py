"""`spavis genes ...`: resolve names, export vocabularies, refresh the gene table (thin wrappers)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from spavis.cli import app
from spavis.cli._common import friendly_errors

genes_app = typer.Typer(help="Human gene table, vocabularies and symbol/Ensembl resolution.",
                        no_args_is_help=True)
app.add_typer(genes_app, name="genes")
console = Console()


@genes_app.command("resolve")
@friendly_errors
def resolve_cmd(
    names: List[str] = typer.Argument(..., help="Gene symbols or Ensembl ids (version suffixes allowed)."),
    vocab: str = typer.Option("stamp-v1", "--vocab", help="Show each gene's index in this vocabulary."),
) -> None:
    """Show how names resolve: by id, approved symbol, previous symbol, alias, or ambiguous/unknown."""
    from spavis.genes import load_vocabulary, resolve

    voc = load_vocabulary(vocab)
    res = resolve(names)
    table = Table("query", "match", "ensembl_id", "symbol", f"{voc.name} index", "candidates / note")
    colors = {"id": "green", "symbol": "green", "previous": "yellow", "alias": "yellow",
              "ambiguous": "red", "unknown": "red"}
    for r in res.itertuples(index=False):
        idx = voc.index_of(r.ensembl_id) if r.ensembl_id else None
        detail = "; ".join(x for x in (r.candidates.replace("|", ", "), r.note) if x)
        table.add_row(r.query, f"[{colors[r.match]}]{r.match}[/]", r.ensembl_id, r.symbol,
                      "" if idx is None else str(idx), detail)
    console.print(table)


@genes_app.command("vocab")
@friendly_errors
def vocab_cmd(
    preset: str = typer.Argument("stamp-v1", help="Preset name (stamp-v1, gencode48-pc-mt) or vocab.json path."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write vocab.json here (default: stdout)."),
) -> None:
    """Export a vocabulary as vocab.json (index <-> Ensembl id <-> symbol)."""
    from spavis.genes import load_vocabulary

    voc = load_vocabulary(preset)
    if out is None:
        sys.stdout.write(voc.to_json())
        return
    voc.write(out)
    Console(stderr=True).print(f"{voc.name}: {len(voc):,} genes, sha256 {voc.checksum} -> {out}")


@genes_app.command("refresh")
@friendly_errors
def refresh_cmd(
    out: Optional[Path] = typer.Option(None, "--out", "-o",
                                       help="Output table (default: $SPAVIS_CACHE/genes/human_genes_biomart.tsv.gz)."),
    url: Optional[str] = typer.Option(None, "--url", help="BioMart martservice URL (default: $SPAVIS_BIOMART_URL "
                                      "or http://www.ensembl.org/biomart/martservice)."),
) -> None:
    """Rebuild the gene table from Ensembl BioMart (needs network). Use it with SPAVIS_GENE_TABLE=<file>."""
    from spavis.genes.biomart import refresh_gene_table

    path, n, release = refresh_gene_table(out, url=url)
    console.print(f"{n:,} genes from {release} -> {path}\n"
                  f"use it with: export SPAVIS_GENE_TABLE={path}")
