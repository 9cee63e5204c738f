"""stamp: STAMP encoders trained on spavis shards (gene encoder; image encoder to come)."""
from __future__ import annotations

__version__ = "0.1.0"


# What users call, loaded on first use so `import stamp` stays fast (no torch until needed).
_LAZY: dict[str, tuple[str, str]] = {
    "GeneTokenizer": ("stamp.tokenizer", "GeneTokenizer"),
    "StampGeneEncoder": ("stamp.gene_encoder", "StampGeneEncoder"),
    "StampConfig": ("stamp.gene_encoder", "StampConfig"),
    "StampModel": ("stamp.aligned_model", "StampModel"),
    "load": ("stamp.factory", "load"),
    "Encoder": ("stamp.encoder", "Encoder"),
    "list_pretrained": ("stamp.catalogue", "list_pretrained"),
    "create_model": ("stamp.factory", "create_pretrained_model"),
    "load_tokenizer": ("stamp.factory", "load_tokenizer"),
    "pretrain": ("stamp.training.gene", "pretrain"),
    "PretrainArgs": ("stamp.training.gene", "PretrainArgs"),
    "embed_corpus": ("stamp.embed", "embed_corpus"),
    "load_model": ("stamp.embed", "load_model"),
    "StampError": ("stamp.errors", "StampError"),
    "open_corpus": ("spavis.format", "open_corpus"),
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'stamp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
