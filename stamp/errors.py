"""Every error class ``stamp`` raises on purpose. Each message names the file / slide / repo and the fix.

``stamp`` keeps its own hierarchy (it reads spavis shards only through ``spavis.format``),
so ``except StampError`` catches every error stamp raises on purpose. Errors raised while
*reading* a corpus come from ``spavis.format`` (``SpavisError``s such as ``CorpusError``) and
the ``stamp`` CLI prints both kinds the same way (one line, no traceback; ``--debug`` or
``STAMP_DEBUG=1`` shows it).
"""
from __future__ import annotations

__all__ = [
    "StampError", "BatchingError", "DataError", "EmbedError", "PublishError", "TrainingError",
    "ModelConfigError", "TokenizerError", "ModelNotFoundError", "UsageError", "PretrainedError", "ConvertError",
    "VisionWeightsError", "RegionGridError", "SlideError", "BagError", "EvaluateError",
]


class StampError(Exception):
    """Base class of every error stamp raises on purpose (the CLI prints these without a traceback)."""


class BatchingError(StampError):
    """The neighbour graph of a slide cannot form spatial groups as asked."""


class DataError(StampError):
    """The corpus cannot feed the loader as configured (too few shards for the ranks, fewer spots
    than one batch, no spatial group within D_max ...)."""


class EmbedError(StampError):
    """The model and the corpus do not fit together, or the output cannot be written."""


class PublishError(StampError):
    """A run cannot be published (no model folder, missing files, Hub refused)."""


class TrainingError(StampError):
    """Pretraining cannot start or continue (bad run folder, changed options on resume, diverged loss)."""


class ModelConfigError(StampError):
    """A model config name, file or value is unusable."""


class TokenizerError(StampError):
    """Bad tokenizer input: means file of the wrong length, unknown mode, negative counts."""


class ModelNotFoundError(StampError):
    """A model id is neither a local model folder nor a reachable Hugging Face Hub repo."""


class UsageError(StampError):
    """A command-line value is out of range (lr <= 0, --max-steps 0, batch size < 1 ...)."""


class EvaluateError(StampError):
    """An evaluation cannot run as asked (no such label column, too few labelled spots, ...)."""


class PretrainedError(ModelNotFoundError):
    """A model name / repo / folder cannot be resolved, is gated, or its catalogue entry is broken."""


class VisionWeightsError(StampError):
    """Vision trunk weights cannot be fetched or do not fit the architecture."""


class RegionGridError(ModelConfigError):
    """The region's token grid cannot be pooled into the 3 x 3 cells the CSP objective needs."""


class ConvertError(StampError):
    """The released checkpoint cannot be read safely or does not match the expected layout."""


class SlideError(StampError):
    """A slide cannot be read or tiled (unknown format, no scale, truncated file, no tissue)."""


class BagError(StampError):
    """A feature bag folder or a labels table cannot be used (unknown slides, empty bags, bad folds)."""
