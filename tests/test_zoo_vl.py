"""Evidence for the vision-language entries of the zoo (issue 28): CONCH, CLIP, QuiltNet, OmiCLIP, mSTAR.

* CONCH: an independent reference written from the authors' published code (tests/reference_conch.py,
  not imported from them) with random weights saved as the released ``pytorch_model.bin`` (a whole CoCa:
  visual + text towers); ``stamp.load("conch", weights=...)`` gives the reference's
  ``encode_image(proj_contrast=False, normalize=False)`` at 448 px to 1e-5;
* QuiltNet: random weights in open_clip's Hub layout on the loopback Hub; our features equal open_clip's
  own ``create_model_and_transforms("hf-hub:...")`` ``encode_image(normalize=False)`` to 1e-5 (images at
  the input size, so both transforms only normalise), and so do the pixels;
* OmiCLIP: an open_clip training checkpoint (``state_dict`` with ``module.`` prefixes, optimizer state)
  named ``checkpoint.pt``, loaded the way Loki loads it (``create_model_from_pretrained(cfg,
  pretrained=file)``) as the reference: image features and gene-sentence text features equal; the gene
  sentences equal a pandas reference of Loki's rule (top genes, '.' / '-' symbols dropped);
* untrusted open_clip configurations (a timm or Hugging Face tower that open_clip would download) and
  checkpoints that do not fit the architecture: one line each.

Sizes are tiny (set in the served configurations); real sizes are checked on the meta device in
tests/test_zoo_catalogue.py.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from stamp.errors import ModelConfigError
from stamp.zoo.catalogue import get_pretrained
from tests.test_zoo_catalogue import hub  # noqa: F401  (the loopback Hub fixture)
from tests.reference_conch import RefCoCa, conch_config, randomize_

TINY_CLIP = {"embed_dim": 16, "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "patch_size": 32,
                                             "head_width": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
TINY_COCA = {"embed_dim": 16,
             "vision_cfg": {"image_size": 56, "layers": 2, "width": 32, "patch_size": 14, "head_width": 16,
                            "attentional_pool": True, "attn_pooler_heads": 2, "attn_pooler_queries": 8,
                            "output_tokens": True},
             "text_cfg": {"context_length": 76, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                          "embed_cls": True, "output_tokens": True},
             "multimodal_cfg": {"context_length": 76, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                                "attn_pooler_heads": 2},
             "custom_text": True}


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and "Traceback" not in text
    return text


def images(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def overlay(tmp_path, monkeypatch, **entries) -> None:
    """A $STAMP_REGISTRY overlay: the shipped entries with test sizes."""
    from importlib import resources

    shipped = json.loads((resources.files("stamp.zoo") / "pretrained.json").read_text())["models"]
    models = {}
    for name, changes in entries.items():
        models[name] = {**shipped[name], **changes}
    path = tmp_path / "registry.json"
    path.write_text(json.dumps({"models": models}))
    monkeypatch.setenv("STAMP_REGISTRY", str(path))


def same_pixels_and_features(enc, theirs, preprocess, imgs):
    """Our transform equals open_clip's eval transform on images at the input size (it only normalises there)
    and our features its ``encode_image(normalize=False)``, to 1e-5; returns (our pixels, theirs)."""
    from PIL import Image

    x = torch.stack([enc.transform(im) for im in imgs])
    ref_px = torch.stack([preprocess(Image.fromarray(im)) for im in imgs])
    torch.testing.assert_close(x, ref_px, atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(enc.encode_images(x), theirs.encode_image(ref_px, normalize=False), atol=1e-5,
                                   rtol=1e-5)
    return x, ref_px


def labelled_paired_corpus(root):
    """Two GENERATED slides (60 genes, 3 domains, labels in the 'domain' column) with mosaic H&E patches."""
    from paired_helpers import write_paired
    from stamp_helpers import generated_domains, write_generated_slices

    from spavis.shards import build_shards

    vocab, folders = write_generated_slices(root / "c", slides=2, n_genes=60, seed=7, n_domains=3, max_row=4,
                                            with_image=False)
    corpus = build_shards(folders, root / "c", vocab=vocab, min_genes=5, k_neighbors=8, max_spots_per_shard=1,
                          obs_columns="domain")
    write_paired(corpus, {k: int(str(v).rsplit("_", 1)[-1]) for k, v in generated_domains(folders).items()},
                 seed=7, n_domains=3)
    return corpus


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads; on a shared box torch's thread pool costs 10x per small op."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def randomized_open_clip(model_cfg: dict, seed: int):
    import open_clip

    from stamp.models.openclip import model_class

    torch.manual_seed(seed)
    model = model_class(model_cfg)(**{k: v for k, v in model_cfg.items() if k != "custom_text"})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    assert isinstance(model, (open_clip.CLIP, open_clip.CoCa))
    return model.eval()


# ----------------------------------------------------------------------------- CONCH
def test_conch_equals_the_authors_forward_at_448_px(tmp_path, monkeypatch, hub):
    import stamp
    from stamp.models.conch import ConchImageEncoder

    ref = randomize_(RefCoCa(image_size=448), seed=3).eval()
    overlay(tmp_path, monkeypatch, conch={"architecture": {**get_pretrained("conch").architecture,
                                                           "config": conch_config(ref)}, "embed_dim": 16})
    folder = tmp_path / "conch"
    folder.mkdir()
    torch.save(ref.state_dict(), folder / "pytorch_model.bin")
    enc = stamp.load("conch", weights=folder, device="cpu")
    assert enc.kind == "image" and enc.embed_dim == 16 and enc.input_size == 448
    assert enc.provenance.license == "cc-by-nc-nd-4.0" and enc.provenance.commercial is False
    imgs = images(2, 448)
    x = torch.stack([enc.transform(im) for im in imgs])
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    theirs_px = (torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255 - mean) / std
    torch.testing.assert_close(x, theirs_px, atol=1e-6, rtol=0)  # ToTensor + Normalize(OpenAI), at 448 no resize
    with torch.no_grad():
        ours = enc.encode_images(x)
        theirs = ref.encode_image(theirs_px, proj_contrast=False, normalize=False)
        projected = ref.encode_image(theirs_px, proj_contrast=True, normalize=False)
    assert ours.shape == (2, 16)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert isinstance(enc.module, ConchImageEncoder)
    enc.module.output = "projected"
    with torch.no_grad():
        torch.testing.assert_close(enc.encode_images(x), projected, atol=1e-5, rtol=1e-5)

    # a stray tensor, an extra one, a missing one, a wrong shape: one line each, nothing loaded
    state = ref.state_dict()
    for name, bad, message in (
            ("stray", {**state, "classifier.weight": torch.zeros(2)}, "neither part of the visual tower"),
            ("extra", {**state, "visual.extra.weight": torch.zeros(2)}, "no place in the architecture"),
            ("missing", {k: v for k, v in state.items() if k != "visual.ln_contrast.weight"}, "not in the weights"),
            ("shape", {**state, "visual.proj_contrast": torch.zeros(3, 3)}, "has shape")):
        d = tmp_path / name
        d.mkdir()
        torch.save(bad, d / "pytorch_model.bin")
        with pytest.raises(ModelConfigError) as err:
            stamp.load("conch", weights=d, device="cpu")
        assert message in one_line(err.value) and "pytorch_model.bin" in str(err.value)

    # the Hub repo is gated: without access, the one line that says so
    hub.create_repo("MahmoodLab/conch", gated=True)
    hub.add_files("MahmoodLab/conch", {"pytorch_model.bin": folder / "pytorch_model.bin", "meta.yaml": "a: 1\n"})
    with pytest.raises(Exception) as err:
        stamp.load("conch", device="cpu")
    assert "gated" in one_line(err.value) and "--weights" in str(err.value)


# ----------------------------------------------------------------------------- QuiltNet (open_clip Hub layout)
def test_quiltnet_equals_open_clips_own_hub_loader(tmp_path, hub):
    import open_clip
    from safetensors.torch import save_file

    import stamp

    model = randomized_open_clip(TINY_CLIP, seed=1)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors"))
    config = {"model_cfg": TINY_CLIP, "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                                                         "std": [0.26862954, 0.26130258, 0.27577711]}}
    hub.create_repo("wisdomik/QuiltNet-B-32")
    hub.add_files("wisdomik/QuiltNet-B-32", {"open_clip_config.json": json.dumps(config),
                                             "open_clip_model.safetensors": tmp_path / "open_clip_model.safetensors"})
    enc = stamp.load("quiltnet", device="cpu")  # the catalogue's size is ViT-B/32; the repo's config wins
    assert (enc.kind, enc.embed_dim, enc.input_size) == ("image", 16, 224)
    assert enc.provenance.revision == hub.head("wisdomik/QuiltNet-B-32")
    theirs, _, preprocess = open_clip.create_model_and_transforms("hf-hub:wisdomik/QuiltNet-B-32")
    theirs.eval()
    x, ref_px = same_pixels_and_features(enc, theirs, preprocess, images(3, 224))
    # the same files as a folder downloaded by hand, and as a repo in no catalogue
    snap = tmp_path / "by-hand"
    snap.mkdir()
    (snap / "open_clip_config.json").write_text(json.dumps(config))
    (snap / "open_clip_model.safetensors").write_bytes((tmp_path / "open_clip_model.safetensors").read_bytes())
    with torch.no_grad():
        by_hand = stamp.load("quiltnet", weights=snap, device="cpu").encode_images(x)
        generic = stamp.load(str(snap), device="cpu").encode_images(x)
    torch.testing.assert_close(by_hand, generic)
    torch.testing.assert_close(by_hand, theirs.encode_image(ref_px, normalize=False), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("change, message", [
    ({"vision_cfg": {**TINY_CLIP["vision_cfg"], "timm_model_name": "vit_base_patch16_224",
                     "timm_model_pretrained": True}}, "fetch or import another model"),
    ({"text_cfg": {**TINY_CLIP["text_cfg"], "hf_model_name": "bert-base-uncased"}}, "fetch or import another model"),
    ({"vision_cfg": {**TINY_CLIP["vision_cfg"], "width": 10 ** 7}}, "outside"),
    ({"loader": "pickle"}, "not open_clip architecture keys"),
])
def test_untrusted_open_clip_configs_are_refused_in_one_line(tmp_path, change, message):
    import stamp

    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {**TINY_CLIP, **change}}))
    (folder / "open_clip_model.safetensors").write_bytes(b"\x80\x04not weights")
    with pytest.raises(ModelConfigError) as err:
        stamp.load(str(folder), device="cpu")
    assert message in one_line(err.value) and "open_clip_config.json" in str(err.value)


# ----------------------------------------------------------------------------- OmiCLIP (Loki's checkpoint.pt)
def loki_sentences(X: np.ndarray, symbols: list[str], top_k: int) -> list[str]:
    """Loki's generate_gene_df, as a pandas reference: symbols with '.' or '-' dropped, nlargest per spot of
    the dense matrix (keep="first": ties, zeros included, in column order)."""
    import pandas as pd

    keep = [i for i, s in enumerate(symbols) if "." not in s and "-" not in s]
    df = pd.DataFrame(X[:, keep], columns=[symbols[i] for i in keep])
    return [" ".join(row.nlargest(top_k).index) for _, row in df.iterrows()]


def test_omiclip_checkpoint_image_and_gene_sides_equal_open_clip(tmp_path, monkeypatch, hub):
    import open_clip

    import stamp
    from stamp.models.gene_inputs import CorpusGenes

    model = randomized_open_clip(TINY_COCA, seed=2)
    checkpoint = {"epoch": 3, "name": "omiclip-test",
                  "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
                  "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-5, "params": [0]}]}}
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    hub.create_repo("WangGuangyuLab/Loki")
    hub.add_files("WangGuangyuLab/Loki", {"checkpoint.pt": tmp_path / "checkpoint.pt"})
    overlay(tmp_path, monkeypatch, omiclip={"architecture": {"model_cfg": TINY_COCA}, "embed_dim": 16,
                                            "gene_input": {"rule": "gene-sentence", "top_k": 5,
                                                           "skip_chars": [".", "-"]}})
    enc = stamp.load("omiclip", device="cpu")
    assert enc.kind == "aligned" and enc.embed_dim == 16 and enc.input_size == 56

    # the reference: Loki's own loading path (open_clip create_model_from_pretrained with the file)
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "tiny_coca_test.json").write_text(json.dumps(TINY_COCA))
    open_clip.add_model_config(tmp_path / "cfgs" / "tiny_coca_test.json")
    theirs, preprocess = open_clip.create_model_from_pretrained("tiny_coca_test", pretrained=str(tmp_path / "checkpoint.pt"))
    theirs.eval()
    same_pixels_and_features(enc, theirs, preprocess, images(3, 56, seed=4))

    # gene side: spots -> gene sentences -> open_clip's tokenizer -> encode_text
    symbols = ["TTN", "MYH7", "MT-CO1", "RP11-1.2", "MB", "DES", "", "CRYAB", "TPM1", "ACTC1"]
    rng = np.random.default_rng(5)
    X = rng.poisson(2.0, (6, len(symbols))).astype(np.float32)
    X[0, :] = [5, 5, 9, 9, 5, 1, 7, 0, 0, 2]  # ties (corpus order decides) and skipped symbols with top counts
    X[1, :] = [0, 0, 3, 0, 0, 2, 0, 0, 1, 0]  # 2 kept genes expressed: filled up with unexpressed ones, as Loki
    inputs = enc.counts
    inputs.bind(CorpusGenes.of([f"ENSG{i:011d}" for i in range(len(symbols))], symbols))
    sentences = inputs.sentences(sp.csr_matrix(X))
    expected = loki_sentences(X, [s or "?." for s in symbols], top_k=5)
    assert sentences == expected and sentences[0] == "TTN MYH7 MB ACTC1 DES"
    assert sentences[1] == "DES TPM1 TTN MYH7 MB"
    tokenizer = open_clip.get_tokenizer("tiny_coca_test")
    with torch.no_grad():
        ours = enc.encode_genes(inputs(sp.csr_matrix(X)))
        ref = theirs.encode_text(tokenizer(expected), normalize=False)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)

    # a checkpoint that is not this architecture: one line naming the file
    wrong = {"state_dict": {k: v for k, v in model.state_dict().items() if not k.startswith("text.")}}
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(ModelConfigError) as err:
        stamp.load("omiclip", weights=tmp_path / "wrong.pt", device="cpu")
    assert "not in the weights" in one_line(err.value) and "wrong.pt" in str(err.value)


# ----------------------------------------------------------------------------- mSTAR (timm, the authors' mSTAR.pth)
def test_mstar_pth_equals_timm_with_the_authors_transform_and_keeps_its_marks(tmp_path, monkeypatch):
    """mSTAR's released file is a plain state dict (``mSTAR.pth``) for timm's ViT-L/16 as UNI; the authors'
    README transform is Resize(224) + ToTensor + ImageNet Normalize. Table 1 marks V+L+G reach the encoder
    (timm entries recorded none, so mSTAR and PLIP were scored as V only)."""
    import timm
    from PIL import Image
    from torchvision import transforms

    import stamp

    kwargs = {**get_pretrained("mstar").architecture["kwargs"], "embed_dim": 32, "depth": 1, "num_heads": 2}
    torch.manual_seed(0)
    theirs = timm.create_model("vit_large_patch16_224", pretrained=False, **kwargs).eval()
    torch.save(theirs.state_dict(), tmp_path / "mSTAR.pth")
    overlay(tmp_path, monkeypatch, mstar={"architecture": {"name": "vit_large_patch16_224", "kwargs": kwargs},
                                          "embed_dim": 32, "parameters": None, "card_parameters": None})
    enc = stamp.load("mstar", weights=tmp_path / "mSTAR.pth", device="cpu")
    assert enc.provenance.extra["marks"] == "V+L+G" and enc.provenance.license == "cc-by-nc-nd-4.0"
    readme = transforms.Compose([transforms.Resize(224), transforms.ToTensor(),
                                 transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    imgs = images(2, 224, seed=6)
    x = torch.stack([enc.transform(im) for im in imgs])
    ref = torch.stack([readme(Image.fromarray(im)) for im in imgs])
    torch.testing.assert_close(x, ref, atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(enc.encode_images(x), theirs(ref), atol=1e-5, rtol=1e-5)
