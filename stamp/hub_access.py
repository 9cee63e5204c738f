"""The one module of ``stamp`` that talks to the Hugging Face Hub for reading.

One repo-id check (:func:`check_repo_id`, huggingface_hub's own validator), one translator of
Hub failures into one line (:func:`hub_error`: gated -> "accept the terms at <page>, then
`hf auth login`"; missing repo / file; offline; HTTP), and the two downloads every loader uses
(:func:`download_file`, :func:`snapshot`). Models (the factory, tokenizers, model classes'
``from_pretrained`` hooks) and the conversion all come here; publishing (``stamp.hub``) too.

The corpus side (``spavis.format.hub``) has its own reader; a shared translator would belong in
``spavis.format`` (stamp may import it, spavis may not import stamp): this module's
:func:`hub_error` is written so that it can move there unchanged (it takes ``repo_type``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from stamp.errors import PretrainedError


def is_repo_id(text: Any) -> bool:
    """``ORG/NAME`` that huggingface_hub accepts (and not an existing local path)."""
    from huggingface_hub.utils import validate_repo_id

    text = str(text)
    if text.count("/") != 1 or text.startswith((".", "~", "/")) or Path(text).expanduser().exists():
        return False
    try:
        validate_repo_id(text)
    except Exception:  # HFValidationError
        return False
    return True


def check_repo_id(text: Any, *, what: str = "model") -> str:
    """``text`` if it is a valid Hub repo id, else one :class:`PretrainedError` line saying why."""
    from huggingface_hub.utils import validate_repo_id

    text = str(text)
    if text.count("/") != 1:
        raise PretrainedError(f"{text!r} is neither a local {what} folder nor a Hub repo id (ORG/NAME); check the "
                              "path (a run folder, its model/ folder), the name (`stamp models`) or the repo id")
    try:
        validate_repo_id(text)
    except Exception as exc:  # HFValidationError: '..', '--', bad characters, too long
        reason = str(exc).strip().splitlines()[0].rstrip(".")
        raise PretrainedError(f"{text!r} is not a valid Hub repo id ({reason}); use ORG/NAME with letters, digits, "
                              "'-', '_' and '.' (no '..' or '--')") from None
    return text


def hub_page(repo_id: str, repo_type: str = "model") -> str:
    from huggingface_hub import constants

    prefix = {"model": "", "dataset": "datasets/", "space": "spaces/"}[repo_type]
    return f"{constants.ENDPOINT.rstrip('/')}/{prefix}{repo_id}"


def hub_error(repo_id: str, exc: BaseException, terms_url: str | None = None, *, repo_type: str = "model",
              filename: str | None = None, revision: str | None = None) -> PretrainedError:
    """One clear line for any Hub failure (gated, missing repo / revision / file, offline, HTTP, network)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, HFValidationError,
                                        LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)

    page = terms_url or hub_page(repo_id, repo_type)
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, HFValidationError):
        return PretrainedError(f"{repo_id!r} is not a valid Hub repo id; use ORG/NAME")
    if isinstance(exc, GatedRepoError) or status == 403:
        return PretrainedError(f"{repo_id} is gated: accept its terms at {page}, then `hf auth login` (or set HF_TOKEN) "
                               "with that account; offline, pass --weights FILE or a folder downloaded by hand")
    if isinstance(exc, RevisionNotFoundError):
        return PretrainedError(f"{repo_id} has no revision {revision!r} on the Hub; check --revision")
    if isinstance(exc, RepositoryNotFoundError) or status == 401:
        return PretrainedError(f"{repo_id}: {repo_type} repository not found (or not readable); check the id, and if it is "
                               f"gated or private accept its terms at {page} and `hf auth login`")
    if isinstance(exc, LocalEntryNotFoundError):
        reason = ("offline mode (HF_HUB_OFFLINE=1) and not in the cache" if constants.HF_HUB_OFFLINE
                  else "the Hub cannot be reached")
        return PretrainedError(f"{repo_id}: not a local folder and cannot be fetched from {constants.ENDPOINT} "
                               f"({reason}); connect or set HF_ENDPOINT, or pass a local folder / --weights FILE "
                               "downloaded by hand")
    if isinstance(exc, EntryNotFoundError):
        return PretrainedError(f"{repo_id}: the repo has no {filename or 'such file'}{_files_hint(repo_id, repo_type)}; "
                               "pass --weights FILE, or a catalogue overlay ($STAMP_REGISTRY) naming the right file")
    if isinstance(exc, HfHubHTTPError):
        return PretrainedError(f"{repo_id}: the Hub answered HTTP {status}; retry later or check HF_ENDPOINT")
    return PretrainedError(f"{repo_id}: download failed ({type(exc).__name__}: {str(exc)[:160]}); check the "
                           "network and HF_ENDPOINT")


def _files_hint(repo_id: str, repo_type: str) -> str:
    """`` (it holds: a.bin, b.ckpt)`` - the repo's weight-like files, when they can be listed."""
    try:
        from huggingface_hub import HfApi

        files = [f for f in HfApi().list_repo_files(repo_id, repo_type=repo_type)
                 if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".safetensors"))]
    except Exception:  # listing is a courtesy: any failure drops the hint
        return ""
    return f" (it holds: {', '.join(files[:8])})" if files else " (it holds no weights file)"


def download_file(repo_id: str, filename: str, *, revision: str | None = None, token: str | None = None,
                  cache_dir: str | os.PathLike | None = None, terms_url: str | None = None) -> Path:
    """One file of a model repo (cached by huggingface_hub), or one :class:`PretrainedError` line."""
    from huggingface_hub import hf_hub_download

    check_repo_id(repo_id)
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, token=token, cache_dir=cache_dir,
                                    etag_timeout=5))
    except Exception as exc:  # the client raises many types (HTTP, connection, validation)
        raise hub_error(repo_id, exc, terms_url, filename=filename, revision=revision) from None


def snapshot(repo_id: str, *, revision: str | None = None, token: str | None = None,
             cache_dir: str | os.PathLike | None = None, allow_patterns: list[str] | None = None,
             terms_url: str | None = None) -> Path:
    """A local snapshot of a Hub model repo (one metadata request, no retry loop when offline)."""
    from huggingface_hub import snapshot_download

    check_repo_id(repo_id)
    try:
        return Path(snapshot_download(str(repo_id), repo_type="model", revision=revision, token=token,
                                      cache_dir=cache_dir, allow_patterns=allow_patterns, etag_timeout=5))
    except Exception as exc:
        raise hub_error(str(repo_id), exc, terms_url, revision=revision) from None


def first_file(repo_id: str, filenames: list[str], **kwargs: Any) -> Path:
    """The first of ``filenames`` the repo holds (e.g. model.safetensors, then pytorch_model.bin)."""
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    last: PretrainedError | None = None
    for name in filenames:
        try:
            return download_file(repo_id, name, **kwargs)
        except PretrainedError as exc:
            cause = exc.__context__
            if not isinstance(cause, EntryNotFoundError) or isinstance(cause, LocalEntryNotFoundError):
                raise
            last = exc
    raise PretrainedError(f"{repo_id}: holds none of {', '.join(filenames)}{_files_hint(repo_id, 'model')}; pass "
                          "--weights FILE") from (last.__context__ if last else None)


__all__ = ["PretrainedError", "is_repo_id", "check_repo_id", "hub_error", "hub_page", "download_file", "snapshot",
           "first_file"]
