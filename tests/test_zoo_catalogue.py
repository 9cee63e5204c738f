"""Evidence for the zoo's catalogue (issue 17).

* every entry's architecture, built on the ``meta`` device at its REAL size, has the parameter
  count the catalogue records (and, where the model's card states one, that count to the card's
  rounding) and returns vectors of the catalogue's width;
* representative entries (a timm ViT: ``uni``; the truncated ResNet: ``resnet50-imagenet``; a
  transformers ViT: ``phikon``) served with random weights in their real repo layout (timm
  ``config.json`` + ``model.safetensors``; transformers ``config.json`` + ``model.safetensors``)
  from the loopback Hub load strictly with ``stamp.load(name)`` and give the same features as the
  maintained library's own loader on the same server, to 1e-5 (small sizes, set in the served
  config, for the ViTs; the ResNet at its real size);
* gated, missing, offline and hand-downloaded weights, each one line.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from stamp.zoo.catalogue import catalogue, get_pretrained
from stamp.hub_access import PretrainedError
from tests.fakes.hub import FakeHub

SMALL_VIT = {"embed_dim": 64, "depth": 2, "num_heads": 2}


def images(n: int = 3, size: int = 240, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size + 16 * i, 3), dtype=np.uint8) for i in range(n)]


def image_entries():
    return [n for n, e in catalogue().items() if e.library in ("timm", "transformers", "open_clip", "conch")]


@pytest.mark.parametrize("name", image_entries())
def test_real_size_architecture_on_meta_matches_the_catalogue_and_card(name):
    from stamp.zoo.factory import build_image_encoder

    entry = get_pretrained(name)
    module = build_image_encoder(entry)  # meta device: no memory, seconds even for 1.1 B parameters
    n = sum(p.numel() for p in module.parameters())
    assert n == entry.parameters
    if entry.card_parameters:
        assert abs(n - entry.card_parameters) / entry.card_parameters < 0.05, (n, entry.card_parameters)
    crop = entry.preprocessing["crop"]
    out = module(torch.empty(2, 3, crop, crop, device="meta"))
    assert tuple(out.shape) == (2, entry.embed_dim)
    assert entry.citation.startswith("@") and entry.license and entry.commercial in (True, False, None)


def test_stamp_entries_parameter_counts():
    from stamp.zoo.convert import full_target, gene_target

    for name, target in (("stamp-v1", full_target), ("stamp-v1-gene", gene_target)):
        model, _ = target(get_pretrained(name))
        assert sum(p.numel() for p in model.parameters()) == get_pretrained(name).parameters


def test_formerly_left_out_models_are_in_the_zoo():
    from stamp.zoo.catalogue import catalogue_notes

    notes = catalogue_notes()
    for name in ("nicheformer", "conch"):  # in the zoo since issues 27 and 28
        assert name in catalogue() and name not in notes


# ----------------------------------------------------------------------------- loopback Hub
def timm_repo(tmp_path, arch: str, model_args: dict, pretrained_cfg: dict, seed: int = 0) -> dict:
    """A timm hub repo (config.json + model.safetensors) holding random weights."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, **model_args)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    path = tmp_path / f"{arch}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    config = {"architecture": arch, "num_classes": model_args.get("num_classes", 0), "model_args": model_args,
              "pretrained_cfg": pretrained_cfg}
    return {"config.json": json.dumps(config), "model.safetensors": path}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with FakeHub(tmp_path / "hub") as fake:
        fake.activate(monkeypatch, cache_dir=tmp_path / "hf")
        monkeypatch.setenv("STAMP_CACHE", str(tmp_path / "stamp-cache"))
        yield fake


def pixels_of(enc, imgs) -> torch.Tensor:
    return torch.stack([enc.transform(im) for im in imgs])


def test_uni_loads_like_timms_own_hub_loader(hub, tmp_path):
    import timm

    import stamp

    entry = get_pretrained("uni")
    args = {**entry.architecture["kwargs"], **SMALL_VIT}
    hub.create_repo(entry.hub_id)
    hub.add_files(entry.hub_id, timm_repo(tmp_path, entry.architecture["name"], args,
                                          {"input_size": [3, 224, 224], "mean": [0.485, 0.456, 0.406],
                                           "std": [0.229, 0.224, 0.225], "num_classes": 0}))
    enc = stamp.load("uni", device="cpu")
    assert (enc.kind, enc.embed_dim) == ("image", 1024)  # the catalogue's width (the served model is small)
    assert enc.provenance.hub_id == "MahmoodLab/UNI" and enc.provenance.revision == hub.head(entry.hub_id)
    assert enc.provenance.license == "cc-by-nc-nd-4.0" and enc.provenance.commercial is False
    x = pixels_of(enc, images())
    assert x.shape == (3, 3, 224, 224)
    theirs = timm.create_model(f"hf-hub:{entry.hub_id}", pretrained=True).eval()
    with torch.no_grad():
        ours = enc.encode_images(x)
        ref = theirs(x)
    assert ours.shape == (3, SMALL_VIT["embed_dim"])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_resnet50_truncated_after_layer3_matches_timm_features(hub, tmp_path):
    import timm

    import stamp

    entry = get_pretrained("resnet50-imagenet")
    hub.create_repo(entry.hub_id)
    hub.add_files(entry.hub_id, timm_repo(tmp_path, "resnet50", {"num_classes": 0},
                                          {"input_size": [3, 224, 224], "num_classes": 0}))
    enc = stamp.load("resnet50-imagenet", device="cpu")
    x = pixels_of(enc, images(2))
    theirs = timm.create_model(f"hf-hub:{entry.hub_id}", pretrained=True, features_only=True,
                               out_indices=(3,)).eval()
    with torch.no_grad():
        ours = enc.encode_images(x)
        ref = theirs(x)[0].mean(dim=(2, 3))
    assert ours.shape == (2, 1024) == (2, enc.embed_dim)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_phikon_loads_like_transformers_automodel(hub, tmp_path):
    from transformers import AutoModel, ViTConfig, ViTModel

    import stamp

    entry = get_pretrained("phikon")
    torch.manual_seed(1)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    image_size=224, patch_size=16)
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(tmp_path / "phikon")
    hub.create_repo(entry.hub_id)
    hub.add_files(entry.hub_id, {p.name: p for p in (tmp_path / "phikon").iterdir()})
    enc = stamp.load("phikon", device="cpu")
    x = pixels_of(enc, images(2))
    theirs = AutoModel.from_pretrained(entry.hub_id).eval()
    with torch.no_grad():
        ours = enc.encode_images(x)
        ref = theirs(pixel_values=x).last_hidden_state[:, 0]
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and "Traceback" not in text
    return text


def test_gated_missing_offline_and_hand_downloaded_weights(hub, tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    import stamp

    entry = get_pretrained("uni")
    files = timm_repo(tmp_path, entry.architecture["name"], {**entry.architecture["kwargs"], **SMALL_VIT}, {})
    hub.create_repo(entry.hub_id, gated=True)
    hub.add_files(entry.hub_id, files)
    with pytest.raises(PretrainedError) as err:
        stamp.load("uni", device="cpu")
    text = one_line(err.value)
    assert "gated" in text and "accept its terms at" in text and "hf auth login" in text and "--weights" in text

    hub.create_repo("bioptimus/H0-mini")
    hub.add_files("bioptimus/H0-mini", {"README.md": "# no weights here\n"})
    with pytest.raises(PretrainedError) as err:
        stamp.load("h0-mini", device="cpu")
    assert "holds none of model.safetensors, pytorch_model.bin" in one_line(err.value)

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    with pytest.raises(PretrainedError) as err:
        stamp.load("virchow2", device="cpu")
    assert "offline" in one_line(err.value)

    # gated + offline: the weights downloaded by hand (a folder, or the file alone)
    folder = tmp_path / "by-hand"
    folder.mkdir()
    (folder / "config.json").write_text(files["config.json"])
    (folder / "model.safetensors").write_bytes(files["model.safetensors"].read_bytes())
    enc = stamp.load("uni", device="cpu", weights=folder)
    x = pixels_of(enc, images(1))
    with torch.no_grad():
        assert enc.encode_images(x).shape == (1, SMALL_VIT["embed_dim"])
    with pytest.raises(Exception) as err:  # the file alone: the catalogue's real-size architecture
        stamp.load("uni", device="cpu", weights=folder / "model.safetensors")
    assert "do not belong together" in one_line(err.value)


def test_overlay_entry_is_validated_and_named(tmp_path, monkeypatch):
    from stamp.zoo.catalogue import list_pretrained

    overlay = tmp_path / "mine.json"
    uni = json.loads((__import__("importlib.resources").resources.files("stamp.zoo") / "pretrained.json").read_text())
    good = uni["models"]["uni"]
    overlay.write_text(json.dumps({"models": {"my-uni": {**good, "hub_id": "me/uni-mirror"}}}))
    monkeypatch.setenv("STAMP_REGISTRY", str(overlay))
    assert "my-uni" in list_pretrained("image") and get_pretrained("my-uni").hub_id == "me/uni-mirror"
    broken = {k: v for k, v in good.items() if k != "embed_dim"}
    overlay.write_text(json.dumps({"models": {"my-uni": broken}}))
    with pytest.raises(PretrainedError) as err:
        get_pretrained("my-uni")
    text = one_line(err.value)
    assert str(overlay) in text and "my-uni" in text and "embed_dim" in text and "pretrained.json" not in text


def test_timm_layout_folder_or_repo_without_catalogue_entry(hub, tmp_path):
    """A timm hub-layout repo that is in no catalogue loads by repo id (its own config and preprocessing)."""
    import timm

    import stamp

    files = timm_repo(tmp_path, "vit_small_patch16_224", {"num_classes": 0, **SMALL_VIT, "img_size": 64},
                      {"input_size": [3, 64, 64], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                       "interpolation": "bicubic", "num_classes": 0})
    hub.create_repo("someone/tiny-vit")
    hub.add_files("someone/tiny-vit", files)
    enc = stamp.load("someone/tiny-vit", device="cpu")
    assert enc.kind == "image" and enc.embed_dim == SMALL_VIT["embed_dim"] and enc.input_size == 64
    x = pixels_of(enc, images(2, size=80))
    theirs = timm.create_model("hf-hub:someone/tiny-vit", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(enc.encode_images(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_stamp_embed_images_with_a_zoo_name_online_then_offline(hub, tmp_path):
    """`stamp embed --images tiles/ --model uni` through the real CLI against the loopback Hub, then
    again with the Hub unreachable (HF_HUB_OFFLINE=1): the cached snapshot serves the same features."""
    import subprocess
    import sys

    import pyarrow.parquet as pq
    from PIL import Image

    from stamp.embed.writer import read_model_record

    entry = get_pretrained("uni")
    hub.create_repo(entry.hub_id)
    hub.add_files(entry.hub_id, timm_repo(tmp_path, entry.architecture["name"], {**entry.architecture["kwargs"],
                                                                                 **SMALL_VIT},
                                          {"input_size": [3, 224, 224], "mean": [0.485, 0.456, 0.406],
                                           "std": [0.229, 0.224, 0.225], "num_classes": 0}))
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    for i, im in enumerate(images()):
        Image.fromarray(im).save(tiles / f"t{i}.png")
    env = hub.env(tmp_path / "home")
    env["STAMP_CACHE"] = str(tmp_path / "stamp-cache")

    def embed(out, **extra):
        res = subprocess.run([sys.executable, "-m", "stamp.cli", "embed", "--model", "uni", "--images", str(tiles),
                              "--out", str(out), "--device", "cpu"], env={**env, **extra}, capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        return pq.read_table(out)

    online = embed(tmp_path / "online.parquet")
    assert online.column("image").to_pylist() == ["t0.png", "t1.png", "t2.png"]
    record = read_model_record(tmp_path / "online.parquet")
    assert record["stamp_model_name"] == "uni" and record["stamp_model_license"] == "cc-by-nc-nd-4.0"
    assert record["stamp_model_revision"] == hub.head(entry.hub_id)
    offline = embed(tmp_path / "offline.parquet", HF_HUB_OFFLINE="1")
    np.testing.assert_allclose(np.stack(offline.column("embedding").to_numpy(zero_copy_only=False)),
                               np.stack(online.column("embedding").to_numpy(zero_copy_only=False)), atol=1e-6)
    # gated and offline with an empty cache: `--weights FOLDER` downloaded by hand gives the same features
    by_hand = tmp_path / "by-hand"
    by_hand.mkdir()
    import huggingface_hub

    snap = Path(huggingface_hub.snapshot_download(entry.hub_id, cache_dir=str(tmp_path / "dl")))
    for name in ("config.json", "model.safetensors"):
        (by_hand / name).write_bytes((snap / name).read_bytes())
    res = subprocess.run([sys.executable, "-m", "stamp.cli", "embed", "--model", "uni", "--weights", str(by_hand),
                          "--images", str(tiles), "--out", str(tmp_path / "hand.parquet"), "--device", "cpu"],
                         env={**env, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-home")},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    hand = pq.read_table(tmp_path / "hand.parquet")
    np.testing.assert_allclose(np.stack(hand.column("embedding").to_numpy(zero_copy_only=False)),
                               np.stack(online.column("embedding").to_numpy(zero_copy_only=False)), atol=1e-6)
