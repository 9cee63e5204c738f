"""Two-stage preprocessing (stamp.models.pixels): uint8 geometry in the loader workers, normalisation on the device.

References are independent: torchvision's own ``Resize`` / ``CenterCrop`` / ``ToTensor`` / ``Normalize`` on PIL
images (the model cards' pipeline) and the slide's pixels read straight through OpenSlide.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from stamp.models.foundation import ImagePreprocess

RNG = np.random.default_rng(3)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _smooth_image(h: int, w: int) -> np.ndarray:
    """Tissue-like content: smooth colour fields plus mild noise (uint8 RGB)."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(6 * xx + 1), np.cos(5 * yy), np.sin(4 * (xx + yy))], axis=-1)
    img = 150 + 80 * base + RNG.normal(0, 12, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("size, resize, crop, interpolation", [((256, 256), 224, 224, "bilinear"),
                                                                ((300, 260), 256, 224, "bicubic"),
                                                                ((180, 180), 224, 224, "bilinear")])
def test_two_stages_match_torchvision_on_pil(size, resize, crop, interpolation):
    from PIL import Image
    from torchvision import transforms as T

    img = _smooth_image(*size)
    pre = ImagePreprocess(resize=resize, crop=crop, mean=MEAN, std=STD, interpolation=interpolation)
    mode = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}[interpolation]
    ref = T.Compose([T.Resize(resize, interpolation=mode), T.CenterCrop(crop), T.ToTensor(),
                     T.Normalize(MEAN, STD)])(Image.fromarray(img))
    u8 = pre.to_uint8(img)
    assert u8.dtype == torch.uint8 and tuple(u8.shape) == (3, crop, crop) and u8.is_contiguous()
    got = pre(img)
    torch.testing.assert_close(got, pre.normalize(u8[None])[0], rtol=0, atol=0)  # one definition
    # uint8 antialiased resize: within two grey levels of PIL's, and almost everywhere equal
    diff = ((got - ref) * torch.tensor(STD).view(3, 1, 1) * 255).abs()
    assert float(diff.max()) <= 2.01 and float((diff > 0.5).float().mean()) < 0.05
    # PIL, RGBA (alpha ignored, as PIL's convert("RGB")), grey and arrays all give the same pixels
    rgba = np.concatenate([img, np.full(img.shape[:2] + (1,), 255, np.uint8)], axis=-1)
    for same in (Image.fromarray(img), Image.fromarray(rgba, "RGBA"), rgba):
        assert torch.equal(pre.to_uint8(same), u8)
    grey = img[..., 0]
    assert torch.equal(pre.to_uint8(grey), pre.to_uint8(np.repeat(grey[..., None], 3, axis=2)))


def test_bad_inputs_and_interpolations_are_one_line():
    from stamp.errors import ModelConfigError

    pre = ImagePreprocess(resize=224, crop=224, mean=MEAN, std=STD)
    with pytest.raises(ModelConfigError, match="uint8 RGB"):
        pre(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ModelConfigError, match="interpolation 'lanczos3'"):
        ImagePreprocess(resize=224, crop=224, mean=MEAN, std=STD, interpolation="lanczos3")


def test_stamp_transform_keeps_its_float_resize_and_splits_exactly():
    from stamp.models.vision import ImageTransform, to_pixels
    from stamp.zoo.factory import vision_config

    t = ImageTransform(vision_config("uni"))
    img = _smooth_image(256, 256)
    u8 = t.to_uint8(img)
    assert tuple(u8.shape) == (3, 256, 256)  # no uint8 resize: the released inference resizes in float
    torch.testing.assert_close(t(img), to_pixels(img[None], t.config)[0], rtol=0, atol=0)
    torch.testing.assert_close(t.normalize(u8[None]), to_pixels(img[None], t.config), rtol=0, atol=0)


def test_slide_tiles_go_through_the_two_stages_with_openslide_pixels(tmp_path):
    """embed-slides' dataset: workers hand out uint8 tiles at the model's size; normalising them equals the
    encoder's transform on the tile read by OpenSlide (composited on white where it leaves the scan)."""
    import openslide

    from stamp.slides.embed import TileDataset
    from stamp.slides.reader import open_slide
    from stamp.slides.synthetic import write_synthetic_slide

    truth = write_synthetic_slide(tmp_path / "s.svs", 1536, 1024, [(700, 500, 500, 380)], pen=None, downsamples=(4,))
    pre = ImagePreprocess(resize=224, crop=224, mean=MEAN, std=STD)
    coords = np.array([[512, 256], [256, 512], [1408, 896]])  # the last tile overhangs the 1536 x 1024 scan
    ds = TileDataset(truth.path, None, coords, 0, 256, 256, pre)
    assert ds.stages is not None
    raw = openslide.OpenSlide(str(truth.path))
    for i, (x, y) in enumerate(coords):
        item = ds[i]
        assert item.dtype == torch.uint8 and tuple(item.shape) == (3, 224, 224)
        rgba = np.asarray(raw.read_region((int(x), int(y)), 0, (256, 256))).astype(np.float64)
        a = rgba[..., 3:] / 255.0
        rgb = np.rint(rgba[..., :3] * a + 255 * (1 - a)).astype(np.uint8)  # straight alpha over white
        ref = pre(rgb)
        torch.testing.assert_close(pre.normalize(item[None])[0], ref, rtol=0, atol=1.01 / 255 / min(STD))
    # the opaque fast path hands RGBA through; outside the scan it is RGB on white
    with open_slide(truth.path) as slide:
        assert slide.read_tile(512, 256, 0, 256, 256).shape[-1] == 4
        edge = slide.read_tile(1408, 896, 0, 256, 256)
        assert edge.shape[-1] == 3 and (edge[-1, -1] == 255).all()
    # a transform without the two stages runs whole in the workers, on the tile at the target scale
    plain = TileDataset(truth.path, None, coords, 0, 256, 128, lambda img: img)
    assert plain.stages is None and plain[0].shape == (128, 128, 3)
