"""Imported once by the build's fork server, so forked workers start with everything loaded.

The modules a worker needs (readers, harmonization, QC, graph, Zarr and Parquet writers), the
gene table and the default vocabulary (its ids already resolved: ~0.35 s a worker would pay on
its first slice) are loaded here once instead of in every worker. The table's symbol lookups (~0.7 s) are not
built here: slices keyed by Ensembl ids (Space Ranger output) never need them; a worker builds
them on its first symbol-keyed slice.
"""
import os

from spavis._warnings import ROUTE_ENV, route_warnings

if os.environ.get(ROUTE_ENV):  # started by the CLI: workers print warnings as one line too
    route_warnings()

from spavis.genes import harmonize  # noqa: F401, E402
from spavis.genes.table import load_gene_table  # noqa: E402
from spavis.readers import read_slice  # noqa: F401, E402
from spavis.shards import prepare, write  # noqa: F401, E402
from spavis.shards.config import DEFAULT_VOCAB  # noqa: E402


def _warm() -> None:
    """The gene table, the default vocabulary and its ids resolved (the features of most slices)."""
    table = load_gene_table()
    vocab = prepare.resolve_vocab(DEFAULT_VOCAB)
    vocab.checksum  # noqa: B018  (computed once, here)
    table.resolve(list(vocab.ensembl_ids))


try:
    _warm()
except Exception:  # a broken table or vocabulary is reported by the worker that needs it, with its own message
    pass
