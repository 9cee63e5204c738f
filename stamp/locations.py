"""Where things live on disk: a run's model folder, and ``stamp``'s own cache.

* :func:`resolve_model_dir` - THE function that finds a run's model folder (``RUN`` ->
  ``RUN/model``; a folder holding ``config.json`` + ``model.safetensors`` is itself);
  :func:`model_folder_of` (unchecked) and :func:`run_folder_of` (``RUN/model`` -> ``RUN``) are
  its two readings, used by training (the ``--init`` lineage), evaluation (one model, one name)
  and the feature caches.
* :func:`stamp_cache_root` - ``$STAMP_CACHE``, else ``stamp/`` beside the Hugging Face Hub
  cache. Converted releases live in :func:`converted_cache_root`; the released means files a
  user registered once (``stamp models set-means``) in :func:`means_root`.
"""
from __future__ import annotations

import os
from pathlib import Path

from stamp.errors import PublishError

STAMP_CACHE_ENV = "STAMP_CACHE"
MODEL_SUBDIR = "model"
CONVERTED_MARKER = "conversion.json"  # written last by stamp.zoo.convert: a folder without it is incomplete


def resolve_model_dir(run_or_model: str | os.PathLike, *, need_weights: bool = True) -> Path:
    """THE function that finds a run's model folder: ``RUN`` -> ``RUN/model``; a folder that holds the
    model files is itself. ``need_weights`` (default): ``config.json`` + ``model.safetensors`` must be
    there (else one line saying how to get them); without it, the folder whose ``config.json`` exists
    (or ``run_or_model`` itself) is returned unchecked, for loaders that name the missing file."""
    path = Path(run_or_model).expanduser()
    for candidate in (path / MODEL_SUBDIR, path):
        if (candidate / "config.json").is_file() and (not need_weights or (candidate / "model.safetensors").is_file()):
            return candidate
    if not need_weights:
        return path
    raise PublishError(
        f"{path}: no model folder (config.json + model.safetensors); run `stamp pretrain ... --out {path}` "
        "to completion first, or pass the model folder itself"
    )


def model_folder_of(path: str | os.PathLike) -> Path:
    """``RUN`` -> ``RUN/model`` when that holds a config, else ``path`` (:func:`resolve_model_dir`, unchecked)."""
    return resolve_model_dir(path, need_weights=False)


def run_folder_of(path: str | os.PathLike) -> Path:
    """The run a model folder belongs to: ``RUN/model`` -> ``RUN`` (where ``run.json`` lives); ``RUN`` and any
    other folder -> itself. ``RUN`` and ``RUN/model`` name one model."""
    folder = model_folder_of(path)
    return folder.parent if folder.name == MODEL_SUBDIR else folder


def stamp_cache_root() -> Path:
    """``$STAMP_CACHE`` or ``<HF_HOME>/stamp`` (beside the Hub cache)."""
    if os.environ.get(STAMP_CACHE_ENV):
        return Path(os.environ[STAMP_CACHE_ENV]).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser().parent / "stamp"


def converted_cache_root() -> Path:
    """Where converted releases live: ``$STAMP_CACHE`` itself (as before) or ``<HF_HOME>/stamp/converted``."""
    if os.environ.get(STAMP_CACHE_ENV):
        return Path(os.environ[STAMP_CACHE_ENV]).expanduser()
    return stamp_cache_root() / "converted"


def means_root() -> Path:
    """Where ``stamp models set-means`` keeps the released means files (one per model family)."""
    return stamp_cache_root() / "means"


__all__ = ["resolve_model_dir", "model_folder_of", "run_folder_of", "MODEL_SUBDIR", "stamp_cache_root", "converted_cache_root", "means_root",
           "STAMP_CACHE_ENV", "CONVERTED_MARKER"]
