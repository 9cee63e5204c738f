"""CONCH's image tower (a CoCa ViT-B/16 at 448 px with two attentional poolers), written from its
published configuration so that no third-party package is needed to load the released weights.

The tower, as the authors' configuration (``conch_ViT-B-16.json``) and paper describe it:

* ``trunk``: a timm ``VisionTransformer`` (width 768, 12 blocks, 12 heads, MLP ratio 4, patch 16,
  448 px, class token, final LayerNorm), read through ``forward_features`` (every token after the
  final norm);
* ``attn_pool_contrast``: one learned query (width ``embed_dim`` = 512) attending over the tokens
  (keys / values of width 768), LayerNorm on the query and on the tokens first; then ``ln_contrast``
  and the square ``proj_contrast`` matrix;
* ``attn_pool_caption`` + ``ln_caption``: 256 queries of width 768 for the captioning decoder
  (loaded for completeness; no output of this module uses them).

Outputs (``output``): ``"contrast"`` = ``ln_contrast`` of the pooled query, 512-d, not projected and
not normalised -- what TRIDENT and HEST take (``encode_image(proj_contrast=False, normalize=False)``);
``"projected"`` = that times ``proj_contrast`` (the contrastive embedding before L2 normalisation).

The module's state-dict names are those of the released file's ``visual.`` subtree, so the weights
load strictly without renaming. It knows no names: the zoo builds it from a catalogue entry.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

import torch
from torch import nn

from stamp.errors import ModelConfigError

OUTPUTS = ("contrast", "projected")
MAX_QUERIES = 4096


@dataclass(frozen=True)
class ConchVisionConfig:
    """The image tower's sizes (CONCH's ``vision_cfg`` plus the two widths of its model config)."""

    image_size: int = 448
    patch_size: int = 16
    layers: int = 12
    width: int = 768
    num_heads: int = 12
    mlp_ratio: float = 4.0
    embed_dim: int = 512  # width of the contrastive query (the model's ``embed_dim``)
    embed_dim_caption: int = 768  # width of the captioning queries
    attn_pooler_heads: int = 8
    n_queries_contrast: int = 1
    n_queries_caption: int = 256
    caption_pooler: bool = True

    @classmethod
    def from_model_config(cls, config: Mapping[str, Any], where: str) -> "ConchVisionConfig":
        """From the authors' model configuration (``{"embed_dim", "embed_dim_caption", "vision_cfg": {...}}``);
        every key checked, sizes bounded (:mod:`stamp.safety`); one line naming ``where`` otherwise."""
        from stamp.safety import check_config_sizes

        if not isinstance(config, Mapping) or not isinstance(config.get("vision_cfg"), Mapping):
            raise ModelConfigError(f"{where}: a CONCH configuration needs a 'vision_cfg' object")
        vision = dict(config["vision_cfg"])
        known = {"image_size", "patch_size", "layers", "width", "num_heads", "mlp_ratio", "attn_pooler_heads",
                 "n_queries_contrast", "n_queries_caption", "attentional_pool_contrast",
                 "attentional_pool_caption", "output_tokens"}
        unknown = sorted(set(vision) - known)
        if unknown:
            raise ModelConfigError(f"{where}: vision_cfg keys {unknown} are not part of CONCH's image tower; "
                                   f"known: {sorted(known)}")
        if not vision.pop("attentional_pool_contrast", False):
            raise ModelConfigError(f"{where}: only the attentional-pooler tower (attentional_pool_contrast: true, "
                                   "as released) is supported")
        caption = bool(vision.pop("attentional_pool_caption", False))
        vision.pop("output_tokens", None)
        values = dict(vision, caption_pooler=caption, embed_dim=config.get("embed_dim", 512),
                      embed_dim_caption=config.get("embed_dim_caption", 768))
        for key, value in values.items():
            if key in ("caption_pooler",):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ModelConfigError(f"{where}: {key} = {value!r} must be a positive number")
        if any(values.get(k, 1) > MAX_QUERIES for k in ("n_queries_contrast", "n_queries_caption", "attn_pooler_heads")):
            raise ModelConfigError(f"{where}: pooler queries / heads above {MAX_QUERIES}; the config is corrupt")
        check_config_sizes(values, where)
        cfg = cls(**values)
        cfg.check(where)
        return cfg

    def check(self, where: str) -> None:
        if self.image_size % self.patch_size:
            raise ModelConfigError(f"{where}: image_size {self.image_size} is not a multiple of patch_size "
                                   f"{self.patch_size}")
        for dim, heads, what in ((self.width, self.num_heads, "width / num_heads"),
                                 (self.embed_dim, self.attn_pooler_heads, "embed_dim / attn_pooler_heads"),
                                 (self.embed_dim_caption, self.attn_pooler_heads,
                                  "embed_dim_caption / attn_pooler_heads")):
            if dim % heads:
                raise ModelConfigError(f"{where}: {what} = {dim} / {heads} is not a whole head width")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ConchVisionConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class AttentionalPooler(nn.Module):
    """Learned queries attending over a token sequence (keys and values LayerNorm-ed, queries too)."""

    def __init__(self, dim: int, context_dim: int, heads: int, queries: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.zeros(queries, dim))
        self.attn = nn.MultiheadAttention(dim, heads, kdim=context_dim, vdim=context_dim, batch_first=True)
        self.ln_q = nn.LayerNorm(dim)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, context_dim) -> (B, queries, dim)."""
        keys = self.ln_k(tokens)
        query = self.ln_q(self.query).to(keys.dtype).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        return self.attn(query, keys, keys, need_weights=False)[0]


class ConchImageEncoder(nn.Module):
    """CONCH's image tower (see the module docstring); ``forward(pixels) -> (B, embed_dim)``."""

    def __init__(self, config: ConchVisionConfig, output: str = "contrast") -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        if output not in OUTPUTS:
            raise ModelConfigError(f"CONCH output {output!r} must be one of {', '.join(OUTPUTS)}")
        self.config = config
        self.output = output
        c = config
        meta = torch.empty(0).device.type == "meta"
        self.trunk = VisionTransformer(img_size=c.image_size, patch_size=c.patch_size, embed_dim=c.width,
                                       depth=c.layers, num_heads=c.num_heads, mlp_ratio=c.mlp_ratio, num_classes=0,
                                       dynamic_img_size=True, weight_init="skip" if meta else "")
        self.attn_pool_contrast = AttentionalPooler(c.embed_dim, c.width, c.attn_pooler_heads, c.n_queries_contrast)
        self.ln_contrast = nn.LayerNorm(c.embed_dim)
        self.proj_contrast = nn.Parameter(torch.zeros(c.embed_dim, c.embed_dim))
        if c.caption_pooler:
            self.attn_pool_caption = AttentionalPooler(c.embed_dim_caption, c.width, c.attn_pooler_heads,
                                                       c.n_queries_caption)
            self.ln_caption = nn.LayerNorm(c.embed_dim_caption)

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        tokens = self.trunk.forward_features(pixels)
        pooled = self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])
        return pooled @ self.proj_contrast if self.output == "projected" else pooled


__all__ = ["ConchVisionConfig", "ConchImageEncoder", "AttentionalPooler", "OUTPUTS"]
