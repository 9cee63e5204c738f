"""An independent reference of CONCH's image features, written from the authors' published code
(mahmoodlab/CONCH: conch/open_clip_custom/{coca_model,vision_tower,transformer}.py, read, not imported,
nothing copied) for the zoo's equivalence test.

The reference holds the released file's module tree -- a CoCa with ``visual`` (timm ViT ``trunk``,
``attn_pool_contrast``, ``ln_contrast``, ``proj_contrast``, ``attn_pool_caption``, ``ln_caption``),
``text``, ``text_decoder`` and ``logit_scale`` -- so its ``state_dict()`` has the released names. Its
attentional pooling is computed with explicit matrix products in the authors' sequence-first layout
(tokens permuted to (L, N, D), the learned queries repeated per image), not with
``nn.MultiheadAttention``: the product (stamp.models.conch) and this reference share no attention code.

``encode_image(x, proj_contrast=False, normalize=False)`` follows the authors' ``forward_no_head``: the
trunk's ``forward_features`` (every token after the final norm), the contrastive pooler's single query,
then ``ln_contrast``; with ``proj_contrast=True`` their ``forward``: that times ``proj_contrast``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RefPooler(nn.Module):
    """Parameters named as the authors' AttentionalPooler (query, attn.*, ln_q, ln_k); eps 1e-5."""

    def __init__(self, d_model: int, context_dim: int, n_head: int, n_queries: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        # an nn.MultiheadAttention only to own the released parameter names; never called
        self.attn = nn.MultiheadAttention(d_model, n_head, kdim=context_dim, vdim=context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, context) -> (N, n_queries, d_model), by hand."""
        x = self.ln_k(x).permute(1, 0, 2)  # (L, N, C), as the authors
        q = self.ln_q(self.query)  # (Q, D)
        a = self.attn
        d = q.shape[-1]
        if a._qkv_same_embed_dim:
            wq, wk, wv = a.in_proj_weight.split(d, dim=0)
        else:
            wq, wk, wv = a.q_proj_weight, a.k_proj_weight, a.v_proj_weight
        bq, bk, bv = a.in_proj_bias.split(d)
        queries = q @ wq.t() + bq  # (Q, D)
        keys = torch.einsum("lnc,dc->lnd", x, wk) + bk  # (L, N, D)
        values = torch.einsum("lnc,dc->lnd", x, wv) + bv
        h, hd = self.n_head, d // self.n_head
        qh = queries.view(queries.shape[0], h, hd)  # (Q, h, hd)
        kh = keys.view(keys.shape[0], keys.shape[1], h, hd)  # (L, N, h, hd)
        vh = values.view(values.shape[0], values.shape[1], h, hd)
        scores = torch.einsum("qhe,lnhe->nhql", qh, kh) / math.sqrt(hd)
        weights = scores.softmax(dim=-1)
        mixed = torch.einsum("nhql,lnhe->nqhe", weights, vh).reshape(x.shape[1], queries.shape[0], d)
        return mixed @ a.out_proj.weight.t() + a.out_proj.bias


class RefVisual(nn.Module):
    def __init__(self, *, image_size: int, patch: int, width: int, depth: int, heads: int, embed_dim: int,
                 embed_dim_caption: int, pooler_heads: int, caption_queries: int) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        self.trunk = VisionTransformer(embed_dim=width, depth=depth, num_heads=heads, mlp_ratio=4,
                                       img_size=image_size, patch_size=patch, num_classes=0, dynamic_img_size=True)
        scale = width ** -0.5
        self.attn_pool_contrast = RefPooler(embed_dim, width, pooler_heads, 1)
        self.ln_contrast = nn.LayerNorm(embed_dim)
        self.proj_contrast = nn.Parameter(scale * torch.randn(embed_dim, embed_dim))
        self.head = nn.Sequential()
        self.attn_pool_caption = RefPooler(embed_dim_caption, width, pooler_heads, caption_queries)
        self.ln_caption = nn.LayerNorm(embed_dim_caption)

    def features(self, x: torch.Tensor, proj: bool) -> torch.Tensor:
        tokens = self.trunk.forward_features(x)
        pooled = self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])
        return pooled @ self.proj_contrast if proj else pooled


class RefCoCa(nn.Module):
    """The released module tree at test sizes (text towers: stand-ins with parameters under their prefixes)."""

    def __init__(self, *, image_size: int = 64, patch: int = 16, width: int = 32, depth: int = 2, heads: int = 2,
                 embed_dim: int = 16, embed_dim_caption: int = 32, pooler_heads: int = 2,
                 caption_queries: int = 4) -> None:
        super().__init__()
        self.visual = RefVisual(image_size=image_size, patch=patch, width=width, depth=depth, heads=heads,
                                embed_dim=embed_dim, embed_dim_caption=embed_dim_caption, pooler_heads=pooler_heads,
                                caption_queries=caption_queries)
        self.text = nn.ModuleDict({"token_embedding": nn.Embedding(50, embed_dim_caption),
                                   "ln_final": nn.LayerNorm(embed_dim_caption)})
        self.text.register_parameter("cls_emb", nn.Parameter(torch.randn(embed_dim_caption)))
        self.text_decoder = nn.ModuleDict({"ln_final": nn.LayerNorm(embed_dim_caption)})
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))

    def encode_image(self, x: torch.Tensor, proj_contrast: bool = True, normalize: bool = True) -> torch.Tensor:
        z = self.visual.features(x, proj_contrast)
        return F.normalize(z, dim=-1) if normalize else z


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter drawn afresh (LayerNorms away from 1 / 0 too), so no tensor can be left unread."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.dim() == 1 and p.shape[0] > 1 else 0.0))
    return model


def conch_config(ref: RefCoCa) -> dict:
    """The authors' configuration format (conch_ViT-B-16.json) for a reference's sizes."""
    v = ref.visual
    return {"embed_dim": v.ln_contrast.normalized_shape[0], "embed_dim_caption": v.ln_caption.normalized_shape[0],
            "vision_cfg": {"image_size": v.trunk.patch_embed.img_size[0], "patch_size": v.trunk.patch_embed.patch_size[0],
                           "layers": len(v.trunk.blocks), "width": v.trunk.embed_dim,
                           "num_heads": v.trunk.blocks[0].attn.num_heads, "attentional_pool_caption": True,
                           "attentional_pool_contrast": True, "attn_pooler_heads": v.attn_pool_contrast.n_head,
                           "n_queries_contrast": 1, "n_queries_caption": v.attn_pool_caption.query.shape[0],
                           "output_tokens": True}}
