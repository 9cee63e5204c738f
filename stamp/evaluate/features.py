"""Frozen spot features for every model compared in one run, plus the built-in baselines.

- a given model: the spot embedding before any projection layer (the paper probes these
  features): ``gene`` = the gene encoder's pooled last layer (as ``stamp embed`` writes it);
  for an aligned StampModel, ``image`` = the vision encoder's pooled token (before
  ``patch_projection``) and ``fused`` = [gene, image], each part L2-normalised;
- ``random-init``: the first model's architecture and tokenizer with freshly initialised
  weights (seeded; the whole StampModel for image / fused): what pretraining adds;
- ``pca``: 50 principal components of log-CP10K expression of the 2,000 most variable genes
  (Seurat v3 on raw counts): the classical pipeline without any encoder (expression only,
  whatever the modality).
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


def image_spots(corpus, data: EvalData) -> np.ndarray:
    """Boolean mask of the spots of ``data`` that have an H&E patch in ``corpus`` (``--with-images``)."""
    if not corpus.has_images:
        raise EvaluateError(f"{corpus.root}: the corpus holds no H&E patches; image / fused features need a corpus "
                            "built with `spavis build-shards --with-images` (or pass --modality gene)")
    index = {key: i for i, key in enumerate(zip(data.slide_ids.tolist(), data.spot_ids.tolist()))}
    mask = np.zeros(data.n_spots, bool)
    for table in corpus.iter_paired(columns=["spot_id"]):
        for key in zip(table.column("slide_id").to_pylist(), table.column("spot_id").to_pylist()):
            i = index.get(key)
            if i is not None:
                mask[i] = True
    return mask


def encode_images(vision, config, corpus, data: EvalData, *, batch_size: int = 64, progress=None) -> np.ndarray:
    """The vision encoder's pooled token of every spot's patch (corpus paired rows), BEFORE
    ``patch_projection``; rows follow ``data`` (every spot of ``data`` must have a patch)."""
    import torch

    from stamp.paired_data import decode_png
    from stamp.vision import to_pixels

    index = {key: i for i, key in enumerate(zip(data.slide_ids.tolist(), data.spot_ids.tolist()))}
    out: np.ndarray | None = None
    seen = np.zeros(data.n_spots, bool)
    device = next(vision.parameters()).device
    vision.eval()
    for table in corpus.iter_paired(columns=["spot_id", "patch"], slide_ids=data.slides):
        rows = np.array([index.get(k, -1) for k in zip(table.column("slide_id").to_pylist(),
                                                        table.column("spot_id").to_pylist())])
        keep = np.flatnonzero(rows >= 0)
        for a in range(0, keep.size, batch_size):
            take = keep[a:a + batch_size]
            patches = table.column("patch").take(take).to_pylist()
            pixels = to_pixels(np.stack([decode_png(v) for v in patches]), config).to(device)
            with torch.no_grad():
                z = vision(pixels).pooled.float().cpu().numpy()
            if out is None:
                out = np.zeros((data.n_spots, z.shape[1]), np.float32)
            out[rows[take]] = z
            seen[rows[take]] = True
            if progress is not None:
                progress(len(take))
    if out is None or not seen.all():
        raise EvaluateError(f"{corpus.root}: {int((~seen).sum())} spots have no H&E patch; "
                            "rebuild the corpus with --with-images")
    return out


def _unit_rows(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(n > 0, n, 1.0)).astype(np.float32)


def _stamp_features(net, tokenizer, corpus, data: EvalData, modality: str, *, batch_size: int,
                    progress=None) -> np.ndarray:
    """image: vision pooled token (before patch_projection); fused: [gene, image], each part L2-normalised
    so neither modality dominates distances by its scale (as ``stamp embed --modality fused``)."""
    img = encode_images(net.vision_encoder, net.config.vision, corpus, data, batch_size=min(batch_size, 64),
                        progress=progress)
    if modality == "image":
        return img
    gene = encode(net.gene_encoder, tokenizer, data, batch_size=batch_size, progress=progress)
    return np.concatenate([_unit_rows(gene), _unit_rows(img)], axis=1)


def model_features(model: str, data: EvalData, *, device: str | None = None, batch_size: int = 256,
                   seed: int = 0, progress=None, with_random: bool = False, modality: str = "gene",
                   corpus=None) -> list[FeatureSet]:
    """Features of ``model`` (and, with ``with_random``, of the same architecture re-initialised).

    ``modality`` image / fused: ``model`` must be an aligned StampModel and ``corpus`` the corpus
    ``data`` came from, holding a patch for every spot of ``data``."""
    import torch

    from stamp.model import StampGeneEncoder

    if modality == "gene":
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

    from stamp.embed_multimodal import is_stamp_model, load_stamp_model
    from stamp.hub import resolve_model_source
    from stamp.multimodal import StampModel

    if not is_stamp_model(resolve_model_source(model)):
        raise EvaluateError(f"{model}: a gene encoder without a vision encoder; --modality {modality} needs an "
                            "aligned StampModel (`stamp pretrain --stage align`), or pass --modality gene")
    net, tokenizer, folder = load_stamp_model(model, device or default_device(), need_tokenizer=modality == "fused")
    if modality == "fused":
        if tokenizer is None:
            raise EvaluateError(f"{folder}: no tokenizer files; fused features need them")
        _check_vocab(data, tokenizer, model)
    sets = [FeatureSet(model_name(model), "model", _stamp_features(net, tokenizer, corpus, data, modality,
                                                                   batch_size=batch_size, progress=progress),
                       modality)]
    if with_random:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            rand = StampModel(net.config).to(net.device).eval()
        sets.append(FeatureSet("random-init", "random-init",
                               _stamp_features(rand, tokenizer, corpus, data, modality, batch_size=batch_size,
                                               progress=progress), modality))
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
