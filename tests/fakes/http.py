"""A loopback HTTP file server with Range support and fault injection, for fetch tests.

Serves bytes registered under URL paths (plus optional dynamic routes), HTML directory
indexes like Apache/nginx autoindex (``<a href="name">``), and HEAD. Faults are queued per
path and consumed one per GET, so "503 then success" is ``[Fault.status(503)]``.
Every request is logged (method, path, Range header) for assertions. ``delays`` slows
chosen file GETs down and ``max_inflight`` records how many file GETs were served at
once, so tests can observe (bounded) concurrency.

Counting is exact, whatever the load on the machine: a transfer stops counting *before* its
last body byte is written. A client can only finish reading (and start its next request)
after that byte, so the end of one transfer and the start of the next never overlap in the
count (counting until the handler returns did: a handler descheduled after its final write
still counted while the client's next request arrived). ``gather(n)`` makes the first ``n``
file GETs wait for each other, so "n transfers at once" is observed whenever the client
really runs n at once, without relying on delays being long enough.
"""
from __future__ import annotations

import html
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable
from urllib.parse import unquote, urlsplit

Route = Callable[["_Handler", str, dict], "tuple[int, dict, bytes] | None"]


@dataclass
class Fault:
    """One injected misbehaviour for one GET of one path."""

    kind: str  # status | drop | truncate | corrupt | ignore_range | hang
    status: int = 503
    retry_after: str | None = None
    after: int = 0  # bytes sent before the connection drops / body is truncated

    @classmethod
    def http(cls, status: int, retry_after: str | None = None) -> "Fault":
        return cls("status", status=status, retry_after=retry_after)

    @classmethod
    def drop(cls, after: int) -> "Fault":
        """Announce the full length, send ``after`` bytes, close the connection."""
        return cls("drop", after=after)

    @classmethod
    def truncate(cls, after: int) -> "Fault":
        """A consistent but short answer: Content-Length = ``after``, body cut there."""
        return cls("truncate", after=after)

    @classmethod
    def corrupt(cls) -> "Fault":
        """Same length, different bytes (a wrong-checksum mirror)."""
        return cls("corrupt")

    @classmethod
    def ignore_range(cls) -> "Fault":
        """Answer 200 with the whole body even when a Range was asked."""
        return cls("ignore_range")


@dataclass
class Logged:
    method: str
    path: str
    range: str | None
    query: str


class _QuietServer(ThreadingHTTPServer):
    """A client that gives up mid-transfer (the point of the fault tests) is not a server error."""

    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        import sys

        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            return
        super().handle_error(request, client_address)


class FileServer:
    """``with FileServer() as srv: srv.add('/a/b.txt', b'..'); requests.get(srv.url + '/a/b.txt')``"""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.faults: dict[str, list[Fault]] = {}
        self.routes: list[tuple[str, Route]] = []
        self.log: list[Logged] = []
        self.honour_range = True
        self.delays: dict[str, float] = {}  # path (or "*") -> seconds to stall a file GET
        self.inflight = 0
        self.max_inflight = 0
        self._lock = threading.Lock()
        self._gather: threading.Barrier | None = None
        self._gather_prefix = "/"
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- content ------------------------------------------------------------------
    def add(self, path: str, data: bytes) -> str:
        self.files["/" + path.lstrip("/")] = bytes(data)
        return self.url + "/" + path.lstrip("/")

    def add_file(self, path: str, file: str | Path) -> str:
        return self.add(path, Path(file).read_bytes())

    def route(self, prefix: str, func: Route) -> None:
        """Dynamic handler: ``func(handler, path, query_dict) -> (status, headers, body) | None``."""
        self.routes.append(("/" + prefix.lstrip("/"), func))

    def inject(self, path: str, *faults: Fault) -> None:
        with self._lock:
            self.faults.setdefault("/" + path.lstrip("/"), []).extend(faults)

    def gather(self, n: int, prefix: str = "/", timeout: float = 30.0) -> None:
        """The first ``n`` file GETs under ``prefix`` wait for one another (at most ``timeout`` s: a
        serial client then shows ``max_inflight`` < n instead of hanging)."""
        self._gather = threading.Barrier(n, timeout=timeout) if n > 1 else None
        self._gather_prefix = prefix

    def gets(self, path: str) -> list[Logged]:
        p = "/" + path.lstrip("/")
        return [r for r in self.log if r.method == "GET" and r.path == p]

    # -- lifecycle ----------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FileServer":
        server = self

        class Handler(_Handler):
            owner = server

        self._httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "FileServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _next_fault(self, path: str) -> Fault | None:
        with self._lock:
            queue = self.faults.get(path)
            return queue.pop(0) if queue else None

    def _listing(self, path: str) -> list[str] | None:
        prefix = path if path.endswith("/") else path + "/"
        names = set()
        for p in self.files:
            if p.startswith(prefix):
                rest = p[len(prefix):]
                head, sep, _ = rest.partition("/")
                names.add(head + ("/" if sep else ""))
        return sorted(names) if names else None


class _Handler(BaseHTTPRequestHandler):
    owner: FileServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    _counted = False  # this request's file GET is in srv.inflight

    def _uncount(self) -> None:
        """End this transfer in ``inflight`` (once), before the client can have read its end."""
        if self._counted:
            self._counted = False
            with self.owner._lock:
                self.owner.inflight -= 1

    def _send(self, status: int, headers: dict, body: bytes, head: bool) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        if head or not body:
            self._uncount()
            self.end_headers()
            return
        self.end_headers()
        self.wfile.write(body[:-1])
        self.wfile.flush()
        self._uncount()
        self.wfile.write(body[-1:])

    def _serve(self, head: bool) -> None:
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        srv = self.owner
        with srv._lock:
            srv.log.append(Logged(self.command, path, self.headers.get("Range"), parts.query))
        for prefix, func in srv.routes:
            if path.startswith(prefix):
                from urllib.parse import parse_qs

                query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
                res = func(self, path, query)
                if res is not None:
                    status, headers, body = res
                    return self._send(status, headers, body, head)
        fault = None if head else srv._next_fault(path)
        if fault is not None and fault.kind == "status":
            headers = {"Content-Type": "text/plain"}
            if fault.retry_after is not None:
                headers["Retry-After"] = fault.retry_after
            return self._send(fault.status, headers, f"HTTP {fault.status}\n".encode(), head)
        data = srv.files.get(path)
        if data is None:
            listing = srv._listing(path)
            if listing is not None:
                if not path.endswith("/"):
                    return self._send(301, {"Location": path + "/"}, b"", head)
                body = _index_html(path, listing).encode()
                return self._send(200, {"Content-Type": "text/html"}, body, head)
            return self._send(404, {"Content-Type": "text/plain"}, b"not found\n", head)

        if head:
            return self._serve_file(data, fault, head)
        delay = srv.delays.get(path, srv.delays.get("*", 0.0))
        with srv._lock:
            srv.inflight += 1
            srv.max_inflight = max(srv.max_inflight, srv.inflight)
            self._counted = True
            gather, prefix = srv._gather, srv._gather_prefix
            n_gets = sum(1 for r in srv.log if r.method == "GET" and r.path in srv.files and r.path.startswith(prefix))
            gather = gather if path.startswith(prefix) else None
        try:
            if gather is not None and n_gets <= gather.parties:
                try:
                    gather.wait()
                except threading.BrokenBarrierError:
                    pass
            if delay:
                time.sleep(delay)
            self._serve_file(data, fault, head)
        finally:
            self._uncount()

    def _serve_file(self, data: bytes, fault: "Fault | None", head: bool) -> None:
        srv = self.owner
        total = len(data)
        start = 0
        rng = self.headers.get("Range")
        use_range = rng and srv.honour_range and not (fault and fault.kind == "ignore_range")
        if use_range and rng.startswith("bytes="):
            first = rng[6:].split("-")[0]
            start = int(first or 0)
            if start >= total:
                return self._send(416, {"Content-Range": f"bytes */{total}"}, b"", head)
            status = 206
            headers = {"Content-Range": f"bytes {start}-{total - 1}/{total}", "Accept-Ranges": "bytes"}
        else:
            status, headers = 200, {"Accept-Ranges": "bytes"}
        body = data[start:]
        headers["Content-Type"] = "application/octet-stream"
        if fault is not None and fault.kind == "corrupt":
            body = bytes((b ^ 0xFF) for b in body)
        if fault is not None and fault.kind == "truncate":
            body = body[: fault.after]
        if fault is not None and fault.kind == "drop":
            headers["Content-Length"] = str(len(body))
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Connection", "close")
            self._uncount()
            self.end_headers()
            self.wfile.write(body[: fault.after])
            self.wfile.flush()
            self.close_connection = True
            return
        self._send(status, headers, body, head)


def _index_html(path: str, names: list[str]) -> str:
    """An nginx-autoindex-like page (what ftp.cngb.org and ftp.ncbi.nlm.nih.gov serve)."""
    rows = ['<a href="../">../</a>'] + [
        f'<a href="{html.escape(n)}">{html.escape(n)}</a>    01-Jan-2024 00:00    -' for n in names
    ]
    return (f"<html><head><title>Index of {html.escape(path)}</title></head><body>"
            f"<h1>Index of {html.escape(path)}</h1><hr><pre>" + "\n".join(rows) + "</pre><hr></body></html>")


def run_concurrently(func, n: int = 3) -> list[BaseException]:
    """Call ``func`` from ``n`` threads at once; return the exceptions they raised (empty = all fine)."""
    import threading

    errors: list[BaseException] = []

    def run():
        try:
            func()
        except BaseException as exc:  # reported to the caller
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors
