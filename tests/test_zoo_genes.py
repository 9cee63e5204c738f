"""The gene side of the zoo (issue 27): scGPT, scGPT-spatial, Nicheformer and Geneformer, each with its own
input rules, equal to an independent reference of the AUTHORS' code path (tests/reference_gene_zoo.py).

Random weights at tiny sizes (2 layers, width 32) saved in each model's released layout (scGPT:
``best_model.pt`` with flash-attention ``Wqkv`` keys + ``args.json`` + ``vocab.json``; Nicheformer: a
Lightning checkpoint dict, and the Hub copy's safetensors; Geneformer: ``save_pretrained`` + pickled
dictionaries holding numpy scalars like the real ones), a GENERATED two-slide corpus on the stamp-v1
vocabulary. Real sizes: the catalogue's architectures on the meta device. One ``stamp evaluate cluster``
subprocess runs the four models of the paper's Table 1 from the loopback Hub.
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from stamp.errors import ModelConfigError, PretrainedError
from stamp.zoo.catalogue import catalogue, get_pretrained
from tests.reference_gene_zoo import (ReferenceNicheformer, ReferenceScGPT, geneformer_embed, geneformer_tokens,
                                      nicheformer_tokens, randomize_, scgpt_embed, write_scgpt_release)
from tests.stamp_helpers import gene_subset

GENES = 300  # generated genes (the first 300 human genes of stamp-v1); the corpus vocabulary is all of stamp-v1
ATOL = 1e-5
GENE_ENTRIES = sorted(n for n, e in catalogue().items() if e.library in ("scgpt", "nicheformer", "geneformer"))


# ----------------------------------------------------------------------------- data
@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one torch thread is faster than two contending ones on a shared 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two GENERATED slides (3 domains) on the full stamp-v1 vocabulary, with a ``domain`` column."""
    from spavis.shards import build_shards
    from spavis.simulate import write_simulated_slice

    base = tmp_path_factory.mktemp("genezoo")
    vocab = gene_subset(GENES)
    folders = [write_simulated_slice(base / "in" / f"gen{s}", genes=list(vocab.ensembl_ids), symbols=list(vocab.symbols),
                                     seed=s, n_domains=3, with_image=False, max_row=4, n_markers=30, marker_lfc=3.0)
               for s in range(2)]
    return build_shards(folders, base / "corpus", vocab="stamp-v1", min_genes=5, obs_columns="domain")


def slides(path) -> list[tuple[str, np.ndarray, list[str]]]:
    """(slide id, dense counts spots x corpus genes, spot ids) per slide, in corpus order."""
    from spavis.format import open_corpus, rows_to_csr

    c = open_corpus(path)
    return [(t.column("slide_id")[0].as_py(), rows_to_csr(t, c.n_genes).toarray(), t.column("spot_id").to_pylist())
            for t in c.iter_slides(columns=["spot_id", "gene_index", "counts"])]


def corpus_genes(path) -> tuple[list[str], list[str]]:
    from spavis.format import open_corpus

    genes = open_corpus(path).genes
    return genes["ensembl_id"].astype(str).tolist(), genes["symbol"].fillna("").astype(str).tolist()


def ours(enc, path) -> list[np.ndarray]:
    """The project's path for count encoders: bind once, then slide by slide (context, batches)."""
    from spavis.format import open_corpus, rows_to_csr
    from stamp.models.gene_inputs import CorpusGenes

    c = open_corpus(path)
    enc.counts.bind(CorpusGenes.from_table(c.genes))
    out = []
    for t in c.iter_slides(columns=["spot_id", "gene_index", "counts"]):
        X = rows_to_csr(t, c.n_genes)
        ctx = enc.counts.slide_context(X)
        out.append(np.concatenate([enc.embed_counts(X[a:a + 50], slide=ctx).numpy() for a in range(0, X.shape[0], 50)]))
    return out


def overlay(tmp_path, monkeypatch, **changes) -> None:
    """$STAMP_REGISTRY entries = shipped ones with ``changes`` ({name: {field: value}}) - a mirror / fork."""
    from importlib import resources

    shipped = json.loads((resources.files("stamp.zoo") / "pretrained.json").read_text())["models"]
    entries = {name: {**shipped[name], **fields} for name, fields in changes.items()}
    path = tmp_path / "overlay.json"
    path.write_text(json.dumps({"models": entries}))
    monkeypatch.setenv("STAMP_REGISTRY", str(path))


def np_scalars(d: dict, dtype) -> dict:
    """A dictionary whose values are numpy scalars, pickled as the released Geneformer files are."""
    return {k: (v if k.startswith("<") and dtype is np.float64 else dtype(v)) for k, v in d.items()}


# ----------------------------------------------------------------------------- real sizes
@pytest.mark.parametrize("name", GENE_ENTRIES)
def test_real_size_gene_architectures_on_meta_match_the_catalogue(name):
    from stamp.zoo.gene_zoo import build_gene_model

    entry = get_pretrained(name)
    module = build_gene_model(entry)  # meta device: no memory
    assert sum(p.numel() for p in module.parameters()) == entry.parameters
    if entry.card_parameters:
        assert abs(entry.parameters - entry.card_parameters) / entry.card_parameters < 0.05
    widths = {p.shape[0] for n, p in module.named_parameters() if "norm" in n.lower() and p.ndim == 1}
    assert widths == {entry.embed_dim}
    assert entry.kind == "gene" and entry.citation.startswith("@") and entry.commercial is True
    assert entry.hub_id or entry.download_url


# ----------------------------------------------------------------------------- scGPT
def scgpt_release(folder: Path, symbols: list[str], *, seed: int = 0, spatial: bool = False):
    """Tiny random scGPT in the released layout; the vocabulary holds 240 of the corpus genes (shuffled ids),
    20 symbols the corpus lacks and <pad> only (<cls>, <eoc> are appended by the loader, as embed_data)."""
    rng = np.random.default_rng(seed)
    names = list(dict.fromkeys(s for s in symbols if s))[:GENES]
    picked = list(rng.choice(names, 240, replace=False)) + [f"NOTAGENE{i}" for i in range(20)] + ["<pad>"]
    ids = rng.permutation(len(picked))
    vocab = {g: int(i) for g, i in zip(picked, ids)}
    ntoken = len(vocab) + 2
    args = {"embsize": 32, "nheads": 4, "d_hid": 48, "nlayers": 2, "n_layers_cls": 3, "dropout": 0.2,
            "pad_token": "<pad>", "pad_value": -2, "n_bins": 51, "max_seq_len": 1200, "input_style": "binned"}
    torch.manual_seed(seed)
    model = randomize_(ReferenceScGPT(ntoken, 32, 4, 48, 2, vocab["<pad>"]), seed).eval()
    stats = None
    if spatial:  # gene statistics for most vocabulary genes; the rest are taken from the slide
        known = [vocab[g] for g in picked[:200]]
        stats = pd.DataFrame({"mean": rng.uniform(0.2, 3.0, len(known)), "std": 1.0}, index=known)
    return write_scgpt_release(folder, model, vocab, args, stats), model


def test_scgpt_equals_the_authors_embed_data_through_stamp_embed(corpus, tmp_path, monkeypatch):
    """stamp embed --model scgpt --weights FOLDER == embed_data (binning, sampling above max_length, <cls>, L2),
    the random draws taken from the same per-spot seeds."""
    import pyarrow.parquet as pq

    from typer.testing import CliRunner

    from stamp.cli import app
    from stamp.models.gene_inputs import row_seed

    ids, symbols = corpus_genes(corpus)
    folder, ref = scgpt_release(tmp_path / "scgpt", symbols)
    overlay(tmp_path, monkeypatch, scgpt={"tokenizer": {"match_by": "symbol", "n_bins": 51, "max_length": 64,
                                                        "seed": 7}})
    res = CliRunner().invoke(app, ["embed", "--model", "scgpt", "--weights", str(folder), "--data", str(corpus),
                                   "--out", str(tmp_path / "e.parquet"), "--device", "cpu", "--no-progress",
                                   "--batch-size", "40"])
    assert res.exit_code == 0, res.output
    table = pq.read_table(tmp_path / "e.parquet")
    got = np.stack(table.column("embedding").to_pylist())
    expected, spot_ids = [], []
    for _, counts, spots in slides(corpus):
        expected.append(scgpt_embed(counts, symbols, folder, ref, seed_for=lambda g, v: row_seed(7, g, v),
                                    max_length=64))
        spot_ids += spots
    assert table.column("spot_id").to_pylist() == spot_ids
    assert np.abs(got - np.concatenate(expected)).max() < ATOL
    record = json.loads(pq.read_schema(tmp_path / "e.parquet").metadata[b"stamp.model"])
    inputs = json.loads(record["stamp_model_inputs"])
    assert inputs["genes_matched"] == 240 and inputs["n_bins"] == 51 and inputs["max_length"] == 64


def test_scgpt_spatial_needs_its_folder_and_equals_the_authors(corpus, tmp_path):
    import stamp
    from stamp.models.gene_inputs import row_seed

    with pytest.raises(PretrainedError, match=r"scgpt-spatial is not on the Hugging Face Hub: download its files "
                                              r"from https://figshare.com/.*--weights FOLDER"):
        stamp.load("scgpt-spatial", device="cpu")
    ids, symbols = corpus_genes(corpus)
    folder, ref = scgpt_release(tmp_path / "spatial", symbols, seed=1, spatial=True)
    (folder / "all_dict_mean_std.csv").rename(tmp_path / "stats.csv")
    with pytest.raises(PretrainedError, match=r"lacks all_dict_mean_std.csv"):
        stamp.load("scgpt-spatial", weights=folder, device="cpu")
    (tmp_path / "stats.csv").rename(folder / "all_dict_mean_std.csv")
    enc = stamp.load("scgpt-spatial", weights=folder / "best_model.pt", device="cpu")  # a file: its folder
    got = ours(enc, corpus)
    for (_, counts, _), mine in zip(slides(corpus), got):
        want = scgpt_embed(counts, symbols, folder, ref, seed_for=lambda g, v: row_seed(0, g, v), spatial=True)
        assert np.abs(mine - want).max() < ATOL
    assert enc.provenance.extra["inputs"]["slide_normalised"] is True
    # stamp evaluate's path (weights=, per-slide tables, the random-init baseline of the same architecture)
    from spavis.format import open_corpus
    from stamp.evaluate.data import load_eval_data
    from stamp.evaluate.features import model_features

    sets = model_features("scgpt-spatial", load_eval_data(open_corpus(corpus), "domain"), device="cpu",
                          weights=folder, with_random=True, batch_size=64)
    assert [s.kind for s in sets] == ["model", "random-init"]
    assert np.abs(sets[0].features - np.concatenate(got)).max() < ATOL
    assert np.abs(sets[1].features - sets[0].features).max() > 0.1  # fresh weights, same inputs


def test_evaluate_weights_option_names_its_model(tmp_path):
    from stamp.cli.evaluate import weights_by_model
    from stamp.evaluate import EvaluateError, evaluate

    (tmp_path / "scGPT=v1").mkdir()  # a folder whose name holds "=": a bare PATH, not MODEL=PATH
    assert weights_by_model([str(tmp_path / "scGPT=v1")], ["scgpt"]) == {"scgpt": str(tmp_path / "scGPT=v1")}
    assert weights_by_model(["scgpt-spatial=/a", "uni=/b"], ["scgpt-spatial", "uni"]) == {"scgpt-spatial": "/a",
                                                                                       "uni": "/b"}
    assert weights_by_model(["/a"], ["scgpt-spatial"]) == {"scgpt-spatial": "/a"}
    with pytest.raises(EvaluateError, match="with several --model, write --weights MODEL=PATH"):
        weights_by_model(["/a"], ["scgpt", "nicheformer"])
    with pytest.raises(EvaluateError, match="--weights for scgpt-spatial, which is not among the --model given"):
        evaluate("cluster", ["scgpt"], "nowhere", out="x", weights={"scgpt-spatial": "/a"})


def test_scgpt_release_with_extra_encoder_tensor_or_missing_one_is_refused(corpus, tmp_path):
    import stamp

    _, symbols = corpus_genes(corpus)
    folder, _ = scgpt_release(tmp_path / "s", symbols)
    state = torch.load(folder / "best_model.pt", weights_only=True)
    state["transformer_encoder.layers.2.linear1.weight"] = torch.zeros(48, 32)  # a third layer: not this config
    torch.save(state, folder / "best_model.pt")
    with pytest.raises(ModelConfigError, match=r"have no place in the architecture .*layers\.2\.linear1"):
        stamp.load("scgpt", weights=folder, device="cpu")
    del state["transformer_encoder.layers.2.linear1.weight"]
    bias = state.pop("encoder.enc_norm.bias")
    torch.save(state, folder / "best_model.pt")
    with pytest.raises(ModelConfigError, match=r"not in the weights \(first: encoder.enc_norm.bias\)"):
        stamp.load("scgpt", weights=folder, device="cpu")
    # weight dtypes (issue 24 item 7): fp16 runs as the model's fp32, int8 and NaN are one line each
    state["encoder.enc_norm.bias"] = bias
    torch.save({k: v.half() for k, v in state.items()}, folder / "best_model.pt")
    enc = stamp.load("scgpt", weights=folder, device="cpu")
    assert {p.dtype for p in enc.module.parameters()} == {torch.float32}
    torch.save({k: v.to(torch.int8) for k, v in state.items()}, folder / "best_model.pt")
    with pytest.raises(ModelConfigError, match=r"best_model.pt\): \d+ weight tensor\(s\) are stored as int8 .*quantized"):
        stamp.load("scgpt", weights=folder, device="cpu")
    state["encoder.enc_norm.weight"][3] = float("nan")
    torch.save(state, folder / "best_model.pt")
    with pytest.raises(ModelConfigError, match=r"tensor encoder.enc_norm.weight holds 1 NaN or infinite value"):
        stamp.load("scgpt", weights=folder, device="cpu")
    args = json.loads((folder / "args.json").read_text())
    (folder / "args.json").write_text(json.dumps({**args, "nlayers": 0}))
    with pytest.raises(ModelConfigError, match=r"args.json: nlayers = 0 is outside 1\.\."):
        stamp.load("scgpt", weights=folder, device="cpu")
    (folder / "args.json").write_text(json.dumps({**args, "pad_value": "abc"}))
    with pytest.raises(ModelConfigError, match=r"args.json: pad_value 'abc' is not a number"):
        stamp.load("scgpt", weights=folder, device="cpu")


def test_scgpt_matches_symbols_then_ensembl_ids_as_cellxgene_feature_names():
    from stamp.models.gene_inputs import CorpusGenes
    from stamp.models.scgpt import ScGPTInput, read_vocab

    inputs = ScGPTInput(read_vocab({"TSPAN6": 0, "ENSG00000000005": 1, "<pad>": 2}, "vocab.json"))
    genes = CorpusGenes.of(["ENSG00000000003", "ENSG00000000005", "ENSG00000000419", "ENSG00000000457"],
                           ["TSPAN6", "TNMD", "", "<cls>"])
    assert inputs.column_of(genes).tolist() == [0, 1, -1, -1]  # a gene named like a special token is no gene
    assert inputs.bind(genes).describe() == ("2 of 4 corpus genes are in the model's vocabulary of 2 "
                                             "(matched by symbol)")
    with pytest.raises(ModelConfigError, match=r"indices are not 0..2"):
        read_vocab({"A": 0, "B": 0, "<pad>": 2}, "vocab.json")
    # scGPT-spatial's gene statistics divide the values: NaN = take the slide's, anything else not positive is refused
    from stamp.models.scgpt import read_gene_means

    assert np.isnan(read_gene_means(pd.DataFrame({"mean": [2.0, np.nan]}, index=[0, 2]), 3, "s.csv")[1:]).all()
    for bad, msg in (([0.0, 1.0], r"mean of token 0 is 0 \(1 such\)"), (["x", 1.0], "not numbers")):
        with pytest.raises(ModelConfigError, match=msg):
            read_gene_means(pd.DataFrame({"mean": bad}, index=[0, 1]), 3, "s.csv")


# ----------------------------------------------------------------------------- Nicheformer
def nicheformer_reference(seed: int = 0) -> ReferenceNicheformer:
    torch.manual_seed(seed)
    return randomize_(ReferenceNicheformer(dim=32, heads=4, ffn=64, layers=2, n_tokens=20340, context=64), seed,
                      scale=0.1).eval()


def technology_means(seed: int = 0) -> np.ndarray:
    """20,310 means as the authors' files: NaN for unmeasured genes, some below 0.5 (rounded to 0 -> 1)."""
    rng = np.random.default_rng(seed)
    m = rng.gamma(2.0, 3.0, 20310)
    m[rng.choice(20310, 50, replace=False)] = np.nan
    m[:GENES:7] = rng.uniform(0.05, 0.45, len(range(0, GENES, 7)))
    return m


def test_nicheformer_lightning_checkpoint_equals_the_authors_get_embeddings(corpus, tmp_path, monkeypatch):
    import stamp

    ref = nicheformer_reference()
    ckpt = tmp_path / "nicheformer.ckpt"
    torch.save(ref.lightning_checkpoint(), ckpt)
    means = technology_means()
    np.save(tmp_path / "dissociated_mean_script.npy", means)
    with pytest.raises(PretrainedError, match=r"stamp models set-means nicheformer FILE.*dissociated_mean_script"):
        stamp.load("nicheformer", weights=ckpt, device="cpu")
    enc = stamp.load("nicheformer", weights=ckpt, means=tmp_path / "dissociated_mean_script.npy", device="cpu")
    got = ours(enc, corpus)
    for (_, counts, _), mine in zip(slides(corpus), got):
        tokens = nicheformer_tokens(counts, means, max_seq_len=64)
        with torch.no_grad():
            want = ref.get_embeddings(torch.from_numpy(tokens), specie=5, assay=9, modality=4).numpy()  # 'visium'
        assert np.abs(mine - want).max() < ATOL
    assert enc.provenance.extra["means_sha256"] and enc.provenance.extra["unused_tensors"] == 12 + 2 + 2 + 2  # template layer, 3 heads
    assert enc.counts.describe()["context_tokens"] == {"specie": 5, "assay": 9, "modality": 4}
    # every name of the authors' dictionaries: an overlay picks the generic 10x token instead
    overlay(tmp_path, monkeypatch, nicheformer={"tokenizer": {**_entry_dict("nicheformer")["tokenizer"], "context": {
        "specie": "Homo sapiens", "assay": "10x 3' transcription profiling", "modality": "spatial"}}})
    enc = stamp.load("nicheformer", weights=ckpt, means=tmp_path / "dissociated_mean_script.npy", device="cpu")
    assert enc.counts.describe()["context_tokens"] == {"specie": 5, "assay": 15, "modality": 4}
    # code in a checkpoint is refused unrun
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    bad = ref.lightning_checkpoint()
    bad["hyper_parameters"]["nheads"] = 0
    torch.save(bad, tmp_path / "zero.ckpt")
    with pytest.raises(ModelConfigError, match=r"zero.ckpt: nheads = 0 is outside 1\.\."):  # was ZeroDivisionError
        stamp.load("nicheformer", weights=tmp_path / "zero.ckpt", device="cpu")
    torch.save({"state_dict": {}, "hyper_parameters": {"x": Payload()}}, tmp_path / "evil.ckpt")
    with pytest.raises(ModelConfigError, match=r"holds Python code .*NOT loaded"):
        stamp.load("nicheformer", weights=tmp_path / "evil.ckpt", device="cpu")
    assert not (tmp_path / "ran").exists()


# ----------------------------------------------------------------------------- Geneformer
def geneformer_release(folder: Path, ids: list[str], *, v2: bool, seed: int = 0) -> dict:
    """Tiny BertForMaskedLM (save_pretrained) + dictionaries with numpy scalars, in the repo's layout.
    The mapping collapses two corpus genes onto one id (counts summed) and sends one to an id without a token."""
    from transformers import BertConfig, BertForMaskedLM

    rng = np.random.default_rng(seed)
    genes = [g for g in ids[:GENES]]
    picked = list(rng.choice(genes[:-10], 230, replace=False)) + [f"ENSG9999999{i:04d}" for i in range(15)]
    specials = ["<pad>", "<mask>"] + (["<cls>", "<eos>"] if v2 else [])
    tokens = {t: i for i, t in enumerate(specials + picked)}
    medians = {g: float(rng.uniform(0.5, 20.0)) for g in picked}
    mapping = {g: g for g in picked}
    mapping[genes[-1]] = picked[0]  # collapsed onto another gene
    mapping[genes[-2]] = "ENSG00000000000"  # maps to nothing tokenised: dropped
    config = BertConfig(vocab_size=len(tokens) + 3, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, hidden_act="relu", layer_norm_eps=1e-12,
                        pad_token_id=0, hidden_dropout_prob=0.02, attention_probs_dropout_prob=0.02)
    torch.manual_seed(seed)
    model = BertForMaskedLM(config)
    sub = "Geneformer-V2-104M" if v2 else "Geneformer-V1-10M"
    model.save_pretrained(folder / sub, safe_serialization=v2)
    dicts = "geneformer" if v2 else "geneformer/gene_dictionaries_30m"
    tag = "gc104M" if v2 else "gc30M"
    (folder / dicts).mkdir(parents=True, exist_ok=True)
    for name, data in (("token_dictionary", np_scalars(tokens, np.int16)), ("gene_median_dictionary",
                       np_scalars(medians, np.float64)), ("ensembl_mapping_dict", mapping)):
        (folder / dicts / f"{name}_{tag}.pkl").write_bytes(pickle.dumps(data, protocol=4))
    return {"model_dir": folder / sub, "tokens": tokens, "medians": medians, "mapping": mapping}


@pytest.mark.parametrize("v2", [True, False], ids=["v2-cls", "v1-mean"])
def test_geneformer_equals_bert_for_masked_lm_with_the_authors_tokenizer(corpus, tmp_path, v2):
    import stamp

    ids, _ = corpus_genes(corpus)
    rel = geneformer_release(tmp_path / "Geneformer", ids, v2=v2)
    name = "geneformer-v2-104m" if v2 else "geneformer-v1-10m"
    enc = stamp.load(name, weights=tmp_path / "Geneformer", device="cpu")
    got = ours(enc, corpus)
    assert enc.counts.match.matched == 230 + 1  # the collapsed gene feeds a picked one
    for (_, counts, _), mine in zip(slides(corpus), got):
        cells = geneformer_tokens(counts, ids, rel["tokens"], rel["medians"], rel["mapping"], 64, special=v2)
        assert max(len(c) for c in cells) == 64  # truncated to the input size
        want = geneformer_embed(rel["model_dir"], cells, 0, mode="cls" if v2 else "mean", has_cls=v2, has_eos=v2)
        assert np.abs(mine - want).max() < ATOL
    assert enc.embed_dim == 32 and enc.provenance.extra["pooling"] == ("cls" if v2 else "mean")


def test_geneformer_dictionary_carrying_code_is_refused_unrun(corpus, tmp_path):
    import stamp

    ids, _ = corpus_genes(corpus)
    geneformer_release(tmp_path / "G", ids, v2=True)

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    from safetensors.torch import load_file, save_file

    weights = tmp_path / "G" / "Geneformer-V2-104M" / "model.safetensors"
    state = load_file(weights)
    save_file({k: (v * 100).to(torch.int8) if v.is_floating_point() else v for k, v in state.items()}, weights)
    with pytest.raises(ModelConfigError, match=r"model.safetensors\): \d+ weight tensor\(s\) are stored as int8"):
        stamp.load("geneformer-v2-104m", weights=tmp_path / "G", device="cpu")  # copied in, they were wrong numbers
    save_file(state, weights)
    config = weights.parent / "config.json"
    good = config.read_text()
    config.write_text(json.dumps({**json.loads(good), "hidden_size": 30}))  # 4 heads do not divide it
    with pytest.raises(ModelConfigError, match=r"config.json: not a buildable BERT config \(The hidden size \(30\)"):
        stamp.load("geneformer-v2-104m", weights=tmp_path / "G", device="cpu")
    config.write_text(good)
    path = tmp_path / "G" / "geneformer" / "gene_median_dictionary_gc104M.pkl"
    medians = pickle.loads(path.read_bytes())
    path.write_bytes(pickle.dumps({**medians, next(iter(medians)): 0.0}))  # values are divided by it
    with pytest.raises(ModelConfigError, match=r"G: the median of ENSG\d+ is 0; gene medians must be positive"):
        stamp.load("geneformer-v2-104m", weights=tmp_path / "G", device="cpu")
    path.write_bytes(pickle.dumps({"ENSG00000000003": Payload()}))
    with pytest.raises(ModelConfigError, match=r"gene_median_dictionary_gc104M.pkl: the pickle holds posix.system, "
                                               r"not only plain data; it was NOT loaded"):
        stamp.load("geneformer-v2-104m", weights=tmp_path / "G", device="cpu")
    assert not (tmp_path / "ran").exists()
    v1 = tmp_path / "G" / "geneformer" / "token_dictionary_gc104M.pkl"
    v1.write_bytes(pickle.dumps({"<pad>": 0, "ENSG00000000003": 1}))  # V1-style dictionary for a V2 entry
    path.write_bytes(pickle.dumps({"ENSG00000000003": 1.0}))
    with pytest.raises(ModelConfigError, match=r"lacks <cls>/<eos> but geneformer-v2-104m expects V2"):
        stamp.load("geneformer-v2-104m", weights=tmp_path / "G", device="cpu")


# ----------------------------------------------------------------------------- Hub + the four models at once
def hub_files(tmp: Path, corpus) -> dict[str, dict]:
    """Each model's repo on the loopback Hub, in its real layout (tiny random weights)."""
    from safetensors.torch import save_file

    ids, symbols = corpus_genes(corpus)
    sc, _ = scgpt_release(tmp / "scgpt", symbols)
    niche = nicheformer_reference(2)
    save_file({"nicheformer." + k: v.contiguous() for k, v in niche.state_dict().items()
               if not k.startswith(("pooler_head", "cls_head"))}, str(tmp / "niche.safetensors"))
    gf = geneformer_release(tmp / "gf", ids, v2=True)
    gf_files = {f"Geneformer-V2-316M/{p.name}": p for p in gf["model_dir"].iterdir()}
    gf_files.update({f"geneformer/{p.name}": p for p in (tmp / "gf" / "geneformer").iterdir()})
    return {"u-cellm/scGPT-whole-human": {p.name: p for p in sc.iterdir()},
            "theislab/Nicheformer": {"model.safetensors": tmp / "niche.safetensors",
                                     "config.json": json.dumps(niche.hparams)},
            "ctheodoris/Geneformer": gf_files}


def test_scgpt_hub_mirror_that_differs_from_the_release_is_refused(corpus, tmp_path, monkeypatch):
    import stamp
    from tests.fakes.hub import FakeHub

    files = hub_files(tmp_path, corpus)["u-cellm/scGPT-whole-human"]
    with FakeHub(tmp_path / "hub") as hub:
        hub.create_repo("u-cellm/scGPT-whole-human")
        hub.add_files("u-cellm/scGPT-whole-human", files)
        hub.activate(monkeypatch, cache_dir=tmp_path / "hf")
        with pytest.raises(PretrainedError, match=r"u-cellm/scGPT-whole-human: .* has sha256 [0-9a-f]{64}, not the "
                                                  r"release's [0-9a-f]{64}.*drive.google.com"):
            stamp.load("scgpt", device="cpu")


def test_stamp_evaluate_cluster_on_the_four_gene_models_from_the_loopback_hub(corpus, tmp_path, monkeypatch):
    """`stamp evaluate cluster --model scgpt --model nicheformer --model geneformer --model stamp-v1-gene`: every
    model from its Hub repo in its real layout (stamp-v1-gene gated, converted on first use), the means set once,
    beside the same-run baselines."""
    from stamp.zoo.resolve import set_means
    from tests.fakes.hub import FakeHub
    from tests.test_zoo import TOKEN, make_reference, small_entries

    ref = make_reference()
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    shipped = small_entries()
    registry = {"stamp-v1": shipped["stamp-v1"], "stamp-v1-gene": shipped["stamp-v1-gene"],
                "scgpt": {**_entry_dict("scgpt"), "checksums": {}}}  # a mirror of tiny random files
    (tmp_path / "registry.json").write_text(json.dumps({"models": registry}))
    env_extra = {"STAMP_REGISTRY": str(tmp_path / "registry.json"), "STAMP_CACHE": str(tmp_path / "cache"),
                 "HF_TOKEN": TOKEN}
    for key, value in env_extra.items():
        monkeypatch.setenv(key, value)
    rng = np.random.default_rng(5)
    np.save(tmp_path / "visium_means.npy", rng.gamma(2.0, 1.5, 20310) + 0.4)
    set_means("stamp-v1", tmp_path / "visium_means.npy")
    np.save(tmp_path / "tech_means.npy", technology_means(3))
    set_means("nicheformer", tmp_path / "tech_means.npy")
    with FakeHub(tmp_path / "hub") as hub:
        for repo, files in hub_files(tmp_path, corpus).items():
            hub.create_repo(repo)
            hub.add_files(repo, files)
        hub.create_repo("minghaofdu/STAMP", gated=True)
        hub.add_files("minghaofdu/STAMP", {"pytorch_model.bin": tmp_path / "pytorch_model.bin"})
        hub.grant("minghaofdu/STAMP", TOKEN, repo_type="model")
        env = {**hub.env(tmp_path), **env_extra, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
        env.pop("HF_HUB_DISABLE_IMPLICIT_TOKEN")  # a logged-in user: HF_TOKEN is sent, as `hf auth login` does
        cmd = [sys.executable, "-m", "stamp.cli", "evaluate", "cluster", "--model", "scgpt", "--model", "nicheformer",
               "--model", "geneformer", "--model", "stamp-v1-gene", "--data", str(corpus), "--label", "domain",
               "--out", str(tmp_path / "ev"), "--device", "cpu", "--no-progress", "--no-figures", "--threads", "1"]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    results = pd.read_csv(tmp_path / "ev" / "results.csv")
    assert set(results["model"]) == {"scgpt", "nicheformer", "geneformer", "stamp-v1-gene", "random-init", "pca"}
    scores = results.groupby("model")[["ari", "nmi", "silhouette", "calinski_harabasz"]].mean()
    assert np.isfinite(scores.to_numpy()).all()
    assert "Traceback" not in res.stderr


def _entry_dict(name: str) -> dict:
    from importlib import resources

    return json.loads((resources.files("stamp.zoo") / "pretrained.json").read_text())["models"][name]
