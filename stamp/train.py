"""``stamp.train``: the gene stages' names where code written before :mod:`stamp.training` finds them.

The code lives in :mod:`stamp.training.gene` (``--stage gene|spatial``) and the run contract
shared by every stage in :mod:`stamp.training.run`.
"""
from __future__ import annotations

from stamp.errors import TrainingError  # noqa: F401
from stamp.training.gene import (  # noqa: F401
    INVOCATION_FIELDS, PATH_FIELDS, SPEC, STAGES, PretrainArgs, make_loader, normalize_paths, pretrain,
    read_run_args, resume_differences,
)
from stamp.training.run import (  # noqa: F401
    Dist, data_info, distributed, generated_fraction, init_distributed, lr_at, pick_device,
)

__all__ = ["PretrainArgs", "STAGES", "pretrain", "lr_at", "generated_fraction", "read_run_args",
           "normalize_paths", "resume_differences", "Dist", "distributed", "init_distributed", "pick_device",
           "make_loader", "TrainingError"]
