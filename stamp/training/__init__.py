"""Training: one run contract (:mod:`stamp.training.run`) and the stages that follow it.

* :mod:`stamp.training.run`: the run folder, path normalisation, ``--resume`` option check,
  Hub corpus pinning, vocabulary identity check, checkpoints, NaN stop, metrics, publishing;
* :mod:`stamp.training.gene`: ``--stage gene|spatial`` (:func:`pretrain`, :class:`PretrainArgs`);
* :mod:`stamp.training.align`: ``--stage align`` (:func:`align`, :class:`AlignArgs`);
* :mod:`stamp.training.tokenize`: ``tokenize_corpus`` (pre-tokenized Parquet, ``stamp tokenize``).

Beside them: :mod:`~stamp.training.objectives` (IGR / CGR losses, the module DDP wraps) and
:mod:`~stamp.training.checkpoint` (pickle-free checkpoints). Names load lazily (no torch on
``import stamp.training``).
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "pretrain": "stamp.training.gene", "PretrainArgs": "stamp.training.gene",
    "align": "stamp.training.align", "AlignArgs": "stamp.training.align",
    "tokenize_corpus": "stamp.training.tokenize",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'stamp.training' has no attribute {name!r}")
