"""How ``stamp`` reads model repos from the Hugging Face Hub: the shared reader, with models' words.

The repo-id check, the translation of Hub failures into one line and the downloads are the ones
of :mod:`spavis.format.hub` (shared by both packages; ``stamp`` may import ``spavis.format``).
This module only fixes what is particular to models: ``repo_type="model"``, the error class
(:class:`PretrainedError`), the way around the Hub that every message offers (``--weights FILE``)
and, for a missing weights file, the weight-like files the repo does hold (:func:`first_file`).
Models (the factory, tokenizers, model classes' ``from_pretrained`` hooks) and the conversion
all come here; publishing (``stamp.hub``) checks its repo id here too.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from spavis.format import hub as _hub
from spavis.format.hub import is_repo_id
from stamp.errors import PretrainedError

REPO_TYPE = "model"
FIX = "or pass --weights FILE (or a folder downloaded by hand)"
MISSING_FIX = "pass --weights FILE, or a catalogue overlay ($STAMP_REGISTRY) naming the right file"
WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".safetensors")


def check_repo_id(text: Any, *, what: str = "model") -> str:
    """``text`` if it is a valid Hub repo id, else one :class:`PretrainedError` line saying why."""
    return _hub.check_repo_id(
        text, cls=PretrainedError, kind="repo",
        not_an_id=f"{str(text)!r} is neither a local {what} folder nor a Hub repo id (ORG/NAME); check the path "
                  "(a run folder, its model/ folder), the name (`stamp models`) or the repo id")


def download_file(repo_id: str, filename: str, *, revision: str | None = None, token: str | None = None,
                  cache_dir: str | os.PathLike | None = None, terms_url: str | None = None) -> Path:
    """One file of a model repo (cached by huggingface_hub), or one :class:`PretrainedError` line."""
    check_repo_id(repo_id)
    return _hub.download_file(repo_id, filename, repo_type=REPO_TYPE, revision=revision, token=token,
                              cache_dir=cache_dir, cls=PretrainedError, terms_url=terms_url, fix=FIX,
                              missing_fix=MISSING_FIX, list_suffixes=WEIGHT_SUFFIXES)


def snapshot(repo_id: str, *, revision: str | None = None, token: str | None = None,
             cache_dir: str | os.PathLike | None = None, allow_patterns: list[str] | None = None,
             terms_url: str | None = None) -> Path:
    """A local snapshot of a Hub model repo (one metadata request, no retry loop when offline)."""
    check_repo_id(repo_id)
    return _hub.snapshot(str(repo_id), repo_type=REPO_TYPE, revision=revision, patterns=allow_patterns, token=token,
                         cache_dir=cache_dir, cls=PretrainedError, terms_url=terms_url, fix=FIX)


def first_file(repo_id: str, filenames: list[str], **kwargs: Any) -> Path:
    """The first of ``filenames`` the repo holds (e.g. model.safetensors, then pytorch_model.bin)."""
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    for name in filenames:
        try:
            return download_file(repo_id, name, **kwargs)
        except PretrainedError as exc:
            cause = exc.__context__
            if not isinstance(cause, EntryNotFoundError) or isinstance(cause, LocalEntryNotFoundError):
                raise
    raise PretrainedError(f"{repo_id}: holds none of {', '.join(filenames)}"
                          f"{_hub.files_hint(repo_id, REPO_TYPE, WEIGHT_SUFFIXES)}; pass --weights FILE")


__all__ = ["PretrainedError", "is_repo_id", "check_repo_id", "download_file", "snapshot", "first_file"]
