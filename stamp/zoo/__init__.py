"""The zoo: names -> models. The catalogue is data (``pretrained.json`` read by
:mod:`~stamp.zoo.catalogue`, no torch); :mod:`~stamp.zoo.resolve` turns a name, run folder or
Hub id into local files (the released-means store and hashing too); :mod:`~stamp.zoo.factory`
builds and loads (``stamp.load`` -> :class:`~stamp.zoo.encoder.Encoder`);
:mod:`~stamp.zoo.convert` converts the authors' released checkpoints (cache and run folders are
named by :mod:`stamp.locations`, below the model classes, which also read run folders).

Layers, bottom to top: catalogue, encoder <- convert <- resolve <- factory.
"""
from __future__ import annotations

from spavis.format.lazy import lazy_exports

_LAZY = {
    "load": "stamp.zoo.factory", "create_model": "stamp.zoo.factory", "load_tokenizer": "stamp.zoo.resolve",
    "Encoder": "stamp.zoo.encoder", "Provenance": "stamp.zoo.encoder",
    "list_pretrained": "stamp.zoo.catalogue", "get_pretrained": "stamp.zoo.catalogue",
    "resolve_pretrained": "stamp.zoo.resolve",
}
__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
