"""Pretraining objectives: IGR (intra-spot gene reconstruction) and CGR (contextual gene reconstruction).

IGR (BERT-style): each non-pad token is selected with probability ``mask_prob`` (15%);
a selected token becomes MASK (80%), a uniformly random *gene* token (10%) or stays (10%).
The encoder's ``mlm_head`` predicts the original token id at every selected position from
the same spot's last-layer state; loss = mean cross-entropy over selected positions.

CGR (spatial stage; batches are groups of ``k`` spots, seed first): for each group ``g`` and
rank position ``p`` the context is the mean of the neighbours' last-layer states at ``p``,
``c[g, p] = mean_{j=1..k-1, token[g, j, p] != PAD} h[g, j, p]`` (zero when every neighbour is
padded there). The encoder's separate ``cgr_head`` predicts the seed's *original* token at
each of its IGR-selected positions from ``c[g, p]`` alone; loss = mean cross-entropy.
This is the authors' position-aligned neighbour averaging (their released code), except
that the authors score every non-pad seed position while we score the seed's masked ones,
as the issue specifies (``cgr_targets="all"`` gives the authors' variant).
Total loss = IGR + CGR. Groups are read from the typed batch (``Batch.groups``: rows of the
batch, seed first), never inferred from row order. :class:`StampForPretraining` holds the
encoder and both heads as one module, the unit the DDP wrapper runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from torch import nn

from stamp.constants import GROUP_SIZE, MASK_ID, N_RESERVED, PAD_ID
from stamp.models.gene_encoder import StampGeneEncoder

IGNORE = -100


@dataclass
class Masked:
    """A masked batch: ``input_ids`` go to the encoder, ``labels`` hold originals or -100."""

    input_ids: torch.Tensor
    labels: torch.Tensor


def mask_tokens(
    input_ids: torch.Tensor,
    *,
    vocab_size: int,
    n_reserved: int = N_RESERVED,
    mask_prob: float = 0.15,
    mask_id: int = MASK_ID,
    pad_id: int = PAD_ID,
    generator: torch.Generator | None = None,
) -> Masked:
    """Select ``mask_prob`` of the non-pad tokens; 80% MASK / 10% random gene / 10% unchanged.

    Draws come from ``generator`` (CPU) so a run is reproducible and resumable; special
    tokens (ids below ``n_reserved``) are never selected. The ids are the model config's
    (:meth:`StampForPretraining.mask` passes them); the defaults are :mod:`stamp.constants`.
    """
    ids = torch.as_tensor(input_ids, dtype=torch.long).cpu()
    selectable = (ids >= n_reserved) & (ids != pad_id)
    u = torch.rand(ids.shape, generator=generator)
    action = torch.rand(ids.shape, generator=generator)
    random_genes = torch.randint(n_reserved, vocab_size, ids.shape, generator=generator)
    selected = selectable & (u < mask_prob)
    out = ids.clone()
    out[selected & (action < 0.8)] = mask_id
    swap = selected & (action >= 0.8) & (action < 0.9)
    out[swap] = random_genes[swap]
    labels = torch.where(selected, ids, torch.full_like(ids, IGNORE))
    return Masked(out, labels)


@dataclass
class LossOutput:
    loss: torch.Tensor
    igr_loss: torch.Tensor
    cgr_loss: torch.Tensor | None
    igr_correct: int
    igr_total: int


def igr_loss(model: StampGeneEncoder, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Cross-entropy of ``mlm_head`` at selected positions, plus (correct, total) for accuracy."""
    labels = labels.to(hidden.device)
    sel = labels != IGNORE
    if not bool(sel.any()):
        return hidden.sum() * 0.0, 0, 0
    logits = model.mlm_head(hidden[sel]).float()
    target = labels[sel]
    correct = int((logits.argmax(-1) == target).sum())
    return F.cross_entropy(logits, target), correct, int(target.numel())


def contiguous_groups(n_rows: int, group_size: int = GROUP_SIZE) -> torch.Tensor:
    """(G, group_size) row indices when groups are consecutive rows, seed first (tests, callers without groups)."""
    if n_rows % group_size:
        raise ValueError(f"spatial batch of {n_rows} spots is not whole groups of {group_size}")
    return torch.arange(n_rows, dtype=torch.long).view(-1, group_size)


def group_context(hidden: torch.Tensor, valid: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Position-wise mean of each group's neighbours' states: (B, L, D), groups (G, k) -> (G, L, D)."""
    groups = groups.to(hidden.device)
    h = hidden[groups[:, 1:]]  # (G, k-1, L, D)
    w = valid[groups[:, 1:]].unsqueeze(-1).to(h.dtype)
    return (h * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0)


def neighbour_context(hidden: torch.Tensor, valid: torch.Tensor, group_size: int) -> torch.Tensor:
    """:func:`group_context` for consecutive groups: (G*k, L, D) -> (G, L, D)."""
    return group_context(hidden, valid, contiguous_groups(hidden.shape[0], group_size))


def cgr_loss(
    model: StampGeneEncoder,
    hidden: torch.Tensor,
    original_ids: torch.Tensor,
    labels: torch.Tensor,
    group_size: int = GROUP_SIZE,
    targets: str = "masked",
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """CGR cross-entropy of ``cgr_head`` on the neighbour context (see module docstring).

    ``groups`` (G, k) are rows of the batch, seed first (``Batch.groups``); without them the
    rows must be consecutive groups of ``group_size``.
    """
    if groups is None:
        groups = contiguous_groups(hidden.shape[0], group_size)
    groups = groups.to(hidden.device)
    original_ids = original_ids.to(hidden.device)
    labels = labels.to(hidden.device)
    valid = original_ids != model.config.pad_token_id
    context = group_context(hidden, valid, groups)
    seeds = groups[:, 0]
    seed_labels = labels[seeds]
    if targets == "all":
        seed_labels = torch.where(valid[seeds], original_ids[seeds], IGNORE)
    sel = seed_labels != IGNORE
    if not bool(sel.any()):
        return hidden.sum() * 0.0
    logits = model.cgr_head(context[sel]).float()
    return F.cross_entropy(logits, seed_labels[sel])


class StampForPretraining(nn.Module):
    """The encoder and both pretraining heads as one module: DDP wraps this, so one forward
    runs the encoder, IGR and (spatial stage) CGR, and every used parameter's gradient is
    reduced by DDP.

    ``forward(input_ids, masked_ids, labels, groups=None) -> LossOutput``: ``input_ids`` are
    the original (unmasked) rows, ``masked_ids``/``labels`` come from :meth:`mask`, ``groups``
    from the typed batch (``Batch.groups``; required when ``spatial``).
    """

    def __init__(self, encoder: StampGeneEncoder, *, spatial: bool = False, cgr_targets: str = "masked",
                 mask_prob: float = 0.15) -> None:
        super().__init__()
        if cgr_targets not in ("masked", "all"):
            raise ValueError(f"cgr_targets must be 'masked' or 'all', got {cgr_targets!r}")
        self.encoder = encoder
        self.spatial = spatial
        self.cgr_targets = cgr_targets
        self.mask_prob = mask_prob

    def mask(self, input_ids: torch.Tensor, generator: torch.Generator | None = None) -> Masked:
        """IGR masking with the special ids of the encoder's config."""
        c = self.encoder.config
        return mask_tokens(input_ids, vocab_size=c.vocab_size, n_reserved=c.n_reserved, mask_prob=self.mask_prob,
                           mask_id=c.mask_token_id, pad_id=c.pad_token_id, generator=generator)

    def forward(self, input_ids: torch.Tensor, masked_ids: torch.Tensor, labels: torch.Tensor,
                groups: torch.Tensor | None = None) -> LossOutput:
        model = self.encoder
        if masked_ids.shape[1] > model.config.context_length:
            raise ValueError(f"token rows of {masked_ids.shape[1]} exceed the context of {model.config.context_length}; "
                             "cut them once, where they are made (stamp.data.tokens / to_model_input_ids)")
        hidden = model(masked_ids)
        igr, correct, total = igr_loss(model, hidden, labels)
        cgr = None
        loss = igr
        if self.spatial:
            if groups is None:
                raise ValueError("the spatial stage needs Batch.groups (a loader in mode='spatial')")
            cgr = cgr_loss(model, hidden, input_ids, labels, targets=self.cgr_targets, groups=groups)
            loss = igr + cgr
        return LossOutput(loss, igr, cgr, correct, total)

