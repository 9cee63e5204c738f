"""The STAMP vision encoder: UNI's real architecture, the pretext-token slot, CSP cells, weights, pixels."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from stamp.models.vision import (
    RegionGridError,
    VisionConfig,
    VisionEncoder,
    VisionWeightsError,
    load_vision_config,
    to_pixels,
    vision_preset_names,
)
from stamp.zoo.factory import create_vision_encoder, load_trunk_weights, vision_config


def test_uni_is_described_once_by_its_catalogue_entry():
    """The vision tower's `uni` is read off the catalogue entry (no second description in stamp/configs)."""
    from stamp.zoo.catalogue import get_pretrained

    assert vision_preset_names() == ["tiny"]
    uni, entry = vision_config("uni"), get_pretrained("uni")
    assert (uni.arch, uni.img_size, uni.patch_size, uni.init_values, uni.dynamic_img_size) == (
        "vit_large_patch16_224", 224, 16, 1e-5, True)
    assert uni.arch == entry.architecture["name"] and uni.mean == entry.preprocessing["mean"]
    assert uni.weights == "uni" and (uni.csp_window, uni.csp_stride) == (6, 4)
    # the released model's tower is UNI's with the authors' channel order, as before
    released = get_pretrained("stamp-v1").vision_config
    assert {**released, "weights": "uni", "channel_order": "rgb"} == {**uni.to_dict(), "channel_order": "rgb"}
    with pytest.raises(Exception, match="zoo"):
        load_vision_config("uni")  # the model classes know no names


def test_uni_architecture_at_real_size_on_the_meta_device():
    """UNI = ViT-L/16 at 224 px: 303.35 M trunk parameters, 1024 wide, 14 x 14 tokens, 3 x 3 CSP cells."""
    import timm  # noqa: F401  (import outside the meta context: torchvision's import-time tensors are slow there)

    with torch.device("meta"):
        enc = VisionEncoder(vision_config("uni"))
        x = torch.empty(2, 3, 224, 224)
        out = enc(x)
        region = enc(x, region_of=x)
        cells = enc.region_cells(region.grid)
    assert sum(p.numel() for p in enc.trunk.parameters()) == 303_350_784
    assert enc.dim == 1024 and enc.num_prefix_tokens == 1 and len(enc.trunk.blocks) == 24
    assert tuple(enc.pretext.shape) == (1024,) and tuple(enc.region_proj.weight.shape) == (1024, 1024)
    assert enc.region_proj.bias is not None
    assert tuple(out.pooled.shape) == (2, 1024) and tuple(out.pretext.shape) == (2, 1024)
    assert tuple(out.grid.shape) == (2, 14, 14, 1024) and tuple(cells.shape) == (2, 9, 1024)
    assert tuple(enc.trunk.state_dict()["pos_embed"].shape) == (1, 197, 1024)


def _capture_block0_input(enc: VisionEncoder, pixels, region_of=None) -> torch.Tensor:
    seen = {}
    handle = enc.trunk.blocks[0].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    try:
        enc(pixels, region_of=region_of)
    finally:
        handle.remove()
    return seen["x"]


@pytest.mark.parametrize("reg_tokens", [0, 4])
def test_pretext_token_sits_right_after_the_prefix_tokens(reg_tokens):
    """With register tokens the slot moves (the released code hard-coded position 1)."""
    torch.manual_seed(0)
    cfg = load_vision_config("tiny").to_dict()
    cfg["model_kwargs"] = {**cfg["model_kwargs"], "reg_tokens": reg_tokens}
    enc = VisionEncoder(cfg).eval()
    n = 1 + reg_tokens
    assert enc.num_prefix_tokens == n
    px = torch.randn(2, 3, 112, 112)
    x = _capture_block0_input(enc, px)
    grid = enc.config.grid_size ** 2
    assert x.shape[1] == n + 1 + grid
    torch.testing.assert_close(x[:, n], enc.pretext.detach().expand(2, -1))  # no position embedding added
    torch.testing.assert_close(x[:, 0], (enc.trunk.cls_token + enc.trunk.pos_embed[:, :1])[0].expand(2, -1)
                               if not enc.trunk.no_embed_class else enc.trunk.cls_token[0].expand(2, -1))
    # region input: the slot holds region_proj(norm(proj(patch shrunk to 16 x 16)))
    patch = torch.randn(2, 3, 112, 112)
    xr = _capture_block0_input(enc, px, region_of=patch)
    small = torch.nn.functional.interpolate(patch, size=(16, 16), mode="bilinear", antialias=True)
    expect = enc.region_proj(enc.trunk.patch_embed.norm(enc.trunk.patch_embed.proj(small).flatten(1)))
    torch.testing.assert_close(xr[:, n], expect.detach())
    out = enc(px)
    assert tuple(out.grid.shape) == (2, 7, 7, enc.dim)


def test_pretext_vector_reaches_the_pretext_and_pooled_outputs():
    torch.manual_seed(0)
    enc = VisionEncoder("tiny").eval()
    px = torch.randn(3, 3, 112, 112)
    out = enc(px)
    # changing the pretext vector changes the pretext output and (through attention) the pooled token
    with torch.no_grad():
        enc.pretext.add_(1.0)
    out2 = enc(px)
    assert not torch.allclose(out.pretext, out2.pretext)
    assert not torch.allclose(out.pooled, out2.pooled)
    # tiny pools by averaging: the mean of the grid tokens only (not CLS, not the pretext token)
    assert enc.trunk.global_pool == "avg"
    torch.testing.assert_close(out2.pooled, enc.trunk.fc_norm(out2.grid.mean(dim=(1, 2))))
    # UNI-style 'token' pooling reads CLS
    cfg = load_vision_config("tiny").to_dict()
    cfg["model_kwargs"] = {**cfg["model_kwargs"], "global_pool": "token"}
    cls_enc = VisionEncoder(cfg).eval()
    seen = {}
    handle = cls_enc.trunk.norm.register_forward_hook(lambda m, a, o: seen.setdefault("x", o))
    pooled = cls_enc(px).pooled
    handle.remove()
    torch.testing.assert_close(pooled, seen["x"][:, 0])


def test_region_cells_are_the_released_windows():
    enc = VisionEncoder("tiny")
    grid = torch.arange(2 * 7 * 7 * 4, dtype=torch.float32).reshape(2, 7, 7, 4)
    cells = enc.region_cells(grid)
    # cell (r, c) = mean of rows 2r..2r+2, cols 2c..2c+2 (window 3, stride 2 on a 7 x 7 grid)
    for r in range(3):
        for c in range(3):
            torch.testing.assert_close(cells[:, 3 * r + c], grid[:, 2 * r:2 * r + 3, 2 * c:2 * c + 3].mean(dim=(1, 2)))


def test_region_grid_that_does_not_fit_is_a_clear_error():
    with pytest.raises(RegionGridError, match="window 5, stride 4 does not give 3x3"):
        VisionConfig.from_dict({**vision_config("uni").to_dict(), "csp_window": 5})
    enc = VisionEncoder("tiny")
    out = enc(torch.randn(1, 3, 160, 160))  # dynamic size: a 10 x 10 grid
    with pytest.raises(RegionGridError, match="10x10 token grid"):
        enc.region_cells(out.grid)


def test_local_weights_file_loads_and_misfits_are_named(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    src = VisionEncoder("tiny").eval()
    path = tmp_path / "trunk.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in src.trunk.state_dict().items()}, str(path))
    torch.manual_seed(2)
    dst = VisionEncoder("tiny").eval()
    dst.pretext.data.copy_(src.pretext.data)
    dst.region_proj.load_state_dict(src.region_proj.state_dict())
    load_trunk_weights(dst, str(path))
    px = torch.randn(2, 3, 112, 112)
    torch.testing.assert_close(dst(px).pooled, src(px).pooled)
    uni_like = tmp_path / "wrong.safetensors"
    state = dict(src.trunk.state_dict())
    state["pos_embed"] = torch.zeros(1, 5, src.dim)
    save_file({k: v.contiguous() for k, v in state.items()}, str(uni_like))
    with pytest.raises(VisionWeightsError, match="pos_embed has shape"):
        load_trunk_weights(dst, str(uni_like))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(VisionWeightsError, match="not a safetensors file"):
        load_trunk_weights(dst, str(bad))


def test_gated_hub_weights_give_one_clear_line(tmp_path, monkeypatch):
    from fakes.hub import FakeHub
    from safetensors.torch import save_file

    torch.manual_seed(0)
    src = VisionEncoder("tiny")
    weights = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in src.trunk.state_dict().items()}, str(weights))
    with FakeHub(tmp_path / "hub") as hub:
        hub.create_repo("MahmoodLab/UNI", gated=True)
        hub.add_files("MahmoodLab/UNI", {"model.safetensors": weights.read_bytes()})
        hub.activate(monkeypatch, cache_dir=tmp_path / "hf")
        with pytest.raises(VisionWeightsError) as err:
            create_vision_encoder("tiny", weights="hf-hub:MahmoodLab/UNI")
        msg = str(err.value)
        assert "accept its terms" in msg and "hf auth login" in msg and "\n" not in msg
        hub.grant("MahmoodLab/UNI", "hf_granted", repo_type="model")
        monkeypatch.setenv("HF_TOKEN", "hf_granted")  # the user logged in: the client sends it
        import huggingface_hub.constants as hc

        monkeypatch.setattr(hc, "HF_HUB_DISABLE_IMPLICIT_TOKEN", False)
        enc = create_vision_encoder("tiny", weights="hf-hub:MahmoodLab/UNI")
        torch.testing.assert_close(enc.trunk.state_dict()["pos_embed"], src.trunk.state_dict()["pos_embed"])


def test_pixels_resize_normalise_and_convert_modes():
    from PIL import Image

    from stamp.models.vision import ImageTransform

    cfg = vision_config("uni")
    white = np.full((2, 100, 100, 3), 255, np.uint8)
    px = to_pixels(white, cfg)
    assert tuple(px.shape) == (2, 3, 224, 224)
    expect = (1 - np.array(cfg.mean)) / np.array(cfg.std)
    np.testing.assert_allclose(px[0, :, 50, 50].numpy(), expect, rtol=1e-5)
    t = ImageTransform(cfg)
    gray = Image.fromarray(np.full((64, 64), 255, np.uint8), mode="L")
    rgba = Image.fromarray(np.full((64, 64, 4), 255, np.uint8), mode="RGBA")
    for img in (gray, rgba, np.full((64, 64), 255, np.uint8)):
        torch.testing.assert_close(t(img), px[0])
