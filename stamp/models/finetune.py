"""An image encoder fine-tuned with spatial transcriptomics as supervision (the paper's ‡ rows, after
Chen et al. 2024, STimage-1K4M): the image encoder and a small gene projection trained contrastively so
that a patch and its spot's expression meet in one space.

* :class:`ExpressionInput` -- a spot's counts -> its expression over the run's highly variable genes:
  library-size normalised (counts per 10,000 of the spot's total over every corpus gene), log1p. Genes
  are matched by Ensembl id; a corpus without some of them feeds zeros there (the match is recorded);
* :class:`STFinetuneModel` -- ``image_encoder`` (any module: pixels -> (B, D)), ``image_projection``
  Linear(D, embed_dim), ``gene_projection`` Linear(n_genes, embed_dim) and a learnable temperature; the
  loss is the symmetric InfoNCE of CLIP over the batch (STimage-1K4M's ``ST_contrastive_model``).

``image_features`` (the fine-tuned encoder's own output, before the projection) is what ``stamp
evaluate`` probes; ``encode_image`` / ``encode_genes`` give the shared, L2-normalised space. The class
knows no names: the zoo rebuilds the image encoder from the architecture recorded in ``config.json``.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from stamp.errors import ModelConfigError
from stamp.models.gene_inputs import CorpusGenes, CountInput

MODEL_TYPE = "stamp-finetuned"
GENES_FILE = "genes.json"
TARGET_SUM = 1e4
LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100.0)


class ExpressionInput(CountInput):
    """Raw counts -> log1p(CP10K) over the run's genes (see the module docstring)."""

    key = "ensembl_id"

    def __init__(self, genes: Sequence[str], symbols: Sequence[str] | None = None, target_sum: float = TARGET_SUM):
        super().__init__()
        self.genes = [str(g) for g in genes]
        self.gene_symbols = [str(s) for s in (symbols or [""] * len(self.genes))]
        if not self.genes or len(set(self.genes)) != len(self.genes):
            raise ModelConfigError("the expression input needs distinct genes")
        self.target_sum = float(target_sum)

    @property
    def model_genes(self) -> int:
        return len(self.genes)

    def column_of(self, genes: CorpusGenes) -> np.ndarray:
        index = {g: i for i, g in enumerate(self.genes)}
        return np.array([index.get(g, -1) for g in genes.ensembl_ids], dtype=np.int64)

    def expression(self, X: sp.csr_matrix) -> np.ndarray:
        """(spots, n_genes) float32: counts per ``target_sum`` of each spot's total, log1p."""
        X = sp.csr_matrix(X, dtype=np.float32)
        totals = np.asarray(X.sum(axis=1), dtype=np.float64).reshape(-1)
        scale = np.where(totals > 0, self.target_sum / np.maximum(totals, 1e-12), 0.0).astype(np.float32)
        ours = self.model_counts(X).toarray()
        return np.log1p(ours * scale[:, None]).astype(np.float32)

    def __call__(self, X: sp.csr_matrix, *, slide: Any = None) -> dict[str, Any]:
        return {"expression": torch.from_numpy(self.expression(X))}

    def describe(self) -> dict[str, Any]:
        return {"rule": "log1p-cp10k", "genes": len(self.genes), "target_sum": self.target_sum, "key": self.key,
                **({"match": self.match.describe()} if self.match is not None else {})}

    def save_pretrained(self, folder: str | Path) -> Path:
        from spavis.format.io import atomic_write_text

        path = Path(folder) / GENES_FILE
        atomic_write_text(path, json.dumps({"ensembl_ids": self.genes, "symbols": self.gene_symbols,
                                            "target_sum": self.target_sum, "log1p": True}, indent=1) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "ExpressionInput":
        path = Path(folder) / GENES_FILE
        try:
            data = json.loads(path.read_text())
            return cls(data["ensembl_ids"], data.get("symbols"), float(data.get("target_sum", TARGET_SUM)))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelConfigError(f"{path}: not the gene list of a fine-tuned model ({type(exc).__name__}); "
                                   "the run folder is incomplete: run `stamp finetune` again") from None


@dataclass
class FinetuneConfig:
    """``config.json`` of a fine-tuned model: the image encoder's architecture record (from the zoo), widths."""

    image_encoder: dict
    image_dim: int
    n_genes: int
    embed_dim: int = 32
    model_type: str = MODEL_TYPE
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> "FinetuneConfig":
        from stamp.safety import check_config_sizes

        if data.get("model_type") != MODEL_TYPE:
            raise ModelConfigError(f"{where}: model_type {data.get('model_type')!r} is not {MODEL_TYPE!r}")
        try:
            cfg = cls(image_encoder=dict(data["image_encoder"]), image_dim=int(data["image_dim"]),
                      n_genes=int(data["n_genes"]), embed_dim=int(data.get("embed_dim", 32)),
                      extra={k: v for k, v in data.items() if k not in
                             ("image_encoder", "image_dim", "n_genes", "embed_dim", "model_type")})
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelConfigError(f"{where}: not a fine-tuned model config ({type(exc).__name__}: {exc})") from None
        check_config_sizes({"embed_dim": cfg.embed_dim, "num_features": cfg.image_dim, "n_genes": cfg.n_genes}, where)
        if min(cfg.embed_dim, cfg.image_dim, cfg.n_genes) < 1:
            raise ModelConfigError(f"{where}: widths must be positive")
        return cfg

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(out.pop("extra"))
        return out


class STFinetuneModel(nn.Module):
    """The image encoder and the two projections (see the module docstring)."""

    def __init__(self, image_encoder: nn.Module, config: FinetuneConfig) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = image_encoder
        self.image_projection = nn.Linear(config.image_dim, config.embed_dim)
        self.gene_projection = nn.Linear(config.n_genes, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))
        if self.logit_scale.device.type != "meta":  # STimage-1K4M's initialisation of the two projections
            nn.init.xavier_uniform_(self.image_projection.weight)
            nn.init.xavier_uniform_(self.gene_projection.weight)

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The fine-tuned encoder's own output (B, image_dim), before the projection."""
        return self.image_encoder(pixels.to(self.device))

    def gene_features(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The gene projection of a spot's expression (B, embed_dim), not normalised."""
        return self.gene_projection(batch["expression"].to(self.device, self.gene_projection.weight.dtype))

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        z = self.image_projection(self.image_features(pixels).to(self.image_projection.weight.dtype))
        return F.normalize(z, dim=-1) if normalize else z

    def encode_genes(self, batch: Mapping[str, torch.Tensor], normalize: bool = True) -> torch.Tensor:
        z = self.gene_features(batch)
        return F.normalize(z, dim=-1) if normalize else z

    def forward(self, pixels: torch.Tensor, expression: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(symmetric InfoNCE loss, number of spots whose own partner ranks first in both directions)."""
        image = self.encode_image(pixels)
        gene = self.encode_genes({"expression": expression})
        logits = self.logit_scale.clamp(max=LOGIT_SCALE_MAX).exp() * image @ gene.t()
        target = torch.arange(len(image), device=image.device)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
        correct = ((logits.argmax(1) == target) & (logits.argmax(0) == target)).sum()
        return loss, correct

    def clamp_logit_scale(self) -> None:
        with torch.no_grad():
            self.logit_scale.clamp_(0, LOGIT_SCALE_MAX)

    def save_pretrained(self, folder: str | Path) -> Path:
        """config.json + model.safetensors (every tensor; the image encoder's architecture is in the config)."""
        from safetensors.torch import save_file

        from spavis.format.io import atomic_write_text

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "config.json", json.dumps(self.config.to_dict(), indent=2, sort_keys=True) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt", "model_type": MODEL_TYPE})
        return folder


class Adapter(nn.Module):
    """STAMP_Con's adapter: halve the width, restore it (ReLU after each, no biases), as STAMP's release."""

    def __init__(self, dim: int, reduction: int = 2) -> None:
        super().__init__()
        hidden = max(1, dim // reduction)
        self.fc = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, dim, bias=False),
                                nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


__all__ = ["ExpressionInput", "FinetuneConfig", "STFinetuneModel", "Adapter", "MODEL_TYPE", "GENES_FILE"]
