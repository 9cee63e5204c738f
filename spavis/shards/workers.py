"""Worker processes for build-shards: forked from a clean server, deaf to Ctrl-C, dying with the build.

Why each rule:
- ``forkserver`` with the build modules preloaded: forking the busy main process (pyarrow /
  zarr / BLAS threads) can deadlock, and ``spawn`` makes every worker pay ~2-4 s of imports
  and gene-table indexes; the fork server (started clean, single-threaded) pays them once
  and forks ready workers. ``spawn`` where there is no fork server.
- Ctrl-C in a terminal reaches the whole process group. Workers ignore SIGINT (they are
  started with it blocked, so not even their start-up imports see it) and the parent,
  which alone turns it into ``KeyboardInterrupt``, stops them: one line, no worker
  tracebacks, no half-finished pool shutdown to wait for.
- A killed build (SIGKILL, OOM killer) cannot clean up, so each worker watches the build's
  main process (a Linux pidfd, else polling its pid) and exits the moment it is gone, and
  asks the kernel to kill it when its own parent dies (Linux ``PR_SET_PDEATHSIG``).
- Spawn re-runs an unguarded script's top level in every worker; ``refuse_spawned_reimport``
  stops that re-run with one line instead of a second build that waits for the first's lock.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable

from spavis.errors import BuildError

_PR_SET_PDEATHSIG = 1
MAIN_GUARD_HINT = (
    "build_shards(workers>1) was called while a worker process re-imported your script: "
    "put the call under `if __name__ == \"__main__\":` (or use workers=1)."
)


def refuse_spawned_reimport() -> None:
    """Exit a spawned worker that is running an unguarded script's top level (one stderr line)."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        sys.stderr.write(f"spavis: {MAIN_GUARD_HINT}\n")
        sys.stderr.flush()
        raise SystemExit(1)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _die_with_build(main_pid: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    pidfd = None
    if hasattr(os, "pidfd_open"):
        try:
            pidfd = os.pidfd_open(main_pid)
        except OSError:
            pidfd = None
    if not _pid_alive(main_pid):  # the build died before we could watch it
        os._exit(1)

    def watch() -> None:
        if pidfd is not None:
            import select

            select.select([pidfd], [], [])  # readable when the process has exited
        else:
            while _pid_alive(main_pid):
                time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="spavis-build-watch", daemon=True).start()


def _init_worker(main_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    _die_with_build(main_pid)


PRELOAD = ["spavis.shards._preload"]


def _context(preload: list[str] | None = None):
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        # not '__main__': the server never runs the user's script (a server already running keeps its own)
        ctx.set_forkserver_preload(PRELOAD if preload is None else preload)
        return ctx
    return multiprocessing.get_context("spawn")


@contextlib.contextmanager
def _sigint_blocked():
    """Block SIGINT while processes start, so they inherit it blocked (delivered here afterwards)."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def _sigint_handled_by(handler):
    """SIGINT goes to ``handler`` inside the block; yields the previous handler (None off the main thread,
    where Python cannot change handlers and nothing is changed)."""
    if threading.current_thread() is not threading.main_thread():
        yield None
        return
    old = signal.signal(signal.SIGINT, handler)
    try:
        yield old
    finally:
        signal.signal(signal.SIGINT, old)


@contextlib.contextmanager
def _sigint_deferred():
    """Hold a Ctrl-C that arrives in this block and raise it when the block is done.

    ``ProcessPoolExecutor.submit`` may start a worker (waiting for the fork server's imports,
    ~1.5 s, on the first call); a KeyboardInterrupt raised inside it leaves the executor's
    books half-written (a worker forked but not registered), and the interpreter then hangs
    at exit waiting for it. So the handler only records the signal; it is raised right after,
    where the build's own handler stops the pool cleanly.
    """
    caught: list[int] = []
    with _sigint_handled_by(lambda signum, frame: caught.append(signum)) as old:
        yield
    if caught:
        if callable(old):
            old(signal.SIGINT, None)  # Python's default handler raises KeyboardInterrupt
        elif old != signal.SIG_IGN:
            raise KeyboardInterrupt


def _sigint_ignored_by_children():
    """Processes exec'd in this block start with SIGINT ignored.

    The fork server is exec'd (and ``resource_tracker.ensure_running`` unblocks SIGINT in the
    calling thread, so a blocked mask is not inherited) and multiprocessing makes it ignore
    SIGINT only after its preload imports: a Ctrl-C in those seconds would kill it with a
    traceback and leave the pool waiting on it. An ignored disposition survives exec; a Ctrl-C
    during the few milliseconds of the spawn itself is dropped.
    """
    return _sigint_handled_by(signal.SIG_IGN)


@contextlib.contextmanager
def _quiet_resource_tracker():
    """Start multiprocessing's resource tracker (if this creates it) without its leak warning.

    After Ctrl-C the killed pool's queue semaphores may reach the tracker unreleased; it
    unlinks them anyway, but would print a multi-line "leaked semaphore" warning after our
    one-line message. The filter goes to the tracker process only (through its environment).
    """
    key, rule = "PYTHONWARNINGS", "ignore:resource_tracker:UserWarning"
    old = os.environ.get(key)
    os.environ[key] = f"{old},{rule}" if old else rule
    try:
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old
    yield


class InlinePool:
    """The pool interface, running each task at submit (``--workers 1``: no processes, same code path)."""

    def submit(self, fn: Callable, *args: Any, **kwargs: Any) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except Exception as exc:  # KeyboardInterrupt/SystemExit propagate at once
            fut.set_exception(exc)
        return fut

    def stop(self) -> None:
        pass

    def close(self) -> None:
        pass


class WorkerPool:
    """A ``ProcessPoolExecutor`` whose workers ignore Ctrl-C and die with the build."""

    def __init__(self, workers: int, preload: list[str] | None = None):
        with _sigint_blocked(), _quiet_resource_tracker():
            ctx = _context(preload)
            self._ex = ProcessPoolExecutor(
                max_workers=workers,
                mp_context=ctx,
                initializer=_init_worker,
                initargs=(os.getpid(),),
            )
            if ctx.get_start_method() == "forkserver":
                # start the server (and its preload imports) now, without waiting for it: the
                # caller's own work overlaps them, the first submit waits for what is left
                with _sigint_ignored_by_children():
                    from multiprocessing import forkserver

                    forkserver.ensure_running()

    def submit(self, fn: Callable, *args: Any, **kwargs: Any) -> Future:
        with _sigint_deferred(), _sigint_blocked():  # submit may start a worker process
            try:
                return self._ex.submit(fn, *args, **kwargs)
            except (EOFError, ConnectionError) as exc:  # the fork server died (killed, out of memory)
                raise BrokenProcessPool(f"the worker fork server is gone ({exc})") from exc

    def stop(self) -> None:
        """Kill the workers now (after an error or Ctrl-C): queued tasks are dropped, none is waited for."""
        procs = list((getattr(self._ex, "_processes", None) or {}).values())
        for p in procs:
            with contextlib.suppress(Exception):
                p.kill()
        self._ex.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            with contextlib.suppress(Exception):
                p.join(timeout=5)

    def close(self) -> None:
        self._ex.shutdown(wait=True)


def in_thread(fn: Callable, *args: Any, **kwargs: Any) -> Future:
    """Run ``fn`` in a daemon thread of this process; its Future carries the result or error.

    Daemon, so a build stopped by Ctrl-C exits at once instead of waiting for it; what it
    leaves is a ``.tmp-*`` folder that the next build removes.
    """
    fut: Future = Future()

    def run() -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001  (handed to whoever waits on the Future)
            fut.set_exception(exc)

    threading.Thread(target=run, name=f"spavis-{getattr(fn, '__name__', 'task')}", daemon=True).start()
    return fut


def make_pool(workers: int, preload: list[str] | None = None) -> InlinePool | WorkerPool:
    """``workers`` processes (1: inline); ``preload``: the modules the fork server imports (default ``PRELOAD``,
    what build jobs need; ``spavis subset`` needs none of the readers)."""
    return InlinePool() if workers <= 1 else WorkerPool(workers, preload)


def broken_pool_error(exc: BrokenProcessPool) -> BuildError:
    return BuildError(
        "a worker process stopped unexpectedly (killed, out of memory, or it could not start); "
        f"rerun to resume, or use fewer --workers. If build_shards runs from a script: {MAIN_GUARD_HINT}"
    )
