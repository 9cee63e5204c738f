"""Model classes. They know no names: ``from_pretrained`` takes a local folder (``RUN`` or
``RUN/model``) or a Hub repo id; catalogue names (``stamp-v1``, ``uni`` ...) go through the zoo
(:func:`stamp.load`, :func:`stamp.create_model`). Nothing here imports :mod:`stamp.zoo`.

* :mod:`~stamp.models.gene_encoder`: STAMP's gene encoder (``StampGeneEncoder``, ``StampConfig``);
* :mod:`~stamp.models.vision`: STAMP's pathology image encoder (timm ViT + pretext token);
* :mod:`~stamp.models.aligned_model`: ``StampModel`` (both encoders in one embedding space);
* :mod:`~stamp.models.alignment`: its four contrastive losses;
* :mod:`~stamp.models.foundation`: timm / transformers wrappers for the zoo's image encoders;
* :mod:`~stamp.models.pixels`: two-stage image preprocessing (uint8 resize in loader workers,
  normalise on the device);
* :mod:`~stamp.models.abmil`: gated-attention MIL for whole slides.
"""
from __future__ import annotations

from spavis.format.lazy import lazy_exports

_LAZY = {
    "StampGeneEncoder": "stamp.models.gene_encoder", "StampConfig": "stamp.models.gene_encoder",
    "StampModel": "stamp.models.aligned_model", "StampModelConfig": "stamp.models.aligned_model",
    "VisionEncoder": "stamp.models.vision", "VisionConfig": "stamp.models.vision",
    "GatedABMIL": "stamp.models.abmil",
}
__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
