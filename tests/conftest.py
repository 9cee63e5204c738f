"""Test-wide settings. HF_* variables must be set before huggingface_hub/datasets import."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_UPDATE_DOWNLOAD_COUNTS", "0")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# One BLAS / OpenMP / numba thread per test process: pytest-xdist already runs up to 4 processes on
# the machine's cores, and each library defaulting to one thread per core oversubscribes the CPU
# (measured: test_short_alignment_learns 163 s -> 68 s wall, 78 s -> 33 s CPU on the 2-core box).
# Subprocesses the tests start inherit it. A test about threads sets its own count.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ["COLUMNS"] = "240"  # rich tables and messages unwrapped, whatever the tmp path length
os.environ["NO_PROXY"] = "127.0.0.1,localhost"
os.environ["no_proxy"] = "127.0.0.1,localhost"
for _var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
    os.environ.pop(_var, None)

import pytest  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Small real public fixtures copied from ../shared/data (same layout; sources and licenses in
# tests/data/README.md and DATA_CARD.md), so the suite runs on a plain `git clone`.
FIXTURES = PROJECT_ROOT / "tests" / "data"
# The full raw tables, needed only by tests that rebuild package data from its sources.
RAW_SOURCES = PROJECT_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def real_data() -> Path:
    """Real public fixtures bundled in tests/data (read them, never write)."""
    return FIXTURES


@pytest.fixture(scope="session")
def raw_sources() -> Path:
    """The full raw source tables in ../shared/data, for package-data rebuild tests only."""
    if not RAW_SOURCES.is_dir():
        pytest.skip("rebuilds package data from the raw tables in ../shared/data, which are not beside this clone")
    return RAW_SOURCES


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Every test gets its own HF cache and spavis cache so tests never share state."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(home / "hf" / "datasets"))
    monkeypatch.setenv("SPAVIS_CACHE", str(home / "spavis"))
