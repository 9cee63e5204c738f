"""Errors users see. Each message names the offending file or slice and says how to fix it."""
from __future__ import annotations


class SpavisError(Exception):
    """Base class of every error spavis raises on purpose (the CLI prints these without a traceback)."""


class ReaderError(SpavisError):
    """An input slice cannot be read (missing, corrupt or unknown layout)."""


class QCError(SpavisError):
    """An input slice violates a QC rule that cannot be repaired (NaN, negative counts, empty)."""


class GeneMappingError(SpavisError):
    """Too few of a slice's features resolve to human genes."""


class NotHumanError(GeneMappingError):
    """A slice's features are not human (mouse Ensembl ids or mouse-style symbols)."""


class FetchError(SpavisError):
    """A download failed in a way retrying will not fix (404, gated, checksum, disk full)."""


class ValidationError(SpavisError):
    """A shard directory does not match its manifest or schema."""
