"""The spavis shard format: one dependency-light module that writers and readers share.

``spavis.format.schema`` holds the file names, Arrow schemas and keys; ``spavis.format.corpus``
is the read API (``open_corpus``). It imports nothing of fetch (``spavis.sources``) or build
(``spavis.shards``): ``stamp`` and users depend on this package only.
"""
from __future__ import annotations

from spavis.format import schema
from spavis.format.corpus import (
    EXPRESSION_COLUMNS,
    Corpus,
    CorpusError,
    SpavisError,
    open_corpus,
    rows_to_csr,
)

__all__ = [
    "schema", "Corpus", "CorpusError", "SpavisError", "open_corpus", "rows_to_csr", "EXPRESSION_COLUMNS",
]
