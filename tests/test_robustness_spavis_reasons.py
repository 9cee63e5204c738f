"""The spavis CLI says the true reason in one line: a build whose spots all fail QC, an invalid --repo-id.

Real CLI in subprocesses, no network (an invalid id is refused before any Hub call; HF_ENDPOINT
points at a closed port so a call would show up as a network error).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

SPAVIS = str(Path(sys.executable).with_name("spavis"))
HEART = Path(__file__).parents[1] / "spavis" / "data" / "demo" / "human_heart_v1_subsample"


def _run(*args, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "SPAVIS_NO_PROGRESS": "1", "COLUMNS": "300", **env}
    return subprocess.run([SPAVIS, *map(str, args)], capture_output=True, text=True, timeout=300, env=full)


def _errors(res) -> list[str]:
    assert "Traceback" not in res.stderr, res.stderr
    return [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]


def test_every_spot_failing_qc_says_qc_not_missing_positions(tmp_path):
    # the heart subsample has 2-14 vocabulary genes per spot: none reaches 5000
    res = _run("build-shards", HEART, "--out", tmp_path / "out", "--min-genes", "5000")
    assert res.returncode == 1
    (line,) = _errors(res)
    assert "passed QC" in line and "--min-genes" in line
    assert "no spot positions" not in res.stderr and "neighbour graph" not in res.stderr, res.stderr


def test_a_slide_failing_qc_beside_others_records_only_the_qc_reason(tmp_path):
    from spavis.simulate import write_simulated_slice

    gen = write_simulated_slice(tmp_path / "gen", seed=7, max_row=12, median_umis=3000)
    res = _run("build-shards", gen, HEART, "--out", tmp_path / "out", "--min-genes", "30")
    assert res.returncode == 0, res.stderr
    assert "no spot positions" not in res.stderr, res.stderr
    slides = {r["slide_id"]: r for r in pq.read_table(tmp_path / "out" / "slides.parquet").to_pylist()}
    heart = slides["human_heart_v1_subsample"]
    assert heart["n_spots_kept"] == 0
    assert any("no spot passes QC" in w for w in heart["warnings"]), heart["warnings"]
    assert not any("no spot positions" in w for w in heart["warnings"]), heart["warnings"]
    assert heart["um_per_px"] is not None  # the slide's scale is its own, whatever QC kept


@pytest.mark.parametrize("repo_id", ["org/bad..name", "org/..", "org/a--b", "org/name.git", "org/-x"])
def test_invalid_repo_id_is_named_invalid_not_a_network_problem(tmp_path, repo_id):
    res = _run("publish", HEART, "--repo-id", repo_id, HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_OFFLINE="0")
    assert res.returncode == 1
    (line,) = _errors(res)
    assert repo_id in line and "not a valid Hub dataset id" in line and "network" not in line, line
