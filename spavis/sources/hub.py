"""Hugging Face Hub datasets as a fetch source: shared by ``hest`` and ``stimage``.

Protocol: the dataset's commit is resolved once (``dataset_info``; metadata is public even
though a repo may be gated) and every file is fetched at that commit with
``huggingface_hub.hf_hub_download`` (resumable ``.incomplete`` files), so one fetch is one
consistent snapshot and ``slice.json`` records it as ``revision``. Sizes and hashes come from
the Hub's ``paths-info`` (LFS oid = sha256; git blob sha1 for small files) and are checked
before a file gets its final name. Endpoint: ``HF_ENDPOINT`` read at call time.

Each Hub call holds one of fetch's download slots (``spavis.sources.parallel``) and file
transfers report to fetch's one progress display, so Hub sources plug into ``fetch``
through ``plan_hub_slices`` like every other source.
"""
from __future__ import annotations

import functools
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from spavis.errors import FetchError
from spavis.format import hub as H
from spavis.format.io import hash_file
from spavis.sources import sidecar
from spavis.sources.parallel import SliceTask, slot


def hub_endpoint() -> str:
    """``HF_ENDPOINT`` at call time (huggingface_hub itself reads it only at import)."""
    return H.endpoint()


def dataset_page(repo_id: str) -> str:
    return H.hub_page(repo_id, "dataset")


def _translate(exc: BaseException, repo_id: str, what: str, path: str | None,
               revision: str | None) -> FetchError | None:
    """The one-line FetchError of a Hub failure (:func:`spavis.format.hub.hub_error`, the one translator),
    or None when it is worth retrying: no answer (connection, timeout), 5xx or 429."""
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    status = H.http_status(exc)
    if status in H.RETRIED_STATUS or (status is None and not isinstance(
            exc, (HfHubHTTPError, HFValidationError, LocalEntryNotFoundError))):  # the last: retried by the client
        return None
    line = str(H.hub_error(exc, repo_id, repo_type="dataset", revision=revision, path=path, cls=FetchError))
    return FetchError(line if what == repo_id else f"{what}: {line}")


def _retrying(call: Callable[[], Any], *, repo_id: str, what: str, url: str, path: str | None = None,
              revision: str | None = None) -> Any:
    """Run a Hub call in a download slot; retry connection errors, 5xx and 429 with backoff
    (download.RetryPolicy; the slot is released while waiting)."""
    from spavis.sources.download import RetryPolicy

    policy = RetryPolicy.from_env()
    for attempt in range(1, policy.attempts + 1):
        try:
            with slot():
                return call()
        except FetchError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified below
            fatal = _translate(exc, repo_id, what, path, revision)
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
                     repo_id=repo_id, what=repo_id, url=url, revision=revision)
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
                          repo_id=repo_id, what=what, url=url, revision=revision)
        for f in infos:
            if isinstance(f, RepoFile):
                out[f.path] = RemoteFile(f.path, int(f.size), f.lfs.sha256 if f.lfs else None, f.blob_id)
    return out


def _hash(path: Path) -> tuple[str, str]:
    """(sha256, git blob sha1) of a file, streamed."""
    sha, git = hash_file(path, hashlib.sha256(), hashlib.sha1(b"blob %d\0" % path.stat().st_size))
    return sha, git


def _resolve_url(repo_id: str, path: str, revision: str) -> str:
    return f"{hub_endpoint()}/datasets/{repo_id}/resolve/{revision}/{path}"


class _Bar:
    """What hf_hub_download's ``tqdm_class`` gets: forwards byte counts to fetch's display.

    ``done`` (a one-item list) is shared by the bars of one file's attempts, so a resumed
    attempt (``initial`` = bytes already on disk) does not count those bytes twice.
    """

    def __init__(self, bars: Any, task: Any, done: list[int], *, total: int | None = None, initial: int = 0,
                 **_: Any):
        self._bars, self._task, self._done = bars, task, done
        bars.advance(task, (initial or 0) - done[0], total)
        done[0] = initial or 0

    def update(self, n: int = 1) -> None:
        self._done[0] += n
        self._bars.advance(self._task, n, None)

    def close(self) -> None:
        pass

    def __enter__(self) -> "_Bar":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def fetch_hub_file(repo_id: str, remote: RemoteFile, folder: sidecar.SliceFolder, revision: str, *,
                   label: str, expected: str | None = None) -> dict[str, Any]:
    """Fetch one file into ``folder`` (skip if already verified); return its slice.json entry.

    hf_hub_download writes below the hidden ``folder/.hf`` (its ``.incomplete`` files resume);
    the file is moved to its final name only after size + hash checks. ``expected`` is a
    manifest checksum ('md5:<hex>' or 'sha256:<hex>').
    """
    from huggingface_hub import hf_hub_download

    from spavis.format.progress import transfers

    final = folder.path / remote.path
    url = _resolve_url(repo_id, remote.path, revision)
    known = folder.known(remote.path)
    if (final.is_file() and final.stat().st_size == remote.size and known.get("size") == remote.size
            and (remote.sha256 is None or known.get("sha256") == remote.sha256)
            and (folder.record or {}).get("revision") == revision):
        return {"size": remote.size, "sha256": known["sha256"], "md5": known.get("md5"), "url": url}

    staging = folder.path / ".hf"
    with transfers() as bars:
        task = bars.add(remote.path.rsplit("/", 1)[-1], remote.size)
        bar_class = functools.partial(_Bar, bars, task, [0])  # one per file, shared by its attempts
        try:
            got = _retrying(lambda: hf_hub_download(repo_id, remote.path, repo_type="dataset", revision=revision,
                                                    endpoint=hub_endpoint(), local_dir=staging,
                                                    tqdm_class=bar_class),
                            repo_id=repo_id, what=label, url=url, path=remote.path, revision=revision)
        finally:
            bars.finish(task)
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
                    precheck: bool = False) -> Path:
    """Fetch ``files`` of one slice under a lock and write its slice.json last.

    ``fields(folder)`` returns the sidecar fields (organ, species, …) once all files are
    there; with ``precheck`` it also runs after the first file (e.g. metadata), so it can
    refuse the slice before the big files download.
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
            if k == 0 and precheck:
                fields(folder.path)
        if folder.record:  # keep files of an earlier fetch (e.g. images) still present
            for name, meta in folder.record.get("files", {}).items():
                if name not in entries and (folder.path / name).is_file():
                    entries[name] = meta
        meta = fields(folder.path)
        sidecar.write_sidecar(folder.path, slide_id=slide_id, source=source, revision=revision,
                              files=entries, repository=f"{hub_endpoint()}/datasets/{repo_id}", **meta)
    return folder.final


def plan_hub_slices(ids: Sequence[str], rows: Sequence[Any], *, repo_id: str, source: str, cache: Path,
                    revision_env: str, files_of: Callable[[str], list[str]],
                    fields: Callable[[str, Any, Path], dict[str, Any]], precheck: bool = False) -> list[SliceTask]:
    """One SliceTask per id / manifest row (a row wins over a bare id of the same slice).

    Resolves the dataset revision (``$revision_env``, default ``main``) and every file's
    size/hash up front, in one ``paths-info`` pass; ``fields(slide_id, row, folder)`` gives
    each slice's sidecar fields (see ``fetch_hub_slice`` for ``precheck``).
    """
    targets: dict[str, Any] = {}
    for i in ids:
        targets.setdefault(i.strip(), None)
    for row in rows:
        targets[row.slide_id] = row
    if not targets:
        return []
    revision = resolve_revision(repo_id, os.environ.get(revision_env, "main"))
    wanted = [name for sid in targets for name in files_of(sid)]
    remote = remote_files(repo_id, wanted, revision, what=f"{repo_id} ({len(targets)} slices)")

    def task(sid: str, row: Any) -> SliceTask:
        return SliceTask(sid, lambda: fetch_hub_slice(
            repo_id=repo_id, source=source, slide_id=sid, files=files_of(sid), remote=remote,
            revision=revision, cache=Path(cache), fields=lambda folder: fields(sid, row, folder),
            checksums=dict(row.checksums) if row is not None else {}, precheck=precheck))

    return [task(sid, row) for sid, row in targets.items()]


__all__ = ["RemoteFile", "dataset_page", "fetch_hub_file", "fetch_hub_slice", "hub_endpoint", "plan_hub_slices",
           "remote_files", "resolve_revision"]
