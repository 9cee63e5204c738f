"""A FIFO, a link to /dev/zero or a socket inside a slice folder never hangs `spavis build-shards`.

Only regular files are hashed or read (spavis.format.io.open_regular; discovery refuses the
rest before any file is opened): the build stops with one line naming the path, with or without
``--with-images``, through the real CLI in a subprocess with a timeout (a hang fails the test).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from spavis.format.io import NotRegularFileError, sha256_file

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs (POSIX)")

SPAVIS = str(Path(sys.executable).with_name("spavis"))
TIMEOUT = 120  # a hang would run forever: the timeout turns it into a failure


@pytest.fixture(scope="module")
def slice_dir(tmp_path_factory) -> Path:
    from spavis.simulate import write_simulated_slice

    root = tmp_path_factory.mktemp("special")
    return write_simulated_slice(root / "gen", seed=3, max_row=6, median_umis=500, he_image=True)


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _add(kind: str, folder: Path) -> Path:
    """Put a special file of ``kind`` into ``folder``; return its path."""
    if kind == "fifo":
        p = folder / "spatial" / "extra.csv"
        os.mkfifo(p)
    elif kind == "devzero":
        p = folder / "image_extra.tif"
        p.symlink_to("/dev/zero")
    elif kind == "fifo-matrix":  # a FIFO under a name a reader would open
        p = folder / "filtered_feature_bc_matrix.h5"
        p.unlink()
        os.mkfifo(p)
    elif kind == "fifo-sidecar":  # a fetched slice whose slice.json is a FIFO
        p = folder / "slice.json"
        os.mkfifo(p)
    elif kind == "dangling":
        p = folder / "notes.txt"
        p.symlink_to(folder / "nowhere")
    else:  # a Unix socket
        p = folder / "sock"
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(p))
        s.close()
    return p


def _run(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "SPAVIS_NO_PROGRESS": "1", "COLUMNS": "300"}
    return subprocess.run([SPAVIS, *map(str, args)], capture_output=True, text=True, timeout=TIMEOUT, env=env)


@pytest.mark.parametrize(("kind", "images"), [
    ("fifo", False), ("fifo", True), ("devzero", False), ("devzero", True), ("fifo-matrix", False),
    ("fifo-matrix", True), ("fifo-sidecar", False), ("dangling", False), ("socket", False)])
def test_special_file_in_a_slice_is_refused_in_one_line(slice_dir, tmp_path, kind, images):
    folder = _copy(slice_dir, tmp_path / "in" / "gen")
    bad = _add(kind, folder)
    out = tmp_path / "out"
    res = _run("build-shards", folder, "--out", out, "--min-genes", "1", *(["--with-images"] if images else []))
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and str(bad) in errors[0] and "not a regular file" in errors[0], res.stderr
    assert not out.exists()


def test_a_fifo_or_device_given_as_the_input_is_refused(tmp_path):
    fifo = tmp_path / "slice.h5"
    os.mkfifo(fifo)
    for given in (fifo, "/dev/zero"):
        res = _run("build-shards", given, "--out", tmp_path / "out")
        assert res.returncode == 1 and "not a regular file" in res.stderr and "Traceback" not in res.stderr


def test_hashing_never_opens_a_fifo_or_reads_a_device(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    link = tmp_path / "zero"
    link.symlink_to("/dev/zero")
    for p in (fifo, link):
        with pytest.raises(NotRegularFileError, match="not a regular file"):
            sha256_file(p)  # returns at once (O_NONBLOCK + fstat), never blocks or reads


def test_a_fifo_or_device_given_as_vocab_or_annotations_is_refused(slice_dir, tmp_path):
    fifo = tmp_path / "vocab.json"
    os.mkfifo(fifo)
    for flag, given in (("--vocab", fifo), ("--vocab", "/dev/zero")):
        res = _run("build-shards", slice_dir, "--out", tmp_path / "out", flag, given)
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
        assert res.returncode == 1 and len(errors) == 1 and "not a regular file" in errors[0], res.stderr
    labels = tmp_path / "labels.csv"
    os.mkfifo(labels)
    res = _run("build-shards", slice_dir, "--out", tmp_path / "out", "--obs-columns", "domain",
               "--annotations", labels)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.returncode == 1 and len(errors) == 1 and "not a regular file" in errors[0], res.stderr
