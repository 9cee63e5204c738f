"""Gated-attention multiple-instance learning (ABMIL) over a whole slide's tile features.

The model of ``stamp evaluate mil`` (protocol: :mod:`stamp.evaluate.mil`): tiles are embedded
(Linear-ReLU-Dropout), weighted by gated attention (Ilse et al. 2018, eq. 9) and pooled into one
slide vector that a linear head scores. The attention weights are returned for heatmaps.
"""
from __future__ import annotations

import torch
from torch import nn


class GatedABMIL(nn.Module):
    """``forward(x (N, D)) -> (logits (n_out,), attention (N,))``; attention sums to 1 over the tiles."""

    def __init__(self, in_dim: int, n_out: int, hidden: int = 256, attention_dim: int = 128,
                 dropout: float = 0.25) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attn_v = nn.Sequential(nn.Linear(hidden, attention_dim), nn.Tanh())
        self.attn_u = nn.Sequential(nn.Linear(hidden, attention_dim), nn.Sigmoid())
        self.attn_w = nn.Linear(attention_dim, 1)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, n_out))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(x)
        a = torch.softmax(self.attn_w(self.attn_v(h) * self.attn_u(h)).squeeze(-1), dim=0)
        return self.head(a @ h), a


def nll_survival_loss(logits: torch.Tensor, y_bin: int, event: bool) -> torch.Tensor:
    """Discrete-time survival NLL (Zadeh & Schmid 2020): hazards h = sigmoid(logits), S = cumprod(1 - h);
    an event in bin k costs -log S(k-1) - log h(k); censoring in bin k costs -log S(k)."""
    h = torch.sigmoid(logits).clamp(1e-7, 1 - 1e-7)
    s = torch.cumprod(1 - h, dim=-1)
    s_prev = torch.cat([torch.ones_like(s[..., :1]), s], dim=-1)
    k = y_bin
    if event:
        return -(torch.log(s_prev[..., k].clamp_min(1e-7)) + torch.log(h[..., k]))
    return -torch.log(s_prev[..., k + 1].clamp_min(1e-7))


__all__ = ["GatedABMIL", "nll_survival_loss"]
