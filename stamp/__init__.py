"""stamp: STAMP encoders trained on spavis shards, and the zoo of the field's encoders.

Rooms (see docs/architecture.md): ``tokenizer`` (STAMP's rank tokenizer), ``models`` (model classes,
knowing no names), ``zoo`` (names -> models: catalogue, resolve, factory, convert), ``data``
(loaders), ``training`` (the run contract and the stages), ``embed`` (embeddings and their one
writer), ``slides`` (whole slides), ``evaluate`` (the paper's protocols, hest-bench, MIL),
``hub`` (publishing), ``cli``. The names below load lazily: ``import stamp`` imports no torch.
"""
from __future__ import annotations

from spavis.format.lazy import lazy_exports

__version__ = "0.1.0"


# What users call, loaded on first use so `import stamp` stays fast (no torch until needed).
_LAZY: dict[str, tuple[str, str]] = {
    "GeneTokenizer": ("stamp.tokenizer", "GeneTokenizer"),
    "StampGeneEncoder": ("stamp.models.gene_encoder", "StampGeneEncoder"),
    "StampConfig": ("stamp.models.gene_encoder", "StampConfig"),
    "StampModel": ("stamp.models.aligned_model", "StampModel"),
    "load": ("stamp.zoo.factory", "load"),
    "Encoder": ("stamp.zoo.encoder", "Encoder"),
    "list_pretrained": ("stamp.zoo.catalogue", "list_pretrained"),
    "create_model": ("stamp.zoo.factory", "create_pretrained_model"),
    "load_tokenizer": ("stamp.zoo.resolve", "load_tokenizer"),
    "pretrain": ("stamp.training.gene", "pretrain"),
    "PretrainArgs": ("stamp.training.gene", "PretrainArgs"),
    "embed_corpus": ("stamp.embed.genes", "embed_corpus"),
    "load_model": ("stamp.embed.genes", "load_model"),
    "StampError": ("stamp.errors", "StampError"),
    "open_corpus": ("spavis.format", "open_corpus"),
}
__all__ = ["__version__", *_LAZY]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, extra=("__version__",))
