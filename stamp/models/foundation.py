"""Third-party image encoders as plain modules: a timm or transformers trunk plus its pooling.

These classes know nothing of names, the Hub or model cards (the factory builds them from a
catalogue entry); they only say how a trunk's tokens become one vector per image, and how an
image becomes model pixels (:class:`ImagePreprocess`).

Poolings:

* ``head``: the trunk's own pooled output (``model(x)`` of a timm model built with
  ``num_classes=0``; CLS token or average pool, as its ``global_pool`` says);
* ``cls``: the class token of the last layer (after the final norm);
* ``cls+mean``: class token concatenated with the mean of the patch tokens (register tokens
  excluded), as Virchow / Virchow2 / H0-mini recommend;
* ``mean``: mean of the patch tokens;
* ``layer3-avg``: a ResNet cut after its third stage, global average pooled (CLAM / HEST);
* ``pooler`` / ``image_embeds``: transformers' pooled output / CLIP's projected image embedding.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from stamp.errors import ModelConfigError


class TimmImageEncoder(nn.Module):
    """A timm trunk and a pooling name; ``forward(pixels) -> (B, D)``."""

    def __init__(self, trunk: nn.Module, pooling: str = "head") -> None:
        super().__init__()
        self.trunk = trunk
        self.pooling = pooling
        if pooling == "layer3-avg":
            for name in ("layer4", "fc", "global_pool"):
                if hasattr(trunk, name):
                    setattr(trunk, name, nn.Identity())

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        t = self.trunk
        if self.pooling == "head":
            return t(pixels)
        if self.pooling == "layer3-avg":
            x = t.act1(t.bn1(t.conv1(pixels)))
            x = t.maxpool(x)
            x = t.layer3(t.layer2(t.layer1(x)))
            return x.mean(dim=(2, 3))
        tokens = t.forward_features(pixels)
        n = int(getattr(t, "num_prefix_tokens", 1))
        if self.pooling == "cls":
            return tokens[:, 0]
        if self.pooling == "mean":
            return tokens[:, n:].mean(dim=1)
        if self.pooling == "cls+mean":
            return torch.cat([tokens[:, 0], tokens[:, n:].mean(dim=1)], dim=-1)
        raise ModelConfigError(f"unknown pooling {self.pooling!r} for a timm encoder")


class HFImageEncoder(nn.Module):
    """A transformers vision model and a pooling name; ``forward(pixels) -> (B, D)``."""

    def __init__(self, model: nn.Module, pooling: str = "cls") -> None:
        super().__init__()
        self.model = model
        self.pooling = pooling

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixels)
        if self.pooling == "image_embeds":
            return out.image_embeds
        if self.pooling == "pooler":
            return out.pooler_output
        hidden = out.last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "mean":
            return hidden[:, 1:].mean(dim=1)
        if self.pooling == "cls+mean":
            return torch.cat([hidden[:, 0], hidden[:, 1:].mean(dim=1)], dim=-1)
        raise ModelConfigError(f"unknown pooling {self.pooling!r} for a transformers encoder")


class ImagePreprocess:
    """PIL image / uint8 (H, W, 3) array -> normalised float tensor (3, crop, crop).

    Resize the shorter side to ``resize`` (antialiased, ``interpolation``), centre-crop ``crop``,
    scale to [0, 1], subtract ``mean`` and divide by ``std`` (the entry's own card values): the
    torchvision ``Resize`` / ``CenterCrop`` / ``Normalize`` of the model cards. Split in two stages
    (:mod:`stamp.models.pixels`): ``to_uint8`` (geometry) and ``normalize`` (on the model's device).
    """

    def __init__(self, resize: int, crop: int, mean: Sequence[float], std: Sequence[float],
                 interpolation: str = "bilinear", channel_order: str = "rgb", **_: Any) -> None:
        from stamp.models.pixels import INTERPOLATIONS

        self.resize, self.crop, self.interpolation = int(resize), int(crop), interpolation
        if interpolation not in INTERPOLATIONS:
            raise ModelConfigError(f"preprocessing interpolation {interpolation!r}: choose among "
                                   f"{', '.join(INTERPOLATIONS)}")
        self.channel_order = channel_order
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(3, 1, 1)

    def to_uint8(self, image: Any) -> torch.Tensor:
        """Resize + centre crop in uint8: (3, crop, crop)."""
        from stamp.models.pixels import chw_tensor, resize_shorter_and_crop, uint8_hwc

        x = resize_shorter_and_crop(chw_tensor(uint8_hwc(image)), self.resize, self.crop, self.interpolation)
        return x[0, :3].contiguous()

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, crop, crop) uint8 on any device -> normalised float."""
        from stamp.models.pixels import normalize_uint8

        return normalize_uint8(batch, self.mean.flatten(), self.std.flatten(), channel_order=self.channel_order)

    def __call__(self, image: Any) -> torch.Tensor:
        return self.normalize(self.to_uint8(image)[None])[0]

    def __repr__(self) -> str:
        return (f"ImagePreprocess(resize={self.resize}, crop={self.crop}, interpolation={self.interpolation!r}, "
                f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})")


__all__ = ["TimmImageEncoder", "HFImageEncoder", "ImagePreprocess"]
