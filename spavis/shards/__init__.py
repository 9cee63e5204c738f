"""Build, check and describe a corpus: ``build_shards``, ``validate``, ``info`` and their parts.

Names are loaded on first use (PEP 562), so ``import spavis.shards.config`` (what the CLI
needs for its defaults) does not import the readers, anndata and pyarrow.
"""
from __future__ import annotations

import sys
import types
from typing import Any

from spavis.format.lazy import lazy_exports

_LAZY = {
    "BuildConfig": "spavis.shards.config",
    "DEFAULT_MAX_SPOTS_PER_SHARD": "spavis.shards.config",
    "build_shards": "spavis.shards.builder",
    "is_up_to_date": "spavis.shards.builder",
    "SliceInput": "spavis.shards.discover",
    "discover_inputs": "spavis.shards.discover",
    "info": "spavis.shards.info",
    "prepare_slice": "spavis.shards.prepare",
    "subset": "spavis.shards.subset",
    "SubsetResult": "spavis.shards.subset",
    "ValidationReport": "spavis.shards.validate",
    "validate": "spavis.shards.validate",
    "plan_shards": "spavis.shards.write",
    "write_corpus": "spavis.shards.write",
    "write_corpus_in_order": "spavis.shards.write",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)


class _Package(types.ModuleType):
    """Keeps ``spavis.shards.validate`` / ``.info`` / ``.subset`` the functions once their submodules load.

    Importing a submodule binds it on the package under its name; for the three functions
    named like their modules that binding is skipped, so ``from spavis.shards import validate``
    is the function whatever was imported before (as with eager imports).
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("validate", "info", "subset") and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
