"""End to end through the installed CLI: `spavis fetch` (loopback GEO) -> `spavis build-shards`.

Runs the real console script in a subprocess, as a user would, with SPAVIS_GEO_URL
pointing at the loopback GEO built from real SOFT text and the real Visium fixture.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fakes.geo import FakeGEO
from fakes.http import FileServer


def _spavis(*args: str, env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("spavis")
    cmd = [str(script)] if script.exists() else [sys.executable, "-c", "from spavis.cli import app; app()"]
    return subprocess.run(cmd + list(args), env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def geo_env(real_data, tmp_path):
    with FileServer() as srv:
        g = FakeGEO(srv, real_data).build()
        env = dict(os.environ, SPAVIS_GEO_URL=g.base, SPAVIS_CACHE=str(tmp_path / "cache"),
                   SPAVIS_FETCH_BACKOFF="0.01", SPAVIS_FETCH_MAX_WAIT="0.1", SPAVIS_NO_PROGRESS="1",
                   NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
        yield g, env


def test_fetch_then_build_shards_through_the_cli(geo_env, tmp_path):
    pytest.importorskip("spavis.shards")
    pd = pytest.importorskip("pandas")
    g, env = geo_env
    cache = tmp_path / "cache"
    res = _spavis("fetch", "--source", "geo", "--id", "GSE146540", "--id", "GSM4115598", "--workers", "3", env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [str(cache / "geo" / g) for g in ("GSM4391934", "GSM4391935", "GSM4115598")]

    out = tmp_path / "corpus"
    res = _spavis("build-shards", str(cache / "geo"), "--out", str(out), "--min-genes", "1", "--quiet", env=env)
    assert res.returncode == 0, res.stderr
    slides = pd.read_parquet(out / "slides.parquet").set_index("slide_id").sort_index()
    assert list(slides.index) == ["GSM4115598", "GSM4391934", "GSM4391935"]
    assert [list(a) for a in slides["accession"]] == [["GSE138657", "GSM4115598"], ["GSE146540", "GSM4391934"],
                                                      ["GSE146540", "GSM4391935"]]
    assert set(slides["source"]) == {"geo"} and set(slides["species"]) == {"Homo sapiens"}
    assert slides.loc["GSM4391934", "condition"] == "cancer" and slides.loc["GSM4391935", "condition"] == "healthy"
    assert (slides["n_spots_input"] == 100).all() and (slides["n_spots_kept"] > 0).all()
    # The same fixture arrives loose (mtx / h5) and packed: every slide keeps the same spots.
    assert slides["n_spots_kept"].nunique() == 1
    rows = pd.concat(pd.read_parquet(p, columns=["slide_id"]) for p in sorted((out / "data" / "expression").glob("*.parquet")))
    assert rows["slide_id"].value_counts().sort_index().to_dict() == slides["n_spots_kept"].to_dict()


@pytest.mark.parametrize("acc, message", [
    ("GSE999999", r"GSE999999: http://127\.0\.0\.1:\d+/geo/series/GSE999nnn/GSE999999/soft/GSE999999_family\.soft\.gz "
                  r"was not found \(HTTP 404\)\. Check the accession"),
    ("GSE105845", r"GSE105845: no human Visium sample found \(non-human samples skipped: Mus musculus\)"),
])
def test_cli_errors_are_one_clear_line(geo_env, acc, message):
    import re

    _, env = geo_env
    res = _spavis("fetch", "--source", "geo", "--id", acc, env=env, timeout=120)
    assert res.returncode == 1
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.stderr, res.stderr
    assert re.search(message, lines[0]), lines[0]
