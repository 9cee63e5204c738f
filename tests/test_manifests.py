"""Manifests: committed files are current and valid; validation names bad rows; CLI exit codes."""
from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
from typer.testing import CliRunner

from spavis.cli import app
from spavis.manifests import (ROW_SCHEMA, ManifestError, ManifestRow, load_manifest, summarize,
                              validate_manifest, write_manifest)

MANIFESTS = ("hest-v1", "stimage-v1", "geo-v1", "tenx-v1")


def test_committed_manifests_are_current(raw_sources, tmp_path):
    out = subprocess.run([sys.executable, "manifests/build_manifests.py", "--src", str(raw_sources / "manifests"),
                          "--check"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(open("manifests/schema.json").read()) == ROW_SCHEMA


@pytest.mark.parametrize("name", MANIFESTS)
def test_committed_manifest_valid(name):
    assert validate_manifest(f"manifests/{name}.csv") == []
    rows = load_manifest(name)  # bundled name resolves too
    assert rows and all(r.species == "Homo sapiens" for r in rows)
    assert len({r.slide_id for r in rows}) == len(rows)


def test_counts_match_source_tables(raw_sources):
    hest = pd.read_csv(raw_sources / "manifests" / "hest_v1_1_0_metadata.csv", encoding="utf-8-sig")
    want = hest[(hest.st_technology == "Visium") & (hest.species == "Homo sapiens")]
    rows = load_manifest("manifests/hest-v1.csv")
    assert sorted(r.slide_id for r in rows) == sorted(want.id)
    by_id = {r.slide_id: r for r in rows}
    tenx152 = by_id["TENX152"]
    assert tenx152.organ == "bowel" and tenx152.condition == "cancer"
    assert tenx152.expected_files == ["st/TENX152.h5ad", "metadata/TENX152.json"]
    geo = load_manifest("manifests/geo-v1.csv")
    assert all(r.accession[0].startswith("GSE") and r.accession[1] == r.slide_id for r in geo)
    st = pd.read_csv(raw_sources / "manifests" / "stimage1k4m_meta_all_gene02122025.csv")
    n_st = ((st.tech == "Visium") & (st.species == "human")).sum()
    assert len(load_manifest("manifests/stimage-v1.csv")) == n_st
    assert summarize(rows)["by_source"] == {"hest": len(want)}


def _bad_manifest(tmp_path):
    good = ManifestRow(slide_id="GSM1", source="geo", accession=["GSE1", "GSM1"], organ="heart",
                       license="x", citation="y")
    path = write_manifest([good], tmp_path / "bad.csv")
    text = path.read_text().splitlines()
    text.append("bad/id,geo,GSE2,heart,Homo sapiens,cancer,Visium,x,y,,,{}")
    text.append("GSM3,geo,GSE3;GSM3,heart,Mus musculus,sick,Visium,x,y,../etc/passwd,f=md5:zz,{}")
    text.append("GSM1,geo,GSE1;GSM1,heart,Homo sapiens,cancer,Visium,x,y,,,not json")
    path.write_text("\n".join(text) + "\n")
    return path


def test_validate_names_each_bad_row(tmp_path):
    problems = validate_manifest(_bad_manifest(tmp_path))
    text = "\n".join(problems)
    assert "line 3 (bad/id): slide_id" in text and "GEO rows need a GSM" in text
    assert "line 4 (GSM3): species" in text and "line 4 (GSM3): condition" in text
    assert "line 4 (GSM3): expected_files" in text and "line 4 (GSM3): checksums" in text
    assert "line 5 (GSM1): extra: not JSON" in text
    with pytest.raises(ManifestError, match="bad.csv"):
        load_manifest(tmp_path / "bad.csv")


def test_cli_validate_exit_codes(tmp_path):
    runner = CliRunner()
    ok = runner.invoke(app, ["manifest", "validate", "manifests/tenx-v1.csv"])
    assert ok.exit_code == 0, ok.output
    bad = runner.invoke(app, ["manifest", "validate", str(_bad_manifest(tmp_path))])
    assert bad.exit_code == 1 and "GSM3" in bad.output and "bad/id" in bad.output
    summary = runner.invoke(app, ["manifest", "summary", "--json", "manifests/tenx-v1.csv"])
    assert json.loads(summary.output)["n_slices"] == len(load_manifest("manifests/tenx-v1.csv"))
