"""The model zoo (issue 8): registry, strict + safe conversion of the released checkpoint, and
equivalence with an independent reference of the authors' forward pass (tests/reference_stamp.py).

Sizes are small (width 32, 2 layers, a 2-block ViT at 64 px) but the gene vocabulary is the real
20,310-gene stamp-v1 one, so the embedding table has the released n_tokens + 5 layout and the
tokenizer files are the real ones. Real sizes: benchmarks/convert_real_size.py.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from stamp.zoo.convert import ConvertError, convert_released, load_state_dict
from stamp.errors import PretrainedError
from stamp.zoo.catalogue import get_pretrained, list_pretrained
from stamp.zoo.resolve import load_tokenizer, resolve_pretrained
from tests.reference_stamp import ReferenceStamp, randomize_, reference_tokenize, uni_vit_kwargs

N_GENES = 20310
N_TOKENS = N_GENES + 30
GENE = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, context_length=64)
VISION = dict(name="test-uni-small", arch="vit_tiny_patch16_224", img_size=64, patch_size=16, init_values=1e-5,
              dynamic_img_size=True, model_kwargs=dict(embed_dim=32, depth=2, num_heads=2), weights=None,
              region_grid=3, csp_window=2, csp_stride=1)
EMBED = 16
TOKEN = "hf_fake_granted_token"


def small_entries() -> dict:
    """Registry entries of the same form as stamp/zoo/pretrained.json, at test sizes."""
    full = json.loads((__import__("importlib.resources").resources.files("stamp.zoo") / "pretrained.json").read_text())
    models = full["models"]
    for name in ("stamp-v1", "stamp-v1-gene"):
        models[name]["gene_config"] = {**models[name]["gene_config"], **GENE}
        models[name]["embed_dim"] = EMBED
    # the shipped channel order (bgr: the released pipeline fed OpenCV's BGR patches) with test sizes
    models["stamp-v1"]["vision_config"] = {**VISION, "channel_order": models["stamp-v1"]["vision_config"]["channel_order"]}
    return models


def use_small_registry(tmp_path, monkeypatch) -> None:
    """Point ``STAMP_REGISTRY`` at a registry of the small test models (:func:`small_entries`)."""
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({"models": small_entries()}))
    monkeypatch.setenv("STAMP_REGISTRY", str(registry))


@contextlib.contextmanager
def stamp_repo_on_hub(tmp_path, monkeypatch, files: dict, gated: bool = False):
    """A fake Hub serving ``minghaofdu/STAMP`` with ``files``, active for the real hub client."""
    from tests.fakes.hub import FakeHub

    with FakeHub(tmp_path / "hub") as hub:
        hub.create_repo("minghaofdu/STAMP", "model", gated=gated)
        hub.add_files("minghaofdu/STAMP", files)
        hub.activate(monkeypatch, cache_dir=tmp_path / "hf")
        yield hub


def small_entry(name: str):
    return dataclasses.replace(get_pretrained(name), gene_config=small_entries()[name]["gene_config"],
                               vision_config=small_entries()[name]["vision_config"], embed_dim=EMBED)


def make_reference(seed: int = 0) -> ReferenceStamp:
    torch.manual_seed(seed)
    vit = uni_vit_kwargs(model_name="vit_tiny_patch16_224", img_size=64, embed_dim=32, depth=2, num_heads=2)
    ref = ReferenceStamp(n_tokens=N_TOKENS, dim=32, heads=4, ffn=64, layers=2, context=64, vit=vit, out_dim=EMBED)
    return randomize_(ref, seed).eval()


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """(reference model, path of its state dict saved as the released pytorch_model.bin)."""
    ref = make_reference()
    path = tmp_path_factory.mktemp("release") / "pytorch_model.bin"
    torch.save(ref.state_dict(), path)
    return ref, path


@pytest.fixture(scope="module")
def means_file(tmp_path_factory):
    rng = np.random.default_rng(3)
    means = rng.gamma(2.0, 1.5, N_GENES) + 0.4  # values around x.5: the half-up rounding matters
    means[rng.choice(N_GENES, 100, replace=False)] = np.nan
    path = tmp_path_factory.mktemp("means") / "Visium_mean.npy"
    np.save(path, means)
    return path


def counts_matrix(n_spots: int = 12, seed: int = 1) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_spots):
        k = 20 if i == 0 else int(rng.integers(40, 400))  # spot 0: fewer genes than the context (padding)
        cols = rng.choice(N_GENES, k, replace=False)
        rows.append(sp.csr_matrix((rng.negative_binomial(2, 0.4, k).astype(np.float32) + 1, (np.zeros(k, int), cols)),
                                  shape=(1, N_GENES)))
    return sp.vstack(rows).tocsr()


def assert_same_tokens_up_to_ties(ours: np.ndarray, theirs: np.ndarray, counts, means) -> None:
    """Equal token rows, except that genes of exactly equal count/mean ratio may come in any order
    (the released code's float path decides those; the project breaks ties by vocabulary index).

    Ratios of small integers are compared as float64 quotients: correctly rounded division maps equal
    ratios to equal floats, and distinct ones (counts < 2**20, means < 2**10) stay far apart.
    """
    m = np.nan_to_num(means)
    m = np.where(m % 1 >= 0.5, np.ceil(m), np.floor(m))
    m[m == 0] = 1
    counts = sp.csr_matrix(counts)
    for i in range(ours.shape[0]):
        row = np.asarray(counts[i].todense()).ravel()
        canon = []
        for tokens in (ours[i], theirs[i]):
            genes = tokens[tokens != 0] - 30
            values = row[genes].astype(np.float64) / m[genes]
            assert (np.diff(values) <= 0).all(), f"spot {i}: not ranked by count / mean"
            order = np.lexsort((genes, -values))
            canon.append((values[order], genes[order]))
        (v0, g0), (v1, g1) = canon
        np.testing.assert_array_equal(v0, v1, err_msg=f"spot {i}: different ranked values")
        # a full row (> max_len genes) may cut its last tie group at a different gene: same values, any ids
        keep = v0 != v0[-1] if (ours[i] != 0).all() else np.ones(v0.size, bool)
        np.testing.assert_array_equal(g0[keep], g1[keep], err_msg=f"spot {i}: different tokens")


# ----------------------------------------------------------------------------- registry
def test_registry_entries_are_complete():
    assert {"stamp-v1", "stamp-v1-gene"} <= set(list_pretrained())
    full, gene = get_pretrained("stamp-v1"), get_pretrained("stamp-v1-gene")
    assert (full.component, gene.component) == ("full", "gene")
    assert full.format == gene.format == "stamp-released" and full.hub_id == "minghaofdu/STAMP"
    assert full.gated and "huggingface.co/minghaofdu/STAMP" in full.terms_url and "@" in full.citation
    assert full.gene_config == gene.gene_config and full.gene_config["pooling"] == "released"
    assert full.tokenizer["mode"] == "released" and full.tokenizer["vocabulary"] == "stamp-v1"
    with pytest.raises(PretrainedError, match="known: .*stamp-v1"):
        get_pretrained("stamp-v2")


def test_reference_has_the_released_514_tensors():
    """The reference at the released sizes (meta device: no memory) has the issue's 514 tensors."""
    with torch.device("meta"):
        ref = ReferenceStamp(n_tokens=N_TOKENS, dim=512, heads=16, ffn=1024, layers=12, context=1500,
                             vit=uni_vit_kwargs())
    sd = ref.state_dict()
    assert len(sd) == 514
    assert tuple(sd["spot_backbone.embeddings.weight"].shape) == (20345, 512)
    assert tuple(sd["spot_backbone.classifier_head.weight"].shape) == (20340, 512)
    assert tuple(sd["visual_backbone.p_visual"].shape) == (1, 1, 1024)
    assert tuple(sd["patch_projection.weight"].shape) == (512, 1024)
    assert sum(k.startswith("spot_backbone.encoder_layer.") for k in sd) == 12


# ----------------------------------------------------------------------------- equivalence
def test_converted_full_model_reproduces_reference(released, means_file, tmp_path):
    from stamp.models.aligned_model import StampModel
    from stamp.tokenizer import to_model_input_ids

    ref, path = released
    report = convert_released(path, tmp_path / "out", name=small_entry("stamp-v1"), means=means_file)
    n_src = len(torch.load(path, weights_only=True))
    assert report.n_source == n_src and len(report.mapped) + len(report.unused) == n_src
    assert {u["source"].split(".")[1] for u in report.unused} == {"encoder_layer", "classifier_head"}
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"config.json", "model.safetensors", "vocab.json", "tokenizer_config.json", "gene_means.safetensors",
            "README.md", "conversion.json"} <= files
    model = StampModel.from_pretrained(str(tmp_path / "out")).eval()

    # tokens: the project's stamp-v1 tokenizer (from the converted folder) == the released rules
    counts = counts_matrix()
    tok = load_tokenizer(tmp_path / "out")
    ours = to_model_input_ids(tok.encode_csr(counts), tok.pad_value, GENE["context_length"])
    theirs = reference_tokenize(counts, np.load(means_file))
    assert_same_tokens_up_to_ties(tok.encode_csr(counts), theirs, counts, np.load(means_file))
    assert (ours == 1).any(), "spot 0 must be padded so that the stamp-v1 pooling over padding is exercised"

    with torch.no_grad():
        got = model.encode_gene(torch.from_numpy(ours).long())
        want = ref.encode_gene(torch.from_numpy(ours).long())
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(model.encode_image(pixels), ref.encode_image(pixels), rtol=0, atol=1e-5)
        # a wrong mapping would not be close: a model with another seed is far away
        assert (model.encode_image(pixels) - make_reference(9).encode_image(pixels)).abs().max() > 1e-2
    assert model.logit_scale.item() == ref.logit_scale.item()


def test_lightning_wrapper_and_module_prefix_gene_only(released, tmp_path):
    from stamp.models.gene_encoder import StampGeneEncoder

    ref, _ = released
    ckpt = {"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}, "epoch": 7, "global_step": 1234,
            "pytorch-lightning_version": "2.1.0", "hyper_parameters": {"lr": 1e-4, "extract_layers": [11]}}
    path = tmp_path / "last.ckpt"
    torch.save(ckpt, path)
    sd, notes = load_state_dict(path)
    assert any("Lightning" in n for n in notes) and any("module." in n for n in notes)
    report = convert_released(path, tmp_path / "gene", name=small_entry("stamp-v1-gene"))
    reasons = {u["reason"] for u in report.unused}
    assert any("image encoder" in r for r in reasons)
    enc = StampGeneEncoder.from_pretrained(str(tmp_path / "gene")).eval()
    assert enc.mlm_head is None and enc.config.pooling == "released"
    ids = torch.randint(30, N_TOKENS, (4, 64), generator=torch.Generator().manual_seed(2))
    ids[1, 30:] = 0
    with torch.no_grad():
        want = ref.spot_backbone.features(ids)
        got = enc.embed(torch.where(ids == 0, 1, ids))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    with pytest.raises(PretrainedError, match="--means"):  # the released means are not redistributed
        load_tokenizer(tmp_path / "gene")


# ----------------------------------------------------------------------------- safety + strictness
class _Payload:
    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(_Payload.target),))


def test_pickled_code_is_refused_and_never_run(tmp_path):
    _Payload.target = str(tmp_path / "pwned")
    path = tmp_path / "evil.bin"
    torch.save({"spot_backbone.embeddings.weight": torch.zeros(2, 2), "x": _Payload()}, path)
    torch.save({"state_dict": {"a": torch.zeros(1)}, "hparams": argparse.Namespace(lr=1)}, tmp_path / "ns.ckpt")
    for bad in (path, tmp_path / "ns.ckpt"):
        with pytest.raises(ConvertError, match="refusing to unpickle"):
            convert_released(bad, tmp_path / "out", name=small_entry("stamp-v1-gene"))
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()
    (tmp_path / "garbage.bin").write_bytes(b"not a checkpoint at all")
    (tmp_path / "cut.bin").write_bytes(path.read_bytes()[:300])
    for bad, message in ((tmp_path / "garbage.bin", "not a PyTorch checkpoint"), (tmp_path / "cut.bin", "corrupt")):
        with pytest.raises(ConvertError, match=message):
            convert_released(bad, tmp_path / "out", name=small_entry("stamp-v1-gene"))


@pytest.mark.parametrize("damage, message", [
    (lambda sd: sd.pop("spot_backbone.encoder.layers.1.linear2.weight"),
     r"missing .*spot_backbone\.encoder\.layers\.1\.linear2\.weight"),
    (lambda sd: sd.__setitem__("spot_backbone.embeddings.weight", torch.zeros(N_TOKENS + 6, 32)),
     r"spot_backbone\.embeddings\.weight has shape \(20346, 32\), expected \(20345, 32\)"),
    (lambda sd: sd.__setitem__("visual_backbone.p_visual", torch.zeros(1, 2, 32)),
     r"visual_backbone\.p_visual has shape \(1, 2, 32\)"),
    (lambda sd: sd.__setitem__("spot_backbone.adapter.weight", torch.zeros(3)),
     r"not part of the released STAMP layout: spot_backbone\.adapter\.weight"),
])
def test_strict_mapping_names_the_bad_tensor(released, tmp_path, damage, message):
    ref, _ = released
    sd = dict(ref.state_dict())
    damage(sd)
    path = tmp_path / "pytorch_model.bin"
    torch.save(sd, path)
    with pytest.raises(ConvertError, match=message):
        convert_released(path, tmp_path / "out", name=small_entry("stamp-v1"))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


# ----------------------------------------------------------------------------- Hub + registry path
def test_create_model_registry_name_via_gated_fake_hub(released, tmp_path, monkeypatch):
    """``stamp.create_model(NAME)``: the zoo turns a name into the model class with its weights; the classes
    themselves take folders or Hub ids only and point a name to the zoo."""
    import stamp
    from stamp.models.aligned_model import StampModel
    from stamp.models.gene_encoder import StampGeneEncoder

    ref, path = released
    use_small_registry(tmp_path, monkeypatch)
    monkeypatch.setenv("STAMP_CACHE", str(tmp_path / "converted"))
    from stamp.zoo.resolve import is_cached

    assert not is_cached(get_pretrained("stamp-v1"))
    files = {"pytorch_model.bin": path, "README.md": "# STAMP\n"}
    with stamp_repo_on_hub(tmp_path, monkeypatch, files, gated=True) as hub:
        with pytest.raises(PretrainedError, match=r"gated: accept its terms at https://huggingface.co/minghaofdu/STAMP"
                                                  r".*hf auth login"):
            stamp.create_model("stamp-v1")
        with pytest.raises(PretrainedError, match="hf auth login"):
            stamp.create_model("stamp-v1", token="hf_not_granted")
        with pytest.raises(PretrainedError, match=r"stamp.create_model\('stamp-v1'\)"):
            StampModel.from_pretrained("stamp-v1")  # model classes know no names
        hub.grant("minghaofdu/STAMP", TOKEN, repo_type="model")
        model = stamp.create_model("stamp-v1", token=TOKEN).eval()
        assert type(model) is StampModel
        pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            torch.testing.assert_close(model.encode_image(pixels), ref.encode_image(pixels), rtol=0, atol=1e-5)
        converted = resolve_pretrained("stamp-v1", token=TOKEN)
        assert converted.is_relative_to(tmp_path / "converted")
        assert is_cached(get_pretrained("stamp-v1"))
        stamp_before = (converted / "model.safetensors").stat().st_mtime_ns
        stamp.create_model("stamp-v1", token=TOKEN)  # second load: reads the converted file
        assert (converted / "model.safetensors").stat().st_mtime_ns == stamp_before
        gene = stamp.create_model("stamp-v1-gene", token=TOKEN)  # the gene part of the full release
        assert type(gene) is StampGeneEncoder and gene.config.hidden_size == 32

        assert type(stamp.create_model("stamp-v1-gene")) is StampGeneEncoder  # converted already: no token needed
        with pytest.raises(PretrainedError, match="not found"):
            resolve_pretrained("nobody/nothing")


def test_cli_models_and_convert(released, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from stamp.cli import app

    _, path = released
    use_small_registry(tmp_path, monkeypatch)
    runner = CliRunner()
    res = runner.invoke(app, ["models"])
    assert res.exit_code == 0 and "stamp-v1-gene" in res.output and "minghaofdu/STAMP" in res.output
    res = runner.invoke(app, ["convert", "--from", "stamp-released", str(path), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert "deliberately unused" in res.output and "visual_backbone.base_model.* -> vision_encoder.trunk.*" in res.output
    card = (tmp_path / "o" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: stamp\nlicense: other") and "Visium_mean.npy" in card
    res = runner.invoke(app, ["convert", "--from", "stamp-released", str(path), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "already exists" in res.output
    res = runner.invoke(app, ["convert", "--from", "timm", str(path), "--out", str(tmp_path / "p")])
    assert res.exit_code == 1 and "stamp-released" in res.output


# ----------------------------------------------------------------------------- end to end
def test_embed_stamp_v1_gene_end_to_end(released, means_file, stamp_v1_paired_corpus, tmp_path, monkeypatch):
    """embed_corpus("stamp-v1-gene", means=...) through the registry and the gated fake Hub equals the
    reference fed with the released tokenizer's tokens of the same spots."""
    import pyarrow.parquet as pq

    from spavis.format import open_corpus, rows_to_csr
    from stamp.embed.genes import embed_corpus

    ref, path = released
    use_small_registry(tmp_path, monkeypatch)
    with stamp_repo_on_hub(tmp_path, monkeypatch, {"pytorch_model.bin": path}):
        with pytest.raises(PretrainedError, match="--means"):
            embed_corpus("stamp-v1-gene", stamp_v1_paired_corpus, tmp_path / "e.parquet", device="cpu", progress=False)
        assert not (tmp_path / "e.parquet").exists()
        out = embed_corpus("stamp-v1-gene", stamp_v1_paired_corpus, tmp_path / "e.parquet", device="cpu", progress=False,
                           means=means_file)
    table = pq.read_table(out)
    corpus = open_corpus(stamp_v1_paired_corpus)
    rows = [t for t in corpus.iter_slides(columns=["spot_id", "gene_index", "counts"])]
    spot_ids = [s for t in rows for s in t.column("spot_id").to_pylist()]
    assert table.column("spot_id").to_pylist() == spot_ids and len(spot_ids) > 20
    counts = sp.vstack([rows_to_csr(t, N_GENES) for t in rows]).tocsr()
    from stamp.zoo.resolve import load_tokenizer, resolve_pretrained
    from stamp.tokenizer import to_model_input_ids

    tok = load_tokenizer(resolve_pretrained("stamp-v1-gene"), means_file)
    raw = tok.encode_csr(counts)
    assert_same_tokens_up_to_ties(raw, reference_tokenize(counts, np.load(means_file)), counts, np.load(means_file))
    ours = torch.from_numpy(to_model_input_ids(raw, tok.pad_value, GENE["context_length"]).astype(np.int64))
    got = torch.tensor(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)))
    with torch.no_grad():
        want = ref.spot_backbone.features(ours)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_converted_card_snippet_runs_as_written(released, means_file, tmp_path, monkeypatch):
    """The card's python block (from_pretrained + tokenizer + both encoders) runs unchanged."""
    import re
    import shutil

    _, path = released
    out = tmp_path / "converted"
    convert_released(path, out, name=small_entry("stamp-v1"), load_name=str(out))
    card = (out / "README.md").read_text()
    assert re.search(r"^license: other$", card, re.M) and "library_name: stamp" in card and "- pathology" in card
    assert "@inproceedings{han2026stamp" in card and "sha256" in card
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    shutil.copy(means_file, tmp_path / "Visium_mean.npy")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - our own generated snippet
    assert tuple(scope["gene"].shape) == (4, EMBED) and tuple(scope["image"].shape) == (2, EMBED)
    torch.testing.assert_close(scope["gene"].norm(dim=-1), torch.ones(4))


def test_published_gene_card_has_eval_numbers_and_a_snippet_that_runs(tmp_path, monkeypatch):
    """stamp publish --local-dir --eval: the card gains the `stamp evaluate` table and its snippet runs."""
    import re

    from typer.testing import CliRunner

    from stamp.cli import app
    from stamp.evaluate.results import write_results
    from stamp.cards import write_model_card
    from stamp.models.gene_encoder import StampConfig, StampGeneEncoder
    from stamp.zoo.catalogue import vocabulary as _vocabulary
    from stamp.tokenizer import GeneTokenizer

    genes, _ = _vocabulary("stamp-v1")
    model_dir = tmp_path / "run" / "model"
    torch.manual_seed(0)
    StampGeneEncoder(StampConfig(n_genes=300, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                                 context_length=32)).save_pretrained(model_dir)
    GeneTokenizer(genes[:300], np.linspace(1, 3, 300)).save_pretrained(model_dir)
    write_model_card(model_dir, {"stage": "gene", "license": "cc-by-4.0", "steps": 10,
                                 "data": {"source": "gen", "hub_id": "org/corpus", "n_spots": 100}})
    rows = [{"task": "cluster", "method": "leiden", "model": "org/stamp-tiny", "kind": "stamp", "fold": f,
             "scheme": "per-slide", "ari": 0.41 + 0.02 * f, "nmi": 0.5, "silhouette": 0.1} for f in range(3)]
    rows += [{"task": "cluster", "method": "leiden", "model": "pca-hvg", "kind": "baseline", "fold": f,
              "scheme": "per-slide", "ari": 0.2, "nmi": 0.3, "silhouette": 0.05} for f in range(3)]
    (tmp_path / "eval").mkdir()
    write_results(tmp_path / "eval", rows, title="t")
    res = CliRunner().invoke(app, ["publish", str(tmp_path / "run"), "--local-dir", str(tmp_path / "pub"),
                                   "--eval", str(tmp_path / "eval")])
    assert res.exit_code == 0, res.output
    card = (tmp_path / "pub" / "README.md").read_text()
    assert "library_name: stamp" in card and "license: cc-by-4.0" in card and "- org/corpus" in card
    assert "## Evaluation" in card and "0.430 ± 0.020" in card and "pca-hvg" in card
    assert card.index("## Evaluation") < card.index("## Intended use") and "REPO_ID" not in card
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the card's own snippet
    assert tuple(scope["embeddings"].shape) == (4, 16) and torch.isfinite(scope["embeddings"]).all()
    res = CliRunner().invoke(app, ["publish", str(tmp_path / "run"), "--local-dir", str(tmp_path / "p2"),
                                   "--eval", str(tmp_path / "nothing")])
    assert res.exit_code == 1 and "results.csv" in res.output and not (tmp_path / "p2").exists()


def test_published_stamp_model_card_snippet_runs(tmp_path):
    """An aligned StampModel's card (stamp.models.aligned_model) exported with publish --local-dir: the snippet runs."""
    import re

    from stamp.hub import export_model
    from stamp.models.gene_encoder import StampConfig
    from stamp.models.aligned_model import StampModel, StampModelConfig, write_stamp_model_card
    from stamp.zoo.catalogue import vocabulary as _vocabulary
    from stamp.tokenizer import GeneTokenizer

    genes, _ = _vocabulary("stamp-v1")
    folder = tmp_path / "run" / "model"
    torch.manual_seed(0)
    gene = StampConfig(n_genes=200, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                       context_length=32, heads=False)
    StampModel(StampModelConfig(gene=gene, vision="tiny", embed_dim=8)).save_pretrained(folder)
    GeneTokenizer(genes[:200], np.linspace(1, 3, 200)).save_pretrained(folder)
    write_stamp_model_card(folder, {"license": "cc-by-4.0", "stages": [{"stage": "align", "steps": 5,
                                                                        "data": "org/paired", "generated": True}]})
    card = (export_model(tmp_path / "run", tmp_path / "pub") / "README.md").read_text()
    assert "library_name: stamp" in card and "- org/paired" in card
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the card's own snippet
    assert tuple(scope["image_embedding"].shape) == (1, 8) and tuple(scope["gene_embedding"].shape) == (4, 8)


def test_create_model_loads_published_repo_ids_without_registry_entry(tmp_path, monkeypatch):
    """stamp.create_model / from_pretrained on a repo published by `stamp publish` (no registry entry)."""
    import stamp
    from stamp.models.gene_encoder import StampConfig, StampGeneEncoder
    from tests.fakes.hub import FakeHub

    torch.manual_seed(0)
    enc = StampGeneEncoder(StampConfig(n_genes=50, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                                       context_length=16))
    enc.save_pretrained(tmp_path / "m")
    with FakeHub(tmp_path / "hub") as hub:
        hub.create_repo("org/stamp-tiny", "model")
        hub.add_files("org/stamp-tiny", {p.name: p for p in (tmp_path / "m").iterdir()})
        hub.activate(monkeypatch, cache_dir=tmp_path / "hf")
        got = stamp.create_model("org/stamp-tiny")
        assert type(got) is StampGeneEncoder
        torch.testing.assert_close(got.embeddings.weight, enc.embeddings.weight, rtol=0, atol=0)
        assert stamp.create_model("tiny").config.hidden_size == 64  # presets still build fresh encoders
        with pytest.raises(PretrainedError, match="not found"):
            stamp.create_model("org/missing")


@pytest.fixture(scope="module")
def stamp_v1_paired_corpus(tmp_path_factory):
    """A small GENERATED corpus with H&E patches (--with-images) on the full stamp-v1 vocabulary."""
    from spavis.shards import build_shards
    from spavis.simulate import write_simulated_slice

    base = tmp_path_factory.mktemp("paired")
    write_simulated_slice(base / "in" / "gen0", seed=1, with_image=True, max_row=3)
    build_shards([base / "in" / "gen0"], base / "shards", vocab="stamp-v1", min_genes=5, with_images=True)
    return base / "shards"


def test_stamp_embed_stamp_v1_fused_end_to_end(released, means_file, stamp_v1_paired_corpus, tmp_path, monkeypatch):
    """`stamp embed --model stamp-v1 --modality fused --means F` (registry -> gated fake Hub -> conversion ->
    paired shards) equals [reference gene embedding | reference image embedding] spot by spot."""
    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from spavis.format import decode_image, open_corpus, rows_to_csr
    from stamp.cli import app
    from stamp.tokenizer import to_model_input_ids
    from stamp.models.vision import load_vision_config, to_pixels

    ref, path = released
    use_small_registry(tmp_path, monkeypatch)
    out = tmp_path / "emb.parquet"
    args = ["embed", "--model", "stamp-v1", "--data", str(stamp_v1_paired_corpus), "--modality", "fused",
            "--out", str(out), "--device", "cpu", "--no-progress"]
    with stamp_repo_on_hub(tmp_path, monkeypatch, {"pytorch_model.bin": path}, gated=True) as hub:
        runner = CliRunner()
        res = runner.invoke(app, args + ["--means", str(means_file)])
        assert res.exit_code == 1 and "gated" in res.output and "hf auth login" in res.output, res.output
        hub.grant("minghaofdu/STAMP", TOKEN, repo_type="model")
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_DISABLE_IMPLICIT_TOKEN", False)
        res = runner.invoke(app, args)
        assert res.exit_code == 1 and "--means" in res.output and not out.exists(), res.output
        res = runner.invoke(app, args + ["--means", str(means_file)])
        assert res.exit_code == 0, res.output
        # plain image files need no expression and no means
        from PIL import Image

        rgb = np.random.default_rng(0).integers(0, 256, (2, 80, 80, 3), dtype=np.uint8)
        (tmp_path / "imgs").mkdir()
        for i, arr in enumerate(rgb):
            Image.fromarray(arr).save(tmp_path / "imgs" / f"p{i}.png")
        res = runner.invoke(app, ["embed", "--model", "stamp-v1", "--images", str(tmp_path / "imgs"), "--out",
                                  str(tmp_path / "img.parquet"), "--device", "cpu", "--no-progress"])
        assert res.exit_code == 0, res.output
    img = pq.read_table(tmp_path / "img.parquet")
    assert img.column("image").to_pylist() == ["p0.png", "p1.png"]
    with torch.no_grad():
        want_img = ref.encode_image(to_pixels(np.ascontiguousarray(rgb[..., ::-1]), load_vision_config(VISION)))
    torch.testing.assert_close(torch.tensor(np.stack(img.column("embedding").to_numpy(zero_copy_only=False))),
                               want_img, rtol=0, atol=1e-5)
    table = pq.read_table(out)
    corpus = open_corpus(stamp_v1_paired_corpus)
    paired = pa_concat([t for t in corpus.iter_paired(columns=["spot_id", "patch"])])
    expr = pa_concat([t for t in corpus.iter_slides(columns=["spot_id", "gene_index", "counts"])])
    assert table.column("spot_id").to_pylist() == paired.column("spot_id").to_pylist()
    order = {s: i for i, s in enumerate(expr.column("spot_id").to_pylist())}
    rows = [order[s] for s in paired.column("spot_id").to_pylist()]
    counts = rows_to_csr(expr, N_GENES)[rows]
    from stamp.zoo.resolve import load_tokenizer

    tok = load_tokenizer("stamp-v1", means_file)
    ids = torch.from_numpy(to_model_input_ids(tok.encode_csr(counts), tok.pad_value, GENE["context_length"]))
    patches = np.stack([decode_image(v) for v in paired.column("patch").to_pylist()])
    assert small_entries()["stamp-v1"]["vision_config"]["channel_order"] == "bgr"
    # the released script: OpenCV crops (BGR arrays) -> ToTensor -> ImageNet mean/std, channels never swapped
    pixels = to_pixels(np.ascontiguousarray(patches[..., ::-1]), load_vision_config(VISION))
    got = torch.tensor(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)))
    with torch.no_grad():
        want = torch.cat([ref.encode_gene(ids.long()), ref.encode_image(pixels)], dim=1)
    assert got.shape == (len(rows), 2 * EMBED)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def pa_concat(tables):
    import pyarrow as pa

    return pa.concat_tables(tables)


def test_registry_file_missing_from_repo_names_what_is_there(released, tmp_path, monkeypatch):
    _, path = released
    use_small_registry(tmp_path, monkeypatch)
    with stamp_repo_on_hub(tmp_path, monkeypatch, {"stamp_weights.ckpt": path}):
        with pytest.raises(PretrainedError, match=r"no pytorch_model\.bin \(it holds: stamp_weights\.ckpt\).*STAMP_REGISTRY"):
            resolve_pretrained("stamp-v1")


def test_concurrent_loads_convert_once(released, tmp_path, monkeypatch, caplog):
    import logging

    import stamp
    from tests.fakes.http import run_concurrently

    _, path = released
    use_small_registry(tmp_path, monkeypatch)
    monkeypatch.setenv("STAMP_CACHE", str(tmp_path / "converted"))
    with stamp_repo_on_hub(tmp_path, monkeypatch, {"pytorch_model.bin": path}):
        with caplog.at_level(logging.INFO, logger="stamp.zoo.resolve"):
            assert run_concurrently(lambda: stamp.create_model("stamp-v1-gene"), n=3) == []
    assert sum("converting stamp-v1-gene" in r.getMessage() for r in caplog.records) == 1
    folders = [p for p in (tmp_path / "converted").rglob("*") if p.is_dir() and p.name.startswith(".")]
    assert folders == []  # no temp folder left behind


def test_cli_convert_from_hub_repo_id(released, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from stamp.cli import app
    from stamp.models.gene_encoder import StampGeneEncoder

    ref, path = released
    use_small_registry(tmp_path, monkeypatch)
    with stamp_repo_on_hub(tmp_path, monkeypatch, {"pytorch_model.bin": path}):
        res = CliRunner().invoke(app, ["convert", "--from", "stamp-released", "minghaofdu/STAMP", "--name",
                                       "stamp-v1-gene", "--out", str(tmp_path / "g")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "g" / "conversion.json").read_text())
    assert report["source"].startswith("minghaofdu/STAMP@") and report["n_source"] == len(ref.state_dict())
    ids = torch.randint(30, N_TOKENS, (2, 64), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = StampGeneEncoder.from_pretrained(str(tmp_path / "g")).eval().embed(ids)
        torch.testing.assert_close(got, ref.spot_backbone.features(ids), rtol=0, atol=1e-5)


def test_means_set_once_serve_every_later_load(released, means_file, stamp_v1_paired_corpus, tmp_path, monkeypatch):
    """`stamp models set-means stamp-v1 FILE` once: stamp.load, embed_corpus and load_tokenizer of both
    entries then need no means; the tokens equal those from the explicit file."""
    from typer.testing import CliRunner

    import stamp
    from stamp.cli import app
    from stamp.embed.genes import embed_corpus

    _, path = released
    use_small_registry(tmp_path, monkeypatch)
    monkeypatch.setenv("STAMP_CACHE", str(tmp_path / "stamp-cache"))
    with stamp_repo_on_hub(tmp_path, monkeypatch, {"pytorch_model.bin": path}):
        with pytest.raises(PretrainedError, match="stamp models set-means stamp-v1 FILE"):
            stamp.load("stamp-v1-gene", device="cpu")
        bad = tmp_path / "short.npy"
        np.save(bad, np.ones(10))
        res = CliRunner().invoke(app, ["models", "set-means", "stamp-v1", str(bad)])
        assert res.exit_code == 1 and "short.npy" in res.output and "Traceback" not in res.output
        res = CliRunner().invoke(app, ["models", "set-means", "stamp-v1", str(means_file)])
        assert res.exit_code == 0, res.output
        assert (tmp_path / "stamp-cache" / "means" / "stamp-v1.npy").is_file()
        gene = stamp.load("stamp-v1-gene", device="cpu")
        full = stamp.load("stamp-v1", device="cpu")
        assert (gene.kind, full.kind) == ("gene", "aligned") and full.tokenizer is not None
        explicit = load_tokenizer(resolve_pretrained("stamp-v1-gene"), means_file)
        np.testing.assert_array_equal(gene.tokenizer.means, explicit.means)
        out = embed_corpus("stamp-v1-gene", stamp_v1_paired_corpus, tmp_path / "e.parquet", device="cpu",
                           progress=False)
        assert out.is_file()
        rows = json.loads(CliRunner().invoke(app, ["models", "--json", "--kind", "gene"]).output)
        assert {r["name"]: r.get("means") for r in rows}["stamp-v1-gene"] == "set"
