"""``stamp.train_align``: the align stage's names where code written before :mod:`stamp.training`
finds them. The code lives in :mod:`stamp.training.align`."""
from __future__ import annotations

from stamp.training.align import (  # noqa: F401
    INVOCATION_FIELDS, PATH_FIELDS, SPEC, STAGE, AlignArgs, align, build_model, read_run_args, resume_differences,
)

__all__ = ["AlignArgs", "align", "build_model", "STAGE", "read_run_args", "resume_differences"]
