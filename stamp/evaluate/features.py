"""Frozen spot features for every model compared in one run, plus the built-in baselines.

- a given model: the spot embedding before any projection layer (the gene encoder's pooled
  last layer, as ``stamp embed`` writes it; the paper probes these features);
- ``random-init``: the first model's architecture and tokenizer with freshly initialised
  weights (seeded): what pretraining adds over the architecture alone;
- ``pca``: 50 principal components of log-CP10K expression of the 2,000 most variable genes
  (Seurat v3 on raw counts): the classical pipeline without any encoder.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stamp.evaluate.data import EvalData, EvaluateError, log_cp10k, seurat_v3_hvgs

MODALITIES = ("gene", "image", "fused")
PCA_COMPONENTS = 50
PCA_HVGS = 2000
# learning rate of probes / heads, by the kind of features they read (the paper's choice)
PROBE_LR = {"gene": 1e-3, "image": 1e-4, "fused": 1e-4, "pca": 1e-3}


@dataclass
class FeatureSet:
    """One row of the comparison: a name, what it is, and an (n_spots, dim) float32 matrix."""

    name: str
    kind: str  # "model", "random-init" or "pca"
    features: np.ndarray
    modality: str = "gene"

    @property
    def probe_lr(self) -> float:
        return PROBE_LR["pca" if self.kind == "pca" else self.modality]


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def model_name(model: str | os.PathLike) -> str:
    """A short, readable name: the run / folder name, or the Hub repo id."""
    path = Path(str(model))
    if path.exists():
        path = path.resolve()
        return path.parent.name if path.name == "model" else path.name
    return str(model)


def _check_vocab(data: EvalData, tokenizer, model) -> None:
    if list(data.gene_ids) != list(tokenizer.gene_ids):
        raise EvaluateError(
            f"{model}: its {tokenizer.n_genes}-gene vocabulary differs from the corpus's {len(data.gene_ids)} genes; "
            "build the evaluation corpus with the vocabulary the model was trained on (--vocab)"
        )


def encode(encoder, tokenizer, data: EvalData, *, batch_size: int = 256, progress=None) -> np.ndarray:
    """Pooled gene-encoder embeddings of every spot (corpus order), no gradients."""
    import torch

    from stamp.tokenizer import to_model_input_ids

    out = []
    context = encoder.config.context_length
    encoder.eval()
    for table in data.tables:
        for start in range(0, table.num_rows, batch_size):
            chunk = table.slice(start, batch_size)
            ids = to_model_input_ids(tokenizer.encode_table(chunk), tokenizer.pad_value, context)
            with torch.no_grad():
                out.append(encoder.embed(torch.from_numpy(ids.astype(np.int64))).float().cpu().numpy())
            if progress is not None:
                progress(chunk.num_rows)
    return np.concatenate(out).astype(np.float32)


def _load_gene_side(model: str, device: str):
    """(gene encoder, tokenizer): a gene encoder, or the gene encoder inside an aligned StampModel
    (its pooled output is StampModel.gene_features, the input of spot_projection)."""
    from stamp.embed import load_model
    from stamp.embed_multimodal import is_stamp_model, load_stamp_model
    from stamp.hub import resolve_model_source

    if is_stamp_model(resolve_model_source(model)):
        net, tokenizer, folder = load_stamp_model(model, device)
        if tokenizer is None:
            raise EvaluateError(f"{folder}: no tokenizer files; gene features need them")
        return net.gene_encoder.eval(), tokenizer
    return load_model(model, device)


def check_modality(modality: str) -> None:
    if modality not in MODALITIES:
        raise EvaluateError(f"--modality {modality!r}: choose one of {', '.join(MODALITIES)}")
    if modality != "gene":
        raise EvaluateError(
            f"--modality {modality}: stamp evaluate scores gene features in this version (image / fused "
            "features of an aligned StampModel: use `stamp embed --modality` for now); pass --modality gene"
        )


def model_features(model: str, data: EvalData, *, device: str | None = None, batch_size: int = 256,
                   seed: int = 0, progress=None, with_random: bool = False, modality: str = "gene") -> list[FeatureSet]:
    """Features of ``model`` (and, with ``with_random``, of the same architecture re-initialised)."""
    import torch

    from stamp.model import StampGeneEncoder

    encoder, tokenizer = _load_gene_side(model, device or default_device())
    _check_vocab(data, tokenizer, model)
    sets = [FeatureSet(model_name(model), "model", encode(encoder, tokenizer, data, batch_size=batch_size,
                                                             progress=progress))]
    if with_random:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            rand = StampGeneEncoder(encoder.config).to(encoder.device).eval()
        sets.append(FeatureSet("random-init", "random-init",
                               encode(rand, tokenizer, data, batch_size=batch_size, progress=progress)))
    return sets


def pca_features(data: EvalData, *, n_components: int = PCA_COMPONENTS, n_hvgs: int = PCA_HVGS,
                 seed: int = 0) -> FeatureSet:
    """The PCA baseline: log-CP10K of the most variable genes, scaled per gene, 50 components."""
    from sklearn.decomposition import PCA

    hvgs = seurat_v3_hvgs(data.counts, n_hvgs)
    X = log_cp10k(data.counts)[:, hvgs].toarray()
    X -= X.mean(axis=0)
    sd = X.std(axis=0)
    X /= np.where(sd > 0, sd, 1.0)
    k = int(min(n_components, X.shape[0] - 1, X.shape[1]))
    if k < 1:
        raise EvaluateError("too few spots or genes for the PCA baseline")
    Z = PCA(n_components=k, svd_solver="full", random_state=seed).fit_transform(X)
    return FeatureSet("pca", "pca", Z.astype(np.float32))
