"""Imported once by the build's fork server, so forked workers start with everything loaded.

The modules a worker needs (readers, harmonization, QC, graph, Zarr and Parquet writers) and
the gene table with its symbol indexes (~1.5 s to build, needed as soon as one feature is
not an Ensembl id) are loaded here once instead of in every worker.
"""
from spavis.genes import harmonize  # noqa: F401
from spavis.genes.table import load_gene_table
from spavis.readers import read_slice  # noqa: F401
from spavis.shards import prepare, write  # noqa: F401


def _warm() -> None:
    table = load_gene_table()
    for name in ("_approved", "_approved_ambiguous", "_previous", "_alias", "_upper"):
        getattr(table, name, None)


try:
    _warm()
except Exception:  # a broken table is reported by the worker that needs it, with its own message
    pass
