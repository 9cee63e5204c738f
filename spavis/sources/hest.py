"""HEST-1k (Hugging Face dataset ``MahmoodLab/hest``): per-sample files, never the whole repo.

Protocol: the dataset's commit is resolved once (``dataset_info``; metadata is public even
though the repo is gated) and every file is fetched at that commit with
``huggingface_hub.hf_hub_download`` (resumable ``.incomplete`` files), so one fetch is one
consistent snapshot and ``slice.json`` records it as ``revision``. Sizes and hashes come from
the Hub's ``paths-info`` (LFS oid = sha256; git blob sha1 for small files) and are checked
before a file gets its final name. Endpoint: ``HF_ENDPOINT`` read at call time.

Per sample ``<id>``: ``st/<id>.h5ad`` + ``metadata/<id>.json`` (+ ``wsis/<id>.tif`` with
images) land in ``CACHE/hest/<id>/`` with the repo layout that ``read_slice`` understands.

The helpers here (``hub_endpoint``, ``resolve_revision``, ``fetch_hub_slice``) are shared with
``spavis.sources.stimage``.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from spavis.errors import FetchError
from spavis.sources import sidecar

REPO_ID = "MahmoodLab/hest"
LICENSE = "CC BY-NC-SA 4.0 (HEST-1k)"
CITATION = ("Jaume G. et al. HEST-1k: A Dataset for Spatial Transcriptomics and Histology Image Analysis. "
            "NeurIPS 2024 Datasets and Benchmarks.")
_CONDITIONS = {"cancer": "cancer", "tumor": "cancer", "diseased": "diseased", "healthy": "healthy",
               "treated": "treated"}
_PUBLIC_ENDPOINT = "https://huggingface.co"


def hub_endpoint() -> str:
    """``HF_ENDPOINT`` at call time (huggingface_hub itself reads it only at import)."""
    return os.environ.get("HF_ENDPOINT", _PUBLIC_ENDPOINT).rstrip("/")


def dataset_page(repo_id: str) -> str:
    return f"{hub_endpoint()}/datasets/{repo_id}"


def _status(exc: BaseException) -> int | None:
    """HTTP status of a huggingface_hub error anywhere in the exception chain."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        response = getattr(exc, "response", None)
        if response is not None and getattr(response, "status_code", None):
            return int(response.status_code)
        exc = exc.__cause__ or exc.__context__
    return None


def _gated_error(repo_id: str, what: str) -> FetchError:
    return FetchError(
        f"{what}: {repo_id} is a gated dataset and this account has no access. Accept its terms on "
        f"{dataset_page(repo_id)} (logged in), then log in here with `hf auth login` or set HF_TOKEN "
        "to a token of that account, and run fetch again."
    )


def _translate(exc: BaseException, repo_id: str, what: str, url: str) -> FetchError | None:
    """Map a huggingface_hub/httpx error to a FetchError, or None when it is worth retrying."""
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    status = _status(exc)
    chain = [exc, exc.__cause__, exc.__context__]
    if any(isinstance(e, GatedRepoError) for e in chain) or status in (401, 403):
        return _gated_error(repo_id, what)
    if any(isinstance(e, RevisionNotFoundError) for e in chain):
        return FetchError(f"{what}: revision not found in {repo_id} ({url}); check SPAVIS_*_REVISION.")
    if any(isinstance(e, RepositoryNotFoundError) for e in chain):
        return FetchError(f"{what}: dataset {repo_id} not found at {hub_endpoint()} ({url}); check HF_ENDPOINT.")
    if status == 404 or any(isinstance(e, EntryNotFoundError) for e in chain):
        return FetchError(f"{what}: {url} was not found (HTTP 404); the id may be wrong or not in {repo_id}.")
    if status is not None and status != 429 and 400 <= status < 500:
        return FetchError(f"{what}: {url} answered HTTP {status}.")
    return None


def _retrying(call: Callable[[], Any], *, repo_id: str, what: str, url: str) -> Any:
    """Run a Hub call; retry connection errors, 5xx and 429 with backoff (download.RetryPolicy)."""
    from spavis.sources.download import RetryPolicy

    policy = RetryPolicy.from_env()
    for attempt in range(1, policy.attempts + 1):
        try:
            return call()
        except FetchError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified below
            fatal = _translate(exc, repo_id, what, url)
            if fatal is not None:
                raise fatal from None
            if attempt >= policy.attempts:
                raise FetchError(f"{what}: {url} failed after {attempt} attempts ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''}). Run fetch again to resume.") from None
            retry_after = None
            response = getattr(exc, "response", None)
            if response is not None and response.headers.get("Retry-After", "").isdigit():
                retry_after = float(response.headers["Retry-After"])
            time.sleep(policy.delay(attempt, retry_after))
    raise AssertionError("unreachable")


def resolve_revision(repo_id: str, revision: str = "main") -> str:
    """The commit sha a branch/tag of a dataset points to now."""
    from huggingface_hub import HfApi

    url = f"{hub_endpoint()}/api/datasets/{repo_id}/revision/{revision}"
    info = _retrying(lambda: HfApi(endpoint=hub_endpoint()).dataset_info(repo_id, revision=revision),
                     repo_id=repo_id, what=repo_id, url=url)
    return str(info.sha)


@dataclass(frozen=True)
class RemoteFile:
    """What the Hub publishes about one file: size and sha256 (LFS) or git blob sha1."""

    path: str
    size: int
    sha256: str | None
    git_oid: str


def remote_files(repo_id: str, paths: Sequence[str], revision: str, *, what: str) -> dict[str, RemoteFile]:
    """``paths-info`` for many files (100 per request); missing files are absent from the result."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    api = HfApi(endpoint=hub_endpoint())
    out: dict[str, RemoteFile] = {}
    url = f"{hub_endpoint()}/api/datasets/{repo_id}/paths-info/{revision}"
    for i in range(0, len(paths), 100):
        chunk = list(paths[i:i + 100])
        infos = _retrying(lambda: api.get_paths_info(repo_id, chunk, revision=revision, repo_type="dataset"),
                          repo_id=repo_id, what=what, url=url)
        for f in infos:
            if isinstance(f, RepoFile):
                out[f.path] = RemoteFile(f.path, int(f.size), f.lfs.sha256 if f.lfs else None, f.blob_id)
    return out


def _hash(path: Path) -> tuple[str, str]:
    """(sha256, git blob sha1) of a file, streamed."""
    sha = hashlib.sha256()
    git = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            sha.update(block)
            git.update(block)
    return sha.hexdigest(), git.hexdigest()


def _resolve_url(repo_id: str, path: str, revision: str) -> str:
    return f"{hub_endpoint()}/datasets/{repo_id}/resolve/{revision}/{path}"


def fetch_hub_file(repo_id: str, remote: RemoteFile, folder: sidecar.SliceFolder, revision: str, *,
                   label: str, expected: str | None = None) -> dict[str, Any]:
    """Fetch one file into ``folder`` (skip if already verified); return its slice.json entry.

    hf_hub_download writes below the hidden ``folder/.hf`` (its ``.incomplete`` files resume);
    the file is moved to its final name only after size + hash checks. ``expected`` is a
    manifest checksum ('md5:<hex>' or 'sha256:<hex>').
    """
    from huggingface_hub import hf_hub_download

    final = folder.path / remote.path
    url = _resolve_url(repo_id, remote.path, revision)
    known = folder.known(remote.path)
    if (final.is_file() and final.stat().st_size == remote.size and known.get("size") == remote.size
            and (remote.sha256 is None or known.get("sha256") == remote.sha256)
            and (folder.record or {}).get("revision") == revision):
        return {"size": remote.size, "sha256": known["sha256"], "md5": known.get("md5"), "url": url}

    staging = folder.path / ".hf"
    got = _retrying(lambda: hf_hub_download(repo_id, remote.path, repo_type="dataset", revision=revision,
                                            endpoint=hub_endpoint(), local_dir=staging),
                    repo_id=repo_id, what=label, url=url)
    got = Path(got)
    sha, git_oid = _hash(got)
    md5 = None
    problem = None
    if got.stat().st_size != remote.size:
        problem = f"size {got.stat().st_size} bytes, the Hub lists {remote.size}"
    elif remote.sha256 is not None and sha != remote.sha256:
        problem = f"sha256 {sha}, the Hub lists {remote.sha256}"
    elif remote.sha256 is None and git_oid != remote.git_oid:
        problem = f"git oid {git_oid}, the Hub lists {remote.git_oid}"
    elif expected:
        algo, _, want = expected.partition(":")
        if algo == "md5":
            md5 = hashlib.md5(got.read_bytes()).hexdigest()
            actual = md5
        else:
            actual = sha
        if actual != want.lower():
            problem = f"{algo} {actual}, the manifest lists {want}"
    if problem:
        got.unlink(missing_ok=True)
        raise FetchError(f"{label}: {url}: checksum/size mismatch ({problem}); the file was removed. "
                         "Run fetch again; if it persists the dataset changed: update the manifest.")
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(got, final)
    return {"size": remote.size, "sha256": sha, "md5": md5, "url": url}


def fetch_hub_slice(*, repo_id: str, source: str, slide_id: str, files: Sequence[str],
                    remote: dict[str, RemoteFile], revision: str, cache: Path,
                    fields: Callable[[Path], dict[str, Any]], checksums: dict[str, str] | None = None,
                    precheck: Callable[[Path], None] | None = None) -> Path:
    """Fetch ``files`` of one slice under a lock and write its slice.json last.

    ``precheck(folder)`` runs after the first file (e.g. metadata) and may refuse the slice
    before the big files download; ``fields(folder)`` returns the sidecar fields (organ,
    species, …) once all files are there.
    """
    sidecar.check_slide_id(slide_id)
    for name in files:
        if name not in remote:
            raise FetchError(f"{slide_id}: {_resolve_url(repo_id, name, revision)} was not found (HTTP 404) in "
                             f"{repo_id}@{revision[:10]}; check the id against {dataset_page(repo_id)}.")
    with sidecar.slice_folder(cache, source, slide_id) as folder:
        entries = {}
        for k, name in enumerate(files):
            entries[name] = fetch_hub_file(repo_id, remote[name], folder, revision, label=slide_id,
                                           expected=(checksums or {}).get(name))
            if k == 0 and precheck is not None:
                precheck(folder.path)
        if folder.record:  # keep files of an earlier fetch (e.g. images) still present
            for name, meta in folder.record.get("files", {}).items():
                if name not in entries and (folder.path / name).is_file():
                    entries[name] = meta
        meta = fields(folder.path)
        sidecar.write_sidecar(folder.path, slide_id=slide_id, source=source, revision=revision,
                              files=entries, repository=f"{hub_endpoint()}/datasets/{repo_id}", **meta)
    return folder.final


def _pool_map(func: Callable[[Any], Path], items: Sequence[Any], workers: int) -> list[Path]:
    """Run per-slice fetches concurrently; raise the first error after all finished."""
    if workers <= 1 or len(items) <= 1:
        return [func(x) for x in items]
    results: list[Path | None] = [None] * len(items)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = func(items[i])
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="spavis-hub") as pool:
        list(pool.map(run, range(len(items))))
    if errors:
        raise next((e for e in errors if isinstance(e, FetchError)), errors[0])
    return [r for r in results if r is not None]


# --------------------------------------------------------------------------- HEST
def _str(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and value != value):
        return None
    text = str(value).strip()
    return text or None


def sidecar_fields(sample_id: str, metadata: dict[str, Any], row: Any | None) -> dict[str, Any]:
    """slice.json fields from the manifest row (preferred) or HEST's metadata/<id>.json."""
    species = _str(metadata.get("species")) or (row.species if row is not None else None) or "unknown"
    if species != "Homo sapiens":
        raise FetchError(f"{sample_id}: HEST lists species {species!r}; spavis builds human corpora only. "
                         "Pick a Homo sapiens sample (see manifests/hest-v1.csv).")
    if row is not None:
        return {"accession": list(row.accession) or [sample_id], "organ": row.organ, "species": species,
                "condition": row.condition, "technology": row.technology, "license": row.license,
                "citation": row.citation, "data_path": f"st/{sample_id}.h5ad"}
    title, link = _str(metadata.get("dataset_title")), _str(metadata.get("study_link"))
    return {
        "accession": [sample_id], "organ": (_str(metadata.get("organ")) or "unknown").lower(), "species": species,
        "condition": _CONDITIONS.get((_str(metadata.get("disease_state")) or "").lower(), "unknown"),
        "technology": _str(metadata.get("st_technology")) or "Visium",
        "license": _str(metadata.get("license")) or LICENSE,
        "citation": "; ".join(x for x in (title, link) if x) + f" (via {CITATION})",
        "data_path": f"st/{sample_id}.h5ad",
    }


def fetch_slices(ids: Sequence[str], rows: Sequence[Any], *, cache: Path, workers: int = 4,
                 with_images: bool = False) -> list[Path]:
    """Fetch HEST samples by id (e.g. ``TENX152``) and/or manifest rows into ``CACHE/hest/<id>/``."""
    targets: dict[str, Any] = {}
    for i in ids:
        targets.setdefault(i.strip(), None)
    for row in rows:
        targets[row.slide_id] = row
    if not targets:
        return []
    revision = resolve_revision(REPO_ID, os.environ.get("SPAVIS_HEST_REVISION", "main"))

    def files_of(sid: str) -> list[str]:
        names = [f"metadata/{sid}.json", f"st/{sid}.h5ad"]  # metadata first: species is checked on it
        return names + ([f"wsis/{sid}.tif"] if with_images else [])

    wanted = [name for sid in targets for name in files_of(sid)]
    remote = remote_files(REPO_ID, wanted, revision, what=f"{REPO_ID} ({len(targets)} samples)")

    def one(sid: str) -> Path:
        row = targets[sid]

        def fields(folder: Path) -> dict[str, Any]:
            try:
                metadata = json.loads((folder / f"metadata/{sid}.json").read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise FetchError(f"{sid}: metadata/{sid}.json is unreadable ({exc}); delete "
                                 f"{folder} and fetch again.") from None
            return sidecar_fields(sid, metadata if isinstance(metadata, dict) else {}, row)

        checks = dict(row.checksums) if row is not None else {}
        return fetch_hub_slice(repo_id=REPO_ID, source="hest", slide_id=sid, files=files_of(sid), remote=remote,
                               revision=revision, cache=Path(cache), fields=fields, checksums=checks,
                               precheck=lambda folder: fields(folder) and None)

    return _pool_map(one, list(targets), workers)


__all__ = ["REPO_ID", "fetch_slices", "fetch_hub_slice", "hub_endpoint", "remote_files", "resolve_revision"]
