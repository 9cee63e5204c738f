"""pipelines/slides.smk: one Snakemake job per slide, each the same bag `stamp embed-slides` writes
(GENERATED slides, tiny random-weight model; fixtures shared with tests/test_slides.py)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from test_slides import ROOT, slides, tiny_model  # noqa: F401  (module fixtures)


def test_snakemake_rule_runs_one_job_per_slide(tmp_path, slides, tiny_model):
    pytest.importorskip("snakemake")
    out = tmp_path / "features"
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "pipelines" / "slides.smk"), "--cores", "1",
           "--directory", str(tmp_path), "--config", f"slides={slides}", f"model={tiny_model}", f"out={out}",
           "workers=0", "tissue={'min_tissue_mm2': 0.05, 'min_hole_mm2': 0.01}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    dry = subprocess.run([*cmd, "-n"], capture_output=True, text=True, env=env, timeout=300)
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "embed_slide" in dry.stdout and dry.stdout.count("rule embed_slide") == 3
    # one job, as a cluster runs it: the bag and its manifest entry appear
    one = subprocess.run([*cmd[:3], str(out / "s1.h5"), *cmd[3:]], capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    from stamp.slides.bags import read_bag, read_manifest

    assert read_bag(out / "s1.h5").features.shape[1] == 24
    assert [(e["slide"], e["status"]) for e in read_manifest(out)["slides"]] == [("s1", "done")]
