"""An independent reference of the released STAMP inference, written from issue 8's description.

The authors' repository has no license, so nothing is copied from it: this module rebuilds
the *module tree* of their checkpoint (``spot_backbone`` / ``visual_backbone`` / projections /
``logit_scale``) from plain ``nn.TransformerEncoder`` + timm, so that ``state_dict()`` has the
released key names and shapes, and their forward pass as described:

* gene: ids with 0 read as PAD (1); token + learned position embeddings; the encoder layers
  called one by one with the PAD key-padding mask; the last layer's output averaged over
  positions 3..end *including padding*; ``spot_projection``; L2 normalisation.
* image: timm ViT with the pretext vector inserted right after CLS; ``norm``; the CLS output;
  ``patch_projection``; L2 normalisation. Region inputs (training) use the patch resized to
  16 x 16 through the patch embedding + ``ref_pos_embed`` as the pretext token.

Used by tests/test_zoo.py (small random weights) and benchmarks/convert_real_size.py (real sizes).
"""
from __future__ import annotations

import math

import timm
import torch
import torch.nn.functional as F
from torch import nn

PAD = 1


class ReferenceGeneBackbone(nn.Module):
    """The released gene encoder's module tree: ``embeddings`` (n_tokens + 5 rows), positions,
    ``encoder.layers.N`` (``nn.TransformerEncoderLayer``), the ``encoder_layer`` template and heads."""

    def __init__(self, n_tokens: int, dim: int, heads: int, ffn: int, layers: int, context: int,
                 spatial_head: bool = False) -> None:
        super().__init__()
        self.encoder_layer = nn.TransformerEncoderLayer(dim, heads, ffn, dropout=0.0, batch_first=True,
                                                        layer_norm_eps=1e-12)
        self.encoder = nn.TransformerEncoder(self.encoder_layer, layers, enable_nested_tensor=False)
        self.classifier_head = nn.Linear(dim, n_tokens)
        if spatial_head:
            self.spatial_classifier_head = nn.Linear(dim, n_tokens)
        self.embeddings = nn.Embedding(n_tokens + 5, dim, padding_idx=PAD)
        self.positional_embedding = nn.Embedding(context, dim)
        self.context = context

    def features(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids[:, : self.context].long()
        ids = torch.where(ids == 0, torch.full_like(ids, PAD), ids)
        pad = ids == PAD
        x = self.embeddings(ids) + self.positional_embedding(torch.arange(ids.shape[1]))
        for layer in self.encoder.layers:
            x = layer(x, src_key_padding_mask=pad)
        return x[:, 3:, :].mean(dim=1)


class ReferencePromptViT(nn.Module):
    """timm ViT under ``base_model`` + ``p_visual`` (1, 1, D) + ``ref_pos_embed`` (Linear D -> D)."""

    def __init__(self, **timm_kwargs) -> None:
        super().__init__()
        self.base_model = timm.create_model(**timm_kwargs)
        d = self.base_model.embed_dim
        self.p_visual = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.ref_pos_embed = nn.Linear(d, d)

    def forward(self, pixels: torch.Tensor, ref: torch.Tensor | None = None):
        vit = self.base_model
        x = vit._pos_embed(vit.patch_embed(pixels))
        pretext = self.p_visual.expand(x.shape[0], -1, -1)
        if ref is not None:
            r = vit.patch_embed.proj(ref).flatten(2).transpose(1, 2)
            pretext = pretext * 0 + self.ref_pos_embed(vit.patch_embed.norm(r))
        x = torch.cat([x[:, :1], pretext, x[:, 1:]], dim=1)
        x = vit.norm(vit.blocks(vit.norm_pre(x)))
        tokens = x[:, 1:]
        return x[:, 0], tokens[:, 0], tokens[:, 1:]


class ReferenceStamp(nn.Module):
    """Top level of the released checkpoint (514 tensors at the released sizes)."""

    def __init__(self, *, n_tokens: int, dim: int, heads: int, ffn: int, layers: int, context: int,
                 vit: dict, out_dim: int = 512) -> None:
        super().__init__()
        self.spot_backbone = ReferenceGeneBackbone(n_tokens, dim, heads, ffn, layers, context)
        self.visual_backbone = ReferencePromptViT(**vit)
        width = self.visual_backbone.base_model.embed_dim
        self.spot_projection = nn.Linear(dim, out_dim)
        self.patch_projection = nn.Linear(width, out_dim)
        self.region_projection = nn.Linear(width, out_dim)
        self.positioning_projection = nn.Linear(width, out_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    @torch.no_grad()
    def encode_gene(self, ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.spot_projection(self.spot_backbone.features(ids)), dim=-1)

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.patch_projection(self.visual_backbone(pixels)[0]), dim=-1)


def uni_vit_kwargs(**overrides) -> dict:
    """UNI's timm arguments (ViT-L/16); ``overrides`` shrink it for tests."""
    kw = dict(model_name="vit_large_patch16_224", img_size=224, patch_size=16, init_values=1e-5,
              num_classes=0, dynamic_img_size=True, pretrained=False)
    kw.update(overrides)
    return kw


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial weights everywhere (LayerNorms, LayerScale and biases included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("logit_scale"):
                continue
            scale = 0.5 / math.sqrt(p.shape[-1]) if p.dim() > 1 else 0.1
            base = 1.0 if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")) else 0.0
            p.copy_(base + scale * torch.randn(p.shape, generator=gen))
    return model


def reference_tokenize(counts, released_means, max_len: int = 4096):
    """The released tokenizer as described: counts scaled to 10,000 per spot, divided by the means
    (NaN -> 0, rounded half-up, 0 -> 1), genes ranked by descending value (ties: lower index first),
    top ``max_len`` ids + 30, padded with 0. Dense per-spot loop: slow, obviously right."""
    import numpy as np

    m = np.nan_to_num(np.asarray(released_means, dtype=np.float64))
    m = np.where(m % 1 >= 0.5, np.ceil(m), np.floor(m))
    m[m == 0] = 1
    dense = np.asarray(counts.todense() if hasattr(counts, "todense") else counts, dtype=np.float32)
    out = np.zeros((dense.shape[0], max_len), dtype=np.int32)
    for i, row in enumerate(dense):
        total = row.astype(np.float64).sum()
        v = row * np.float32(10000.0 / (total if total else 1.0))
        v = v / m
        nz = np.flatnonzero(row)
        order = nz[np.argsort(-v[nz], kind="stable")][:max_len]
        out[i, : order.size] = order + 30
    return out
