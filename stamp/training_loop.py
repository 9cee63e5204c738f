"""``stamp.training_loop``: the former name of the run contract, now :mod:`stamp.training.run`."""
from __future__ import annotations

from stamp.training.run import (  # noqa: F401
    append_metrics, corpus_licenses, finish_run, reduce_step_sums, resume_state, save_checkpoint,
    stop_if_not_finite, truncate_metrics, write_model_dir,
)

__all__ = ["append_metrics", "corpus_licenses", "finish_run", "reduce_step_sums", "resume_state", "save_checkpoint",
           "stop_if_not_finite", "truncate_metrics", "write_model_dir"]
