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


def _context():
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)  # not '__main__': the server never runs the user's script
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

    def __init__(self, workers: int):
        with _sigint_blocked(), _quiet_resource_tracker():
            self._ex = ProcessPoolExecutor(
                max_workers=workers,
                mp_context=_context(),
                initializer=_init_worker,
                initargs=(os.getpid(),),
            )

    def submit(self, fn: Callable, *args: Any, **kwargs: Any) -> Future:
        with _sigint_blocked():  # submit may start a worker process
            return self._ex.submit(fn, *args, **kwargs)

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


def make_pool(workers: int) -> InlinePool | WorkerPool:
    return InlinePool() if workers <= 1 else WorkerPool(workers)


def broken_pool_error(exc: BrokenProcessPool) -> BuildError:
    return BuildError(
        "a worker process stopped unexpectedly (killed, out of memory, or it could not start); "
        f"rerun to resume, or use fewer --workers. If build_shards runs from a script: {MAIN_GUARD_HINT}"
    )
