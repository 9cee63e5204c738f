"""`spavis genes ...` commands, the BioMart refresh against a loopback martservice, and the
package-data build from the real sources."""
from __future__ import annotations

import gzip
import json
import os

import pandas as pd
import pytest
from typer.testing import CliRunner

from fakes.biomart import FakeBiomart
from spavis.cli import app
from spavis.genes import load_gene_table, load_vocabulary
from spavis.genes.build_table import DATA_DIR, build_all

runner = CliRunner()


def test_resolve_prints_each_tier():
    result = runner.invoke(app, ["genes", "resolve", "GAPDH", "GAPD", "HER2", "COX1", "ENSG00000198804.2",
                                 "NOT_A_GENE"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    lines = {ln.split("│")[1].strip(): ln for ln in result.output.splitlines() if ln.count("│") > 3}
    assert "symbol" in lines["GAPDH"] and "previous" in lines["GAPD"] and "alias" in lines["HER2"]
    assert "ambiguous" in lines["COX1"] and "ENSG00000095303" in lines["COX1"]
    voc = load_vocabulary("stamp-v1")
    assert "MT-CO1" in lines["ENSG00000198804.2"] and str(voc.index["ENSG00000198804"]) in lines["ENSG00000198804.2"]
    assert "unknown" in lines["NOT_A_GENE"]


def test_vocab_export(tmp_path):
    out = tmp_path / "vocab.json"
    result = runner.invoke(app, ["genes", "vocab", "stamp-v1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    voc = load_vocabulary("stamp-v1")
    data = json.loads(out.read_text())
    assert data["name"] == "stamp-v1" and len(data["genes"]) == 20310
    assert [g["ensembl_id"] for g in data["genes"]] == list(voc.ensembl_ids)
    assert load_vocabulary(out).checksum == voc.checksum
    bad = runner.invoke(app, ["genes", "vocab", "nope", "--out", str(tmp_path / "x.json")])
    assert bad.exit_code == 1 and "unknown vocabulary" in bad.output and not (tmp_path / "x.json").exists()


@pytest.fixture()
def biomart_rows() -> pd.DataFrame:
    """Rows in BioMart's shape, taken from real genes of the pinned table (one row per synonym)."""
    g = load_gene_table().genes.set_index("ensembl_id")
    ids = ["ENSG00000111640", "ENSG00000141736", "ENSG00000198804", "ENSG00000075624", "ENSG00000095303"]
    rows = []
    for e in ids:
        chrom = g.loc[e, "chromosome"].removeprefix("chr").replace("M", "MT")
        for syn in g.loc[e, "aliases"].split("|")[:4] or [""]:
            rows.append((e, g.loc[e, "symbol"], g.loc[e, "biotype"], chrom, syn, "desc"))
    rows.append(("ENSG00000999999", "PATCHGENE", "protein_coding", "CHR_HSCHR19_1_CTG3_1", "", "patch"))
    return pd.DataFrame(rows, columns=["ensembl_gene_id", "external_gene_name", "gene_biotype",
                                       "chromosome_name", "external_synonym", "description"])


def test_refresh_against_loopback_biomart(tmp_path, monkeypatch, biomart_rows):
    out = tmp_path / "refreshed.tsv.gz"
    monkeypatch.chdir(tmp_path)
    with FakeBiomart(biomart_rows) as fake:
        monkeypatch.setenv("SPAVIS_BIOMART_URL", fake.url)
        result = runner.invoke(app, ["genes", "refresh", "--out", str(out)])
        assert result.exit_code == 0, result.output
        kinds = [r.get("type", "query" if "query" in r else "?") for r in fake.requests]
    assert kinds == ["registry", "datasets", "configuration", "query"]
    assert "ensembl_mart_114" in result.output
    assert not (tmp_path / ".pybiomart.sqlite").exists()  # pybiomart's global cache stays off

    table = pd.read_csv(out, sep="\t", dtype=str, keep_default_na=False).set_index("ensembl_id")
    real = biomart_rows[~biomart_rows["chromosome_name"].str.startswith("CHR_")]
    assert set(table.index) == set(real["ensembl_gene_id"])  # patch genes dropped
    assert table.loc["ENSG00000198804", "chromosome"] == "chrM"
    for e, grp in real.groupby("ensembl_gene_id"):
        assert table.loc[e, "symbol"] == grp["external_gene_name"].iloc[0]
        prev = set(filter(None, table.loc[e, "previous_symbols"].split("|")))
        assert set(table.loc[e, "aliases"].split("|")) == set(grp["external_synonym"]) - prev - {""}

    # Opt-in use of the refreshed table for resolution.
    monkeypatch.setenv("SPAVIS_GENE_TABLE", str(out))
    from spavis.genes import resolve
    res = resolve(["GAPDH", "HER2", "TP53"]).set_index("query")
    assert res.loc["GAPDH", "match"] == "symbol"
    assert res.loc["TP53", "match"] == "unknown"  # not served by the fake, so not in this table


def test_refresh_unreachable_is_a_clean_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SPAVIS_BIOMART_URL", "http://127.0.0.1:9/biomart/martservice")
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["genes", "refresh", "--out", str(tmp_path / "t.tsv.gz")])
    assert result.exit_code == 1 and "BioMart" in result.output
    assert not (tmp_path / "t.tsv.gz").exists()


def test_build_table_reproduces_package_data(raw_sources, tmp_path):
    """The shipped table and presets are exactly what the build script makes from ../shared."""
    paths = build_all(raw_sources / "genes", tmp_path)
    for path in paths.values():
        shipped = DATA_DIR / path.relative_to(tmp_path)
        assert path.read_bytes() == shipped.read_bytes(), shipped
    assert os.path.getsize(paths["table"]) < 3 * 2**20
    with gzip.open(paths["table"], "rt") as fh:
        assert fh.readline().rstrip("\n").split("\t") == [
            "ensembl_id", "symbol", "symbol_primary", "biotype", "chromosome", "previous_symbols", "aliases"]
