"""Run a benchmark case in a subprocess and measure it: wall time (from the case), peak memory, CPU seconds."""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path


def tree_rss(pid: int, cpu: dict[int, float] | None = None) -> int:
    """Summed RSS (bytes) of ``pid`` and all its descendants (psutil, else /proc).

    ``cpu`` collects each process's CPU seconds (user + sys) as last seen: workers forked by
    a fork server are not waited for by the case process, so its rusage misses them.
    """
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
                if cpu is not None:
                    t = p.cpu_times()
                    cpu[p.pid] = t.user + t.system
            except psutil.Error:
                pass
        return total
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    tree, frontier = {pid}, {pid}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier} - tree
        tree |= frontier
    total = 0
    for p in tree:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    """Run ``cmd`` (it prints a JSON object as its last stdout line); that object plus memory and CPU.

    ``peak_rss_mib``: ``ru_maxrss`` of ``wait4``, the largest single process (the child or a
    waited-for grandchild); ``tree_rss_mib``: peak of the summed RSS of the child and all its
    descendants, sampled every 50 ms; ``cpu_s``: user + sys of the child and its descendants
    (workers forked by a fork server are not waited for by the child, so their last-seen CPU
    times are summed from the samples).
    """
    import threading

    with tempfile.TemporaryFile("w+") as err:  # a file, so a chatty stderr cannot block the child
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        peak = [0]
        stop = threading.Event()
        cpu: dict[int, float] = {}

        def sample() -> None:
            while not stop.wait(0.05):
                peak[0] = max(peak[0], tree_rss(proc.pid, cpu))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        stdout = proc.stdout.read()
        stop.set()
        sampler.join()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{stderr[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_rss_mib"] = usage.ru_maxrss / 1024  # KiB on Linux: the largest single process
    result["tree_rss_mib"] = peak[0] / 2**20
    result["cpu_s"] = max(usage.ru_utime + usage.ru_stime, sum(cpu.values()))
    return result
