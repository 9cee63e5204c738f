"""STAMP vision encoder: a timm ViT with the cross-scale *pretext token*.

Why a wrapper and not a plain timm model: STAMP inserts one extra token right after the
ViT's prefix tokens (CLS and any register tokens, ``trunk.num_prefix_tokens``; the
released code hard-coded position 1, which breaks ViTs with registers such as UNI2-h).

* For a **patch** image the token is a learned vector (``pretext``).
* For a **region** image (3x wider, same pixel count) it describes *which patch* the
  region is asked about: the patch resized to one ViT patch (16 x 16) sent through the
  trunk's patch-embedding projection and norm, then ``region_proj``; the learned vector
  is added times zero, as released, so both paths share one code path.

The token gets no position embedding. Outputs per image (:class:`VisionOutput`): the
pooled token (the trunk's own pooling -- CLS, or the mean of the non-prefix tokens for
avg-pool models -- computed without the pretext token), the pretext token's output, and
the grid tokens (B, H, W, C) that the CSP objective pools into 3 x 3 cells.

Configs are data: a :class:`VisionConfig` saved in the model's ``config.json``, a JSON file, or
the shipped ``stamp/configs/vision-tiny.json`` (a small random ViT for CPU runs and tests). UNI
and the other ViTs of the zoo are described once, by their catalogue entries: their vision configs
and weights come from the zoo (``stamp.zoo.factory.vision_config`` / ``create_vision_encoder``;
this module knows no names), so building a model from a saved config never downloads anything.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stamp.constants import IMAGENET_MEAN, IMAGENET_STD
from stamp.errors import ModelConfigError, RegionGridError, StampError, VisionWeightsError  # noqa: F401

VISION_PREFIX = "vision-"


@dataclass
class VisionConfig:
    """Architecture of :class:`VisionEncoder` (serialised inside the StampModel config).

    ``arch`` + ``model_kwargs`` go to ``timm.create_model``; ``weights`` is the default
    source of pretrained trunk weights (a catalogue name, ``hf-hub:ORG/NAME`` or a file), used only
    by ``stamp.zoo.factory.create_vision_encoder``. ``csp_window``/``csp_stride``: ``avg_pool2d`` over the
    region's token grid giving ``region_grid`` x ``region_grid`` cells (UNI: 14 x 14
    tokens, window 6, stride 4, as released).
    """

    name: str = "custom"
    arch: str = "vit_large_patch16_224"
    img_size: int = 224
    patch_size: int = 16
    init_values: Optional[float] = 1e-5
    dynamic_img_size: bool = True
    model_kwargs: dict = field(default_factory=dict)
    weights: Optional[str] = None
    region_grid: int = 3
    csp_window: int = 6
    csp_stride: int = 4
    mean: list = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list = field(default_factory=lambda: list(IMAGENET_STD))
    channel_order: str = "rgb"  # "bgr": channels swapped before normalising, as the released STAMP pipeline (OpenCV)

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    def validate(self) -> "VisionConfig":
        if self.img_size % self.patch_size:
            raise ModelConfigError(
                f"vision img_size {self.img_size} is not a multiple of patch_size {self.patch_size}; fix the config"
            )
        check_region_grid(self.grid_size, self.csp_window, self.csp_stride, self.region_grid)
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ModelConfigError("vision mean/std must hold 3 values (RGB)")
        if self.channel_order not in ("rgb", "bgr"):
            raise ModelConfigError(f"vision channel_order {self.channel_order!r} must be 'rgb' or 'bgr'")
        if not isinstance(self.model_kwargs, dict):
            raise ModelConfigError("vision model_kwargs must be a JSON object of timm keyword arguments")
        from stamp.safety import check_config_sizes, check_timm_kwargs

        check_timm_kwargs(self.model_kwargs, f"vision config {self.name!r}")  # only known keys reach timm
        check_config_sizes({"img_size": self.img_size, "patch_size": self.patch_size}, f"vision config {self.name!r}")
        return self

    @classmethod
    def from_dict(cls, data: dict) -> "VisionConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelConfigError(f"unknown vision config keys {unknown}; known keys: {sorted(known)}")
        return cls(**data).validate()

    def to_dict(self) -> dict:
        return asdict(self)


def check_region_grid(grid: int, window: int, stride: int, cells: int = 3) -> None:
    """Raise :class:`RegionGridError` unless ``avg_pool2d(window, stride)`` maps ``grid`` to ``cells``."""
    if window < 1 or stride < 1 or grid < window or (grid - window) % stride or (grid - window) // stride + 1 != cells:
        raise RegionGridError(
            f"a {grid}x{grid} token grid pooled with window {window}, stride {stride} does not give "
            f"{cells}x{cells} region cells; set csp_window/csp_stride in the vision config so that "
            f"(grid - window) / stride + 1 = {cells} (UNI: 14 tokens, window 6, stride 4)"
        )


def vision_preset_names() -> list[str]:
    root = resources.files("stamp") / "configs"
    return sorted(p.name[len(VISION_PREFIX):-5] for p in root.iterdir()
                  if p.name.startswith(VISION_PREFIX) and p.name.endswith(".json"))


def load_vision_config(name_or_path: Union[str, Path, dict, VisionConfig]) -> VisionConfig:
    """A shipped preset (``uni``, ``tiny``), a JSON file of :class:`VisionConfig` fields, or a dict."""
    if isinstance(name_or_path, VisionConfig):
        return name_or_path.validate()
    if isinstance(name_or_path, dict):
        return VisionConfig.from_dict(name_or_path)
    name = str(name_or_path)
    if name in vision_preset_names():
        text = (resources.files("stamp") / "configs" / f"{VISION_PREFIX}{name}.json").read_text()
        where = f"stamp/configs/{VISION_PREFIX}{name}.json"
    else:
        path = Path(name)
        if not path.is_file() or path.suffix != ".json":
            raise ModelConfigError(
                f"vision config {name!r} is neither a preset {vision_preset_names()} nor a JSON file (a ViT of the "
                "zoo such as 'uni' comes from the zoo: stamp.zoo.factory.vision_config / --vision uni)"
            )
        text, where = path.read_text(), str(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelConfigError(f"{where}: not valid JSON ({exc}); fix the file") from exc
    return VisionConfig.from_dict(data.get("vision", data))


_SKIP_INIT: ContextVar[bool] = ContextVar("stamp_vision_skip_init", default=False)


@contextmanager
def skip_trunk_init():
    """Build trunks without timm's random init (seconds for ViT-L on CPU) when weights are loaded next."""
    token = _SKIP_INIT.set(True)
    try:
        yield
    finally:
        _SKIP_INIT.reset(token)


class VisionOutput(NamedTuple):
    pooled: torch.Tensor  # (B, C)
    pretext: torch.Tensor  # (B, C) the pretext token's output
    grid: torch.Tensor  # (B, H, W, C)


def _trunc_normal(t: torch.Tensor) -> None:
    if t.device.type != "meta":
        nn.init.trunc_normal_(t, std=0.02)


class VisionEncoder(nn.Module):
    """``trunk`` (timm ViT) + ``pretext`` (learned vector) + ``region_proj`` (see module docstring)."""

    def __init__(self, config: Union[VisionConfig, dict, str] = "tiny") -> None:
        super().__init__()
        import timm

        self.config = load_vision_config(config)
        c = self.config
        from stamp.safety import check_timm_kwargs

        extra = check_timm_kwargs(c.model_kwargs, f"vision config {c.name!r}")
        kwargs: dict[str, Any] = dict(pretrained=False, img_size=c.img_size, patch_size=c.patch_size,
                                      num_classes=0, dynamic_img_size=c.dynamic_img_size, **extra)
        if c.init_values is not None:
            kwargs["init_values"] = c.init_values
        if torch.empty(0).device.type == "meta" or _SKIP_INIT.get():  # weights come later: skip timm's init
            kwargs["weight_init"] = "skip"
        try:
            self.trunk = timm.create_model(c.arch, **kwargs)
        except (RuntimeError, TypeError, ValueError) as exc:
            raise ModelConfigError(f"timm cannot build {c.arch!r} with {kwargs}: {exc}") from exc
        if not hasattr(self.trunk, "patch_embed") or not hasattr(self.trunk, "_pos_embed"):
            raise ModelConfigError(f"{c.arch!r} is not a timm VisionTransformer; STAMP needs a ViT trunk")
        self.dim = int(self.trunk.embed_dim)
        self.num_prefix_tokens = int(getattr(self.trunk, "num_prefix_tokens", 1))
        self.pretext = nn.Parameter(torch.zeros(self.dim))
        self.region_proj = nn.Linear(self.dim, self.dim)
        _trunc_normal(self.pretext)

    @property
    def device(self) -> torch.device:
        return self.pretext.device

    def region_pretext(self, patch: torch.Tensor) -> torch.Tensor:
        """(B, C) pretext tokens for region inputs: the patch shrunk to one ViT patch, embedded."""
        ps = self.trunk.patch_embed.patch_size
        small = F.interpolate(patch, size=tuple(ps), mode="bilinear", align_corners=False, antialias=True)
        tok = self.trunk.patch_embed.proj(small).flatten(1)  # conv -> (B, C, 1, 1) -> (B, C)
        tok = self.trunk.patch_embed.norm(tok)
        return self.pretext * 0 + self.region_proj(tok)

    def forward(self, pixels: torch.Tensor, region_of: Optional[torch.Tensor] = None) -> VisionOutput:
        """Encode normalised pixels (B, 3, H, W); ``region_of``: the patches these regions hold."""
        t = self.trunk
        x = t.patch_embed(pixels)
        if x.dim() == 4:  # dynamic_img_size: (B, H, W, C)
            h, w = x.shape[1], x.shape[2]
        else:
            h, w = t.patch_embed.grid_size
        x = t._pos_embed(x)
        x = t.patch_drop(x)
        x = t.norm_pre(x)
        b = x.shape[0]
        if region_of is None:
            token = self.pretext.to(x.dtype).expand(b, -1)
        else:
            token = self.region_pretext(region_of).to(x.dtype)
        n = self.num_prefix_tokens
        x = torch.cat([x[:, :n], token[:, None], x[:, n:]], dim=1)
        x = t.blocks(x)
        x = t.norm(x)
        pooled = t.forward_head(torch.cat([x[:, :n], x[:, n + 1:]], dim=1), pre_logits=True)
        grid = x[:, n + 1:].reshape(b, h, w, -1)
        return VisionOutput(pooled, x[:, n], grid)

    def region_cells(self, grid: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) grid tokens -> (B, 9, C) cell tokens, row-major (released: window 6, stride 4)."""
        c = self.config
        check_region_grid(grid.shape[1], c.csp_window, c.csp_stride, c.region_grid)
        if grid.shape[1] != grid.shape[2]:
            raise RegionGridError(f"region token grid {tuple(grid.shape[1:3])} is not square; use square regions")
        pooled = F.avg_pool2d(grid.permute(0, 3, 1, 2), kernel_size=c.csp_window, stride=c.csp_stride)
        return pooled.flatten(2).transpose(1, 2)


# ----------------------------------------------------------------------------- pixels
def to_pixels(images: Union[torch.Tensor, np.ndarray], config: VisionConfig) -> torch.Tensor:
    """uint8 RGB images (B, H, W, 3) -> normalised float (B, 3, S, S) at the config's size.

    The released inference: resize to 224 (bilinear), scale to [0, 1], ImageNet mean/std.
    """
    if isinstance(images, np.ndarray) and not images.flags.writeable:
        images = images.copy()  # PIL hands out read-only arrays; torch wants writable memory
    x = torch.as_tensor(images)
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4 or x.shape[-1] != 3:
        raise ModelConfigError(f"images must be (batch, height, width, 3) RGB, got shape {tuple(x.shape)}")
    if config.channel_order == "bgr":  # the released STAMP cut patches with OpenCV and fed them as BGR
        x = x.flip(-1)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    size = config.img_size
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(config.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(config.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class ImageTransform:
    """PIL image / uint8 array (H, W, 3) -> normalised tensor (3, S, S); grayscale/RGBA converted to RGB.

    The released inference resizes in float (:func:`to_pixels`), so its uint8 stage only converts
    (``to_uint8``: (3, H, W) at the input size) and ``normalize`` resizes, scales and normalises on the
    model's device (:mod:`stamp.models.pixels`); ``__call__`` is both, unchanged.
    """

    def __init__(self, config: VisionConfig) -> None:
        self.config = config

    def to_uint8(self, image: Any) -> torch.Tensor:
        from stamp.models.pixels import as_uint8_rgb, chw_tensor

        return chw_tensor(as_uint8_rgb(image))[0].contiguous()

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 on any device -> (B, 3, S, S) float (:func:`to_pixels`)."""
        return to_pixels(batch.permute(0, 2, 3, 1), self.config)

    def __call__(self, image: Any) -> torch.Tensor:
        return self.normalize(self.to_uint8(image)[None])[0]

    def __repr__(self) -> str:
        c = self.config
        return f"ImageTransform(resize={c.img_size}, mean={c.mean}, std={c.std})"


__all__ = [
    "VisionConfig", "VisionEncoder", "VisionOutput", "ImageTransform", "VisionWeightsError", "RegionGridError",
    "load_vision_config", "vision_preset_names", "skip_trunk_init", "to_pixels",
    "check_region_grid", "IMAGENET_MEAN", "IMAGENET_STD",
]
