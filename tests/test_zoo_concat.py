"""``--model A+B`` (the paper's Hop+scS row), raw-count gene sides (OmiCLIP's gene sentences) in the
consumers, and the Table 1 layout of results.md (issue 28).

Data: two GENERATED slides (domain labels, mosaic H&E patches); models: a tiny QuiltNet and a tiny OmiCLIP
served with random weights in their real layouts from the loopback Hub, and a 1-step tiny STAMP gene
encoder. The concatenation's features must equal the parts' own features, L2-normalised and joined.
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from tests.fakes.hub import FakeHub
from tests.test_zoo_vl import (TINY_CLIP, TINY_COCA, labelled_paired_corpus, one_thread,  # noqa: F401
                               overlay, randomized_open_clip)


@pytest.fixture(scope="module")
def corpus_and_gene_run(tmp_path_factory):
    from stamp.cli import app as stamp_app

    root = tmp_path_factory.mktemp("concat")
    corpus = labelled_paired_corpus(root)
    res = CliRunner().invoke(stamp_app, ["pretrain", "--stage", "gene", "--data", str(corpus), "--out",
                                         str(root / "g"), "--config", "tiny", "--max-steps", "1", "--batch-size", "8",
                                         "--warmup-steps", "1", "--no-progress"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return corpus, root / "g"


@pytest.fixture
def zoo(tmp_path, monkeypatch):
    """quiltnet and omiclip (tiny, random) on the loopback Hub, in their real layouts."""
    from safetensors.torch import save_file

    with FakeHub(tmp_path / "hub") as hub:
        hub.activate(monkeypatch, cache_dir=tmp_path / "hf")
        monkeypatch.setenv("STAMP_CACHE", str(tmp_path / "stamp-cache"))
        clip = randomized_open_clip(TINY_CLIP, seed=1)
        save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(tmp_path / "q.safetensors"))
        hub.create_repo("wisdomik/QuiltNet-B-32")
        hub.add_files("wisdomik/QuiltNet-B-32", {"open_clip_config.json": json.dumps({"model_cfg": TINY_CLIP}),
                                                 "open_clip_model.safetensors": tmp_path / "q.safetensors"})
        coca = randomized_open_clip(TINY_COCA, seed=2)
        torch.save({"state_dict": coca.state_dict()}, tmp_path / "checkpoint.pt")
        hub.create_repo("WangGuangyuLab/Loki")
        hub.add_files("WangGuangyuLab/Loki", {"checkpoint.pt": tmp_path / "checkpoint.pt"})
        overlay(tmp_path, monkeypatch, omiclip={"architecture": {"model_cfg": TINY_COCA}, "embed_dim": 16})
        yield hub


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_concatenation_is_the_parts_features_normalised_and_joined(corpus_and_gene_run, zoo):
    from spavis.format import open_corpus
    from stamp.errors import EvaluateError
    from stamp.evaluate.data import load_eval_data
    from stamp.evaluate.features import model_features

    corpus_dir, gene_run = corpus_and_gene_run
    corpus = open_corpus(corpus_dir)
    data = load_eval_data(corpus, "domain")
    spec = f"quiltnet+{gene_run}"
    fused = model_features(spec, data, modality="fused", corpus=corpus, device="cpu")[0]
    image = model_features("quiltnet", data, modality="image", corpus=corpus, device="cpu")[0].features
    gene = model_features(str(gene_run), data, modality="gene", corpus=corpus, device="cpu")[0].features
    assert fused.name == "quiltnet+g" and fused.marks == "V+L+G"
    np.testing.assert_allclose(fused.features, np.concatenate([unit(gene), unit(image)], axis=1), atol=1e-5)
    # one modality asks every part for it: the gene encoder has no image side -> one line, nothing computed
    with pytest.raises(EvaluateError) as err:
        model_features(spec, data, modality="image", corpus=corpus, device="cpu")
    assert "g has no image side" in str(err.value) and "--modality fused" in str(err.value)
    # two image encoders: their image features, each normalised, joined
    both = model_features("quiltnet+omiclip", data, modality="image", corpus=corpus, device="cpu")[0].features
    omi = model_features("omiclip", data, modality="image", corpus=corpus, device="cpu")[0].features
    np.testing.assert_allclose(both, np.concatenate([unit(image), unit(omi)], axis=1), atol=1e-5)


def test_omiclip_gene_sentences_through_embed_and_evaluate_with_table1(corpus_and_gene_run, zoo, tmp_path):
    import stamp
    from spavis.format import open_corpus, rows_to_csr
    from stamp.embed.genes import embed_corpus
    from stamp.evaluate import evaluate
    from stamp.models.gene_inputs import CorpusGenes

    corpus_dir, gene_run = corpus_and_gene_run
    out = embed_corpus("omiclip", corpus_dir, tmp_path / "omi.parquet", device="cpu", progress=False, batch_size=7)
    table = pq.read_table(out)
    got = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    # the reference: every spot's gene sentence (all slides at once), open_clip's tokenizer, encode_text
    corpus = open_corpus(corpus_dir)
    enc = stamp.load("omiclip", device="cpu")
    genes = corpus.genes
    enc.counts.bind(CorpusGenes.of(genes["ensembl_id"].tolist(), genes["symbol"].fillna("").tolist()))
    X = rows_to_csr(pq.read_table(corpus.expression_files[0]), corpus.n_genes)
    for f in corpus.expression_files[1:]:
        import scipy.sparse as sp

        X = sp.vstack([X, rows_to_csr(pq.read_table(f), corpus.n_genes)]).tocsr()
    sentences = enc.counts.sentences(X)
    assert len(sentences) == len(got) and all(sentences)
    with torch.no_grad():
        ref = enc.module.model.encode_text(enc.counts.tokenize(sentences), normalize=False).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)

    # several models scored: the Table 1 layout (rows = models with their marks), results.csv unchanged
    df = evaluate("cluster", ["omiclip", f"quiltnet+{gene_run}"], corpus_dir, out=tmp_path / "ev",
                  label="domain", modality="fused", figures=False, progress=False, device="cpu")
    md = (tmp_path / "ev" / "results.md").read_text()
    assert "## Table 1 layout" in md
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")]
    header = lines[0]
    assert header.startswith("| model | V | L | G | cluster leiden ari | cluster leiden nmi")
    rows = {ln.split(" | ")[0][2:]: ln.split(" | ") for ln in lines[1:5]}
    assert rows["omiclip"][1:4] == ["✓", "", "✓"] and rows["quiltnet+g"][1:4] == ["✓", "✓", "✓"]
    assert rows["pca"][1:4] == ["", "", ""]
    assert "marks" not in df.columns and list(df.columns[:8]) == ["task", "method", "model", "kind", "fold",
                                                                   "scheme", "n_train", "n_test"]
    assert set(df["model"]) == {"omiclip", "quiltnet+g", "random-init", "pca"}
