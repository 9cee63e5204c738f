"""The one downloader every source uses: resumable, retried, verified, atomic.

Why one: researchers lose days to truncated caches and ad-hoc retry loops. Every file
goes through ``fetch_file``:

* streamed to ``<dest>.part``; a later attempt (or a later run) resumes it with an HTTP
  ``Range`` request (206 appends; a server that ignores Range answers 200 and we restart);
* connection errors, 5xx and 429 are retried with exponential backoff + jitter, honouring
  ``Retry-After`` (bounded by ``RetryPolicy.max_wait``);
* the size (Content-Length / expected), sha256 (always computed and returned) and md5
  (where the source publishes it) are checked before ``os.replace`` gives the file its
  final name, so a final name only ever holds a verified file;
* 404, 401/403, checksum mismatch and a full disk raise ``FetchError`` with the accession,
  the URL and the fix; the ``.part`` file is removed for those (it could not be resumed).
  After exhausted transient retries the ``.part`` stays so the next run resumes it.
"""
from __future__ import annotations

import email.utils
import errno
import hashlib
import os
import random
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import requests

from spavis.errors import FetchError
from spavis.format.io import hash_file as _hash_file
from spavis.sources.parallel import run_ordered, slot
from spavis.format.progress import transfers

CHUNK = 1 << 20
STREAM_CHUNK = 1 << 16  # small enough that a dropped connection keeps what arrived
USER_AGENT = "spavis-fetch (+https://github.com/; research data curation)"
_local = threading.local()


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try. Defaults suit real servers; tests pass tiny delays (or set env)."""

    attempts: int = 6  # total attempts per file
    backoff: float = 1.0  # first delay in seconds, doubled each retry
    max_backoff: float = 60.0
    max_wait: float = 300.0  # cap on any single wait, including Retry-After
    jitter: float = 0.25  # +- fraction of the delay
    timeout: float = 60.0  # connect/read timeout per request

    @classmethod
    def from_env(cls) -> "RetryPolicy":
        """Read SPAVIS_FETCH_{RETRIES,BACKOFF,MAX_WAIT,TIMEOUT} at call time."""
        env = os.environ
        return cls(
            attempts=max(1, int(env.get("SPAVIS_FETCH_RETRIES", cls.attempts))),
            backoff=float(env.get("SPAVIS_FETCH_BACKOFF", cls.backoff)),
            max_wait=float(env.get("SPAVIS_FETCH_MAX_WAIT", cls.max_wait)),
            timeout=float(env.get("SPAVIS_FETCH_TIMEOUT", cls.timeout)),
        )

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before attempt ``attempt + 1`` (attempt counts from 1)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_wait)
        base = min(self.backoff * (2 ** (attempt - 1)), self.max_backoff, self.max_wait)
        return max(0.0, base * (1 + random.uniform(-self.jitter, self.jitter)))


@dataclass
class FileRecord:
    """What slice.json records for one file."""

    path: Path
    url: str
    size: int
    sha256: str
    md5: str | None = None
    skipped: bool = False  # already verified in the cache; nothing downloaded

    def sidecar_entry(self) -> dict:
        return {"size": self.size, "sha256": self.sha256, "md5": self.md5, "url": self.url}


@dataclass
class Job:
    """One file to fetch (for ``download_many``)."""

    url: str
    dest: Path
    size: int | None = None
    sha256: str | None = None
    md5: str | None = None
    label: str | None = None
    extra: dict = field(default_factory=dict)


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.retry_after = retry_after


def make_session() -> requests.Session:
    """A requests session with our User-Agent (one per thread: Session is not thread-safe)."""
    s = requests.Session()
    s.headers["User-Agent"] = USER_AGENT
    # Byte ranges and sizes must refer to the stored file, never a compressed transfer.
    s.headers["Accept-Encoding"] = "identity"
    return s


def thread_session() -> requests.Session:
    sess = getattr(_local, "session", None)
    if sess is None:
        sess = _local.session = make_session()
    return sess


def hash_file(path: Path, *, md5: bool = False) -> tuple[str, str | None]:
    """sha256 (and optionally md5) hex digests of a file, streamed."""
    if md5:
        sha, md5_hex = _hash_file(path, hashlib.sha256(), hashlib.md5())
        return sha, md5_hex
    return _hash_file(path, hashlib.sha256())[0], None


def _retry_after(resp: requests.Response) -> float | None:
    value = resp.headers.get("Retry-After")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max(0.0, when.timestamp() - time.time())


def _disk_full(path: Path, exc: OSError) -> FetchError:
    try:
        free = shutil.disk_usage(path.parent).free
        free_txt = f"{free / 1e9:.2f} GB free"
    except OSError:
        free_txt = "free space unknown"
    return FetchError(
        f"{path}: the disk is full ({exc.strerror}; {free_txt} on {path.parent}). "
        "Free some space or point SPAVIS_CACHE / --cache at a bigger disk, then run fetch again."
    )


def _existing_ok(dest: Path, size: int | None, sha256: str | None, md5: str | None,
                 url: str, session: requests.Session, timeout: float) -> FileRecord | None:
    """Return a record when ``dest`` is already the verified file, cheaply where possible."""
    if not dest.is_file():
        return None
    actual = dest.stat().st_size
    if size is not None and actual != size:
        return None
    if sha256 and size is not None and not md5:
        # Cheap path: final names only ever hold verified files, and the recorded
        # size + sha256 came from that verification (slice.json).
        return FileRecord(dest, url, actual, sha256, None, skipped=True)
    if size is None and not sha256 and not md5:
        # Nothing to compare with: ask the server for the size instead of downloading.
        try:
            head = session.head(url, allow_redirects=True, timeout=timeout)
        except requests.RequestException:
            return None
        length = head.headers.get("Content-Length")
        if head.status_code != 200 or length is None or int(length) != actual:
            return None
    got_sha, got_md5 = hash_file(dest, md5=bool(md5))
    if sha256 and got_sha != sha256.lower():
        return None
    if md5 and got_md5 != md5.lower():
        return None
    return FileRecord(dest, url, actual, got_sha, got_md5, skipped=True)


def fetch_file(
    url: str,
    dest: str | os.PathLike,
    *,
    size: int | None = None,
    sha256: str | None = None,
    md5: str | None = None,
    session: requests.Session | None = None,
    policy: RetryPolicy | None = None,
    label: str | None = None,
    progress: Callable[[int, int | None], None] | None = None,
) -> FileRecord:
    """Download ``url`` to ``dest`` (resumable, retried, verified, atomic) and describe it.

    ``label`` names the accession in error messages. ``progress(advance, total)`` is
    called per chunk (``total`` once known, else None).
    """
    dest = Path(dest)
    session = session or thread_session()
    policy = policy or RetryPolicy.from_env()
    who = f"{label}: " if label else ""
    dest.parent.mkdir(parents=True, exist_ok=True)

    done = _existing_ok(dest, size, sha256, md5, url, session, policy.timeout)
    if done is not None:
        if progress:
            progress(done.size, done.size)
        return done

    part = dest.with_name(dest.name + ".part")
    clean_retry_used = False
    attempt = 0
    last_reason = ""
    while True:
        attempt += 1
        try:
            with slot():
                total = _attempt(url, part, session, policy, who, progress)
        except _Retryable as exc:
            last_reason = str(exc)
            if attempt >= policy.attempts:
                kept = f" The partial file {part} is kept; run fetch again to resume it." if part.exists() else ""
                raise FetchError(
                    f"{who}{url} failed after {attempt} attempts ({last_reason}).{kept}"
                ) from None
            time.sleep(policy.delay(attempt, exc.retry_after))
            continue
        except FetchError:
            part.unlink(missing_ok=True)
            raise
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                part.unlink(missing_ok=True)
                raise _disk_full(part, exc) from None
            raise

        # Complete transfer: verify before the file gets its final name.
        actual = part.stat().st_size
        got_sha, got_md5 = hash_file(part, md5=bool(md5))
        problem = None
        if total is not None and actual != total:
            problem = f"size {actual} bytes, server announced {total}"
        elif size is not None and actual != size:
            problem = f"size {actual} bytes, expected {size}"
        elif sha256 and got_sha != sha256.lower():
            problem = f"sha256 {got_sha}, expected {sha256.lower()}"
        elif md5 and got_md5 != md5.lower():
            problem = f"md5 {got_md5}, expected {md5.lower()}"
        if problem:
            part.unlink(missing_ok=True)
            if not clean_retry_used and attempt < policy.attempts:
                # One clean re-download: a stale .part or a glitch may explain it.
                clean_retry_used = True
                continue
            raise FetchError(
                f"{who}{url}: checksum/size mismatch ({problem}); the file was removed. "
                "The source may have changed the file: check the manifest's checksum, or retry later."
            )
        os.replace(part, dest)
        return FileRecord(dest, url, actual, got_sha, got_md5)


def _attempt(url: str, part: Path, session: requests.Session, policy: RetryPolicy,
             who: str, progress: Callable[[int, int | None], None] | None) -> int | None:
    """One HTTP request; returns the full size announced by the server (None if unknown)."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        resp = session.get(url, headers=headers, stream=True, timeout=policy.timeout)
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise _Retryable(f"connection error: {type(exc).__name__}") from None
    with resp:
        status = resp.status_code
        if status == 416 and offset:
            total = _content_range_total(resp.headers.get("Content-Range"))
            if total == offset:
                return total  # the .part already holds the whole file
            part.unlink(missing_ok=True)
            raise _Retryable("stale partial file (HTTP 416), restarting", 0.0)
        _check_status(resp, url, who)

        mode = "ab"
        total: int | None = None
        length = resp.headers.get("Content-Length")
        if status == 206:
            start = _content_range_start(resp.headers.get("Content-Range"))
            if start != offset:
                part.unlink(missing_ok=True)
                raise _Retryable("server resumed at the wrong offset, restarting", 0.0)
            total = _content_range_total(resp.headers.get("Content-Range"))
        else:  # 200: the server ignored Range (or there was none): start over
            mode, offset = "wb", 0
            total = int(length) if length is not None and not resp.headers.get("Content-Encoding") else None
        if progress:
            progress(offset, total)
        written = offset
        try:
            with open(part, mode) as fh:
                for chunk in resp.iter_content(STREAM_CHUNK):
                    fh.write(chunk)
                    written += len(chunk)
                    if progress:
                        progress(len(chunk), total)
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError,
                requests.Timeout) as exc:
            raise _Retryable(f"connection dropped after {written} bytes ({type(exc).__name__})") from None
        if total is not None and written < total:
            raise _Retryable(f"truncated body: {written} of {total} bytes")
        return total


def _check_status(resp: requests.Response, url: str, who: str) -> None:
    """Map an HTTP status to FetchError (permanent), _Retryable (transient) or nothing (2xx)."""
    status = resp.status_code
    if status in (404, 410):
        raise FetchError(
            f"{who}{url} was not found (HTTP {status}). Check the accession; the source "
            "may have moved or withdrawn it."
        )
    if status in (401, 403):
        raise FetchError(
            f"{who}{url} is forbidden (HTTP {status}): the data may be gated or need "
            "credentials. Accept the dataset's terms / log in, then retry."
        )
    if status == 429 or status >= 500:
        raise _Retryable(f"HTTP {status}", _retry_after(resp))
    if status not in (200, 206):
        raise FetchError(f"{who}{url}: unexpected HTTP {status}.")


def get_bytes(url: str, *, label: str | None = None, policy: RetryPolicy | None = None,
              session: requests.Session | None = None) -> bytes:
    """A small GET (index page, API answer) with the same retries and errors as files."""
    session = session or thread_session()
    policy = policy or RetryPolicy.from_env()
    who = f"{label}: " if label else ""
    for attempt in range(1, policy.attempts + 1):
        try:
            with slot():
                resp = session.get(url, timeout=policy.timeout)
                _check_status(resp, url, who)
                return resp.content
        except (requests.ConnectionError, requests.Timeout) as exc:
            reason, wait = f"connection error: {type(exc).__name__}", None
        except _Retryable as exc:
            reason, wait = str(exc), exc.retry_after
        if attempt >= policy.attempts:
            raise FetchError(f"{who}{url} failed after {attempt} attempts ({reason}); check the "
                             "network / base URL and run fetch again.")
        time.sleep(policy.delay(attempt, wait))
    raise AssertionError("unreachable")


def expected_digests(checksum: str | None) -> dict[str, str | None]:
    """A manifest checksum ('md5:<hex>' | 'sha256:<hex>') as fetch_file keyword arguments."""
    algo, _, value = (checksum or "").partition(":")
    algo = algo.strip().lower()
    return {"sha256": value.strip() if algo == "sha256" and value else None,
            "md5": value.strip() if algo == "md5" and value else None}


def _content_range_start(value: str | None) -> int | None:
    # "bytes 100-199/200"
    try:
        return int(value.split()[1].split("-")[0])  # type: ignore[union-attr]
    except (AttributeError, IndexError, ValueError):
        return None


def _content_range_total(value: str | None) -> int | None:
    try:
        tail = value.rsplit("/", 1)[1]  # type: ignore[union-attr]
        return None if tail == "*" else int(tail)
    except (AttributeError, IndexError, ValueError):
        return None


def download(url: str, dest: str | os.PathLike, **kwargs) -> Path:
    """Download one file and return its final path (keywords as ``fetch_file``:
    size, sha256, md5, session, policy, label)."""
    return fetch_file(url, dest, **kwargs).path


def download_many(jobs: Sequence[Job], *, workers: int = 4, policy: RetryPolicy | None = None,
                  show_progress: bool | None = None) -> list[FileRecord]:
    """Fetch several files concurrently (thread pool) under the shared progress display.

    Returns the records in job order. The first FetchError is re-raised after the other
    downloads finished (so completed files are kept for the next run).
    """
    policy = policy or RetryPolicy.from_env()
    with transfers(show_progress) as bar:
        def run(job: Job) -> FileRecord:
            task = bar.add(job.dest.name, job.size)
            try:
                return fetch_file(job.url, job.dest, size=job.size, sha256=job.sha256, md5=job.md5,
                                  policy=policy, label=job.label,
                                  progress=lambda adv, tot: bar.advance(task, adv, tot))
            finally:
                bar.finish(task)

        return run_ordered(run, jobs, workers, name="spavis-dl")


def iter_records(records: Iterable[FileRecord], root: Path) -> dict[str, dict]:
    """slice.json ``files`` mapping (paths relative to the slice folder)."""
    return {r.path.relative_to(root).as_posix(): r.sidecar_entry() for r in records}
