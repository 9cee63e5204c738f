"""``StampModel``: the gene encoder and the vision encoder aligned in one embedding space.

Both encoders, four projections to ``embed_dim`` (512: ``spot``, ``patch``, ``region``,
``positioning``) and one learnable logit scale (initialised at log(1/0.07), clamped at
log(100) as open_clip does). ``save_pretrained``/``from_pretrained`` come from
``PyTorchModelHubMixin``: ``config.json`` (:class:`StampModelConfig`: gene config, vision
config, embed_dim) + ``model.safetensors``. Building from a config never downloads trunk
weights: the saved tensors are the weights.

Deliberately no ``from __future__ import annotations``: the mixin reads the ``config``
annotation at class creation to (de)serialise the config.
"""
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from stamp.models.alignment import AlignLosses, alignment_losses
from stamp.errors import ModelConfigError
from stamp.models.gene_encoder import StampConfig, StampGeneEncoder
from stamp.cards import stamp_model_card, write_stamp_model_card  # noqa: F401  (re-exported)
from stamp.models.vision import ImageTransform, VisionConfig, VisionEncoder, load_vision_config, to_pixels

LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100.0)
PROJECTIONS = ("spot_projection", "patch_projection", "region_projection", "positioning_projection")


@dataclass
class StampModelConfig:
    """Everything that defines a :class:`StampModel` (the repo's ``config.json``).

    The gene pooling that feeds ``spot_projection`` is ``gene.pooling`` (``stamp-v1``
    reproduces the released one: positions 3..end of the last layer, padding included).
    """

    gene: StampConfig = field(default_factory=StampConfig)
    vision: Optional[VisionConfig] = None  # required; model classes know no names (UNI: zoo.factory.vision_config)
    embed_dim: int = 512
    projection_bias: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.gene, dict):
            self.gene = StampConfig.from_dict(self.gene)
        if self.vision is None:
            raise ModelConfigError("a StampModel config needs its vision tower: a VisionConfig, its fields, a preset "
                                   "('tiny') or a JSON file; UNI and the zoo's other ViTs: "
                                   "stamp.zoo.factory.vision_config('uni')")
        if isinstance(self.vision, (dict, str)):
            self.vision = load_vision_config(self.vision)
        if self.embed_dim < 1:
            raise ModelConfigError(f"embed_dim must be positive, got {self.embed_dim}")

    def to_dict(self) -> dict:
        return asdict(self)


class StampModel(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="stamp",
    tags=["spatial-transcriptomics", "visium", "stamp", "pathology", "image-gene-alignment"],
    repo_url="https://arxiv.org/abs/2602.13944",
    license="bsd-3-clause",
):
    """STAMP: gene encoder + pathology vision encoder + projections + logit scale.

    ``encode_gene(input_ids)`` and ``encode_image(pixels)`` return L2-normalised (B, embed_dim)
    embeddings; ``image_transform`` turns a PIL image / uint8 array into model pixels.
    """

    def __init__(self, config: StampModelConfig = None) -> None:  # type: ignore[assignment]
        super().__init__()
        if config is None:
            config = StampModelConfig()
        if isinstance(config, dict):
            config = StampModelConfig(**config)
        self.config = config
        c = config
        self.gene_encoder = StampGeneEncoder(c.gene)
        self.vision_encoder = VisionEncoder(c.vision)
        g, v, e, bias = c.gene.hidden_size, self.vision_encoder.dim, c.embed_dim, c.projection_bias
        self.spot_projection = nn.Linear(g, e, bias=bias)
        self.patch_projection = nn.Linear(v, e, bias=bias)
        self.region_projection = nn.Linear(v, e, bias=bias)
        self.positioning_projection = nn.Linear(v, e, bias=bias)
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, Path], *args, **kwargs) -> "StampModel":
        """A local model folder (``RUN`` or ``RUN/model``) or a Hub repo id (this class knows no names:
        ``stamp.create_model("stamp-v1")`` for a catalogue name)."""
        from stamp.models.gene_encoder import check_pretrained_folder, checked_weights, pretrained_folder

        pretrained_model_name_or_path = pretrained_folder(pretrained_model_name_or_path, **kwargs)
        check_pretrained_folder(pretrained_model_name_or_path, lambda cfg: cls(StampModelConfig(**cfg)))
        kwargs.setdefault("strict", True)  # a missing or unexpected tensor is an error, never a silent default
        try:
            return checked_weights(super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs),
                                   pretrained_model_name_or_path)
        except RuntimeError as exc:
            if "state_dict" not in str(exc):
                raise
            detail = " ".join(str(exc).split())[:300]
            raise ModelConfigError(
                f"{pretrained_model_name_or_path}: model.safetensors does not fit its config.json ({detail}); "
                "re-save the model or re-download it"
            ) from None

    def _save_pretrained(self, save_directory: Path) -> None:
        from stamp.models.gene_encoder import save_weights

        save_weights(self, save_directory)

    @classmethod
    def _from_pretrained(cls, *args, **kwargs) -> "StampModel":
        from stamp.models.vision import skip_trunk_init

        from stamp.models.gene_encoder import quiet_stdout

        with skip_trunk_init(), quiet_stdout():  # every tensor is read from the checkpoint next
            return super()._from_pretrained(*args, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    @property
    def image_transform(self) -> ImageTransform:
        """PIL image or uint8 (H, W, 3) -> (3, S, S): resize, [0, 1], ImageNet mean/std (as released)."""
        return ImageTransform(self.config.vision)

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> normalised model pixels on the model's device."""
        return to_pixels(torch.as_tensor(images).to(self.device), self.config.vision)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=LOGIT_SCALE_MAX).exp()

    def clamp_logit_scale(self) -> None:
        """In-place clamp to [0, log(100)] after each optimizer step, as open_clip."""
        with torch.no_grad():
            self.logit_scale.clamp_(0, LOGIT_SCALE_MAX)

    # ------------------------------------------------------------------ encoders
    def gene_features(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Pooled last layer of the gene encoder (B, hidden) -- before ``spot_projection``."""
        hidden = self.gene_encoder(input_ids)
        return self.gene_encoder.pool(hidden, input_ids)

    def encode_gene(self, input_ids: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Spot embeddings (B, embed_dim) from model token ids (B, L)."""
        z = self.spot_projection(self.gene_features(input_ids).to(self.spot_projection.weight.dtype))
        return F.normalize(z, dim=-1) if normalize else z

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Patch embeddings (B, embed_dim) from normalised pixels (B, 3, S, S) (see ``image_transform``)."""
        z = self.patch_projection(self.vision_encoder(pixels.to(self.device)).pooled)
        return F.normalize(z, dim=-1) if normalize else z

    def encode_region(self, region: torch.Tensor, patch: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Region embeddings (B, embed_dim), the region's pretext token describing ``patch``."""
        z = self.region_projection(self.vision_encoder(region, region_of=patch).pooled)
        return F.normalize(z, dim=-1) if normalize else z

    def forward(self, input_ids: torch.Tensor, patch: torch.Tensor, region: torch.Tensor,
                region_cell: torch.Tensor, *, gather_with_grad: bool = True) -> AlignLosses:
        """The four alignment losses for one batch (pixels normalised, see :meth:`pixels`)."""
        spot = self.encode_gene(input_ids)
        patch_emb = self.encode_image(patch)
        out = self.vision_encoder(region, region_of=patch)
        region_emb = F.normalize(self.region_projection(out.pooled), dim=-1)
        cells = self.positioning_projection(self.vision_encoder.region_cells(out.grid))
        pretext = self.positioning_projection(out.pretext)
        return alignment_losses(spot, patch_emb, region_emb, cells, pretext, region_cell, self.scale(),
                                gather_with_grad=gather_with_grad)

    def freeze(self, *, gene: bool = False, vision_trunk: bool = False) -> None:
        """Frozen parts get no gradients; the gene heads (MLM/CGR) never train in this stage."""
        self.gene_encoder.requires_grad_(not gene)
        for head in ("mlm_head", "cgr_head"):
            if getattr(self.gene_encoder, head, None) is not None:
                getattr(self.gene_encoder, head).requires_grad_(False)
        self.vision_encoder.trunk.requires_grad_(not vision_trunk)


def create_stamp_model(gene_encoder: StampGeneEncoder, vision_encoder: VisionEncoder,
                       embed_dim: int = 512) -> StampModel:
    """A StampModel holding these (already initialised) encoders; projections freshly initialised."""
    if getattr(gene_encoder, "mlm_head", None) is not None or getattr(gene_encoder, "cgr_head", None) is not None:
        # the pretraining heads (IGR/CGR) play no part in alignment or inference: drop them
        gene_encoder.mlm_head = None
        gene_encoder.cgr_head = None
        gene_encoder.config = StampConfig.from_dict({**gene_encoder.config.to_dict(), "heads": False})
    cfg = StampModelConfig(gene=gene_encoder.config, vision=vision_encoder.config, embed_dim=embed_dim)
    with torch.device("meta"):
        model = StampModel(cfg)
    model.gene_encoder = gene_encoder
    model.vision_encoder = vision_encoder
    for name in PROJECTIONS:
        layer = getattr(model, name)
        fresh = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        setattr(model, name, fresh)
    model.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))
    return model


__all__ = ["StampModel", "StampModelConfig", "create_stamp_model", "stamp_model_card", "write_stamp_model_card",
           "LOGIT_SCALE_INIT", "LOGIT_SCALE_MAX"]
