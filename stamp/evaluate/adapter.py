"""``stamp finetune --method adapter``: STAMP_Con, then BLEEP's query-reference expression prediction.

For an aligned model whose image side has a separate projection into the shared space (a STAMP model:
``patch_projection``; a ``stamp finetune`` run: ``image_projection``), leave one slide out:

1. everything frozen but a two-layer adapter on the image features (halve the width, restore it, ReLU after
   each, no biases: :class:`stamp.models.finetune.Adapter`, added to the features as a residual so training
   starts from the frozen model) and a copy of the image projection;
2. trained on the other slides' spots with the symmetric InfoNCE between the adapted patch embedding and
   the frozen spot embedding (the model's own, frozen temperature), AdamW lr 1e-3, at most 20 epochs,
   early stopping on a 10 % validation split (patience 5, best epoch kept), batch 256, seeded;
3. BLEEP's query-reference (:func:`stamp.evaluate.heads.knn_regression`): each held-out spot's adapted patch
   embedding queries the training spots' SPOT embeddings (shared space), the top-K (50) similarity-weighted
   mean of their expression is the prediction; targets and metrics are ``stamp evaluate
   predict-expression``'s (log-CP10K of the top HVGs; MSE, PCC-V, PCC-E).

The same-run baseline ``bleep`` queries with the frozen patch embedding (no adapter). Output in ``--out``:
``results.csv`` / ``results.md`` (``stamp evaluate``'s layout, methods ``stamp-con`` and ``bleep``),
``adapters/<fold>.safetensors`` (adapter + projection of every fold) and ``adapter.json`` (settings). A
fold whose adapter exists is not trained again when the command is rerun.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from stamp.errors import EvaluateError

METHODS = ("stamp-con", "bleep")


@dataclass
class AdapterOptions:
    epochs: int = 20
    patience: int = 5
    lr: float = 1e-3
    weight_decay: float = 0.01  # AdamW's default
    batch_size: int = 256
    reduction: int = 2
    knn_k: int = 50
    n_hvgs: int = 5000
    seed: int = 0
    device: Optional[str] = None


def image_side_with_projection(enc, model):
    """(pixels -> image features before the projection, the projection module, temperature) of an aligned model."""
    module = enc.module
    if enc.kind != "aligned":
        raise EvaluateError(f"{model}: a {enc.kind} encoder; STAMP_Con adapts an aligned model (image and spot "
                            "embeddings in one space: a STAMP model, or a `stamp finetune` run)")
    vision, proj = getattr(module, "vision_encoder", None), getattr(module, "patch_projection", None)
    if vision is not None and proj is not None:
        return (lambda px: vision(px.to(enc.device)).pooled), proj, module.logit_scale
    if hasattr(module, "image_features") and hasattr(module, "image_projection"):
        return module.image_features, module.image_projection, module.logit_scale
    raise EvaluateError(f"{model}: its image projection is not a separate layer (open_clip models project inside "
                        "their image tower); STAMP_Con needs a STAMP model or a `stamp finetune` run")


def _infonce(a, b, scale):
    import torch
    import torch.nn.functional as F

    logits = scale * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).t()
    target = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def train_adapter(feats: np.ndarray, spots: np.ndarray, fit: np.ndarray, val: np.ndarray, projection, scale: float,
                  opts: AdapterOptions, device: str):
    """(adapter, projection copy) trained on rows ``fit`` (early stopping on ``val``)."""
    import torch

    from stamp.models.finetune import Adapter

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(opts.seed)
        adapter = Adapter(feats.shape[1], opts.reduction).to(device)
    proj = copy.deepcopy(projection).to(device).float().requires_grad_(True)
    params = list(adapter.parameters()) + list(proj.parameters())
    opt = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    X = torch.as_tensor(feats, device=device)
    G = torch.as_tensor(spots, device=device)
    gen = torch.Generator().manual_seed(opts.seed)

    def embed(rows):
        x = X[rows]
        return proj(x + adapter(x))

    best, best_state, bad = float("inf"), None, 0
    for _ in range(opts.epochs):
        adapter.train()
        order = torch.as_tensor(fit)[torch.randperm(len(fit), generator=gen)]
        for s in range(0, len(order), opts.batch_size):
            rows = order[s:s + opts.batch_size]
            if len(rows) < 2:
                continue
            opt.zero_grad(set_to_none=True)
            _infonce(embed(rows), G[rows], scale).backward()
            opt.step()
        if len(val) < 2:
            continue
        adapter.eval()
        with torch.no_grad():
            loss = float(_infonce(embed(torch.as_tensor(val)), G[val], scale))
        if loss < best - 1e-6:
            best, best_state, bad = loss, (copy.deepcopy(adapter.state_dict()), copy.deepcopy(proj.state_dict())), 0
        else:
            bad += 1
            if bad >= opts.patience:
                break
    if best_state is not None:
        adapter.load_state_dict(best_state[0])
        proj.load_state_dict(best_state[1])
    return adapter.eval(), proj.eval()


def stamp_con(model: str, data: str | os.PathLike, out: str | os.PathLike, *, options: AdapterOptions | None = None,
              means: str | os.PathLike | None = None, progress: bool = True):
    """Run STAMP_Con + BLEEP (module docstring); returns the results DataFrame."""
    import torch
    from safetensors.torch import load_file, save_file

    import stamp
    from spavis.format import open_corpus
    from spavis.format.io import atomic_write_text
    from stamp.evaluate import output_folder
    from stamp.evaluate.data import load_eval_data
    from stamp.evaluate.features import (_context_length, default_device, encode, encode_counts_of, encode_images,
                                         image_spots, marks_of, model_name)
    from stamp.evaluate.heads import knn_regression
    from stamp.evaluate.metrics import expression_metrics, top_genes
    from stamp.evaluate.results import write_results
    from stamp.evaluate.splits import carve_validation, make_folds
    from stamp.evaluate.tasks import expression_targets
    from stamp.zoo.counts import bind_genes, count_input

    opts = options or AdapterOptions()
    for name in ("epochs", "patience", "batch_size", "reduction", "knn_k", "n_hvgs"):
        if getattr(opts, name) < 1:
            raise EvaluateError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(opts, name)}")
    device = opts.device or default_device()
    corpus = open_corpus(data)
    ev = load_eval_data(corpus, None)
    imaged = image_spots(corpus, ev)
    if not imaged.any():
        raise EvaluateError(f"{data}: no spot has an H&E patch; STAMP_Con needs a corpus built with --with-images")
    ev = ev.subset(imaged)
    if len(ev.slides) < 2:
        raise EvaluateError(f"{data}: one slide; STAMP_Con leaves one slide out and needs at least two")
    enc = stamp.load(str(model), device=device, means=means)
    image_fn, projection, logit_scale = image_side_with_projection(enc, model)
    problem = enc.gene_side_problem()
    if problem is not None:
        raise EvaluateError(f"{model}: {problem}")
    name = model_name(model)
    with output_folder(Path(out)) as out, torch.no_grad():
        feats = encode_images(image_fn, enc.transform, enc.device, corpus, ev, batch_size=64)
        if count_input(enc) is not None:
            bind_genes(enc, ev.gene_ids, ev.gene_symbols, model=str(model), data=str(data), error=EvaluateError)
            spots = encode_counts_of(enc, enc.encode_genes, ev)
        else:
            from spavis.format.vocabulary import require_same_vocabulary

            require_same_vocabulary(enc.tokenizer, list(ev.gene_ids), a_name=str(model), b_name=str(data),
                                    error=EvaluateError, fix="build the corpus with the model's vocabulary (--vocab)")
            spots = encode(enc.encode_genes, enc.tokenizer, ev, context=_context_length(enc.module, 1500))
        spots = spots / np.maximum(np.linalg.norm(spots, axis=1, keepdims=True), 1e-12)
        Y, _, flavor = expression_targets(ev, opts.n_hvgs)
        hvg, heg = top_genes(Y, np.arange(Y.shape[1]))
        scale = float(logit_scale.detach().float().exp().clamp(max=100.0))
        folds = make_folds(ev.slide_ids, seed=opts.seed)
        (out / "adapters").mkdir(exist_ok=True)
        rows = []
        frozen = projection.float()(torch.as_tensor(feats, device=projection.weight.device)).cpu().numpy()
        for fold in folds:
            path = out / "adapters" / f"{fold.name}.safetensors"
            fit, val = carve_validation(fold.train, seed=opts.seed)
            with torch.enable_grad():
                if path.is_file():  # a rerun: this fold's adapter was trained before
                    from stamp.models.finetune import Adapter

                    state = load_file(str(path))
                    adapter = Adapter(feats.shape[1], opts.reduction)
                    adapter.load_state_dict({k[len("adapter."):]: v for k, v in state.items()
                                             if k.startswith("adapter.")})
                    proj = copy.deepcopy(projection).float().cpu()
                    proj.load_state_dict({k[len("projection."):]: v for k, v in state.items()
                                          if k.startswith("projection.")})
                    adapter, proj = adapter.to(device).eval(), proj.to(device).eval()
                else:
                    adapter, proj = train_adapter(feats, spots, fit, val, projection, scale, opts, device)
                    tensors = {f"adapter.{k}": v.detach().cpu().contiguous() for k, v in adapter.state_dict().items()}
                    tensors.update({f"projection.{k}": v.detach().cpu().contiguous() for k, v in proj.state_dict().items()})
                    tmp = path.with_name(f".{path.name}.tmp")
                    save_file(tensors, str(tmp))
                    os.replace(tmp, path)
            x = torch.as_tensor(feats[fold.test], device=device)
            adapted = proj(x + adapter(x)).cpu().numpy()
            for method, query in (("stamp-con", adapted), ("bleep", frozen[fold.test])):
                pred = knn_regression(spots[fold.train], Y[fold.train], query, k=opts.knn_k, device=device)
                rows.append({"model": name, "kind": "model", "task": "predict-expression", "method": method,
                             "fold": fold.name, "scheme": fold.scheme, "n_train": len(fold.train),
                             "n_test": len(fold.test), **expression_metrics(Y[fold.test], pred, hvg, heg)})
        atomic_write_text(out / "adapter.json", json.dumps({"model": str(model), "data": str(data), **asdict(opts),
                                                            "device": device, "gene_ranking": flavor}, indent=2) + "\n")
        notes = [f"corpus: {data} ({len(ev.slides)} slides, {ev.n_spots:,} imaged spots)",
                 "stamp-con: adapter (halve, restore) + image projection trained per held-out slide (AdamW 1e-3, "
                 f"<= {opts.epochs} epochs, patience {opts.patience}); bleep: the frozen model; both query the "
                 f"training spots' embeddings (top-{opts.knn_k}, similarity-weighted)",
                 f"targets: log-CP10K of the top {Y.shape[1]} genes ranked by {flavor}"]
        return write_results(out, rows, title="stamp finetune --method adapter (STAMP_Con + BLEEP)", notes=notes,
                             marks={name: marks_of(enc)})


__all__ = ["AdapterOptions", "stamp_con", "train_adapter", "image_side_with_projection", "METHODS"]
