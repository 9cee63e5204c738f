"""Errors users of ``stamp`` can hit. Each message names the file / slide / repo and the fix.

``stamp`` keeps its own hierarchy (it reads spavis shards only through ``spavis.format``),
so ``except StampError`` catches every error stamp raises on purpose. Errors raised while
*reading* a corpus come from ``spavis.format``; ``stamp.cli._common.CORPUS_ERRORS`` names them and
the ``stamp`` CLI prints both kinds the same way.
"""
from __future__ import annotations

__all__ = ["StampError", "BatchingError", "DataError", "EmbedError", "PublishError"]


class StampError(Exception):
    """Base class of every error stamp raises on purpose (the CLI prints these without a traceback)."""


class BatchingError(StampError):
    """The neighbour graph of a slide cannot form spatial groups as asked."""


class DataError(StampError):
    """The corpus cannot feed the loader as configured (too few shards for the ranks, ...)."""


class EmbedError(StampError):
    """The model and the corpus do not fit together, or the output cannot be written."""


class PublishError(StampError):
    """A run cannot be published (no model folder, missing files, Hub refused)."""
