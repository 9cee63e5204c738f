"""The one Hugging Face Hub reader of both packages: repo-id check, one-line errors, downloads.

Why one module, and why here: ``open_corpus("org/name")``, ``spavis publish`` / ``validate``,
``fetch`` of Hub sources (datasets) and every model download of ``stamp`` (``stamp.hub_access``)
must read the same endpoint (``HF_ENDPOINT`` at call time, so tests and mirrors work after
import), accept the same repo ids and turn huggingface_hub's many exception types into the same
clear line: gated repo without access, missing repo, missing revision, missing file, offline,
HTTP. ``stamp`` may import ``spavis.format`` (never the reverse), so the one copy lives here.

* :func:`is_repo_id` / :func:`check_repo_id` - the one repo-id check (huggingface_hub's own
  validator; an existing local path is never a repo id);
* :func:`hub_error` - the one translator; ``cls`` picks the error class of the caller's package,
  ``fix`` adds the caller's way around the Hub (``--weights FILE``);
* :func:`download_file`, :func:`snapshot` - downloads into the shared HF cache. A file that is not
  cached is asked for once, without huggingface_hub's retry loop, so an unreachable Hub is one line
  within seconds instead of five retries over half a minute.

Tokens come from huggingface_hub (``HF_TOKEN`` or ``hf auth login``) and are never printed.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from spavis.errors import CorpusError

REPO_TYPE = "dataset"  # corpora; stamp passes repo_type="model"
DEFAULT_ENDPOINT = "https://huggingface.co"
ETAG_TIMEOUT = 10.0  # seconds for the metadata request (huggingface_hub's default)
_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
RETRIED_STATUS = (408, 429, 500, 502, 503, 504)  # answers huggingface_hub retries (transient)

__all__ = ["REPO_TYPE", "endpoint", "api", "hub_page", "is_repo_id", "check_repo_id", "hub_error", "http_status",
           "files_hint", "download_file", "snapshot"]


def endpoint() -> str:
    """The Hub URL (``HF_ENDPOINT`` read now, not at import)."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def api(token: str | bool | None = None):
    """An ``HfApi`` on :func:`endpoint`; ``token=None`` lets huggingface_hub find the user's token."""
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint(), token=token)


def hub_page(repo_id: str, repo_type: str = REPO_TYPE) -> str:
    """The repo's web page (where gated terms are accepted)."""
    return f"{endpoint()}/{_PREFIX[repo_type]}{repo_id}"


# ----------------------------------------------------------------------------- repo ids
def _shaped(text: str) -> bool:
    """``ORG/NAME``: one slash, two non-empty parts, not a relative or home path."""
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~"))


def is_repo_id(text: Any) -> bool:
    """``ORG/NAME`` that huggingface_hub accepts, and not an existing local path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    text = str(text)
    if not _shaped(text) or Path(text).expanduser().exists():
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def check_repo_id(text: Any, *, cls: type[Exception] = CorpusError, kind: str = "dataset", label: str | None = None,
                  not_an_id: str | None = None) -> str:
    """``text`` if it is a valid Hub repo id, else one ``cls`` line with huggingface_hub's reason.

    ``kind`` names the id in the message ("dataset", "repo"), ``label`` how the user gave it
    (``--repo-id 'x'``; default ``'x'``), ``not_an_id`` the line for text that is not ``ORG/NAME``.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    text = str(text)
    label = label or repr(text)
    if not _shaped(text):
        raise cls(not_an_id or f"{label} is not a Hub {kind} id; use ORG/NAME.")
    try:
        validate_repo_id(text)
    except HFValidationError as exc:  # '..', '--', bad characters, too long
        reason = " ".join(str(exc).split()).rstrip(".")
        raise cls(f"{label} is not a valid Hub {kind} id ({reason}); use ORG/NAME with letters, digits, '-', '_' "
                  "or '.' (no '--' or '..', at most 96 characters).") from None
    return text


# ----------------------------------------------------------------------------- errors
def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while exc is not None and len(out) < 8 and all(e is not exc for e in out):
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def http_status(exc: BaseException) -> int | None:
    """The HTTP status of a huggingface_hub error anywhere in the exception chain."""
    for e in _chain(exc):
        code = getattr(getattr(e, "response", None), "status_code", None)
        if code:
            return int(code)
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else ""


def _refs_hint(repo_id: str, repo_type: str) -> str:
    """`` (it has: main, v1)`` - the repo's branches and tags, when they can be listed."""
    try:
        refs = api().list_repo_refs(repo_id, repo_type=repo_type)
    except Exception:  # the hint is optional; the error stands on its own
        return ""
    names = [b.name for b in refs.branches] + [t.name for t in refs.tags]
    if not names:
        return ""
    return f" (it has: {', '.join(names[:8])}{', …' if len(names) > 8 else ''})"


def files_hint(repo_id: str, repo_type: str, suffixes: tuple[str, ...]) -> str:
    """`` (it holds: a.bin, b.ckpt)`` - the repo's files with these suffixes, when they can be listed."""
    try:
        files = [f for f in api().list_repo_files(repo_id, repo_type=repo_type) if f.endswith(suffixes)]
    except Exception:  # listing is a courtesy: any failure drops the hint
        return ""
    return f" (it holds: {', '.join(files[:8])})" if files else f" (it holds no {'/'.join(suffixes)} file)"


def hub_error(exc: BaseException, repo_id: str, *, repo_type: str = REPO_TYPE, revision: str | None = None,
              path: str | None = None, cls: type[Exception] = CorpusError, terms_url: str | None = None,
              fix: str | None = None, missing_fix: str | None = None,
              list_suffixes: tuple[str, ...] = ()) -> Exception:
    """One clear line (an instance of ``cls``) for a failed Hub call on ``repo_id``.

    ``fix``: the caller's way around the Hub, added where it helps (gated, offline, no answer),
    e.g. "or pass --weights FILE"; ``missing_fix`` replaces it for a file the repo lacks, and
    ``list_suffixes`` then lists the repo's files with these suffixes (the weights it does hold).
    """
    from huggingface_hub import constants
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, HFValidationError,
                                        LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    chain = _chain(exc)

    def has(*types: type) -> bool:
        return any(isinstance(e, types) for e in chain)

    noun = repo_type if repo_type in _PREFIX else "repo"
    page = terms_url or hub_page(repo_id, repo_type)
    rev = revision or "main"
    status = http_status(exc)
    also = f"; {fix}" if fix else ""
    if has(HFValidationError):
        return cls(f"{repo_id!r} is not a valid Hub {noun} id; use ORG/NAME.")
    if has(GatedRepoError) or status == 403:
        why = "your token has not been granted access" if status == 403 else "no Hugging Face token was sent"
        return cls(f"{repo_id} is gated: accept its terms at {page} ({why}), then run `hf auth login` (or set "
                   f"HF_TOKEN) with that account and try again{also}.")
    if has(RevisionNotFoundError):
        tagged = " (published builds are tagged build-<build_key>)" if repo_type == "dataset" else ""
        return cls(f"{repo_id} has no revision {rev!r}{_refs_hint(repo_id, repo_type)}; pass an existing branch, "
                   f"tag{tagged} or commit id.")
    if has(LocalEntryNotFoundError, OfflineModeIsEnabled):
        why = "offline mode, HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        return cls(f"{repo_id}: {path or 'its files'} not cached here and cannot be fetched from {endpoint()} "
                   f"({why}); connect (or unset HF_HUB_OFFLINE), or set HF_ENDPOINT to a mirror{also}.")
    if has(EntryNotFoundError) or status == 404 and not has(RepositoryNotFoundError):
        listed = files_hint(repo_id, repo_type, list_suffixes) if list_suffixes else ""
        fix_missing = missing_fix or (f"the published corpus is incomplete: check it with `spavis validate {repo_id} "
                                      f"--revision {rev}`" if repo_type == "dataset" else fix)
        return cls(f"{repo_id}@{rev}: no {path or 'such file'}{listed} in the {noun}"
                   f"{'; ' + fix_missing if fix_missing else ''}.")
    if has(RepositoryNotFoundError) or status == 401:
        return cls(f"{repo_id}: no such {noun} on {endpoint()} (not found, or it is private: run `hf auth login` "
                   "or set HF_TOKEN with a token that can read it).")
    if has(HfHubHTTPError):
        return cls(f"{repo_id}: the Hub answered HTTP {status} ({_first_line(exc)}); try again later or check "
                   f"{page}.")
    return cls(f"{repo_id}: cannot talk to the Hub at {endpoint()} ({type(exc).__name__}: {_first_line(exc)}); "
               f"check your network and HF_ENDPOINT{also}.")


# ----------------------------------------------------------------------------- downloads
def _probe(repo_id: str, filename: str, *, repo_type: str, revision: str | None, token: Any) -> None:
    """Ask for a file's metadata once, without retries: an unreachable Hub fails here in seconds.

    huggingface_hub retries a failed metadata request five times with backoff (about 25 s)
    when the file is not cached; called only then, so a cached file still loads offline.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    if constants.HF_HUB_OFFLINE:
        return  # huggingface_hub refuses at once
    url = hf_hub_url(repo_id, filename, repo_type=repo_type, revision=revision, endpoint=endpoint())
    try:
        get_hf_file_metadata(url, token=token, timeout=ETAG_TIMEOUT)
    except (HfHubHTTPError, HFValidationError) as exc:  # the Hub answered: translated as it is
        if http_status(exc) in RETRIED_STATUS:
            return  # busy or down for a moment: huggingface_hub's retries are worth it
        raise
    except Exception as exc:  # no answer (refused, DNS, timeout): what the retries would repeat
        raise LocalEntryNotFoundError(f"cannot reach {endpoint()}: {_first_line(exc)}") from exc


def download_file(repo_id: str, filename: str, *, repo_type: str = REPO_TYPE, revision: str | None = None,
                  token: str | bool | None = None, cache_dir: str | os.PathLike | None = None,
                  cls: type[Exception] = CorpusError, terms_url: str | None = None, fix: str | None = None,
                  missing_fix: str | None = None, list_suffixes: tuple[str, ...] = ()) -> Path:
    """One file of ``repo_id`` at ``revision`` (cached by huggingface_hub), or one ``cls`` line."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision,
                                        repo_type=repo_type)
        if not isinstance(cached, str):
            _probe(repo_id, filename, repo_type=repo_type, revision=revision, token=token)
        return Path(hf_hub_download(repo_id, filename, repo_type=repo_type, revision=revision, token=token,
                                    cache_dir=cache_dir, endpoint=endpoint(), etag_timeout=ETAG_TIMEOUT))
    except Exception as exc:  # huggingface_hub raises many types (HTTP, connection, validation)
        raise hub_error(exc, repo_id, repo_type=repo_type, revision=revision, path=filename, cls=cls,
                        terms_url=terms_url, fix=fix, missing_fix=missing_fix, list_suffixes=list_suffixes) from None


def snapshot(repo_id: str, *, repo_type: str = REPO_TYPE, revision: str | None = None,
             patterns: Sequence[str] | None = None, token: str | bool | None = None,
             cache_dir: str | os.PathLike | None = None, cls: type[Exception] = CorpusError,
             terms_url: str | None = None, fix: str | None = None) -> Path:
    """Download ``patterns`` (default: everything) of ``repo_id`` into the shared HF cache; the snapshot folder.

    One metadata request (``repo_info``, no retry loop when offline), then only missing files.
    """
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, revision=revision, token=token,
                                      cache_dir=cache_dir, endpoint=endpoint(), etag_timeout=ETAG_TIMEOUT,
                                      allow_patterns=list(patterns) if patterns is not None else None))
    except Exception as exc:
        raise hub_error(exc, repo_id, repo_type=repo_type, revision=revision, cls=cls, terms_url=terms_url,
                        fix=fix) from None
