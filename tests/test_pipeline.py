"""pipelines/Snakefile (`snakemake --cores 2`) equals `spavis build-shards` byte for byte.

The pipeline fetches two real-manifest HEST heart samples from the loopback Hub (the real
Visium heart fixture packaged as HEST publishes it), prepares one job per slice and writes
the corpus; build-shards is then run on the same fetched cache with the same parameters.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from fakes.hub import FakeHub, hest_sample_files
from spavis.manifests import load_manifest, write_manifest

ROOT = Path(__file__).resolve().parents[1]


def _files(root: Path) -> dict[str, bytes]:
    keep = ("genes.parquet", "slides.parquet")
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.parquet"))
            if p.name in keep or "data/expression" in p.as_posix()}


def test_snakemake_pipeline_matches_build_shards(tmp_path, real_data):
    pytest.importorskip("snakemake")
    build = pytest.importorskip("spavis.shards")
    rows = [r for r in load_manifest(ROOT / "manifests" / "hest-v1.csv") if r.organ == "heart"][:2]
    meta = pd.read_csv(real_data / "manifests" / "hest_v1_1_0_metadata.csv", encoding="utf-8-sig")
    meta = meta.set_index("id", drop=False)
    manifest = write_manifest(rows, tmp_path / "heart.csv")
    with FakeHub(tmp_path / "hub") as hub:
        hub.create_repo("MahmoodLab/hest", "dataset")
        for r in rows:
            hub.add_files("MahmoodLab/hest", hest_sample_files(real_data / "visium" / "human_heart_v1_subsample",
                                                               r.slide_id, meta.loc[r.slide_id].to_dict()),
                          "dataset")
        env = hub.env(tmp_path)
        env["SPAVIS_NO_PROGRESS"] = "1"
        cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "pipelines" / "Snakefile"),
               "--configfile", str(ROOT / "pipelines" / "config.yaml"), "--cores", "2", "--directory",
               str(tmp_path / "run"), "--quiet", "--config", f"manifest={manifest}", "source=hest",
               "cache=cache", "work=work", "out=corpus", "min_genes=1"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        resolves = [p for m, p in hub.requests if m == "GET" and "/resolve/" in p]
        assert len(resolves) == 4  # 2 slices x (h5ad + metadata), one fetch job per slice
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "work").iterdir() if not p.name.startswith(".")) == sorted(
        r.slide_id for r in rows)
    ref = build.build_shards([run / "cache" / "hest"], tmp_path / "ref", min_genes=1)
    got, want = _files(run / "corpus"), _files(Path(ref))
    assert "genes.parquet" in want and "slides.parquet" in want
    assert any(k.startswith("data/expression/") for k in want)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], name
