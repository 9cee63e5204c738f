"""The spavis CLI the way users meet its failure modes, in real subprocesses with timeouts.

Permission denied (as an unprivileged user: we usually run as root, where chmod alone does
not deny), a full disk (a tiny tmpfs in a private mount namespace), invalid numbers, the
debug switch, a slice reached twice, a slice without usable scale factors, a missing or
corrupt shard, and file modes under the caller's umask. Each failure must be ONE line, no
traceback; each silent loss must be a warning and a slides.parquet record.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

SPAVIS = str(Path(sys.executable).with_name("spavis"))
TIMEOUT = 300
NOBODY = 65534


def run(args, *, env=None, prefix=(), cwd=None, umask=None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "SPAVIS_NO_PROGRESS": "1", "COLUMNS": "200", **(env or {})}
    cmd = [*prefix, SPAVIS, *map(str, args)]
    if umask is not None:
        cmd = ["sh", "-c", f'umask {umask:03o} && exec "$@"', "sh", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=full_env, cwd=cwd)


def assert_one_line_error(res: subprocess.CompletedProcess, *needles: str, code: int = 1) -> str:
    err = res.stderr
    assert res.returncode == code, (res.returncode, res.stdout, err)
    assert "Traceback" not in err and "╭" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, err)
    return lines[0]


# ----------------------------------------------------------------------------- environments


def _shared_tmp() -> Path:
    """A folder an unprivileged user can enter (pytest's tmp_path is private to root)."""
    d = Path(tempfile.mkdtemp(prefix="spavis-robust-"))
    d.chmod(0o777)
    return d


@pytest.fixture(scope="module")
def unprivileged():
    """Command prefix that runs as `nobody` (or as root without permission-bypassing capabilities), or ()
    when the tests already run unprivileged."""
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot drop privileges to test permission errors")
    prefix = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")
    probe = subprocess.run([*prefix, sys.executable, "-c", "import spavis.cli"], capture_output=True,
                           timeout=TIMEOUT, env={**os.environ, "HOME": "/tmp"})
    if probe.returncode == 0:
        return prefix
    # the tree is private to root (a clone in a 0700 folder such as mktemp's): stay root, but without the
    # capabilities that bypass file permissions, so root is refused like anyone else
    prefix = ("setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search")
    probe = subprocess.run([*prefix, sys.executable, "-c", "import spavis.cli"], capture_output=True,
                           timeout=TIMEOUT, env={**os.environ, "HOME": "/tmp"})
    if probe.returncode != 0:
        pytest.skip(f"cannot drop privileges to test permission errors ({probe.stderr.decode()[-200:]})")
    return prefix


@pytest.fixture
def nobody_dir():
    d = _shared_tmp()
    (d / "home").mkdir(mode=0o777)
    (d / "home").chmod(0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _full_disk_prefix(mount: Path, size: str) -> tuple[str, ...]:
    return ("unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o size={size} tmpfs {mount} && exec "$@"', "sh")


@pytest.fixture(scope="module")
def full_disk_ok():
    if shutil.which("unshare") is None:
        pytest.skip("no unshare: cannot mount a tiny tmpfs to fill a disk")
    d = Path(tempfile.mkdtemp())
    probe = subprocess.run([*_full_disk_prefix(d, "64k"), "true"], capture_output=True, timeout=60)
    d.rmdir()
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here ({probe.stderr.decode().strip()[:200]})")


@pytest.fixture(scope="module")
def slices(tmp_path_factory) -> Path:
    """Small generated slices: a (complete), b (no scale factors), c (unreadable scale factors),
    plus a_link (a symlink to a) and a_copy (an identical copy of a)."""
    from spavis.simulate import write_simulated_slice
    from spavis.spaceranger import SCALEFACTORS, SPATIAL_DIR

    root = tmp_path_factory.mktemp("robust") / "in"
    for i, name in enumerate("abc"):
        write_simulated_slice(root / name, slide_id=name, seed=i, max_row=8, median_umis=800)
    (root / "b" / SPATIAL_DIR / SCALEFACTORS).unlink()
    (root / "c" / SPATIAL_DIR / SCALEFACTORS).write_text("{not json")
    shutil.copytree(root / "a", root / "a_copy")
    (root.parent / "a_link").symlink_to(root / "a", target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def built(slices) -> tuple[Path, subprocess.CompletedProcess]:
    out = slices.parent / "corpus"
    res = run(["build-shards", slices, slices.parent / "a_link", "--out", out, "--min-genes", "10",
               "--max-spots-per-shard", "300", "-q"], umask=0o002)
    assert res.returncode == 0, res.stderr
    return out, res


# ----------------------------------------------------------------------------- permission denied


def test_permission_denied_output(unprivileged, nobody_dir):
    ro = nobody_dir / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    res = run(["simulate", ro / "out"], prefix=unprivileged, env={"HOME": str(nobody_dir / "home")})
    assert_one_line_error(res, str(ro / "out"), "permission denied")
    assert not (ro / "out").exists()


def test_permission_denied_input(unprivileged, nobody_dir, slices):
    src = nobody_dir / "in"
    shutil.copytree(slices / "a", src)
    for p in [src, *src.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    secret = src / "filtered_feature_bc_matrix.h5"
    secret.chmod(0o000)  # unreadable to every user without a capability that bypasses permissions
    res = run(["build-shards", src, "--out", nobody_dir / "out", "-q"], prefix=unprivileged,
              env={"HOME": str(nobody_dir / "home")})
    assert_one_line_error(res, str(secret), "permission denied")


def test_permission_denied_cache(unprivileged, nobody_dir):
    ro = nobody_dir / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    env = {"HOME": str(nobody_dir / "home"), "SPAVIS_GEO_URL": "http://127.0.0.1:9", "SPAVIS_FETCH_RETRIES": "1"}
    res = run(["fetch", "--source", "geo", "--id", "GSM4284316", "--cache", ro / "cache"], prefix=unprivileged, env=env)
    assert_one_line_error(res, str(ro / "cache"), "permission denied")


# ----------------------------------------------------------------------------- full disk


def test_disk_full_simulate(full_disk_ok, tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    res = run(["simulate", mount / "out"], prefix=_full_disk_prefix(mount, "512k"))
    assert_one_line_error(res, "no space left on the device", "free some space")
    assert res.returncode == 1  # not a crash at exit (HDF5 handles)


def test_disk_full_build_shards(full_disk_ok, slices, tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    res = run(["build-shards", slices / "a", "--out", mount / "corpus", "--min-genes", "10", "-q"],
              prefix=_full_disk_prefix(mount, "256k"))
    assert_one_line_error(res, "no space left on the device")


# ----------------------------------------------------------------------------- numbers, debug


@pytest.mark.parametrize("args, option", [
    (["simulate", "OUT", "--median-umis", "-5"], "--median-umis"),
    (["simulate", "OUT", "--median-umis", "0"], "--median-umis"),
    (["simulate", "OUT", "--seed", "-1"], "--seed"),
    (["simulate", "OUT", "--n-slices", "0"], "--n-slices"),
    (["build-shards", "IN", "--out", "OUT", "--k-neighbors", "0"], "--k-neighbors"),
    (["build-shards", "IN", "--out", "OUT", "--min-genes", "-1"], "--min-genes"),
    (["build-shards", "IN", "--out", "OUT", "--workers", "0"], "--workers"),
    (["build-shards", "IN", "--out", "OUT", "--max-spots-per-shard", "0"], "--max-spots-per-shard"),
    (["fetch", "--source", "geo", "--id", "GSM1", "--workers", "0"], "--workers"),
])
def test_invalid_numbers_are_usage_errors(args, option, tmp_path):
    (tmp_path / "IN").mkdir()
    res = run([a.replace("OUT", str(tmp_path / "o")).replace("IN", str(tmp_path / "IN")) if a in ("OUT", "IN") else a
               for a in args])
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and option in res.stderr
    assert not (tmp_path / "o").exists()


def test_debug_switch_shows_the_traceback(tmp_path):
    (tmp_path / "empty").mkdir()
    quiet = run(["info", tmp_path / "empty"])
    assert_one_line_error(quiet, "manifest.json")
    for res in (run(["info", tmp_path / "empty"], env={"SPAVIS_DEBUG": "1"}),
                run(["--debug", "info", tmp_path / "empty"])):
        assert res.returncode == 1
        assert "Traceback" in res.stderr and "ValidationError" in res.stderr


# ----------------------------------------------------------------------------- nothing silently wrong


def test_same_slice_twice_is_counted_once(built):
    out, res = built
    slides = pq.read_table(out / "slides.parquet").to_pandas().set_index("slide_id")
    assert sorted(slides.index) == ["a", "b", "c"]
    warned = [ln for ln in res.stderr.splitlines() if ln.startswith("warning:") and "same input files" in ln]
    assert len(warned) == 2, res.stderr  # the symlink and the copy
    assert any("a_copy" in ln and "copy" in ln for ln in warned)
    assert any("reached through a link" in ln for ln in warned)
    inputs = json.loads((out / "manifest.json").read_text())
    assert len({s["input_sha256"] for s in pq.read_table(out / "slides.parquet").to_pylist()}) == 3, inputs.keys()


def test_missing_or_unreadable_scalefactors_are_recorded(built):
    out, res = built
    slides = pq.read_table(out / "slides.parquet").to_pandas().set_index("slide_id")
    a, b, c = (slides.loc[k] for k in "abc")
    assert a["um_per_px_method"] == "scalefactors" and list(a["warnings"]) == []
    for row in (b, c):
        assert row["um_per_px_method"] == "lattice"
        assert row["um_per_px"] == pytest.approx(a["um_per_px"], rel=0.03)  # same generator, same pixel size
        assert any("µm per pixel" in w and "estimated" in w for w in row["warnings"])
    assert any("scale factors unusable" in w for w in c["warnings"])
    assert any("no scale factors" in w for w in b["warnings"])
    err = res.stderr
    assert "warning: b: no scale factors" in err and "scale factors unusable" in err


def test_missing_positions_say_the_graph_is_lost(slices, tmp_path):
    from spavis.spaceranger import POSITIONS, SPATIAL_DIR

    src = tmp_path / "nopos"
    shutil.copytree(slices / "a", src)
    (src / SPATIAL_DIR / POSITIONS).unlink()
    res = run(["build-shards", src, "--out", tmp_path / "o", "--min-genes", "10", "-q"])
    assert res.returncode == 0, res.stderr
    row = pq.read_table(tmp_path / "o" / "slides.parquet").to_pylist()[0]
    assert row["neighbor_method"] == "none" and row["um_per_px"] is None
    assert any("no neighbour graph" in w and "no µm scale" in w for w in row["warnings"])
    assert "warning: nopos: no spot positions" in res.stderr


def test_outputs_follow_the_umask(built):
    out, _ = built
    for p in [out, *out.rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        if p.is_dir():
            assert mode == 0o775, p
        else:
            assert mode in (0o664, 0o775), (p, oct(mode))


def test_simulated_slices_follow_the_umask(tmp_path):
    res = run(["simulate", tmp_path / "sim", "--median-umis", "500"], umask=0o002)
    assert res.returncode == 0, res.stderr
    paths = [p for p in (tmp_path / "sim").rglob("*")]
    assert paths and all(stat.S_IMODE(p.stat().st_mode) == (0o775 if p.is_dir() else 0o664) for p in paths)


# ----------------------------------------------------------------------------- corpus integrity


def test_validate_names_a_missing_and_a_corrupt_shard(built, tmp_path):
    out, _ = built
    c = tmp_path / "c"
    shutil.copytree(out, c)
    shards = sorted((c / "data" / "expression").glob("*.parquet"))
    assert len(shards) >= 2
    shards[0].unlink()
    raw = bytearray(shards[1].read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 2048] = bytes(2048)
    shards[1].write_bytes(bytes(raw))
    res = run(["validate", c])
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert f"{shards[0]}: listed in manifest.json but missing" in res.stderr + res.stdout
    assert f"{shards[1]}: sha256" in res.stderr + res.stdout


def test_empty_in_tissue_set_says_so(slices, tmp_path):
    import pandas as pd

    from spavis.spaceranger import POSITIONS, SPATIAL_DIR

    src = tmp_path / "notissue"
    shutil.copytree(slices / "a", src)
    pos_file = src / SPATIAL_DIR / POSITIONS
    pos = pd.read_csv(pos_file)
    pos["in_tissue"] = 0
    pos.to_csv(pos_file, index=False)
    res = run(["build-shards", src, "--out", tmp_path / "o", "-q"])
    line = assert_one_line_error(res, "no spot of any slide is marked in tissue", "notissue", "positions file")
    assert "--min-genes" not in line
    assert not (tmp_path / "o").exists()


def test_disk_full_single_file_writer_names_the_file(full_disk_ok, tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    res = run(["genes", "vocab", "stamp-v1", "--out", mount / "vocab.json"], prefix=_full_disk_prefix(mount, "64k"))
    assert_one_line_error(res, "vocab.json", "no space left on the device")


def test_version_needs_no_command():
    import spavis

    res = run(["--version"])
    assert res.returncode == 0 and res.stdout.strip() == spavis.__version__, res.stderr
