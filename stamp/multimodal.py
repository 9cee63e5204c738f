"""Old module name of :mod:`stamp.aligned_model` (STAMP: gene encoder aligned with the image
encoder), kept so that earlier imports (``from stamp.multimodal import StampModel``) keep
working: this name IS that module (same objects)."""
import sys

from stamp import aligned_model as _aligned_model

sys.modules[__name__] = _aligned_model
