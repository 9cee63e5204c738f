"""The four STAMP alignment objectives (paper eqs. 7-11) and the cross-rank gather they need.

* P-S: symmetric InfoNCE between patch and spot embeddings;
* R-S: the same between region and spot embeddings;
* P-R: InfoNCE from patch to region (one direction, as released);
* CSP (cross-scale positioning): the region's grid tokens pooled into its 3 x 3 cells and the
  region's pretext-token output (which describes the patch) go through one ``positioning``
  projection; cosine x logit scale over the 9 cells, cross-entropy against the stored cell.

Total = sum of the four. Contrastive logits compare each rank's embeddings with the
embeddings of *every* rank (:func:`gather_features`, as open_clip's ``gather_features``),
so a global batch of 512 on 4 GPUs sees 512 candidates per row, not 128.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F


class AlignLosses(NamedTuple):
    loss: torch.Tensor
    ps: torch.Tensor
    rs: torch.Tensor
    pr: torch.Tensor
    csp: torch.Tensor
    csp_correct: int
    csp_total: int


def gather_features(*features: torch.Tensor, with_grad: bool = False) -> tuple[torch.Tensor, ...]:
    """Concatenate each tensor over all DDP ranks (rank order); identity with one process.

    Gradients flow into this rank's own rows (the gathered copies of the others are
    replaced by the local tensor, as open_clip does with ``gather_with_grad=False``);
    ``with_grad=True`` uses the autograd-aware all_gather so gradients also reach the
    other ranks' rows.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features
    world, rank = dist.get_world_size(), dist.get_rank()
    out = []
    for x in features:
        if with_grad:
            import torch.distributed.nn.functional as dnf

            out.append(torch.cat(dnf.all_gather(x), dim=0))
            continue
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.detach().contiguous())
        parts[rank] = x
        out.append(torch.cat(parts, dim=0))
    return tuple(out)


def _labels(n_local: int, n_global: int, device: torch.device) -> torch.Tensor:
    """Row i of this rank matches global column offset + i."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() and n_global != n_local else 0
    return torch.arange(n_local, device=device) + rank * n_local


def info_nce(a: torch.Tensor, b_all: torch.Tensor, scale: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``scale * a @ b_all.T`` against ``labels`` (a: local rows, b_all: all ranks)."""
    return F.cross_entropy(scale * a @ b_all.t(), labels)


def symmetric_info_nce(a: torch.Tensor, b: torch.Tensor, a_all: torch.Tensor, b_all: torch.Tensor,
                       scale: torch.Tensor) -> torch.Tensor:
    """CLIP loss: mean of a->b and b->a InfoNCE, local rows against all ranks' candidates."""
    labels = _labels(a.shape[0], a_all.shape[0], a.device)
    return 0.5 * (info_nce(a, b_all, scale, labels) + info_nce(b, a_all, scale, labels))


def csp_logits(cells: torch.Tensor, pretext: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(B, 9) logits: cosine between the pretext output and each region cell, times the scale."""
    cells = F.normalize(cells, dim=-1)
    pretext = F.normalize(pretext, dim=-1)
    return scale * torch.einsum("bd,bkd->bk", pretext, cells)


def alignment_losses(
    spot: torch.Tensor,
    patch: torch.Tensor,
    region: torch.Tensor,
    cells: torch.Tensor,
    pretext: torch.Tensor,
    region_cell: torch.Tensor,
    scale: torch.Tensor,
    *,
    gather_with_grad: bool = True,
    weights: Optional[dict[str, float]] = None,
) -> AlignLosses:
    """All four losses from L2-normalised spot/patch/region embeddings (B, E), projected cells
    (B, 9, E), projected pretext outputs (B, E) and the cell labels (B,)."""
    spot_all, patch_all, region_all = gather_features(spot, patch, region, with_grad=gather_with_grad)
    ps = symmetric_info_nce(patch, spot, patch_all, spot_all, scale)
    rs = symmetric_info_nce(region, spot, region_all, spot_all, scale)
    pr = info_nce(patch, region_all, scale, _labels(patch.shape[0], region_all.shape[0], patch.device))
    logits = csp_logits(cells, pretext, scale)
    target = region_cell.to(logits.device, torch.long)
    csp = F.cross_entropy(logits, target)
    w = {"ps": 1.0, "rs": 1.0, "pr": 1.0, "csp": 1.0, **(weights or {})}
    total = w["ps"] * ps + w["rs"] * rs + w["pr"] * pr + w["csp"] * csp
    correct = int((logits.argmax(dim=1) == target).sum())
    return AlignLosses(total, ps, rs, pr, csp, correct, int(target.numel()))


__all__ = ["AlignLosses", "alignment_losses", "gather_features", "info_nce", "symmetric_info_nce", "csp_logits"]
