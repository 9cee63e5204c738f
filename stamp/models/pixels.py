"""Image preprocessing in two stages: uint8 geometry where the pixels are decoded, float on the model's device.

An encoder's ``transform`` (see :mod:`stamp.zoo.encoder`) turns one image into normalised model pixels.
Transforms built here also expose the two halves of that work, so a loader can split it:

* ``to_uint8(image) -> (3, S, S) uint8 tensor``: conversion to RGB, resize and crop, in uint8. It
  runs in DataLoader worker processes (cheap to ship: a quarter of a float tile);
* ``normalize(batch) -> (B, 3, S, S) float``: [0, 1] scaling, mean / std (and what else needs
  floats), on whatever device ``batch`` sits (the GPU when there is one).

``transform(image) == normalize(to_uint8(image)[None])[0]`` always: one definition, two call sites
(``stamp embed`` on patches, ``stamp embed-slides`` on slide tiles).

uint8 resizing is torch's antialiased kernel (``F.interpolate(..., antialias=True)`` on uint8, the
one torchvision uses for tensors): within one grey level of PIL's ``Image.resize`` for bilinear
(at most two for bicubic, on noise), several times faster (``benchmarks/slides.py``).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from stamp.constants import INTERPOLATIONS
from stamp.errors import ModelConfigError



def uint8_hwc(image: Any) -> np.ndarray:
    """PIL image or array (H, W), (H, W, 3), (H, W, 4) uint8 -> (H, W, 3 or 4) uint8 array whose first three
    channels are RGB (a fourth, alpha, is carried along unread: resizing it with the rest keeps torch's fast
    channels-last kernel, dropping it afterwards is free)."""
    if hasattr(image, "convert"):  # PIL
        return np.asarray(image if image.mode in ("RGB", "RGBA") else image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.dtype != np.uint8:
        raise ModelConfigError(f"images must be uint8 RGB (H, W, 3), got {arr.dtype} {arr.shape}")
    return arr


def as_uint8_rgb(image: Any) -> np.ndarray:
    """PIL image or array -> (H, W, 3) uint8 (alpha dropped, as PIL's ``convert("RGB")`` drops it)."""
    arr = uint8_hwc(image)
    return arr if arr.shape[2] == 3 else np.ascontiguousarray(arr[..., :3])


def chw_tensor(arr: np.ndarray) -> torch.Tensor:
    """(H, W, C) uint8 array -> (1, C, H, W) uint8 tensor sharing its memory (channels-last strides: the
    layout torch's uint8 resize kernel is fastest on)."""
    if not arr.flags.writeable:  # PIL hands out read-only buffers; torch wants writable memory
        arr = arr.copy()
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


def resize_uint8(x: torch.Tensor, size: tuple[int, int], interpolation: str = "bilinear") -> torch.Tensor:
    """(1, C, H, W) uint8 -> (1, C, h, w) uint8, antialiased when shrinking (no-op at the same size)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if interpolation not in INTERPOLATIONS:
        raise ModelConfigError(f"interpolation {interpolation!r}: choose among {', '.join(INTERPOLATIONS)}")
    if interpolation == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    return F.interpolate(x, size=size, mode=interpolation, antialias=True, align_corners=False)


def resize_shorter_and_crop(x: torch.Tensor, resize: int, crop: int, interpolation: str) -> torch.Tensor:
    """torchvision's ``Resize(resize)`` then ``CenterCrop(crop)`` (its rounding: the longer side truncated,
    the crop offset rounded half to even) on a (1, C, H, W) uint8 tensor."""
    h, w = (int(v) for v in x.shape[-2:])
    short, long = min(h, w), max(h, w)
    new_long = int(resize * long / short)
    size = (resize, new_long) if h <= w else (new_long, resize)
    x = resize_uint8(x, size, interpolation)
    if min(size) < crop:  # torchvision pads a too-small image; the cards' resize >= crop never needs it
        raise ModelConfigError(f"preprocessing: resize {resize} is smaller than the crop {crop}")
    top, left = int(round((size[0] - crop) / 2.0)), int(round((size[1] - crop) / 2.0))
    return x[..., top:top + crop, left:left + crop]


def normalize_uint8(batch: torch.Tensor, mean, std, *, channel_order: str = "rgb") -> torch.Tensor:
    """(B, 3, S, S) uint8 on any device -> float32 (B, 3, S, S): /255, BGR flip if asked, (x - mean) / std."""
    x = batch.float().div_(255.0)
    if channel_order == "bgr":
        x = x.flip(1)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def two_stages(transform: Any) -> Optional[tuple[Callable[[Any], torch.Tensor], Callable[[torch.Tensor], Any]]]:
    """``(to_uint8, normalize)`` of a transform that offers them, else ``None`` (a plain callable: the
    loader runs all of it in its workers)."""
    a, b = getattr(transform, "to_uint8", None), getattr(transform, "normalize", None)
    return (a, b) if callable(a) and callable(b) else None


__all__ = ["uint8_hwc", "as_uint8_rgb", "chw_tensor", "resize_uint8", "resize_shorter_and_crop", "normalize_uint8", "two_stages",
           "INTERPOLATIONS"]
