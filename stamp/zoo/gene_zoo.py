"""The gene models of the catalogue that ship in their authors' own file layout: scGPT (+ scGPT-spatial),
Nicheformer, Geneformer (libraries ``scgpt``, ``nicheformer``, ``geneformer``).

For each, :func:`load_gene_entry` does what the authors' loaders do, with this project's checks:

1. **files**: the entry's ``layout`` names each file's role and path; they come from the Hub repo (one
   file at a time, all at the commit of the first, which is recorded) or from ``--weights FOLDER``
   holding the authors' files as released (the repo's paths, or the bare file names in one folder);
   Nicheformer also takes its Lightning checkpoint file itself. Files with a ``checksums`` entry are
   compared with the release's sha256 when they come from the Hub (a mirror that changed is refused).
2. **sizes from those files**, as the authors' loaders take them: scGPT ``args.json`` + ``vocab.json``,
   Nicheformer the checkpoint's ``hyper_parameters`` (or the Hub ``config.json``), Geneformer
   ``config.json``; bounded (:mod:`stamp.safety`) and built on the ``meta`` device first.
3. **weights strictly**: pickled checkpoints only through ``torch.load(weights_only=True)``, Geneformer's
   dictionaries through a restricted unpickler; every tensor the model needs present with its shape,
   every other released tensor on the model's list of unused heads (a stray one is an error).
4. an :class:`~stamp.zoo.encoder.Encoder` with ``counts`` = the model's own input rules.

:func:`build_gene_model` builds an entry's architecture at the catalogue's (real) sizes on ``meta``.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stamp.errors import ModelConfigError, PretrainedError
from stamp.hub_access import download_file
from stamp.zoo.catalogue import GENE_LIBRARIES, ModelEntry
from stamp.zoo.encoder import Encoder, Provenance
from stamp.zoo.resolve import means_key, registered_means, weights_sha256

logger = logging.getLogger(__name__)
OPTIONAL_ROLES = {"scgpt": ("gene_stats",), "nicheformer": (), "geneformer": ("mapping",)}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # inside a Geneformer model folder, in this order


@dataclass
class ReleaseFiles:
    """Local paths of an entry's files (role -> path), where they came from, and the Hub commit."""

    paths: dict[str, Path]
    where: str
    revision: str | None = None
    from_hub: bool = False
    extra: dict[str, Path] = field(default_factory=dict)

    def get(self, role: str) -> Path | None:
        return self.paths.get(role)


# ----------------------------------------------------------------------------- files
def _snapshot_commit(path: Path) -> str | None:
    parts = path.parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None


def _hub_files(entry: ModelEntry, revision: str | None, token: str | None) -> ReleaseFiles:
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    if not entry.hub_id:
        raise PretrainedError(f"{entry.name} is not on the Hugging Face Hub: download its files from "
                              f"{entry.download_url} and pass --weights FOLDER (weights=FOLDER)")
    paths: dict[str, Path] = {}
    rev = revision
    optional = OPTIONAL_ROLES[entry.library]
    for role, rel in entry.layout.items():
        names = [f"{rel}/config.json"] if role == "model" else [rel]
        try:
            got = download_file(entry.hub_id, names[0], revision=rev, token=token, terms_url=entry.page)
        except PretrainedError as exc:
            missing = isinstance(exc.__context__, EntryNotFoundError) and \
                not isinstance(exc.__context__, LocalEntryNotFoundError)
            if role in optional and missing:
                continue
            raise
        rev = rev or _snapshot_commit(got)
        paths[role] = got
        if role == "model":  # a transformers folder: config.json + the first weights file it holds
            paths["model_weights"] = _first_hub_file(entry, [f"{rel}/{w}" for w in WEIGHT_FILES], rev, token)
            paths[role] = got.parent
    files = ReleaseFiles(paths, entry.hub_id, revision=rev, from_hub=True)
    _check_checksums(entry, files)
    return files


def _first_hub_file(entry: ModelEntry, names: list[str], revision: str | None, token: str | None) -> Path:
    from stamp.hub_access import first_file

    return first_file(entry.hub_id, names, revision=revision, token=token, terms_url=entry.page)


def _check_checksums(entry: ModelEntry, files: ReleaseFiles) -> None:
    by_path = {rel: files.paths.get(role) for role, rel in entry.layout.items()}
    for rel, expected in entry.checksums.items():
        path = by_path.get(rel)
        if path is None or not path.is_file():
            continue
        got = weights_sha256(path)
        if got != expected:
            raise PretrainedError(f"{entry.hub_id}: {rel} has sha256 {got}, not the release's {expected}; the repo no "
                                  f"longer holds the authors' file. Download it from {entry.download_url or entry.page} "
                                  "and pass --weights FOLDER")


def _local_files(entry: ModelEntry, weights: str | os.PathLike) -> ReleaseFiles:
    """A folder (or a file inside it) holding the authors' files: the repo's paths or the bare names."""
    given = Path(weights).expanduser()
    if not given.exists():
        raise PretrainedError(f"{given}: no such file or folder; download {entry.name}'s files from "
                              f"{entry.download_url or entry.page} and pass their folder")
    if entry.library == "nicheformer" and given.is_file() and given.suffix in (".ckpt", ".pt", ".pth"):
        return ReleaseFiles({"checkpoint": given}, str(given))  # the authors' Lightning checkpoint itself
    folder = given if given.is_dir() else given.parent
    paths: dict[str, Path] = {}
    for role, rel in entry.layout.items():
        for candidate in (folder / rel, folder / Path(rel).name):
            if role == "model" and candidate.is_dir() and (candidate / "config.json").is_file():
                paths[role] = candidate
                break
            if role != "model" and candidate.is_file():
                paths[role] = candidate
                break
        else:
            if role == "model" and (folder / "config.json").is_file():
                paths[role] = folder
    if entry.library == "nicheformer" and "weights" not in paths:
        ckpts = sorted(folder.glob("*.ckpt"))
        if ckpts:
            return ReleaseFiles({"checkpoint": ckpts[0]}, str(ckpts[0]))
    if "model" in paths:
        weights_file = next((paths["model"] / w for w in WEIGHT_FILES if (paths["model"] / w).is_file()), None)
        if weights_file is None:
            raise PretrainedError(f"{paths['model']}: holds config.json but none of {', '.join(WEIGHT_FILES)}")
        paths["model_weights"] = weights_file
    missing = [f"{role} ({rel})" for role, rel in entry.layout.items()
               if role not in paths and role not in OPTIONAL_ROLES[entry.library]]
    if missing:
        raise PretrainedError(f"{folder}: lacks {', '.join(missing)}; pass the folder of {entry.name}'s files as "
                              f"released ({entry.download_url or entry.page})")
    return ReleaseFiles(paths, str(folder))


def release_files(entry: ModelEntry, *, weights: str | os.PathLike | None = None, revision: str | None = None,
                  token: str | None = None) -> ReleaseFiles:
    """The entry's files: from ``weights`` (a folder, or Nicheformer's checkpoint file) or the Hub."""
    return _local_files(entry, weights) if weights is not None else _hub_files(entry, revision, token)


# ----------------------------------------------------------------------------- weights
def _state_dict(path: Path) -> dict:
    """Tensors of a weights file: safetensors, or a weights-only torch pickle (a ``state_dict`` /
    ``model`` wrapper is unwrapped)."""
    from stamp.safety import load_torch_weights

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        from stamp.safety import safetensors_shapes

        safetensors_shapes(path)  # a pickle named .safetensors: one line
        return load_file(str(path))
    state = load_torch_weights(path)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise ModelConfigError(f"{path}: not a state dict (name -> tensor)")
    return state


def _load_strict(module, mapped: dict, unused: list[str], where: str):
    """``mapped`` must hold exactly the module's tensors with their shapes (built on meta: assigned)."""
    from stamp.safety import check_shapes, fit_state, meta_shapes

    check_shapes(meta_shapes(module), {k: tuple(v.shape) for k, v in mapped.items()}, where)
    mapped = fit_state(mapped, module.state_dict(), where)  # int8 refused, fp16 cast, NaN refused
    module.load_state_dict(mapped, strict=True, assign=True)
    logger.info("%s: %d tensors loaded, %d released tensors not used by embeddings", where, len(mapped), len(unused))
    return module.eval()


def _meta(build):
    import torch

    from stamp.safety import check_parameter_count

    with torch.device("meta"):
        module = build()
    check_parameter_count(sum(p.numel() for p in module.parameters()), "the release's sizes")
    return module


# ----------------------------------------------------------------------------- the three families
def _scgpt(entry: ModelEntry, files: ReleaseFiles) -> tuple[Any, Any, dict]:
    import numpy as np
    import pandas as pd

    from stamp.models.scgpt import ScGPTConfig, ScGPTInput, ScGPTModel, read_gene_means, read_vocab, \
        released_state_dict
    from stamp.safety import read_json_config

    args = read_json_config(files.paths["args"])
    vocab_path = files.paths["vocab"]
    try:
        vocab = read_vocab(json.loads(vocab_path.read_text()), str(vocab_path))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelConfigError(f"{vocab_path}: not a JSON vocabulary ({exc})") from None
    pad_token = str(args.get("pad_token", "<pad>"))
    if pad_token not in vocab:
        raise ModelConfigError(f"{files.paths['args']}: pad_token {pad_token!r} is not in {vocab_path.name}")
    try:
        pad_value = float(args.get("pad_value", -2))
    except (TypeError, ValueError):
        pad_value = float("nan")
    if not np.isfinite(pad_value):
        raise ModelConfigError(f"{files.paths['args']}: pad_value {args.get('pad_value')!r} is not a number (scGPT "
                               "releases have -2)")
    config = ScGPTConfig.from_args(args, ntoken=len(vocab), pad_token_id=vocab[pad_token],
                                   where=str(files.paths["args"]))
    model = _meta(lambda: ScGPTModel(config))
    mapped, unused = released_state_dict(_state_dict(files.paths["weights"]))
    model = _load_strict(model, mapped, unused, f"{files.where} ({files.paths['weights'].name})")
    gene_means = None
    if "gene_stats" in entry.layout:
        stats = files.get("gene_stats")
        if stats is None:
            raise PretrainedError(f"{files.where}: lacks {entry.layout['gene_stats']}, the gene statistics "
                                  f"{entry.name} normalises with; download the whole release folder")
        try:
            table = pd.read_csv(stats, index_col=0)
        except (ValueError, OSError, UnicodeDecodeError) as exc:
            raise ModelConfigError(f"{stats}: not a CSV table ({exc})") from None
        gene_means = read_gene_means(table, len(vocab), str(stats))
    tok = entry.tokenizer
    inputs = ScGPTInput(vocab, pad_value=pad_value, pad_token=pad_token,
                        max_length=int(tok.get("max_length", 1200)), n_bins=int(tok.get("n_bins", 51)),
                        seed=int(tok.get("seed", 0)), gene_means=gene_means)
    return model, inputs, {"weights": files.paths["weights"], "dim": config.embsize, "unused": len(unused)}


def _nicheformer_means(entry: ModelEntry, means: Any, n_genes: int):
    from stamp.tokenizer import load_means_file

    path = means if means is not None else registered_means(means_key(entry))
    if path is None:
        raise PretrainedError(f"{entry.name} divides by a technology-mean file, which is not in its Hub repo: run "
                              f"`stamp models set-means {means_key(entry)} FILE` once, or pass --means FILE "
                              f"(means=...): {entry.tokenizer.get('means', '')}")
    return load_means_file(path, n_genes), Path(path)


def _nicheformer(entry: ModelEntry, files: ReleaseFiles, means: Any) -> tuple[Any, Any, dict]:
    from stamp.models.gene_encoder import StampGeneEncoder
    from stamp.models.nicheformer import ASSAY_TOKENS, MODALITY_TOKENS, SPECIE_TOKENS, NicheformerInput, \
        gene_encoder_config, released_state_dict
    from stamp.safety import check_config_sizes, load_torch_weights, read_json_config
    from stamp.zoo.catalogue import vocabulary

    if "checkpoint" in files.paths:  # the authors' Lightning checkpoint: weights + hyper_parameters
        path = files.paths["checkpoint"]
        ckpt = load_torch_weights(path)
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict) \
                or not isinstance(ckpt.get("hyper_parameters"), dict):
            raise ModelConfigError(f"{path}: not a Lightning checkpoint (no state_dict / hyper_parameters)")
        hparams, state = ckpt["hyper_parameters"], ckpt["state_dict"]
        check_config_sizes(hparams, str(path))
    else:
        path = files.paths["weights"]
        hparams, state = read_json_config(files.paths["config"]), _state_dict(path)
    config = gene_encoder_config(hparams, str(path))
    gene_ids, _ = vocabulary(entry.tokenizer["vocabulary"])
    if config.n_genes != len(gene_ids):
        raise ModelConfigError(f"{path}: n_tokens {config.vocab_size} is {config.n_genes} genes + 30, but the "
                               f"vocabulary {entry.tokenizer['vocabulary']!r} has {len(gene_ids)}")
    model = _meta(lambda: StampGeneEncoder(config))
    mapped, unused = released_state_dict(state, config, bool(hparams.get("learnable_pe", True)))
    model = _load_strict(model, mapped, unused, f"{files.where} ({path.name})")
    values, means_path = _nicheformer_means(entry, means, len(gene_ids))
    names = entry.tokenizer.get("context", {})
    tables = {"specie": SPECIE_TOKENS, "assay": ASSAY_TOKENS, "modality": MODALITY_TOKENS}
    try:
        context = {k: tables[k][str(names[k]).lower()] for k in tables}
    except KeyError as exc:
        raise PretrainedError(f"{entry.origin}: entry {entry.name!r}: tokenizer.context needs specie, assay and "
                              f"modality named as in Nicheformer's tokenization ({exc})") from None
    inputs = NicheformerInput(gene_ids, values, context=context, context_length=config.context_length)
    return model, inputs, {"weights": path, "dim": config.hidden_size, "unused": len(unused),
                           "means_sha256": weights_sha256(means_path),
                           "embed": lambda batch: model.embed(batch["input_ids"])}


def _geneformer_dictionaries(files: ReleaseFiles) -> tuple[dict, dict, dict | None]:
    from stamp.models.geneformer import check_dictionary
    from stamp.safety import load_plain_pickle

    def read(role: str, kind: type | tuple) -> dict | None:
        path = files.get(role)
        return None if path is None else check_dictionary(load_plain_pickle(path), role, str(path), kind)

    mapping = files.get("mapping")
    raw = None if mapping is None else load_plain_pickle(mapping)
    if raw is not None and (not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw)):
        raise ModelConfigError(f"{mapping}: the mapping dictionary must map Ensembl ids to Ensembl ids")
    return read("tokens", int), read("medians", (int, float)), raw


def _geneformer(entry: ModelEntry, files: ReleaseFiles) -> tuple[Any, Any, dict]:
    import torch

    from stamp.models.geneformer import GeneformerConfig, GeneformerInput, GeneformerModel, released_state_dict
    from stamp.safety import check_shapes, fit_state, meta_shapes, read_json_config

    bert = read_json_config(files.paths["model"] / "config.json")
    tokens, medians, mapping = _geneformer_dictionaries(files)
    special = "<cls>" in tokens and "<eos>" in tokens
    if entry.tokenizer.get("special_tokens") is not None and bool(entry.tokenizer["special_tokens"]) != special:
        raise ModelConfigError(f"{files.paths['tokens']}: the token dictionary {'has' if special else 'lacks'} "
                               f"<cls>/<eos> but {entry.name} expects {'V2' if not special else 'V1'} dictionaries; "
                               "the model and dictionary files do not belong together")
    config = GeneformerConfig(bert=bert, emb_layer=int(entry.architecture.get("emb_layer", -1)), pooling=entry.pooling,
                              pad_token_id=int(tokens["<pad>"]), cls_token_id=tokens.get("<cls>") if special else None,
                              eos_token_id=tokens.get("<eos>") if special else None)
    if int(bert.get("vocab_size", 0)) <= max(tokens.values()):
        raise ModelConfigError(f"{files.paths['tokens']}: token ids reach {max(tokens.values())} but the model has "
                               f"{bert.get('vocab_size')} embeddings; the model and dictionary files do not belong "
                               "together")
    try:  # transformers' own checks (heads dividing the width ...) raise bare errors
        _meta(lambda: GeneformerModel(config, full=True))
    except (ValueError, ZeroDivisionError) as exc:
        raise ModelConfigError(f"{files.paths['model'] / 'config.json'}: not a buildable BERT config "
                               f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); fix or re-download "
                               "it") from None
    weights = files.paths["model_weights"]
    mapped, unused = released_state_dict(_state_dict(weights), config)
    expected = meta_shapes(_meta(lambda: GeneformerModel(config)).bert)
    where = f"{files.where} ({weights.name})"
    check_shapes(expected, {k: tuple(v.shape) for k, v in mapped.items()}, where)
    with torch.random.fork_rng(devices=[]):  # real build (BERT's non-persistent buffers), then the weights
        model = GeneformerModel(config)
    model.bert.load_state_dict(fit_state(mapped, model.bert.state_dict(), where), strict=True)
    try:
        inputs = GeneformerInput(tokens, medians, input_size=int(bert["max_position_embeddings"]), mapping=mapping,
                                 special_tokens=special)
    except ModelConfigError as exc:
        raise ModelConfigError(f"{files.where}: {exc}") from None
    return model.eval(), inputs, {"weights": weights, "dim": int(bert["hidden_size"]), "unused": len(unused)}


def load_gene_entry(entry: ModelEntry, *, weights: str | os.PathLike | None = None, revision: str | None = None,
                    token: str | None = None, means: Any = None, source: str | None = None) -> Encoder:
    """A ``scgpt`` / ``nicheformer`` / ``geneformer`` catalogue entry as a gene :class:`Encoder` (CPU, eval)."""
    if entry.library not in GENE_LIBRARIES:
        raise ModelConfigError(f"{entry.name}: library {entry.library!r} is not a gene model with its own files")
    files = release_files(entry, weights=weights, revision=revision, token=token)
    if entry.library == "scgpt":
        model, inputs, info = _scgpt(entry, files)
    elif entry.library == "nicheformer":
        model, inputs, info = _nicheformer(entry, files, means)
    else:
        model, inputs, info = _geneformer(entry, files)
    sha = weights_sha256(info["weights"])
    if not files.from_hub and entry.checksums.get(entry.layout.get("weights", "")) not in (None, sha):
        logger.warning("%s: %s is not the authors' release (sha256 %s); loaded as given", entry.name,
                       info["weights"].name, sha)
    extra = {"library": entry.library, "pooling": entry.pooling, "inputs": inputs.describe(),
             "unused_tensors": info["unused"]}
    if info.get("means_sha256"):
        extra["means_sha256"] = info["means_sha256"]
    prov = Provenance(name=entry.name, source=source or entry.name, hub_id=entry.hub_id, revision=files.revision,
                      license=entry.license_name or entry.license, commercial=entry.commercial, weights_sha256=sha,
                      extra=extra)
    return Encoder(model, kind="gene", embed_dim=info["dim"], provenance=prov, counts=inputs,
                   gene_fn=info.get("embed") or (lambda batch: model.embed(batch))).eval()


# ----------------------------------------------------------------------------- real sizes, on meta
def build_gene_model(entry: ModelEntry):
    """The entry's architecture at the catalogue's sizes on the ``meta`` device (every released layer):
    what the parameter count of the catalogue is checked against."""
    a = entry.architecture
    if entry.library == "scgpt":
        from stamp.models.scgpt import ScGPTConfig, ScGPTModel

        config = ScGPTConfig(ntoken=a["ntoken"], embsize=a["embsize"], nheads=a["nheads"], d_hid=a["d_hid"],
                             nlayers=a["nlayers"], pad_token_id=a.get("pad_token_id", 0))
        return _meta(lambda: ScGPTModel(config))
    if entry.library == "nicheformer":
        from stamp.models.gene_encoder import StampGeneEncoder
        from stamp.models.nicheformer import gene_encoder_config

        return _meta(lambda: StampGeneEncoder(gene_encoder_config(a, entry.name)))
    if entry.library == "geneformer":
        from stamp.models.geneformer import GeneformerConfig, GeneformerModel

        config = GeneformerConfig(bert=a["config"], emb_layer=a.get("emb_layer", -1), pooling=entry.pooling,
                                  cls_token_id=0 if entry.pooling == "cls" else None)
        return _meta(lambda: GeneformerModel(config, full=True))
    raise ModelConfigError(f"{entry.name}: library {entry.library!r} is not a gene model with its own files")


__all__ = ["load_gene_entry", "build_gene_model", "release_files", "ReleaseFiles"]
