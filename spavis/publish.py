"""`spavis publish`: a built corpus on the Hugging Face Hub (or in a folder with the Hub's layout).

Why it is more than ``upload_folder``: a corpus is large and must arrive whole and named.

* **Integrity first.** Every file manifest.json lists is re-hashed and compared before
  anything leaves the machine; a slide without a recorded license stops the publish unless
  ``allow_unknown_license`` (the dataset card lists such slides either way).
* **Several commits, resumable.** Data files go up in batches (``max_files_per_commit``,
  ``max_bytes_per_commit``), README.md + manifest.json (and the removal of files an older
  version left behind) in the last commit, so the card and manifest only change once the data
  they describe is there. Before uploading, the remote tree is listed through the Hub API
  and every file whose LFS sha256 and size (git blob id for small regular files) already
  match is skipped: an interrupted publish, run again, uploads only what is missing, and a
  re-run of a finished publish makes no commit at all.
* **Versioned.** The final commit is tagged ``build-<build_key>`` (manifest.json
  ``build_key``: digest of spavis version, vocabulary, parameters and input checksums), so the
  same bytes always carry the same tag; ``revision_tag`` adds a human tag (e.g. ``v1.0``).

``validate_hub`` re-checks a published revision against its manifest: LFS sha256 and sizes
from the Hub API (small regular files are downloaded and hashed), Zarr digests recomputed,
no unlisted files; ``deep=True`` downloads the revision and runs the full local validation.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow.parquet as pq

from spavis.errors import PublishError, SpavisError
from spavis.format import schema as S
from spavis.format import hub as H
from spavis.format import integrity
from spavis.format.io import atomic_dir, sha256_file
from spavis.shards.card import UNKNOWN_LICENSE, most_restrictive, normalize_license

__all__ = ["PublishResult", "publish", "validate_hub", "corpus_files", "build_tag", "TAG_PREFIX"]

TAG_PREFIX = "build-"
MAX_FILES_PER_COMMIT = 256
MAX_BYTES_PER_COMMIT = 8 * 1024**3
BRANCH = "main"
RETRY_STATUSES = (429, 503)  # the Hub did not make the commit: waiting and repeating it is safe
MAX_WAIT_S = 60.0
_FINAL = (S.CARD_FILE, S.MANIFEST_FILE)  # written last: they describe the data already uploaded
_HUB_ONLY = (".gitattributes",)  # files the Hub keeps that a corpus does not have


@dataclass
class PublishResult:
    """What ``publish`` did: where, which commit and tags, and how much it uploaded."""

    repo_id: str | None
    local_dir: Path | None
    commit: str | None
    tag: str
    extra_tag: str | None
    license: str
    n_files: int
    n_uploaded: int
    n_commits: int
    n_deleted: int = 0
    bytes_uploaded: int = 0
    url: str | None = None
    unknown_license_slides: list[str] = field(default_factory=list)


def build_tag(manifest: dict[str, Any]) -> str:
    """The Hub tag naming a build: ``build-<build_key>``."""
    key = manifest.get("build_key")
    if not key:
        raise PublishError(f"{S.MANIFEST_FILE} has no build_key; rebuild the corpus with `spavis build-shards`.")
    return f"{TAG_PREFIX}{key}"


def corpus_files(root: str | os.PathLike) -> dict[str, Path]:
    """``{path in the repository: local path}`` of every corpus file (hidden top-level entries skipped)."""
    root = Path(root)
    out: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here == root:
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            filenames = [f for f in filenames if not f.startswith(".")]
        dirnames.sort()
        for name in sorted(filenames):
            p = here / name
            out[p.relative_to(root).as_posix()] = p
    return dict(sorted(out.items()))


def _load_manifest(root: Path) -> dict[str, Any]:
    path = root / S.MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise PublishError(f"{path}: missing; {root} is not a finished `spavis build-shards` output.") from None
    except ValueError as exc:
        raise PublishError(f"{path}: not valid JSON ({exc}); rebuild the corpus.") from None
    if manifest.get("format") != S.FORMAT_NAME:
        raise PublishError(f"{path}: format is {manifest.get('format')!r}, not {S.FORMAT_NAME!r}; "
                           "publish the --out folder of `spavis build-shards`.")
    return manifest


def _check_local(root: Path, manifest: dict[str, Any], files: dict[str, Path]) -> dict[str, str]:
    """sha256 of every file, checked against manifest.json (each byte is hashed once, a few files at a time)."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # hashlib releases the GIL
        shas = dict(zip(files, pool.map(sha256_file, files.values())))
    problems = integrity.check(manifest, integrity.ListedCopy(dict.fromkeys(files), shas.__getitem__))
    if problems:
        head = integrity.summary(problems)
        raise PublishError(f"{root}: does not match its manifest.json ({head}); nothing was published. "
                           f"Rebuild it with `spavis build-shards` (`spavis validate {root}` lists every problem).")
    return shas


def _licenses(root: Path) -> tuple[str, list[str]]:
    """(corpus license, slide ids without a recorded license)."""
    try:
        table = pq.read_table(root / S.SLIDES_FILE, columns=["slide_id", "license"]).to_pylist()
    except (OSError, ValueError) as exc:  # missing or corrupt: the integrity check would say so too
        raise PublishError(f"{root / S.SLIDES_FILE}: unreadable ({type(exc).__name__}); rebuild the corpus with "
                           "`spavis build-shards`.") from None
    ids = [normalize_license(r["license"]) for r in table]
    unknown = [r["slide_id"] for r, lic in zip(table, ids) if lic == UNKNOWN_LICENSE]
    return most_restrictive(ids), unknown


def _git_blob_sha1(path: Path) -> str:
    h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _same(remote, local: Path, sha256: str) -> bool:
    """True when the remote file (a huggingface_hub RepoFile) holds exactly the local bytes."""
    if remote is None:
        return False
    size = local.stat().st_size
    lfs = getattr(remote, "lfs", None)
    if lfs is not None:
        return lfs.sha256 == sha256 and int(lfs.size) == size
    return int(remote.size) == size and remote.blob_id == _git_blob_sha1(local)


def _batches(paths: list[str], files: dict[str, Path], max_files: int, max_bytes: int) -> list[list[str]]:
    out: list[list[str]] = []
    cur: list[str] = []
    size = 0
    for rel in paths:
        n = files[rel].stat().st_size
        if cur and (len(cur) >= max_files or size + n > max_bytes):
            out.append(cur)
            cur, size = [], 0
        cur.append(rel)
        size += n
    if cur:
        out.append(cur)
    return out


def _publish_local(root: Path, files: dict[str, Path], local_dir: Path) -> int:
    """Write the repository layout to ``local_dir`` (staged, then renamed); returns files written."""
    local_dir = Path(local_dir)
    if local_dir.resolve() == root.resolve() or root.resolve() in local_dir.resolve().parents:
        raise PublishError(f"{local_dir}: --local-dir must be outside the corpus {root}.")
    if local_dir.exists() and not local_dir.is_dir():
        raise PublishError(f"{local_dir}: exists and is not a folder; choose another --local-dir.")
    existing = corpus_files(local_dir) if local_dir.is_dir() else {}
    if local_dir.is_dir() and any(local_dir.iterdir()) and not (local_dir / S.MANIFEST_FILE).is_file():
        raise PublishError(f"{local_dir}: not empty and not a published corpus (no {S.MANIFEST_FILE}); it would be "
                           "replaced, so choose a new or empty --local-dir.")
    if existing.keys() == files.keys() and all(
            existing[r].stat().st_size == p.stat().st_size for r, p in files.items()) and (
            (local_dir / S.MANIFEST_FILE).read_bytes() == (root / S.MANIFEST_FILE).read_bytes()):
        return 0  # same build already there
    local_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(local_dir, "publish") as tmp:
        for rel, src in files.items():
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dest)  # same file system: no copy
            except OSError:
                shutil.copy2(src, dest)
    return len(files)


def publish(
    corpus: str | os.PathLike,
    repo_id: str | None = None,
    *,
    local_dir: str | os.PathLike | None = None,
    private: bool = False,
    gated: str | None = None,
    revision_tag: str | None = None,
    allow_unknown_license: bool = False,
    token: str | None = None,
    max_files_per_commit: int = MAX_FILES_PER_COMMIT,
    max_bytes_per_commit: int = MAX_BYTES_PER_COMMIT,
    echo: Callable[[str], None] | None = None,
) -> PublishResult:
    """Upload corpus folder ``corpus`` to Hub dataset ``repo_id`` and/or write it to ``local_dir``.

    Returns a :class:`PublishResult`; raises :class:`PublishError` (nothing half-announced: the
    card and manifest go last) with the fix in one line. ``token`` None uses HF_TOKEN or the
    login of ``hf auth login``; it is never printed. ``gated`` ("auto" or "manual") makes readers
    accept the dataset's terms on the Hub first (as HEST-1k does).
    """
    say = echo or (lambda _msg: None)
    root = Path(corpus)
    if repo_id is None and local_dir is None:
        raise PublishError("give --repo-id ORG/NAME (the Hub) or --local-dir DIR (a folder), or both.")
    if repo_id is not None:
        # before any upload: else an id such as org/bad..name reached the client and read like a network failure
        H.check_repo_id(repo_id, cls=PublishError, label=f"--repo-id {repo_id!r}")
    if revision_tag is not None and (not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", revision_tag)
                                     or re.fullmatch(r"[0-9a-f]{40}", revision_tag) or revision_tag == BRANCH
                                     or revision_tag.startswith(TAG_PREFIX)):
        raise PublishError(f"--revision-tag {revision_tag!r}: use letters, digits, '.', '_' or '-' (e.g. v1.0), "
                           f"not a commit id, {BRANCH!r} or a name starting with {TAG_PREFIX!r}.")
    if gated not in (None, "auto", "manual"):
        raise PublishError(f"--gated {gated!r}: use 'auto' (access granted on request) or 'manual' (you approve).")
    if max_files_per_commit < 1 or max_bytes_per_commit < 1:
        raise PublishError("--files-per-commit and the bytes per commit must be at least 1.")
    if not root.is_dir():
        raise PublishError(f"{root}: no such corpus folder; pass the --out folder of `spavis build-shards`.")
    manifest = _load_manifest(root)
    tag = build_tag(manifest)
    corpus_license, unknown = _licenses(root)  # cheap: before hashing the whole corpus
    if unknown and not allow_unknown_license:
        shown = ", ".join(unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
        raise PublishError(
            f"{root}: {len(unknown)} slide(s) have no recorded license ({shown}); record one in their "
            "slice.json (`license`) and rebuild, or pass --allow-unknown-license to publish them listed as "
            "unknown in the dataset card.")
    files = corpus_files(root)
    say(f"checking {len(files)} files of {root} against {S.MANIFEST_FILE}")
    shas = _check_local(root, manifest, files)
    result = PublishResult(repo_id, Path(local_dir) if local_dir is not None else None, None, tag, revision_tag,
                           corpus_license, len(files), 0, 0, unknown_license_slides=unknown)
    if local_dir is not None:
        result.n_uploaded = _publish_local(root, files, Path(local_dir))
        say(f"{local_dir}: {'wrote' if result.n_uploaded else 'already holds'} {len(files)} files")
    if repo_id is None:
        return result
    with _no_hf_progress_bars():  # one line per commit (echo) instead of a bar per Zarr chunk
        return _publish_hub(root, repo_id, files, shas, manifest, result, private=private, gated=gated, token=token,
                            max_files=max_files_per_commit, max_bytes=max_bytes_per_commit, say=say)


@contextlib.contextmanager
def _no_hf_progress_bars() -> Iterator[None]:
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


def _publish_hub(root, repo_id, files, shas, manifest, result: PublishResult, *, private, gated, token,
                 max_files, max_bytes, say) -> PublishResult:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, get_token

    token = token or get_token()  # HF_TOKEN or `hf auth login`; a write always needs one, sent explicitly
    if not token:
        raise PublishError(f"{repo_id}: no Hugging Face token; run `hf auth login` or set HF_TOKEN to a token "
                           "that can write to the dataset (nothing was uploaded).")
    api = H.api(token=token)
    try:
        api.create_repo(repo_id, repo_type=H.REPO_TYPE, private=private or None, exist_ok=True)
        if gated is not None:
            api.update_repo_settings(repo_id, repo_type=H.REPO_TYPE, gated=gated)
        head = api.repo_info(repo_id, repo_type=H.REPO_TYPE, revision=BRANCH).sha
        remote = {f.path: f for f in api.list_repo_tree(repo_id, repo_type=H.REPO_TYPE, revision=head,
                                                        recursive=True) if hasattr(f, "blob_id")}
    except Exception as exc:
        raise _publish_error(exc, repo_id, "before uploading anything") from None
    missing = [rel for rel in files if not _same(remote.get(rel), files[rel], shas[rel])]
    stale = sorted(p for p in remote if p not in files and p not in _HUB_ONLY)
    if stale and S.MANIFEST_FILE not in remote:  # not a spavis corpus: its files are not ours to delete
        shown = ", ".join(stale[:5]) + (f" and {len(stale) - 5} more" if len(stale) > 5 else "")
        raise PublishError(f"{repo_id} already holds files that are not part of this corpus ({shown}) and is not "
                           "a spavis corpus; publish to a new dataset id (nothing was uploaded).")
    data = [rel for rel in missing if rel not in _FINAL]
    final = [rel for rel in missing if rel in _FINAL]
    batches = _batches(data, files, max_files, max_bytes)
    n_commits = len(batches) + (1 if final or stale else 0)
    say(f"{repo_id}: {len(files) - len(missing)} of {len(files)} files already there; uploading "
        f"{len(missing)} in {n_commits} commit(s)" + (f", removing {len(stale)} old file(s)" if stale else ""))
    done = 0
    try:
        for i, batch in enumerate(batches, 1):
            ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(files[rel])) for rel in batch]
            info = _commit(api, repo_id, ops, head, f"spavis publish: data {i}/{len(batches)} ({len(batch)} files)", say)
            head, done = info.oid, done + 1
            result.n_uploaded += len(batch)
            result.bytes_uploaded += sum(files[r].stat().st_size for r in batch)
            say(f"commit {done}/{n_commits}: {len(batch)} files")
        if final or stale:
            ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(files[rel])) for rel in final]
            ops += [CommitOperationDelete(path_in_repo=rel) for rel in stale]
            info = _commit(api, repo_id, ops, head, f"spavis publish: card and manifest of {result.tag}", say)
            head, done = info.oid, done + 1
            result.n_uploaded += len(final)
            result.bytes_uploaded += sum(files[r].stat().st_size for r in final)
            result.n_deleted = len(stale)
            say(f"commit {done}/{n_commits}: card and manifest" + (f", {len(stale)} removed" if stale else ""))
    except Exception as exc:
        raise _publish_error(exc, repo_id, f"after {done} of {n_commits} commit(s)", resumable=True) from None
    result.n_commits = done
    result.commit = head
    for name in [result.tag] + ([result.extra_tag] if result.extra_tag else []):
        _ensure_tag(api, repo_id, name, head)
    result.url = f"{H.endpoint()}/datasets/{repo_id}/tree/{result.tag}"
    say(f"{repo_id}@{head[:12]} tagged {result.tag}" + (f" and {result.extra_tag}" if result.extra_tag else ""))
    return result


def _commit(api, repo_id: str, ops: list, parent: str, message: str, say: Callable[[str], None]):
    """``create_commit`` on ``main`` after ``parent``, waiting out rate limits (429) and 503s.

    Those answers mean the commit was not made, so repeating it is safe; anything else (a 500
    may or may not have landed) stops the publish, and a rerun compares with the Hub again.
    """
    from huggingface_hub.errors import HfHubHTTPError

    retries = int(os.environ.get("SPAVIS_PUBLISH_RETRIES", "5"))
    for attempt in range(retries + 1):
        try:
            return api.create_commit(repo_id, ops, repo_type=H.REPO_TYPE, revision=BRANCH, parent_commit=parent,
                                     commit_message=message)
        except HfHubHTTPError as exc:
            response = getattr(exc, "response", None)
            status = getattr(response, "status_code", None)
            if status not in RETRY_STATUSES or attempt == retries:
                raise
            after = (response.headers.get("Retry-After") if response is not None else None) or ""
            wait = min(float(after) if after.strip().isdigit() else 2.0 * 2**attempt, MAX_WAIT_S)
            say(f"the Hub answered HTTP {status}; retrying the commit in {wait:.0f} s ({attempt + 1}/{retries})")
            time.sleep(wait)
    raise AssertionError("unreachable")  # the loop returns or raises


def _ensure_tag(api, repo_id: str, tag: str, commit: str) -> None:
    """Tag ``commit``; an existing tag is fine when it names the same manifest (the same bytes)."""
    try:
        refs = api.list_repo_refs(repo_id, repo_type=H.REPO_TYPE)
        current = {t.name: t.target_commit for t in refs.tags}.get(tag)
        if current is None:
            api.create_tag(repo_id, tag=tag, revision=commit, repo_type=H.REPO_TYPE,
                           tag_message="spavis publish")
            return
        if current == commit:
            return
        ours, theirs = (api.get_paths_info(repo_id, [S.MANIFEST_FILE], repo_type=H.REPO_TYPE, revision=rev)
                        for rev in (commit, current))
    except Exception as exc:
        raise _publish_error(exc, repo_id, f"while tagging {tag} (the upload itself is complete)",
                             resumable=True) from None
    if not ours or not theirs or ours[0].blob_id != theirs[0].blob_id:
        raise PublishError(
            f"{repo_id}: tag {tag} already names another version of the corpus (commit {current[:12]}); "
            "tags are versions and never move: choose a new --revision-tag.")


def _publish_error(exc: BaseException, repo_id: str, when: str, *, resumable: bool = False) -> SpavisError:
    """One line: what failed, when, and the fix (for an interrupted upload: run it again)."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, SpavisError):
        return exc
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, HfHubHTTPError) and status in (401, 403):
        return PublishError(f"{repo_id}: the Hub refused the upload {when} (HTTP {status}); log in with a token "
                            "that can write to it (`hf auth login` or HF_TOKEN).")
    if not resumable:
        return H.hub_error(exc, repo_id, revision=BRANCH, cls=PublishError)
    if isinstance(exc, HfHubHTTPError):
        why = f"the Hub answered HTTP {status}"
    else:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        why = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return PublishError(f"{repo_id}: publishing stopped {when} ({why}); run the same command again: it "
                        "uploads only what is missing.")


# ----------------------------------------------------------------------------- validate a published corpus
def validate_hub(repo_id: str, revision: str | None = None, *, deep: bool = False):
    """Re-check Hub dataset ``repo_id`` at ``revision`` against its manifest.json; a ValidationReport.

    Shallow (default): LFS sha256 and sizes from the Hub API, small regular files downloaded and
    hashed, Zarr digests recomputed, no unlisted files. ``deep``: download the revision and run
    the full local ``validate`` (schemas, rows, Parquet vs Zarr, gene sums).
    """
    from spavis.shards.validate import ValidationReport, validate

    api = H.api()
    try:
        commit = api.repo_info(repo_id, repo_type=H.REPO_TYPE, revision=revision).sha
        tree = {f.path: f for f in api.list_repo_tree(repo_id, repo_type=H.REPO_TYPE, revision=commit,
                                                      recursive=True) if hasattr(f, "blob_id")}
    except Exception as exc:
        raise H.hub_error(exc, repo_id, revision=revision) from None
    if deep:
        tops = sorted({p.split("/", 1)[0] + ("/*" if "/" in p else "") for p in tree if p not in _HUB_ONLY})
        path = H.snapshot(repo_id, revision=commit, patterns=tops)  # everything but the Hub's own .gitattributes
        rep = validate(path, deep=True)
        rep.path = Path(f"{repo_id}@{commit}")
        return rep
    rep = ValidationReport(Path(f"{repo_id}@{commit}"))
    if S.MANIFEST_FILE not in tree:
        rep.error(f"{S.MANIFEST_FILE}: missing; this revision is not a complete spavis corpus")
        return rep
    manifest = json.loads(H.download_file(repo_id, S.MANIFEST_FILE, revision=commit).read_text())
    # LFS files carry their sha256 in the listing; small regular files (Zarr metadata, the card)
    # are downloaded, a few at a time, and hashed
    regular = sorted(p for p, f in tree.items() if f.lfs is None and p != S.MANIFEST_FILE and p not in _HUB_ONLY)
    with ThreadPoolExecutor(max_workers=8) as pool:
        hashed = dict(zip(regular, pool.map(
            lambda rel: sha256_file(H.download_file(repo_id, rel, revision=commit)), regular)))

    def sha_of(rel: str) -> str:
        f = tree[rel]
        return f.lfs.sha256 if f.lfs is not None else hashed[rel]

    sizes = {p: (f.lfs.size if f.lfs is not None else f.size) for p, f in tree.items()}
    for problem in integrity.check(manifest, integrity.ListedCopy(sizes, sha_of), allowed=_HUB_ONLY):
        rep.error(str(problem))
    rep.checked["outputs"] = len(manifest.get("outputs", []))
    rep.checked["files"] = len(tree)
    return rep
