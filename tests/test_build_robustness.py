"""build-shards under the mistakes users make: Ctrl-C, a killed main process, an unguarded script,
rebuilding into another corpus, two builds at once, a failed build's work folder.

Every case drives the real CLI (or a real script) in a subprocess with a timeout, on small
GENERATED slices (spavis.simulate). Child processes are found through /proc (Linux only).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from spavis.errors import BuildError

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads child pids from /proc")

MIN_GENES = 20
N_SLICES = 6


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from spavis.cli import app; app()", *args]


def _children(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (from /proc/*/stat)."""
    parent_of: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] != "Z":
                parent_of[int(entry)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parent_of.items() if pp in frontier} - found
        found |= frontier
    return found


def _session(sid: int) -> set[int]:
    """Live processes of session ``sid`` (a build started with start_new_session: all its descendants)."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[3]) == sid:
                found.add(int(entry))
    return found


def _session_gone(sid: int, timeout: float = 15.0) -> set[int]:
    deadline = time.time() + timeout
    while _session(sid) and time.time() < deadline:
        time.sleep(0.05)
    return _session(sid)


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for p in pids:
        try:
            state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(p)
    return alive


def _wait_gone(pids: set[int], timeout: float = 15.0) -> set[int]:
    deadline = time.time() + timeout
    while _alive(pids) and time.time() < deadline:
        time.sleep(0.05)
    return _alive(pids)


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def slices(tmp_path_factory) -> Path:
    """N_SLICES small generated slices of 1,000 stamp-v1 genes (a folder of slice folders)."""
    from spavis.genes import load_vocabulary
    from spavis.simulate import write_simulated_slice

    root = tmp_path_factory.mktemp("slices")
    vocab = load_vocabulary("stamp-v1")
    genes = [e for e in vocab.ensembl_ids if str(e).startswith("ENSG")][:1000]
    for i in range(N_SLICES):
        write_simulated_slice(root / f"gen_{i}", genes=genes, tissue_fraction=0.15, seed=i, median_umis=2000)
    return root


def _build_args(inputs, out: Path, *extra: str) -> list[str]:
    return _cli("build-shards", *map(str, inputs), "--out", str(out), "--min-genes", str(MIN_GENES),
                "--max-spots-per-shard", "2000", "--quiet", *extra)


def _start(args: list[str]) -> subprocess.Popen:
    # a session of its own: the test can send Ctrl-C to the whole group, like a terminal does
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for_workers(proc: subprocess.Popen, work: Path, n: int = 2, timeout: float = 60.0) -> set[int]:
    """Block until the build runs ``n`` worker processes and has started preparing."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"build ended early ({proc.returncode}): {proc.stderr.read()}")
        kids = _children(proc.pid)
        started = work.is_dir() and any(p.name.startswith(".tmp-") or (p / "prepared.json").is_file()
                                        for p in work.iterdir())
        if len(kids) >= n and started:
            return kids
        time.sleep(0.05)
    pytest.fail("the build did not start its workers in time")


def test_ctrl_c_with_two_workers_exits_130_with_one_line(slices, tmp_path):
    """Ctrl-C (SIGINT to the process group) mid-build: status 130, one stderr line, no process left."""
    for attempt in range(3):
        out, work = tmp_path / f"out{attempt}", tmp_path / f"work{attempt}"
        proc = _start(_build_args([slices], out, "--workers", "2", "--work-dir", str(work)))
        kids = _wait_for_workers(proc, work)
        os.killpg(proc.pid, signal.SIGINT)
        try:
            stdout, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"attempt {attempt}: build-shards did not exit within 30 s of Ctrl-C")
        assert proc.returncode == 130, stderr
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("interrupted"), stderr
        assert not _wait_gone(kids), f"attempt {attempt}: worker processes outlived the build"
        assert not _session_gone(proc.pid), f"attempt {attempt}: a process of the build's session is left"
        assert not out.exists() and not list(tmp_path.glob(f"*out{attempt}.tmp-*"))


def test_sigkill_of_main_leaves_no_workers_and_rerun_is_identical(slices, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    proc = _start(_build_args([slices], out, "--workers", "2", "--work-dir", str(work)))
    kids = _wait_for_workers(proc, work)
    os.kill(proc.pid, signal.SIGKILL)  # the main process only: its workers must notice
    proc.communicate(timeout=30)
    assert not _wait_gone(kids), "worker processes outlived a SIGKILLed build"
    assert not _session_gone(proc.pid), "a process of the killed build's session is left"
    assert not out.exists()

    res = subprocess.run(_build_args([slices], out, "--workers", "2", "--work-dir", str(work)),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    from spavis.shards import build_shards

    ref = build_shards([slices], tmp_path / "ref", min_genes=MIN_GENES, max_spots_per_shard=2000, workers=1)
    assert _digest(out) == _digest(ref)  # resumed with 2 workers == fresh with 1 worker, byte for byte
    assert not list(tmp_path.glob("*.tmp-*")) and not list(tmp_path.glob(".*.tmp-*")) and not list(work.glob(".tmp-*"))


def test_script_without_main_guard_fails_fast_with_the_fix(slices, tmp_path):
    script = tmp_path / "build.py"
    script.write_text(textwrap.dedent(f"""
        from spavis.shards import build_shards
        build_shards([{str(slices / 'gen_0')!r}, {str(slices / 'gen_1')!r}], {str(tmp_path / 'out')!r},
                     min_genes={MIN_GENES}, workers=2)
        print("built")
    """))
    proc = _start([sys.executable, str(script)])
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        kids = _children(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        _wait_gone(kids)
        pytest.fail("build_shards(workers=2) from an unguarded script hung")
    assert proc.returncode != 0 and "built" not in stdout
    assert 'if __name__ == "__main__":' in stderr
    assert not (tmp_path / "out").exists()
    assert not _wait_gone(_children(proc.pid))


def test_other_inputs_need_overwrite_and_user_files_are_kept(slices, tmp_path):
    from spavis.shards import build_shards

    out = tmp_path / "corpus"
    build_shards([slices / "gen_0", slices / "gen_1"], out, min_genes=MIN_GENES)
    before = _digest(out)

    res = subprocess.run(_build_args([slices / "gen_2"], out), capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert "--overwrite" in res.stderr and "other inputs" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert _digest(out) == before

    # more slides than before: nothing of the old corpus is lost, no --overwrite needed
    build_shards([slices / "gen_0", slices / "gen_1", slices / "gen_2"], out, min_genes=MIN_GENES)
    assert sorted(p.name for p in (out / "zarr").iterdir()) == ["gen_0.zarr", "gen_1.zarr", "gen_2.zarr"]

    (out / "notes.txt").write_text("mine")
    embedding = out / "zarr" / "gen_0.zarr" / "obsm" / "X_stamp"
    embedding.mkdir(parents=True)
    (embedding / ".zarray").write_text("{}")
    with pytest.raises(BuildError, match="did not write.*notes.txt"):
        build_shards([slices / "gen_3"], out, min_genes=MIN_GENES, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (embedding / ".zarray").is_file()

    (out / "notes.txt").unlink()
    shutil.rmtree(embedding)
    res = subprocess.run(_build_args([slices / "gen_3"], out, "--overwrite"), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (out / "zarr").iterdir()) == ["gen_3.zarr"]


def test_concurrent_build_into_the_same_out_fails_clearly(slices, tmp_path):
    from spavis.shards import build_shards

    out = tmp_path / "corpus"
    first = _start(_build_args([slices], out, "--workers", "1"))
    lock = tmp_path / ".corpus.spavis-lock"
    deadline = time.time() + 60
    while not (tmp_path / ".spavis-work-corpus").is_dir() and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    assert first.poll() is None and lock.exists(), first.stderr.read() if first.poll() is not None else ""
    # paused while it holds the lock: the first build cannot finish during the second's attempt,
    # however slow or loaded the machine (no race between the two builds' speeds)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        with pytest.raises(BuildError, match="another build-shards is writing"):
            build_shards([slices / "gen_0"], out, min_genes=MIN_GENES)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert len(list((out / "zarr").iterdir())) == N_SLICES  # the first build's corpus, untouched


def test_failed_build_says_where_its_work_folder_is(slices, tmp_path):
    bad = tmp_path / "in" / "zz_truncated"
    shutil.copytree(slices / "gen_0", bad)
    h5 = bad / "filtered_feature_bc_matrix.h5"
    h5.write_bytes(h5.read_bytes()[:2000])
    shutil.copytree(slices / "gen_1", tmp_path / "in" / "gen_1")
    res = subprocess.run(_build_args([tmp_path / "in"], tmp_path / "out"), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 1
    work = tmp_path / ".spavis-work-out"
    assert (work / "gen_1" / "prepared.json").is_file()  # kept: the rerun resumes from it
    assert f"kept in {work}" in res.stderr and " MB)" in res.stderr and len(res.stderr.strip().splitlines()) == 1

    res = subprocess.run(_build_args([tmp_path / "in" / "zz_truncated"], tmp_path / "out2"), capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 1 and "kept in" not in res.stderr
    assert not (tmp_path / ".spavis-work-out2").exists()  # nothing prepared: no folder left behind
