"""Hub access for corpora published as Hugging Face datasets: downloads and one-line errors.

Why one module: ``open_corpus("org/name")``, ``spavis publish`` and ``spavis validate
org/name`` must read the same endpoint (``HF_ENDPOINT`` at call time, so tests and mirrors
work after import) and turn huggingface_hub's many exception types into one clear line:
gated dataset without access, missing repo, missing revision, missing file, no network.
Tokens come from huggingface_hub (``HF_TOKEN`` or ``hf auth login``) and are never printed.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from spavis.errors import CorpusError

REPO_TYPE = "dataset"
DEFAULT_ENDPOINT = "https://huggingface.co"


def looks_like_repo_id(text: str) -> bool:
    """``org/name`` (not a path such as ``./x``, ``/x`` or ``~/x``)."""
    parts = str(text).split("/")
    return len(parts) == 2 and all(parts) and not str(text).startswith((".", "/", "~"))


def endpoint() -> str:
    """The Hub URL (``HF_ENDPOINT`` read now, not at import)."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def api(token: str | bool | None = None):
    """An ``HfApi`` on :func:`endpoint`; ``token=None`` lets huggingface_hub find the user's token."""
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint(), token=token)


def _refs_hint(repo_id: str) -> str:
    try:
        refs = api().list_repo_refs(repo_id, repo_type=REPO_TYPE)
    except Exception:  # the hint is optional; the error below stands on its own
        return ""
    names = [b.name for b in refs.branches] + [t.name for t in refs.tags]
    if not names:
        return ""
    shown = ", ".join(names[:8]) + (", …" if len(names) > 8 else "")
    return f" (it has: {shown})"


def hub_error(exc: BaseException, repo_id: str, revision: str | None = None, *,
              path: str | None = None, cls: type[Exception] = CorpusError) -> Exception:
    """One clear line for a failed Hub call on dataset ``repo_id`` (an instance of ``cls``)."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    page = f"{endpoint()}/datasets/{repo_id}"
    rev = revision or "main"
    if isinstance(exc, GatedRepoError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        why = ("your token has not been granted access" if status == 403
               else "no Hugging Face token was sent")
        return cls(f"{repo_id} is a gated dataset and {why}: accept its terms at {page}, then run "
                   "`hf auth login` (or set HF_TOKEN) and try again.")
    if isinstance(exc, RevisionNotFoundError):
        return cls(f"{repo_id} has no revision {rev!r}{_refs_hint(repo_id)}; pass an existing branch, tag "
                   "(published builds are tagged build-<build_key>) or commit id.")
    if isinstance(exc, EntryNotFoundError):
        return cls(f"{repo_id}@{rev}: {path or 'a file'} is not in the dataset; the published corpus is "
                   f"incomplete: check it with `spavis validate {repo_id} --revision {rev}`.")
    if isinstance(exc, RepositoryNotFoundError):
        return cls(f"{repo_id}: no such dataset on {endpoint()} (or it is private: run `hf auth login` or set "
                   "HF_TOKEN with a token that can read it).")
    if isinstance(exc, LocalEntryNotFoundError):
        return cls(f"{repo_id}: cannot reach the Hub at {endpoint()} and the files are not cached; check your "
                   "network (or unset HF_HUB_OFFLINE).")
    if isinstance(exc, HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        if status == 401:
            return cls(f"{repo_id}: the Hub refused the request (HTTP 401); run `hf auth login` or set HF_TOKEN.")
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        return cls(f"{repo_id}: the Hub answered HTTP {status} ({first}); try again later or check {page}.")
    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return cls(f"{repo_id}: cannot talk to the Hub at {endpoint()} ({type(exc).__name__}: {first}); "
               "check your network and the dataset id.")


def snapshot(repo_id: str, revision: str | None, patterns: Sequence[str]) -> Path:
    """Download only ``patterns`` of dataset ``repo_id`` into the shared HF cache; the snapshot folder."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo_id=repo_id, repo_type=REPO_TYPE, revision=revision,
                                 allow_patterns=list(patterns), endpoint=endpoint())
    except Exception as exc:  # huggingface_hub raises many types; name the repo and the fix
        raise hub_error(exc, repo_id, revision) from None
    return Path(path)


def download(repo_id: str, revision: str | None, path: str) -> Path:
    """One file of dataset ``repo_id`` at ``revision`` (a commit id keeps it in the same snapshot)."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, path, repo_type=REPO_TYPE, revision=revision, endpoint=endpoint()))
    except Exception as exc:
        raise hub_error(exc, repo_id, revision, path=path) from None
