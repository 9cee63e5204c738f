"""The one home of stamp's shared constants: the token-id layout the spatial-group geometry and the run-folder file names.

Token ids: 0 MASK, 1 PAD, 2 CLS, 3..29 reserved, gene ``i`` of the vocabulary -> ``i + 30``
(the layout of the released STAMP / Nicheformer encoders, so embedding tables are
interchangeable). These are the *defaults* of :class:`stamp.models.gene_encoder.StampConfig`; code that
has a model reads the ids from ``model.config`` (``mask_token_id``, ``pad_token_id``,
``cls_token_id``, ``n_reserved``), the tokenizer writes them into ``tokenizer_config.json``.

Spatial groups (the paper's Algorithm 2): a seed and its 8 nearest spots, 24 groups per
batch, groups spanning more than ``D_MAX_UM`` dropped (see :mod:`stamp.data.batching`).
"""
from __future__ import annotations

MASK_ID = 0
PAD_ID = 1
CLS_ID = 2
N_RESERVED = 30  # gene token id = vocabulary index + N_RESERVED

GROUP_SIZE = 9
GROUPS_PER_BATCH = 24
D_MAX_UM = 400.0
# A run folder (``stamp pretrain --out RUN``): options fixed at the start, one metrics line per
# step, and the run summary written with RUN/model (read back by publish and the next stage's --init).
ARGS_FILE = "train_args.json"
METRICS_FILE = "metrics.jsonl"
RUN_INFO = "run.json"
from spavis.format.schema import SPOT_SPACING_UM as VISIUM_SPACING_UM  # noqa: E402  (one definition)

__all__ = ["MASK_ID", "PAD_ID", "CLS_ID", "N_RESERVED", "GROUP_SIZE", "GROUPS_PER_BATCH", "D_MAX_UM",
           "VISIUM_SPACING_UM", "ARGS_FILE", "METRICS_FILE", "RUN_INFO", "IMAGENET_MEAN", "IMAGENET_STD"]

# image resize filters a preprocessing entry may name (stamp.models.pixels resizes with torch's kernels, which
# have no lanczos)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")

# ImageNet channel statistics: the default normalisation of image encoders (catalogue entries, the vision tower)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
