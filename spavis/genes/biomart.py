"""Rebuild the human gene table from Ensembl BioMart (pybiomart), for users with network.

The refreshed table is written next to, never over, the pinned package table: builds stay
reproducible unless a user opts in with SPAVIS_GENE_TABLE=<file> (read by load_gene_table).
BioMart has no previous-symbol attribute, so previous symbols are carried over from the
pinned (HGNC-derived) table for genes whose Ensembl id is unchanged.
"""
from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

import pandas as pd

from spavis.errors import BiomartError, SpavisError  # noqa: F401
from spavis.genes.table import TABLE_COLUMNS, TABLE_PATH, load_gene_table

DEFAULT_URL = "http://www.ensembl.org/biomart/martservice"
MART = "ENSEMBL_MART_ENSEMBL"
DATASET = "hsapiens_gene_ensembl"
ATTRIBUTES = ["ensembl_gene_id", "external_gene_name", "gene_biotype", "chromosome_name",
              "external_synonym"]



def biomart_url() -> str:
    """$SPAVIS_BIOMART_URL (read at call time so tests and mirrors can redirect it)."""
    return os.environ.get("SPAVIS_BIOMART_URL", DEFAULT_URL)


def default_refresh_path() -> Path:
    root = Path(os.environ.get("SPAVIS_CACHE") or Path.home() / ".cache" / "spavis")
    return root / "genes" / "human_genes_biomart.tsv.gz"


def _import_pybiomart():
    """Import pybiomart without its import-time side effect: it installs a global requests
    cache (.pybiomart.sqlite in the working directory) that would cache every request the
    process makes, Hub downloads included."""
    import requests_cache

    install = requests_cache.install_cache
    requests_cache.install_cache = lambda *a, **k: None
    try:
        import pybiomart
        from pybiomart.mart import Mart
    finally:
        requests_cache.install_cache = install
    return pybiomart, Mart


def fetch_biomart_genes(url: str | None = None) -> tuple[pd.DataFrame, str]:
    """Query BioMart for human genes + synonyms. Returns (rows, mart database name)."""
    import requests

    pybiomart, Mart = _import_pybiomart()
    url = url or biomart_url()
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BiomartError(f"SPAVIS_BIOMART_URL={url!r} is not an http(s) URL; "
                           f"use e.g. {DEFAULT_URL}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = f"{parts.scheme}://{parts.hostname}"
    try:
        server = pybiomart.Server(host=host, path=parts.path or "/biomart/martservice", port=port,
                                  use_cache=False)
        if MART not in server.marts:
            raise BiomartError(f"{url}: BioMart registry has no {MART} mart; check SPAVIS_BIOMART_URL")
        listed = server.marts[MART]
        # Talk to the server we were given (the registry names the public host and port 80).
        mart = Mart(name=MART, database_name=listed.database_name, display_name=listed.display_name,
                    host=server.host, path=server.path, port=server.port, use_cache=False)
        if DATASET not in mart.datasets:
            raise BiomartError(f"{url}: mart {MART} has no dataset {DATASET}")
        rows = mart[DATASET].query(attributes=ATTRIBUTES, use_attr_names=True)
    except BiomartError:
        raise
    except (requests.RequestException, pybiomart.base.BiomartException, KeyError, ValueError) as exc:
        raise BiomartError(f"Ensembl BioMart at {url} failed: {exc}. Check the network or set "
                           "SPAVIS_BIOMART_URL to a reachable mirror (e.g. "
                           "http://useast.ensembl.org/biomart/martservice)") from exc
    missing = [a for a in ATTRIBUTES if a not in rows.columns]
    if missing or rows.empty:
        raise BiomartError(f"{url}: BioMart answer lacks {missing or 'rows'}; the query may have been cut off")
    return rows, listed.database_name


def _chromosome(name: str) -> str:
    """Ensembl '1'/'MT' -> GENCODE style 'chr1'/'chrM'; scaffolds unchanged."""
    if name == "MT":
        return "chrM"
    if name.isdigit() or name in ("X", "Y"):
        return f"chr{name}"
    return name


def table_from_biomart(rows: pd.DataFrame) -> pd.DataFrame:
    """BioMart rows (one per gene x synonym) -> gene table with the pinned table's columns."""
    rows = rows[ATTRIBUTES].astype("string").fillna("").astype(object)
    rows = rows[~rows["chromosome_name"].str.startswith(("CHR_", "HSCHR"))]  # primary assembly only
    genes = rows.drop_duplicates("ensembl_gene_id").set_index("ensembl_gene_id")
    table = pd.DataFrame({
        "ensembl_id": genes.index,
        "symbol": genes["external_gene_name"].to_numpy(),
        "biotype": genes["gene_biotype"].to_numpy(),
        "chromosome": genes["chromosome_name"].map(_chromosome).to_numpy(),
    })
    table["symbol_primary"] = table["symbol"].ne("") & ~table["symbol"].duplicated(keep=False)
    pinned = load_gene_table(TABLE_PATH).genes.set_index("ensembl_id")["previous_symbols"]
    table["previous_symbols"] = table["ensembl_id"].map(pinned).fillna("")
    syn = rows[rows["external_synonym"] != ""]
    symbol_of = dict(zip(table["ensembl_id"], table["symbol"]))
    prev_of = dict(zip(table["ensembl_id"], table["previous_symbols"].str.split("|")))
    keep = [s != symbol_of.get(e) and s not in prev_of.get(e, ())
            for e, s in zip(syn["ensembl_gene_id"], syn["external_synonym"])]
    aliases = syn[keep].groupby("ensembl_gene_id")["external_synonym"].agg(
        lambda s: "|".join(sorted(set(s))))
    table["aliases"] = table["ensembl_id"].map(aliases).fillna("")
    return table.sort_values("ensembl_id", kind="stable").reset_index(drop=True)[TABLE_COLUMNS]


def refresh_gene_table(out: str | Path | None = None, *, url: str | None = None) -> tuple[Path, int, str]:
    """Fetch, convert and atomically write a refreshed table. Returns (path, n_genes, mart release)."""
    from spavis.format.io import atomic_write_bytes
    from spavis.genes.build_table import table_bytes

    rows, release = fetch_biomart_genes(url)
    table = table_from_biomart(rows)
    path = Path(out) if out else default_refresh_path()
    atomic_write_bytes(path, table_bytes(table))
    return path, len(table), release
