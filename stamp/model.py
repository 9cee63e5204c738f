"""Old module name of :mod:`stamp.gene_encoder` (the STAMP gene encoder), kept so that earlier
imports (``from stamp.model import StampGeneEncoder``) and run folders keep working: this name
IS that module (same objects, so patching one patches the other)."""
import sys

from stamp import gene_encoder as _gene_encoder

sys.modules[__name__] = _gene_encoder
