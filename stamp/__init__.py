"""stamp: STAMP encoders trained on spavis shards (gene encoder; image encoder to come)."""
from __future__ import annotations

__version__ = "0.1.0"


def __getattr__(name: str):
    lazy = {
        "GeneTokenizer": ("stamp.tokenizer", "GeneTokenizer"),
        "StampGeneEncoder": ("stamp.model", "StampGeneEncoder"),
        "StampConfig": ("stamp.model", "StampConfig"),
        "StampModel": ("stamp.multimodal", "StampModel"),
        "list_pretrained": ("stamp.registry", "list_pretrained"),
        "create_model": ("stamp.registry", "create_model"),
    }
    if name in lazy:
        import importlib

        module, attr = lazy[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'stamp' has no attribute {name!r}")
