"""A loopback fake of the Hugging Face Hub API, driven by the REAL huggingface_hub/datasets clients.

It replays the routes the installed clients use (read from their source):

* ``GET  /api/{models|datasets}/{repo}[/revision/{rev}]``         repo info (sha, siblings, gated, cardData)
* ``GET  /api/{type}s/{repo}/tree/{rev}[/{path}]``                  listing, ``recursive``/``expand``,
  cursor pagination through a ``Link: <...>; rel="next"`` header
* ``POST /api/{type}s/{repo}/paths-info/{rev}``                    form ``paths=…&expand=…``
* ``GET  /api/{type}s/{repo}/refs`` and ``/commits/{rev}``; ``POST /api/{type}s/{repo}/tag/{rev}``
  (``{"tag": …}``; 409 when it exists) and ``DELETE /api/{type}s/{repo}/tag/{tag}``
* ``HEAD|GET /{datasets/}{repo}/resolve/{rev}/{path}``             ETag, X-Repo-Commit, Content-Length,
  X-Linked-Etag/X-Linked-Size (LFS files: etag = sha256), Range -> 206, 404 EntryNotFound
* ``POST /api/repos/create``, ``/api/validate-yaml``, ``GET /api/whoami-v2``,
  ``PUT /api/{type}s/{repo}/settings`` (``gated``, ``visibility``/``private``)
* ``POST /api/{type}s/{repo}/preupload/{rev}`` (answers ``lfs`` for binary/large files, else ``regular``)
* ``POST /{datasets/}{repo}.git/info/lfs/objects/batch`` + ``PUT /_lfs/upload/{oid}`` + ``POST /_lfs/verify``
* ``POST /api/{type}s/{repo}/commit/{rev}`` (NDJSON: header, file, lfsFile, deletedFile, deletedFolder)

Gated repos answer like the real Hub: resolve without a token -> 401 ``X-Error-Code: GatedRepo``;
with a token that was not granted -> 403 GatedRepo. Repo info and listings stay public (as on the Hub).
Private repos answer 401 ``RepoNotFound`` to every request without a token (the Hub hides them).
Tags (``create_tag``) resolve like branches; commits to a tag are refused.
Blobs live on disk under ``root/blobs/<sha256>``; repo histories live in memory.

Faults (for downloader tests): ``hub.add_fault(path_contains, kind, ...)`` where kind is
``"status"`` (answer ``status`` with optional Retry-After), ``"drop"`` (send headers and half the
body, then close), ``"truncate"`` (send fewer bytes than Content-Length, then close) or
``"corrupt"`` (flip bytes in the body). Each fault fires ``times`` times, for GET only unless
``methods`` says otherwise, after letting the first ``after`` matching requests through (so
``add_fault("/commit/main", status=500, methods=("POST",), after=2)`` fails the third commit).

How to point the clients at it (they read ``HF_ENDPOINT`` once, at import):

1. **Our own code** (spavis.sources.hest/stimage, stamp.hub) reads ``HF_ENDPOINT`` at call time and
   passes ``endpoint=`` explicitly, so ``monkeypatch.setenv("HF_ENDPOINT", hub.url)`` is enough.
2. **Third-party calls in-process** (``datasets.load_dataset``, ``PyTorchModelHubMixin.from_pretrained``,
   ``Dataset.push_to_hub``): use ``hub.activate(monkeypatch)``. It sets the env vars AND the
   import-time copies (``huggingface_hub.constants.ENDPOINT``/``HUGGINGFACE_CO_URL_TEMPLATE``/
   ``HF_HUB_CACHE``, ``datasets.config.HF_ENDPOINT``/``HUB_DATASETS_URL``/``USE_PARQUET_EXPORT``),
   the same way huggingface_hub's own test-suite patches ``constants``. Undone at test end.
3. **A fresh interpreter** (CLI, snakemake): ``subprocess.run(..., env=hub.env(tmp_path))``; that env
   has HF_ENDPOINT, an isolated HF_HOME, telemetry/xet off and NO_PROXY set, so nothing leaves 127.0.0.1.

Example::

    from tests.fakes.hub import FakeHub

    def test_download(tmp_path, monkeypatch):
        with FakeHub(tmp_path / "hub") as hub:
            hub.create_repo("org/data", repo_type="dataset")
            hub.add_files("org/data", {"a.txt": b"hi"}, repo_type="dataset")
            hub.activate(monkeypatch)
            from huggingface_hub import hf_hub_download
            hf_hub_download("org/data", "a.txt", repo_type="dataset", endpoint=hub.url)

A session-wide instance is available as the ``fake_hub`` fixture in tests/fakes/hub_fixtures.py
style: ``FakeHub`` is cheap (one thread), so a fresh one per test is the simple default.
"""
from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

__all__ = ["FakeHub", "Fault", "WRITE_TOKEN"]

WRITE_TOKEN = "hf_fake_write_token"
LFS_EXTENSIONS = (
    ".parquet", ".arrow", ".h5ad", ".h5", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".tif",
    ".tiff", ".png", ".jpg", ".jpeg", ".gz", ".tar", ".zip", ".zarr", ".npy", ".npz", ".msgpack",
)
_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_EPOCH = _dt.datetime(2024, 1, 1, tzinfo=_dt.timezone.utc)


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob (what the Hub calls ``oid`` for regular files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class _Entry:
    size: int
    sha256: str
    git_oid: str  # git blob sha1 of the content (regular) or of the LFS pointer (lfs)
    lfs: bool

    def pointer(self) -> bytes:
        return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\n"
                f"size {self.size}\n").encode()


@dataclass
class _Commit:
    oid: str
    title: str
    date: _dt.datetime
    tree: dict[str, _Entry]
    parent: str | None


@dataclass
class _Repo:
    repo_id: str
    repo_type: str
    private: bool = False
    gated: bool = False
    commits: dict[str, _Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # branch/pr ref -> commit oid
    tags: dict[str, str] = field(default_factory=dict)  # tag name -> commit oid
    n_prs: int = 0


@dataclass
class Fault:
    """An injected failure for requests whose path contains ``path_contains``."""

    path_contains: str
    kind: str = "status"  # status | drop | truncate | corrupt
    status: int = 503
    times: int = 1
    retry_after: int | None = None
    methods: tuple[str, ...] = ("GET",)
    after: int = 0  # matching requests let through before the fault starts firing
    fired: int = 0
    seen: int = 0


class _HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str, commit: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.commit = status, code, message, commit


class FakeHub:
    """A threaded Hugging Face Hub on 127.0.0.1. Use as a context manager (or ``start``/``stop``)."""

    def __init__(self, root: str | os.PathLike | None = None, *, lfs_threshold: int = 10 * 1024 * 1024,
                 page_size: int = 1000, expand_page_size: int = 50):
        self._own_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="fakehub-"))
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self.lfs_threshold = lfs_threshold
        self.page_size = page_size
        self.expand_page_size = expand_page_size
        self.repos: dict[tuple[str, str], _Repo] = {}
        self.granted_tokens: dict[tuple[str, str], set[str]] = {}
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, for assertions
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "FakeHub":
        handler = type("_BoundHandler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="FakeHub")
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ client wiring
    def env(self, home: str | os.PathLike | None = None) -> dict[str, str]:
        """Environment for a subprocess whose HF clients must talk only to this hub."""
        env = dict(os.environ)
        env.update({
            "HF_ENDPOINT": self.url, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1",
            "HF_UPDATE_DOWNLOAD_COUNTS": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
        })
        for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            env.pop(var, None)
        if home is not None:
            env["HF_HOME"] = str(Path(home) / "hf")
            env["HF_DATASETS_CACHE"] = str(Path(home) / "hf" / "datasets")
            env.pop("HF_HUB_CACHE", None)
        return env

    def activate(self, monkeypatch, cache_dir: str | os.PathLike | None = None) -> None:
        """Point the already-imported huggingface_hub/datasets of this process at this hub (test scope)."""
        monkeypatch.setenv("HF_ENDPOINT", self.url)
        import huggingface_hub.constants as hc

        monkeypatch.setattr(hc, "ENDPOINT", self.url)
        monkeypatch.setattr(hc, "HUGGINGFACE_CO_URL_TEMPLATE", self.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(hc, "HF_URL_HOSTS", frozenset(hc.HF_URL_HOSTS | {"127.0.0.1"}))
        monkeypatch.setattr(hc, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(hc, "HF_HUB_DISABLE_IMPLICIT_TOKEN", True)
        home = Path(cache_dir) if cache_dir is not None else Path(os.environ.get("HF_HOME") or self.root / "home")
        monkeypatch.setattr(hc, "HF_HUB_CACHE", str(home / "hub"))
        monkeypatch.setattr(hc, "HF_TOKEN_PATH", str(home / "token"))
        monkeypatch.setattr(hc, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
        try:
            import datasets.config as dc
        except ImportError:  # pragma: no cover - datasets is a project dependency
            return
        monkeypatch.setattr(dc, "HF_ENDPOINT", self.url)
        monkeypatch.setattr(dc, "HUB_DATASETS_URL", self.url + "/datasets/{repo_id}/resolve/{revision}/{path}")
        monkeypatch.setattr(dc, "USE_PARQUET_EXPORT", False)
        monkeypatch.setattr(dc, "HF_UPDATE_DOWNLOAD_COUNTS", False, raising=False)
        monkeypatch.setattr(dc, "HF_DATASETS_CACHE", home / "datasets")
        monkeypatch.setattr(dc, "HF_HUB_CACHE", home / "hub", raising=False)
        monkeypatch.setattr(dc, "DOWNLOADED_DATASETS_PATH", home / "datasets" / "downloads", raising=False)
        monkeypatch.setattr(dc, "EXTRACTED_DATASETS_PATH", home / "datasets" / "downloads" / "extracted",
                            raising=False)
        monkeypatch.setattr(dc, "HF_MODULES_CACHE", home / "modules", raising=False)

    # ------------------------------------------------------------------ seeding / inspection
    def create_repo(self, repo_id: str, repo_type: str = "model", *, gated: bool = False,
                    private: bool = False, exist_ok: bool = True) -> None:
        """Create an empty repo with an initial commit on ``main`` (like the Hub's .gitattributes commit)."""
        key = (repo_type, repo_id)
        with self._lock:
            if key in self.repos:
                if not exist_ok:
                    raise ValueError(f"{repo_type} {repo_id} exists")
                self.repos[key].gated = self.repos[key].gated or gated
                return
            repo = _Repo(repo_id, repo_type, private=private, gated=gated)
            self.repos[key] = repo
            self._commit(repo, "main", "initial commit", {".gitattributes": _gitattributes()}, [])

    def grant(self, repo_id: str, token: str, repo_type: str = "dataset") -> None:
        """Accept a gated repo's terms for ``token`` (the user clicked 'agree' on the Hub)."""
        self.granted_tokens.setdefault((repo_type, repo_id), set()).add(token)

    def add_files(self, repo_id: str, files: dict[str, bytes | str | os.PathLike], repo_type: str = "model",
                  *, message: str = "add files", revision: str = "main", delete: tuple[str, ...] = ()) -> str:
        """Commit ``{path_in_repo: bytes | text | pathlib.Path}``; returns the new commit oid."""
        with self._lock:
            repo = self._repo(repo_type, repo_id)
            contents = {p: (Path(v).read_bytes() if isinstance(v, os.PathLike)
                            else v.encode() if isinstance(v, str) else bytes(v)) for p, v in files.items()}
            return self._commit(repo, revision, message, contents, list(delete))

    def head(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> str:
        return self._repo(repo_type, repo_id).refs[revision]

    def read_file(self, repo_id: str, path: str, repo_type: str = "model", revision: str = "main") -> bytes:
        repo = self._repo(repo_type, repo_id)
        entry = repo.commits[self._resolve_rev(repo, revision)].tree[path]
        return self._blob(entry.sha256).read_bytes()

    def list_files(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> list[str]:
        repo = self._repo(repo_type, repo_id)
        return sorted(repo.commits[self._resolve_rev(repo, revision)].tree)

    def add_fault(self, path_contains: str, kind: str = "status", **kwargs: Any) -> Fault:
        fault = Fault(path_contains, kind, **kwargs)
        self.faults.append(fault)
        return fault

    # ------------------------------------------------------------------ internals
    def _blob(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256

    def _store(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self._blob(sha)
        if not path.exists():
            tmp = path.with_suffix(".tmp%d" % threading.get_ident())
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return sha

    def _is_lfs(self, path: str, size: int, sample: bytes) -> bool:
        return size >= self.lfs_threshold or path.lower().endswith(LFS_EXTENSIONS) or b"\0" in sample[:512]

    def _repo(self, repo_type: str, repo_id: str) -> _Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise _HubError(404, "RepoNotFound", f"Repository {repo_id} ({repo_type}) not found")
        return repo

    def _resolve_rev(self, repo: _Repo, rev: str) -> str:
        rev = unquote(rev)
        if rev in repo.refs:
            return repo.refs[rev]
        if rev in repo.tags:
            return repo.tags[rev]
        if rev.startswith("refs/tags/") and rev[len("refs/tags/"):] in repo.tags:
            return repo.tags[rev[len("refs/tags/"):]]
        if rev.startswith("refs/heads/") and rev[len("refs/heads/"):] in repo.refs:
            return repo.refs[rev[len("refs/heads/"):]]
        if re.fullmatch(r"[0-9a-f]{40}", rev) and rev in repo.commits:
            return rev
        raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {rev}")

    def _commit(self, repo: _Repo, revision: str, title: str, adds: dict[str, bytes],
                deletes: list[str], lfs_adds: dict[str, tuple[str, int]] | None = None,
                deleted_folders: tuple[str, ...] = ()) -> str:
        parent = repo.refs.get(revision)
        if parent is None and repo.refs:
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        tree = dict(repo.commits[parent].tree) if parent else {}
        for path in deletes:
            if path not in tree:
                raise _HubError(404, "EntryNotFound", f"A file with this name doesn't exist: {path}")
            del tree[path]
        for folder in deleted_folders:
            prefix = folder.rstrip("/") + "/"
            for path in [p for p in tree if p.startswith(prefix)]:
                del tree[path]
        for path, data in adds.items():
            sha = self._store(data)
            lfs = self._is_lfs(path, len(data), data)
            entry = _Entry(len(data), sha, "", lfs)
            entry.git_oid = git_blob_sha1(entry.pointer() if lfs else data)
            tree[path] = entry
        for path, (sha, size) in (lfs_adds or {}).items():
            if not self._blob(sha).exists():
                raise _HubError(400, None, f"LFS object {sha} for {path} was never uploaded")
            entry = _Entry(size, sha, "", True)
            entry.git_oid = git_blob_sha1(entry.pointer())
            tree[path] = entry
        date = _EPOCH + _dt.timedelta(minutes=len(repo.commits))
        digest = hashlib.sha1(json.dumps([parent, title, sorted((p, e.git_oid) for p, e in tree.items()),
                                          len(repo.commits)]).encode()).hexdigest()
        repo.commits[digest] = _Commit(digest, title, date, tree, parent)
        repo.refs[revision] = digest
        return digest

    def tags(self, repo_id: str, repo_type: str = "model") -> dict[str, str]:
        """Tag name -> commit oid."""
        return dict(self._repo(repo_type, repo_id).tags)

    def commits(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> list[str]:
        """Titles of the commits reachable from ``revision``, oldest first."""
        repo = self._repo(repo_type, repo_id)
        commit = repo.commits[self._resolve_rev(repo, revision)]
        titles = []
        while commit is not None:
            titles.append(commit.title)
            commit = repo.commits.get(commit.parent) if commit.parent else None
        return titles[::-1]

    def _check_private(self, repo: _Repo, token: str | None) -> None:
        if repo.private and not token:
            raise _HubError(401, "RepoNotFound", f"Repository Not Found for url: {repo.repo_id}. Please make sure "
                                                 "you specified the correct `repo_id` and `repo_type`. If you are "
                                                 "trying to access a private or gated repo, make sure you are "
                                                 "authenticated.")

    def _check_gate(self, repo: _Repo, token: str | None) -> None:
        if not repo.gated:
            return
        kind = "dataset" if repo.repo_type == "dataset" else "model"
        page = f"{self.url}/{_PREFIX[repo.repo_type]}{repo.repo_id}"
        if not token:
            raise _HubError(401, "GatedRepo", f"Access to {kind} {repo.repo_id} is restricted. You must have access "
                                              "to it and be authenticated to access it. Please log in.")
        if token not in self.granted_tokens.get((repo.repo_type, repo.repo_id), set()):
            raise _HubError(403, "GatedRepo", f"Access to {kind} {repo.repo_id} is restricted and you are not in the "
                                              f"authorized list. Visit {page} to ask for access.")

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.fired < fault.times and method in fault.methods and fault.path_contains in unquote(path):
                    fault.seen += 1
                    if fault.seen <= fault.after:
                        continue
                    fault.fired += 1
                    return fault
        return None

    # ---- JSON shapes
    def _entry_json(self, path: str, entry: _Entry, commit: _Commit | None) -> dict:
        out: dict[str, Any] = {"type": "file", "oid": entry.git_oid, "size": entry.size, "path": path}
        if entry.lfs:
            out["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": len(entry.pointer())}
        if commit is not None:
            out["lastCommit"] = {"id": commit.oid, "title": commit.title, "date": _iso(commit.date)}
        return out

    def _folder_json(self, path: str, tree: dict[str, _Entry], commit: _Commit | None) -> dict:
        inner = sorted((p, e.git_oid) for p, e in tree.items() if p.startswith(path + "/"))
        out: dict[str, Any] = {"type": "directory", "path": path,
                               "oid": hashlib.sha1(json.dumps(inner).encode()).hexdigest()}
        if commit is not None:
            out["lastCommit"] = {"id": commit.oid, "title": commit.title, "date": _iso(commit.date)}
        return out

    def _last_commit(self, repo: _Repo, head: str, path: str) -> _Commit:
        """The newest commit that changed ``path`` (file or folder), walking first parents."""
        commit = repo.commits[head]
        while commit.parent is not None:
            parent = repo.commits[commit.parent]
            if _subtree(commit.tree, path) != _subtree(parent.tree, path):
                return commit
            commit = parent
        return commit

    def _list(self, repo: _Repo, head: str, path: str, recursive: bool, expand: bool) -> list[dict]:
        tree = repo.commits[head].tree
        path = path.strip("/")
        if path and path in tree:
            raise _HubError(404, "EntryNotFound", f"{path} is a file, not a folder")
        prefix = path + "/" if path else ""
        files = sorted(p for p in tree if p.startswith(prefix))
        if path and not files:
            raise _HubError(404, "EntryNotFound", f"Entry not found: {path}", commit=head)
        out: list[dict] = []
        seen_dirs: set[str] = set()
        for p in files:
            rest = p[len(prefix):].split("/")
            for depth in range(1, len(rest)):
                d = prefix + "/".join(rest[:depth])
                if d not in seen_dirs and (recursive or depth == 1):
                    seen_dirs.add(d)
                    out.append(self._folder_json(d, tree, self._last_commit(repo, head, d) if expand else None))
            if recursive or len(rest) == 1:
                out.append(self._entry_json(p, tree[p], self._last_commit(repo, head, p) if expand else None))
        return out


def _subtree(tree: dict[str, _Entry], path: str) -> list:
    return sorted((p, e.git_oid) for p, e in tree.items() if p == path or p.startswith(path + "/"))


def _iso(date: _dt.datetime) -> str:
    return date.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _gitattributes() -> bytes:
    return "".join(f"*{ext} filter=lfs diff=lfs merge=lfs -text\n" for ext in LFS_EXTENSIONS).encode()


def _card_data(readme: bytes) -> dict | None:
    text = readme.decode("utf-8", "replace")
    match = re.match(r"^---\s*\n(.*?)\n---\s*\n", text, re.S)
    if not match:
        return None
    import yaml

    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"
    server_version = "FakeHub/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # ---------------------------------------------------------------- plumbing
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        return auth[7:].strip() if auth.lower().startswith("bearer ") else None

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json", head_only: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head_only and body:
            self.wfile.write(body)

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _error(self, err: _HubError, head_only: bool = False) -> None:
        headers = {"X-Error-Message": err.message}
        if err.code:
            headers["X-Error-Code"] = err.code
        if err.commit:
            headers["X-Repo-Commit"] = err.commit
        self._send(err.status, json.dumps({"error": err.message}).encode(), headers, head_only=head_only)

    def _dispatch(self, method: str) -> None:
        hub = self.hub
        raw_path = self.path
        hub.requests.append((method, raw_path))
        split = urlsplit(raw_path)
        self.query = parse_qs(split.query)
        fault = hub._take_fault(method, split.path)
        if fault is not None and fault.kind == "status":
            self._body()
            headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
            self._send(fault.status, b'{"error": "injected fault"}', headers, head_only=method == "HEAD")
            return
        self.fault = fault
        try:
            self._route(method, split.path)
        except _HubError as err:
            self._error(err, head_only=method == "HEAD")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # ---------------------------------------------------------------- routing
    def _route(self, method: str, path: str) -> None:
        hub = self.hub
        if path == "/api/whoami-v2":
            return self._whoami()
        if path == "/api/validate-yaml" and method == "POST":
            self._body()
            return self._json(200, {"errors": [], "warnings": []})
        if path == "/api/repos/create" and method == "POST":
            return self._create_repo(json.loads(self._body() or b"{}"))
        if path.startswith("/_lfs/upload/") and method == "PUT":
            return self._lfs_upload(path.rsplit("/", 1)[1])
        if path == "/_lfs/verify" and method == "POST":
            payload = json.loads(self._body())
            if not hub._blob(payload["oid"]).exists():
                raise _HubError(404, None, f"LFS object {payload['oid']} not found")
            return self._json(200, {"success": True})
        m = re.match(r"^/(?:(datasets|spaces)/)?([^/]+/[^/]+)\.git/info/lfs/objects/batch$", path)
        if m and method == "POST":
            return self._lfs_batch(_TYPES.get(m.group(1) or "", "model"), unquote(m.group(2)))
        m = re.match(r"^/api/(models|datasets|spaces)/([^/]+/[^/]+)(?:/(.*))?$", path)
        if m:
            return self._api(method, _TYPES[m.group(1)], unquote(m.group(2)), m.group(3) or "")
        m = re.match(r"^/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if m and method in ("GET", "HEAD"):
            return self._resolve(method, _TYPES.get(m.group(1) or "", "model"), unquote(m.group(2)),
                                 unquote(m.group(3)), unquote(m.group(4)))
        raise _HubError(404, None, f"Sorry, we can't find the page you are looking for: {path}")

    def _whoami(self) -> None:
        token = self._token()
        if not token:
            raise _HubError(401, None, "Invalid credentials in Authorization header")
        self._json(200, {"type": "user", "id": "fake", "name": "fake-user", "fullname": "Fake User",
                         "orgs": [], "auth": {"type": "access_token",
                                              "accessToken": {"displayName": "fake", "role": "write"}}})

    def _create_repo(self, payload: dict) -> None:
        if not self._token():
            raise _HubError(401, None, "Invalid credentials in Authorization header")
        repo_type = payload.get("type") or "model"
        name = payload["name"]
        repo_id = f"{payload.get('organization') or 'fake-user'}/{name}"
        url = f"{self.hub.url}/{_PREFIX[repo_type]}{repo_id}"
        if (repo_type, repo_id) in self.hub.repos:
            return self._json(409, {"error": "You already created this model repo", "url": url})
        self.hub.create_repo(repo_id, repo_type, private=payload.get("visibility") == "private")
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _api(self, method: str, repo_type: str, repo_id: str, rest: str) -> None:
        hub = self.hub
        with hub._lock:
            repo = hub._repo(repo_type, repo_id)
        hub._check_private(repo, self._token())
        parts = rest.split("/", 1)
        action, tail = parts[0], (parts[1] if len(parts) > 1 else "")
        if action in ("", "revision") and method == "GET":
            head = hub._resolve_rev(repo, tail or "main")
            return self._json(200, self._info(repo, head))
        if action == "tree" and method == "GET":
            rev, _, sub = tail.partition("/")
            head = hub._resolve_rev(repo, rev)
            return self._tree(repo, head, unquote(sub))
        if action == "paths-info" and method == "POST":
            head = hub._resolve_rev(repo, tail)
            form = parse_qs(self._body().decode())
            expand = (form.get("expand") or ["False"])[0].lower() == "true"
            tree = repo.commits[head].tree
            out = []
            for p in form.get("paths", []):
                p = p.strip("/")
                if p in tree:
                    out.append(hub._entry_json(p, tree[p], hub._last_commit(repo, head, p) if expand else None))
                elif any(q.startswith(p + "/") for q in tree):
                    out.append(hub._folder_json(p, tree, hub._last_commit(repo, head, p) if expand else None))
            return self._json(200, out)
        if action == "refs" and method == "GET":
            branches = [{"name": r, "ref": f"refs/heads/{r}", "targetCommit": c}
                        for r, c in repo.refs.items() if not r.startswith("refs/")]
            prs = [{"name": r, "ref": r, "targetCommit": c} for r, c in repo.refs.items() if r.startswith("refs/pr/")]
            tags = [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": c} for t, c in sorted(repo.tags.items())]
            out = {"branches": branches, "tags": tags, "converts": []}
            if "include_prs" in self.query:
                out["pullRequests"] = prs
            return self._json(200, out)
        if action == "commits" and method == "GET":
            commit = repo.commits[hub._resolve_rev(repo, tail or "main")]
            history = []
            while commit is not None:
                history.append({"id": commit.oid, "title": commit.title, "message": "", "authors": [],
                                "date": _iso(commit.date)})
                commit = repo.commits.get(commit.parent) if commit.parent else None
            return self._json(200, history)
        if action == "preupload" and method == "POST":
            return self._preupload(repo, tail)
        if action == "commit" and method == "POST":
            return self._commit(repo, unquote(tail))
        if action == "settings" and method == "PUT":
            if not self._token():
                raise _HubError(401, None, "Invalid credentials in Authorization header")
            payload = json.loads(self._body() or b"{}")
            with hub._lock:
                if "gated" in payload:
                    repo.gated = payload["gated"] not in (False, "false", None)
                if "visibility" in payload:
                    repo.private = payload["visibility"] == "private"
                elif "private" in payload:
                    repo.private = bool(payload["private"])
            return self._json(200, {})
        if action == "tag" and method in ("POST", "DELETE"):
            return self._tag(method, repo, unquote(tail))
        raise _HubError(404, None, f"Unknown route /api/{repo_type}s/{repo_id}/{rest}")

    def _info(self, repo: _Repo, head: str) -> dict:
        commit = self.hub.repos[(repo.repo_type, repo.repo_id)].commits[head]
        blobs = "blobs" in self.query and self.query["blobs"][0].lower() in ("1", "true")
        siblings = []
        for p, e in sorted(commit.tree.items()):
            s: dict[str, Any] = {"rfilename": p}
            if blobs:
                s.update({"size": e.size, "blobId": e.git_oid})
                if e.lfs:
                    s["lfs"] = {"size": e.size, "sha256": e.sha256, "pointerSize": len(e.pointer())}
            siblings.append(s)
        info: dict[str, Any] = {
            "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0], "sha": head, "lastModified": _iso(commit.date),
            "createdAt": _iso(_EPOCH), "private": repo.private, "gated": "manual" if repo.gated else False,
            "disabled": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
            "usedStorage": sum(e.size for e in commit.tree.values()),
        }
        if "README.md" in commit.tree:
            card = _card_data(self.hub._blob(commit.tree["README.md"].sha256).read_bytes())
            if card is not None:
                info["cardData"] = card
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
        return info

    def _tree(self, repo: _Repo, head: str, sub: str) -> None:
        recursive = (self.query.get("recursive") or ["False"])[0].lower() == "true"
        expand = (self.query.get("expand") or ["False"])[0].lower() == "true"
        entries = self.hub._list(repo, head, sub, recursive, expand)
        size = self.hub.expand_page_size if expand else self.hub.page_size
        start = int((self.query.get("cursor") or ["0"])[0])
        page = entries[start:start + size]
        headers = {}
        if start + size < len(entries):
            q = f"recursive={recursive}&expand={expand}&cursor={start + size}"
            headers["Link"] = f'<{self.hub.url}{urlsplit(self.path).path}?{q}>; rel="next"'
        self._json(200, page, headers)

    def _resolve(self, method: str, repo_type: str, repo_id: str, rev: str, path: str) -> None:
        hub = self.hub
        with hub._lock:
            repo = hub._repo(repo_type, repo_id)
            hub._check_private(repo, self._token())
            head = hub._resolve_rev(repo, rev)
            hub._check_gate(repo, self._token())
            entry = repo.commits[head].tree.get(path)
        if entry is None:
            raise _HubError(404, "EntryNotFound", f"Entry not found: {path}", commit=head)
        headers = {"X-Repo-Commit": head, "Accept-Ranges": "bytes",
                   "ETag": f'"{entry.sha256 if entry.lfs else entry.git_oid}"'}
        if entry.lfs:
            headers["X-Linked-Etag"] = f'"{entry.sha256}"'
            headers["X-Linked-Size"] = str(entry.size)
        data = hub._blob(entry.sha256).read_bytes()
        status, start, end = 200, 0, len(data)
        rng = self.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if m and (m.group(1) or m.group(2)):
                if m.group(1):
                    start = int(m.group(1))
                    end = min(int(m.group(2)) + 1, len(data)) if m.group(2) else len(data)
                else:
                    start = max(0, len(data) - int(m.group(2)))
                if start >= len(data) and len(data) > 0:
                    return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}", **headers},
                                      head_only=method == "HEAD")
                status = 206
                headers["Content-Range"] = f"bytes {start}-{max(start, end - 1)}/{len(data)}"
        body = data[start:end]
        fault = self.fault
        if method == "HEAD" or fault is None:
            return self._send(status, body, headers, "application/octet-stream", head_only=method == "HEAD")
        # injected body faults
        if fault.kind == "corrupt":
            body = bytes(b ^ 0xFF for b in body[:16]) + body[16:]
            return self._send(status, body, headers, "application/octet-stream")
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body[: max(1, len(body) // 2)])
        self.wfile.flush()
        self.close_connection = True  # drop/truncate: fewer bytes than announced, then close

    def _tag(self, method: str, repo: _Repo, rev: str) -> None:
        if not self._token():
            raise _HubError(401, None, "Invalid credentials in Authorization header")
        hub = self.hub
        with hub._lock:
            if method == "DELETE":
                if rev not in repo.tags:
                    raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                del repo.tags[rev]
                return self._json(200, {})
            payload = json.loads(self._body() or b"{}")
            tag = str(payload.get("tag") or "")
            if not tag or tag in repo.refs:
                raise _HubError(400, None, f"Invalid tag name: {tag!r}")
            if tag in repo.tags:
                raise _HubError(409, None, f"Tag {tag} already exists")
            repo.tags[tag] = hub._resolve_rev(repo, rev)
        self._json(200, {})

    def _preupload(self, repo: _Repo, rev: str) -> None:
        if not self._token():
            raise _HubError(401, None, "Invalid credentials in Authorization header")
        hub = self.hub
        payload = json.loads(self._body())
        with hub._lock:
            head = hub._resolve_rev(repo, rev) if unquote(rev) in repo.refs else None
            tree = repo.commits[head].tree if head else {}
        files = []
        for f in payload["files"]:
            sample = base64.b64decode(f.get("sample") or "")
            lfs = hub._is_lfs(f["path"], int(f["size"]), sample)
            existing = tree.get(f["path"])
            oid = None
            if existing is not None:
                oid = existing.sha256 if existing.lfs else existing.git_oid
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular",
                          "shouldIgnore": False, "oid": oid})
        self._json(200, {"files": files, "commitOid": head})

    def _lfs_batch(self, repo_type: str, repo_id: str) -> None:
        hub = self.hub
        hub._repo(repo_type, repo_id)
        if not self._token():
            raise _HubError(401, None, "Invalid credentials in Authorization header")
        payload = json.loads(self._body())
        objects = []
        for obj in payload.get("objects", []):
            out: dict[str, Any] = {"oid": obj["oid"], "size": int(obj["size"]), "authenticated": True}
            if not hub._blob(obj["oid"]).exists():
                out["actions"] = {
                    "upload": {"href": f"{hub.url}/_lfs/upload/{obj['oid']}", "header": {}},
                    "verify": {"href": f"{hub.url}/_lfs/verify", "header": {}},
                }
            objects.append(out)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def _lfs_upload(self, oid: str) -> None:
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            raise _HubError(400, None, f"sha256 of the uploaded body does not match {oid}")
        self.hub._store(data)
        self._send(200, b"")

    def _commit(self, repo: _Repo, rev: str) -> None:
        if not self._token():
            raise _HubError(401, None, "Invalid credentials in Authorization header")
        hub = self.hub
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        title, adds, lfs_adds, deletes, deleted_folders = "commit", {}, {}, [], []
        for item in lines:
            key, value = item["key"], item["value"]
            if key == "header":
                title = value.get("summary") or title
            elif key == "file":
                adds[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                size = value.get("size")
                if size is None and hub._blob(value["oid"]).exists():
                    size = hub._blob(value["oid"]).stat().st_size
                lfs_adds[value["path"]] = (value["oid"], int(size or 0))
            elif key == "deletedFile":
                deletes.append(value["path"])
            elif key == "deletedFolder":
                deleted_folders.append(value["path"])
        create_pr = (self.query.get("create_pr") or ["0"])[0] == "1"
        with hub._lock:
            target = rev
            pr_url = None
            if create_pr:
                repo.n_prs += 1
                target = f"refs/pr/{repo.n_prs}"
                repo.refs[target] = hub._resolve_rev(repo, rev)
                pr_url = f"{hub.url}/{_PREFIX[repo.repo_type]}{repo.repo_id}/discussions/{repo.n_prs}"
            elif rev not in repo.refs:
                hub._resolve_rev(repo, rev)  # raises RevisionNotFound
            oid = hub._commit(repo, target, title, adds, deletes, lfs_adds, tuple(deleted_folders))
        url = f"{hub.url}/{_PREFIX[repo.repo_type]}{repo.repo_id}/commit/{oid}"
        self._json(200, {"success": True, "commitOid": oid, "commitUrl": url, "hookOutput": "",
                         "pullRequestUrl": pr_url})


def hub_url_for(repo_id: str, path: str, repo_type: str = "dataset", revision: str = "main", *,
                endpoint: str) -> str:
    """The resolve URL of a file, as huggingface_hub.hf_hub_url builds it."""
    return f"{endpoint}/{_PREFIX[repo_type]}{repo_id}/resolve/{quote(revision, safe='')}/{quote(path)}"


# --------------------------------------------------------------------------- real-fixture repos
def _visium_fixture(visium_dir: str | os.PathLike):
    """The real 10x fixture as (AnnData of in-tissue spots, positions DataFrame indexed by barcode)."""
    import pandas as pd
    import scanpy as sc

    visium_dir = Path(visium_dir)
    adata = sc.read_10x_h5(visium_dir / "filtered_feature_bc_matrix.h5")
    adata.var_names_make_unique()
    pos = pd.read_csv(visium_dir / "spatial" / "tissue_positions_list.csv", header=None, index_col=0,
                      names=["barcode", "in_tissue", "array_row", "array_col", "pxl_row", "pxl_col"])
    pos = pos.loc[adata.obs_names]
    return adata, pos


def hest_sample_files(visium_dir: str | os.PathLike, sample_id: str, metadata: dict) -> dict[str, bytes]:
    """A real Visium fixture packaged the way HEST-1k publishes a sample (st/<id>.h5ad + metadata json).

    HEST's h5ad keeps raw counts in X, symbols as var_names and full-resolution pixel centres in
    obs ``pxl_col_in_fullres``/``pxl_row_in_fullres`` (plus ``array_row``/``array_col``/``in_tissue``).
    """
    import io

    adata, pos = _visium_fixture(visium_dir)
    adata.obs["in_tissue"] = pos["in_tissue"].to_numpy()
    adata.obs["array_row"] = pos["array_row"].to_numpy()
    adata.obs["array_col"] = pos["array_col"].to_numpy()
    adata.obs["pxl_col_in_fullres"] = pos["pxl_col"].to_numpy(dtype=float)
    adata.obs["pxl_row_in_fullres"] = pos["pxl_row"].to_numpy(dtype=float)
    adata.obsm["spatial"] = pos[["pxl_col", "pxl_row"]].to_numpy(dtype=float)
    buf = io.BytesIO()
    tmp = Path(tempfile.mkdtemp(prefix="hest-")) / f"{sample_id}.h5ad"
    try:
        adata.write_h5ad(tmp)
        buf.write(tmp.read_bytes())
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)
    meta = {k: v for k, v in metadata.items() if v == v}  # drop NaN
    meta["id"] = sample_id
    return {f"st/{sample_id}.h5ad": buf.getvalue(),
            f"metadata/{sample_id}.json": json.dumps(meta, indent=1, default=str).encode()}


def stimage_slide_files(visium_dir: str | os.PathLike, slide: str) -> dict[str, bytes]:
    """A real Visium fixture in STimage-1K4M's per-slide CSV layout (dense counts + coord table)."""
    import numpy as np
    import pandas as pd

    adata, pos = _visium_fixture(visium_dir)
    spots = [f"{slide}_{b}" for b in adata.obs_names]
    dense = np.asarray(adata.X.todense()).astype(np.int64)
    counts = pd.DataFrame(dense, index=spots, columns=list(adata.var_names))
    coord = pd.DataFrame({"yaxis": pos["pxl_row"].to_numpy(), "xaxis": pos["pxl_col"].to_numpy(),
                          "r": np.full(len(spots), 44.7)}, index=spots)
    return {f"Visium/gene_exp/{slide}_count.csv": counts.to_csv().encode(),
            f"Visium/coord/{slide}_coord.csv": coord.to_csv().encode()}
