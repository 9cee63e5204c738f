"""Former home of the model zoo; kept so that earlier imports keep working.

The catalogue (entries as data) is :mod:`stamp.catalogue`; name -> model resolution, the
released-means store and ``create_model`` are :mod:`stamp.factory`; Hub reads and their
errors are :mod:`stamp.hub_access`; cache locations are :mod:`stamp.locations`. New code
imports from those modules.
"""
from __future__ import annotations

from stamp.catalogue import (EXTRA_REGISTRY_ENV, REGISTRY_FILE, ModelEntry, PretrainedEntry,  # noqa: F401
                             PretrainedError, get_pretrained, is_pretrained, list_pretrained)
from stamp.catalogue import vocabulary as _vocabulary  # noqa: F401
from stamp.factory import (CONVERTED_MARKER, MEANS_REQUIRED_KEY, create_model, load_tokenizer,  # noqa: F401
                           registry_path, resolve_pretrained)
from stamp.hub_access import hub_error  # noqa: F401
from stamp.hub_access import is_repo_id as _looks_like_repo_id  # noqa: F401
from stamp.locations import converted_cache_root  # noqa: F401


def _download(repo_id, filename, *, revision=None, token=None, cache_dir=None, terms_url=None,
              allow_patterns=None):
    """A file (``filename``) or a snapshot of ``repo_id`` (:mod:`stamp.hub_access`)."""
    from stamp.hub_access import download_file, snapshot

    if filename is not None:
        return download_file(repo_id, filename, revision=revision, token=token, cache_dir=cache_dir,
                             terms_url=terms_url)
    return snapshot(repo_id, revision=revision, token=token, cache_dir=cache_dir, allow_patterns=allow_patterns,
                    terms_url=terms_url)


def write_tokenizer_files(folder, entry, means=None):
    from stamp.convert import write_tokenizer_files as write

    return write(folder, entry, means)


__all__ = ["PretrainedEntry", "PretrainedError", "list_pretrained", "get_pretrained", "is_pretrained",
           "resolve_pretrained", "converted_cache_root", "hub_error", "write_tokenizer_files", "load_tokenizer",
           "registry_path", "create_model", "REGISTRY_FILE"]
