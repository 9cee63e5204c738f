"""A killed `spavis build-shards` leaves no visible folder, and the next build in that folder cleans up.

The corpus is written in a hidden ``.OUT.tmp-<host>-<pid>-<random>`` folder (spavis.shards.write.staging_dir);
a SIGKILL (which no handler can catch) leaves it behind, and the next build of *any* --out in the
same parent removes it once its writer is provably dead (same host, process gone). A staging
folder of a live process is never touched.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spavis.shards import build_shards
from spavis.shards.write import staging_dir

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups and pids")

SPAVIS = str(Path(sys.executable).with_name("spavis"))


@pytest.fixture(scope="module")
def slices(tmp_path_factory) -> Path:
    from spavis.simulate import write_simulated_slice

    root = tmp_path_factory.mktemp("staging") / "slices"
    for i in range(3):
        write_simulated_slice(root / f"gen_{i}", seed=20 + i, max_row=10, median_umis=600, he_image=True)
    return root


def _visible(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if not p.name.startswith("."))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_build_leaves_nothing_visible_and_the_next_build_cleans_up(slices, tmp_path, sig):
    parent = tmp_path / "corpora"
    parent.mkdir()
    proc = subprocess.Popen([SPAVIS, "build-shards", str(slices), "--out", str(parent / "first"), "--min-genes",
                             "1", "--workers", "2", "--with-images", "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120  # not a speed threshold: only how long to wait for the folder at all
    staged: list[Path] = []
    while time.monotonic() < deadline and proc.poll() is None and not staged:
        staged = list(parent.glob(".first.tmp-*"))
        time.sleep(0.01)
    if not staged:
        pytest.fail(f"no staging folder seen (exit {proc.poll()}): {proc.stderr.read().decode()[-2000:]}")
    os.killpg(proc.pid, sig)
    proc.wait(timeout=60)
    if sig == signal.SIGKILL or list(parent.glob(".first.tmp-*")):
        # whatever is left is hidden: nothing beside --out but the (absent or complete) corpus
        assert _visible(parent) in ([], ["first"]), _visible(parent)

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        # a staging folder whose writer is alive (this host, a running process) must survive
        alive = staging_dir(parent / "busy")
        alive = alive.with_name(alive.name.replace(f"-{os.getpid()}-", f"-{live.pid}-"))
        alive.mkdir()
        other_host = parent / ".other.tmp-000000-1-0123abcd"  # another host's: never removed
        other_host.mkdir()
        # the next build of ANOTHER --out in the same folder removes the dead staging folder
        build_shards([slices / "gen_0"], parent / "second", min_genes=1)
        assert not list(parent.glob(".first.tmp-*"))
        assert alive.is_dir() and other_host.is_dir()
        assert _visible(parent) in (["second"], ["first", "second"])
    finally:
        live.kill()
        live.wait()


def test_prepared_stores_are_moved_or_linked_and_a_slice_without_its_store_is_prepared_again(slices, tmp_path):
    """Default work dir (deleted after the build): each Zarr store is renamed into the corpus at commit.
    A kept --work-dir: stores are hard-linked, so the prepared slices stay complete for later builds.
    A prepared slice whose store is gone (a build killed after the renames) counts as not prepared."""
    from spavis.format.io import tree_sha256
    from spavis.shards import discover_inputs, prepare_slice
    from spavis.shards.prepare import ZARR_DIR

    inputs = [slices / "gen_0"]
    moved = build_shards(inputs, tmp_path / "a", min_genes=1)
    assert not (tmp_path / ".spavis-work-a").exists()
    work = tmp_path / "work"
    linked = build_shards(inputs, tmp_path / "b", min_genes=1, work_dir=work)
    for sid in ("gen_0",):
        store = linked / "zarr" / f"{sid}.zarr"
        assert tree_sha256(store) == tree_sha256(moved / "zarr" / f"{sid}.zarr")
        assert (work / sid / ZARR_DIR / "X" / "data" / "0").stat().st_nlink == 2  # linked, not copied
        assert (store / "X" / "data" / "0").stat().st_nlink == 2
    (s0,) = discover_inputs([slices / "gen_0"])
    os.rename(work / "gen_0" / ZARR_DIR, tmp_path / "elsewhere")  # as a killed build's commit leaves it
    again = prepare_slice(s0, work, vocab="stamp-v1", min_genes=1)
    assert tree_sha256(again / ZARR_DIR) == tree_sha256(tmp_path / "elsewhere")
