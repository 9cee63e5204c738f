"""The spavis shard format: one dependency-light package that writers and readers share.

- ``spavis.format.schema``: file names, Arrow schemas, Zarr/obsp/uns keys, geometry constants;
- ``spavis.format.corpus``: the read API (``open_corpus``, ``Corpus``, ``rows_to_csr``,
  ``iter_file_slides``), with the manifest size check done on open;
- ``spavis.format.vocabulary``: what crosses to stamp about genes and slides: the vocabulary
  fingerprint (recorded in manifest.json), the one vocabulary-equality check, ``CONDITIONS``;
- ``spavis.format.coordinates``: spot coordinates in µm from the recorded scale (slides.parquet
  ``um_per_px``), never re-derived;
- ``spavis.format.io``: atomic writes, sha256, umask-respecting file modes (standard library only);
- ``spavis.format.integrity``: a corpus copy against its manifest.json, the one Zarr store digest.

What both packages share lives here too (``stamp`` may import ``spavis.format`` only):
``spavis.format.hub`` (the Hub reader: repo-id check, one-line errors, downloads),
``spavis.format.console`` (the command-line kit of both CLIs), ``spavis.format.lazy`` (lazy package
attributes) and ``spavis.format.progress``
(every progress bar, on stderr).

It imports nothing of fetch (``spavis.sources``) or build (``spavis.shards``): ``stamp`` and
users depend on this package only. Names load lazily, so ``import spavis.format.io`` stays
free of pyarrow/scipy (the downloader uses it).
"""
from __future__ import annotations

from spavis.format.lazy import lazy_exports

__all__ = [
    "schema", "io", "vocabulary", "coordinates", "Corpus", "CorpusError", "SpavisError", "open_corpus", "rows_to_csr",
    "iter_file_slides", "EXPRESSION_COLUMNS", "decode_image",
]

_LAZY = {
    "Corpus": "spavis.format.corpus",
    "open_corpus": "spavis.format.corpus",
    "rows_to_csr": "spavis.format.corpus",
    "iter_file_slides": "spavis.format.corpus",
    "decode_image": "spavis.format.corpus",
    "EXPRESSION_COLUMNS": "spavis.format.corpus",
    "CorpusError": "spavis.errors",
    "SpavisError": "spavis.errors",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, submodules=("schema", "io", "corpus", "vocabulary", "coordinates"))
