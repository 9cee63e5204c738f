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

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from stamp.evaluate.data import EvalData, EvaluateError, log_cp10k, seurat_v3_hvgs
from stamp.locations import run_folder_of

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
    marks: str = ""  # V / L / G: modalities the model saw in pretraining (Table 1; none for the baselines)

    @property
    def probe_lr(self) -> float:
        return PROBE_LR["pca" if self.kind == "pca" else self.modality]


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def model_name(model: str | os.PathLike) -> str:
    """A short, readable name: the run / folder name, or the Hub repo id (``A+B``: the parts' names)."""
    from stamp.zoo.concat import SEPARATOR, split_spec

    path = Path(str(model))
    parts = None if path.exists() else split_spec(str(model))
    if parts:
        return SEPARATOR.join(model_name(p) for p in parts)
    return run_folder_of(path.resolve()).name if path.exists() else str(model)


BASELINE_NAMES = ("random-init", "pca")


def _model_key(model: str | os.PathLike) -> tuple[str, ...]:
    """What identifies a model: its resolved run folder (``RUN`` and ``RUN/model`` are one model) as path
    parts, or the Hub id / zoo name as given."""
    path = Path(str(model))
    if path.exists():
        return run_folder_of(path.resolve()).parts
    return tuple(p for p in str(model).split("/") if p) or (str(model),)


def model_names(models: Sequence[str | os.PathLike]) -> list[str]:
    """One unique, readable name per model (rows of results.csv).

    The folder name (or Hub id) when it is unique; otherwise the shortest path suffix that tells the
    same-named models apart (``A/run``, ``B/run``). The same model given twice (``R`` and ``R/model``,
    or one path spelled two ways) is refused: its folds would be pooled into one row."""
    keys = [_model_key(m) for m in models]
    seen: dict[tuple[str, ...], str] = {}
    for m, k in zip(models, keys):
        if k in seen:
            raise EvaluateError(f"--model {m}: the same model as --model {seen[k]}; give each model once")
        seen[k] = str(m)
    base = [model_name(m) for m in models]
    names = []
    for i, k in enumerate(keys):
        clash = [keys[j] for j in range(len(keys)) if j != i and base[j] == base[i]]
        if base[i] in BASELINE_NAMES:  # a folder named like a baseline: never one row with it
            clash.append(("", base[i]))
        n = 1
        while n < len(k) and any(k[-n:] == c[-n:] for c in clash):
            n += 1
        names.append(base[i] if n == 1 and not clash else "/".join(k[-n:]).lstrip("/") or str(models[i]))
    return names


def marks_of(enc) -> str:
    from stamp.zoo.encoder import marks_of as marks

    return marks(enc)


def _check_vocab(data: EvalData, tokenizer, model, enc=None) -> None:
    from spavis.format.vocabulary import require_same_vocabulary

    from stamp.zoo.counts import bind_genes, count_input

    if enc is not None and count_input(enc) is not None:  # a raw-count gene side: bound to the corpus's genes
        bind_genes(enc, data.gene_ids, data.gene_symbols, model=str(model), data="the evaluation corpus",
                   error=EvaluateError)
        return
    require_same_vocabulary(tokenizer, list(data.gene_ids), a_name=str(model), b_name="the evaluation corpus",
                            error=EvaluateError,
                            fix="build the evaluation corpus with the vocabulary the model was trained on (--vocab)")


def load_encoder(model: str | os.PathLike, device: str | None = None, means: str | os.PathLike | None = None,
                 weights: str | os.PathLike | None = None):
    """Any model of the zoo (name, run folder, model folder, Hub id) as a :class:`stamp.zoo.encoder.Encoder`;
    ``weights``: the files of a zoo name downloaded by hand (as ``stamp embed --weights``)."""
    import stamp

    return stamp.load(str(model), device=device or default_device(), means=means, weights=weights)


def _context_length(module, default: int) -> int:
    config = getattr(module, "config", None)
    for cfg in (config, getattr(config, "gene", None)):
        n = getattr(cfg, "context_length", None)
        if isinstance(n, int) and n > 0:
            return n
    return default


def gene_side(enc, model) -> tuple:
    """(ids -> (B, D) features, tokenizer, context length) of an encoder's gene side, BEFORE any projection:
    an aligned STAMP model's pooled gene-encoder output (the input of ``spot_projection``), else
    ``Encoder.encode_genes``."""
    problem = enc.gene_side_problem()
    if problem is not None:
        raise EvaluateError(f"{model}: {problem}; gene features need a gene or aligned model (for an image "
                            "encoder pass --modality image, with a corpus built with --with-images)")
    fn = getattr(enc.module, "gene_features", None) or enc.encode_genes
    return fn, enc.tokenizer, _context_length(enc.module, 1500)


def image_side(enc, model, modality: str = "image"):
    """pixels (B, 3, S, S) -> (B, D) image features, BEFORE any projection: an aligned STAMP model's pooled
    vision token (the input of ``patch_projection``), else ``Encoder.encode_images``."""
    if enc.kind == "gene" or enc.transform is None:
        raise EvaluateError(f"{model}: a gene encoder without a vision encoder; --modality {modality} needs an "
                            "aligned StampModel (`stamp pretrain --stage align`) or an image encoder, or pass "
                            "--modality gene")
    vision = getattr(enc.module, "vision_encoder", None)
    if vision is not None:
        return lambda px: vision(px.to(enc.device)).pooled
    return getattr(enc.module, "image_features", None) or enc.encode_images


def _whole_sides(enc, model, modality: str) -> None:
    """A concatenation A+B asked for one modality: every part must have that side (never silently dropped)."""
    from stamp.zoo.concat import parts_without

    for side in (("image",) if modality == "image" else ("gene",) if modality == "gene" else ()):
        missing = parts_without(enc, side)
        if missing:
            raise EvaluateError(f"{model}: {', '.join(missing)} has no {side} side; --modality {modality} "
                                f"concatenates the {side} features of every part (use --modality fused to join "
                                "one part's image features with another's gene features)")


def encode_counts_of(enc, gene_fn, data: EvalData, *, batch_size: int = 256, progress=None) -> np.ndarray:
    """Gene-side features of every spot from raw counts (a count-input gene side), slide by slide."""
    from stamp.zoo.counts import encode_counts

    out, start = [], 0
    slides = data.slide_ids
    while start < data.n_spots:
        end = start + 1
        while end < data.n_spots and slides[end] == slides[start]:
            end += 1
        out.append(encode_counts(enc, data.counts[start:end], batch_size=batch_size, gene_fn=gene_fn,
                                 progress=progress))
        start = end
    return np.concatenate(out).astype(np.float32)


def encode(gene_fn, tokenizer, data: EvalData, *, context: int, batch_size: int = 256, progress=None) -> np.ndarray:
    """Gene-side features of every spot (corpus order), no gradients."""
    import torch

    from stamp.tokenizer import to_model_input_ids

    out = []
    for table in data.tables:
        for start in range(0, table.num_rows, batch_size):
            chunk = table.slice(start, batch_size)
            ids = to_model_input_ids(tokenizer.encode_table(chunk), tokenizer.pad_value, context)
            with torch.no_grad():
                out.append(gene_fn(torch.from_numpy(ids.astype(np.int64))).float().cpu().numpy())
            if progress is not None:
                progress(chunk.num_rows)
    return np.concatenate(out).astype(np.float32)


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


def embed_pixels(image_fn, transform, images, *, device) -> np.ndarray:
    """uint8 RGB images (B, H, W, 3) -> (B, D) float32 features: the encoder's own transform, then ``image_fn``."""
    import torch

    pixels = torch.stack([transform(np.ascontiguousarray(im)) for im in images]).to(device)
    with torch.no_grad():
        return image_fn(pixels).float().cpu().numpy()


def encode_images(image_fn, transform, device, corpus, data: EvalData, *, batch_size: int = 64,
                  progress=None) -> np.ndarray:
    """Image features of every spot's patch (corpus paired rows); rows follow ``data`` (every spot of
    ``data`` must have a patch)."""
    from stamp.data.paired import decode_png

    index = {key: i for i, key in enumerate(zip(data.slide_ids.tolist(), data.spot_ids.tolist()))}
    out: np.ndarray | None = None
    seen = np.zeros(data.n_spots, bool)
    for table in corpus.iter_paired(columns=["spot_id", "patch"], slide_ids=data.slides):
        rows = np.array([index.get(k, -1) for k in zip(table.column("slide_id").to_pylist(),
                                                        table.column("spot_id").to_pylist())])
        keep = np.flatnonzero(rows >= 0)
        for a in range(0, keep.size, batch_size):
            take = keep[a:a + batch_size]
            patches = table.column("patch").take(take).to_pylist()
            z = embed_pixels(image_fn, transform, [decode_png(v) for v in patches], device=device)
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


@contextlib.contextmanager
def reinitialised(module, seed: int):
    """``module`` with freshly initialised, seeded weights inside the block, its own weights restored after.

    Fresh weights are those of a new instance built from the module's ``config`` (the architecture's own
    initialisation) when it has one, else every submodule's ``reset_parameters``. In place, so an
    :class:`~stamp.zoo.encoder.Encoder`'s functions (bound to this module) compute the random-init features."""
    import torch

    saved = {k: v.detach().clone() for k, v in module.state_dict().items()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = None
        config = getattr(module, "config", None)
        if config is not None:
            try:
                fresh = type(module)(config)
            except TypeError:
                fresh = None
        if fresh is not None:
            module.load_state_dict(fresh.state_dict())
            del fresh
        else:
            for m in module.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
    try:
        yield module
    finally:
        module.load_state_dict(saved)


def _features(enc, model, data: EvalData, modality: str, corpus, *, batch_size: int, progress=None) -> np.ndarray:
    """gene / image / fused ([gene, image], each part L2-normalised so neither modality dominates distances
    by its scale, as ``stamp embed --modality fused``) features of every spot of ``data``."""
    parts = []
    if modality in ("image", "fused"):
        parts.append(encode_images(image_side(enc, model, modality), enc.transform, enc.device, corpus, data,
                                   batch_size=min(batch_size, 64), progress=progress))
        if modality == "image":
            return parts[0]
    gene_fn, tokenizer, context = gene_side(enc, model)
    from stamp.zoo.counts import count_input

    if count_input(enc) is not None:
        gene = encode_counts_of(enc, gene_fn, data, batch_size=batch_size, progress=progress)
    else:
        gene = encode(gene_fn, tokenizer, data, context=context, batch_size=batch_size, progress=progress)
    if modality == "gene":
        return gene
    return np.concatenate([_unit_rows(gene), _unit_rows(parts[0])], axis=1)


def model_features(model: str, data: EvalData, *, device: str | None = None, batch_size: int = 256,
                   seed: int = 0, progress=None, with_random: bool = False, modality: str = "gene",
                   corpus=None, name: str | None = None, means: str | os.PathLike | None = None,
                   encoder=None, weights: str | os.PathLike | None = None) -> list[FeatureSet]:
    """Features of ``model`` (loaded with :func:`stamp.load`; and, with ``with_random``, of the same
    architecture re-initialised).

    ``modality`` image / fused: ``model`` must have an image side (fused: an aligned model) and ``corpus``
    be the corpus ``data`` came from, holding a patch for every spot of ``data``."""
    check_modality(modality)
    enc = encoder if encoder is not None else load_encoder(model, device, means, weights)
    _whole_sides(enc, model, modality)
    if modality in ("image", "fused"):
        image_side(enc, model, modality)  # fail before any work
    if modality in ("gene", "fused"):
        _check_vocab(data, gene_side(enc, model)[1], model, enc)
    sets = [FeatureSet(name or model_name(model), "model",
                       _features(enc, model, data, modality, corpus, batch_size=batch_size, progress=progress),
                       modality, marks=marks_of(enc))]
    if with_random:
        with reinitialised(enc.module, seed):
            sets.append(FeatureSet("random-init", "random-init",
                                   _features(enc, model, data, modality, corpus, batch_size=batch_size,
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
    # exact either way; the covariance eigendecomposition (d x d) is much cheaper than a full SVD of the
    # (spots x genes) matrix when spots >> genes (10,000 x 2,000: seconds instead of minutes)
    solver = "covariance_eigh" if X.shape[0] >= 4 * X.shape[1] else "full"
    Z = PCA(n_components=k, svd_solver=solver, random_state=seed).fit_transform(X)
    return FeatureSet("pca", "pca", Z.astype(np.float32))
