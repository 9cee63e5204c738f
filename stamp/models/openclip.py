"""open_clip models (CLIP, CoCa) of the zoo as plain modules, built by open_clip itself from a checked config.

open_clip (``open_clip_torch``, a dependency) builds the towers; this module only decides what of its
configuration may be trusted, which class a configuration means, and what a model's output is:

* :func:`check_model_config` -- an ``open_clip_config.json`` ``model_cfg`` is data from someone else:
  only architecture keys pass (open_clip's own ``CLIPVisionCfg`` / ``CLIPTextCfg`` / ``MultimodalCfg``
  fields), never a key that makes open_clip download or import something (``timm_model_name``,
  ``hf_model_name``, ``hf_tokenizer_name``, layer keyword dicts), every size bounded;
* :func:`build_model` -- ``CLIP``, ``CustomTextCLIP`` or ``CoCa``, as open_clip's factory picks them
  (``custom_text`` / ``multimodal_cfg``), on the ``meta`` device unless told;
* :class:`OpenClipImageEncoder` -- the image tower alone: ``visual(pixels)`` = open_clip's
  ``encode_image(pixels, normalize=False)``;
* :class:`OpenClipAlignedModel` -- image and text towers in one space (OmiCLIP): ``encode_image`` /
  ``encode_text``, and ``embed_genes`` for a spot's "gene sentence" (:class:`GeneSentenceInput`);
* :func:`preprocessing` -- open_clip's eval transform (resize the shorter side, centre crop, mean/std)
  as this project's preprocessing fields.

Nothing here knows a model name; the zoo (:mod:`stamp.zoo.factory`) builds these from catalogue entries.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from stamp.errors import ModelConfigError
from stamp.models.gene_inputs import CorpusGenes, CountInput

CONFIG_FILE = "open_clip_config.json"
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
MODEL_KEYS = frozenset({"embed_dim", "vision_cfg", "text_cfg", "multimodal_cfg", "quick_gelu", "custom_text",
                        "init_logit_scale", "init_logit_bias", "nonscalar_logit_scale"})
# keys that make open_clip fetch weights, import a model by name or pass keyword dicts to layers
REFUSED_KEYS = frozenset({"timm_model_name", "timm_model_pretrained", "timm_pool", "timm_proj", "timm_proj_bias",
                          "timm_drop", "timm_drop_path", "hf_model_name", "hf_model_pretrained", "hf_proj_type",
                          "hf_pooler_type", "hf_tokenizer_name", "tokenizer_mode", "tokenizer_kwargs", "act_kwargs",
                          "norm_kwargs"})
EXTRA_BOUNDS = {"heads": 1024, "head_width": 32768, "attn_pooler_queries": 4096, "attn_pooler_heads": 1024,
                "n_queries": 4096, "dim_head": 32768}
RESIZE_MODES = ("shortest",)


def _cfg_fields() -> dict[str, set[str]]:
    from open_clip.coca_model import MultimodalCfg
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    return {"vision_cfg": {f.name for f in dataclasses.fields(CLIPVisionCfg)},
            "text_cfg": {f.name for f in dataclasses.fields(CLIPTextCfg)},
            "multimodal_cfg": {f.name for f in dataclasses.fields(MultimodalCfg)}}


def _plain(value: Any) -> bool:
    if isinstance(value, (str, int, float, bool, type(None))):
        return True
    return isinstance(value, list) and len(value) <= 64 and all(isinstance(v, (int, float)) for v in value)


def check_model_config(model_cfg: Any, where: str) -> dict:
    """A checked copy of an open_clip ``model_cfg`` (one :class:`ModelConfigError` line naming ``where``)."""
    from stamp.safety import check_config_sizes

    if not isinstance(model_cfg, Mapping):
        raise ModelConfigError(f"{where}: model_cfg must be a JSON object (open_clip's model configuration)")
    unknown = sorted(set(model_cfg) - MODEL_KEYS)
    if unknown:
        raise ModelConfigError(f"{where}: model_cfg keys {unknown} are not open_clip architecture keys stamp reads; "
                               f"allowed: {', '.join(sorted(MODEL_KEYS))}")
    for part in ("vision_cfg", "text_cfg"):
        if not isinstance(model_cfg.get(part), Mapping):
            raise ModelConfigError(f"{where}: model_cfg.{part} must be an object")
    allowed = _cfg_fields()
    out: dict[str, Any] = {}
    for key, value in model_cfg.items():
        if key in allowed:
            if not isinstance(value, Mapping):
                raise ModelConfigError(f"{where}: model_cfg.{key} must be an object")
            sub = {}
            for k, v in value.items():
                if k in REFUSED_KEYS and v not in (None, False, {}, ""):
                    raise ModelConfigError(f"{where}: model_cfg.{key}.{k} = {v!r} would make open_clip fetch or "
                                           "import another model; stamp builds only plain open_clip towers")
                if k in REFUSED_KEYS:
                    continue
                if k not in allowed[key]:
                    raise ModelConfigError(f"{where}: model_cfg.{key}.{k} is not an open_clip {key} field")
                if not _plain(v):
                    raise ModelConfigError(f"{where}: model_cfg.{key}.{k} = {v!r} must be a plain JSON value")
                if k in EXTRA_BOUNDS and v is not None and (isinstance(v, bool) or not isinstance(v, int)
                                                            or not 0 < v <= EXTRA_BOUNDS[k]):
                    raise ModelConfigError(f"{where}: model_cfg.{key}.{k} = {v!r} is outside 1..{EXTRA_BOUNDS[k]:,}")
                sub[k] = v
            out[key] = sub
        else:
            if not _plain(value):
                raise ModelConfigError(f"{where}: model_cfg.{key} = {value!r} must be a plain JSON value")
            out[key] = value
    check_config_sizes(out, where)
    return out


def model_class(model_cfg: Mapping[str, Any]):
    """The open_clip class a configuration means (open_clip's own rule)."""
    import open_clip

    if model_cfg.get("custom_text"):
        return open_clip.CoCa if "multimodal_cfg" in model_cfg else open_clip.CustomTextCLIP
    if "multimodal_cfg" in model_cfg:
        raise ModelConfigError("an open_clip multimodal_cfg (CoCa) needs custom_text: true")
    return open_clip.CLIP


def build_model(model_cfg: Mapping[str, Any], where: str, *, meta: bool = True) -> nn.Module:
    """The whole open_clip model of a checked configuration (:func:`check_model_config`)."""
    cfg = {k: v for k, v in model_cfg.items() if k != "custom_text"}
    cls = model_class(model_cfg)
    try:
        if meta:
            with torch.device("meta"):
                return cls(**cfg)
        return cls(**cfg)
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        raise ModelConfigError(f"{where}: open_clip cannot build {cls.__name__} from this configuration "
                               f"({type(exc).__name__}: {str(exc)[:160]})") from None


def materialize_masks(module: nn.Module) -> None:
    """Rebuild the causal ``attn_mask`` buffers a meta build leaves empty (open_clip registers them as
    non-persistent: they are not in any weights file)."""
    for sub in module.modules():
        mask = getattr(sub, "attn_mask", None)
        if isinstance(mask, torch.Tensor) and mask.is_meta and hasattr(sub, "build_causal_mask"):
            sub.register_buffer("attn_mask", sub.build_causal_mask().to("cpu"), persistent=False)


def image_size(model_cfg: Mapping[str, Any]) -> int:
    size = model_cfg.get("vision_cfg", {}).get("image_size", 224)
    if isinstance(size, list):
        if len(size) != 2 or size[0] != size[1]:
            raise ModelConfigError(f"open_clip image_size {size} is not square; stamp feeds square tiles")
        size = size[0]
    return int(size)


def preprocessing(model_cfg: Mapping[str, Any], preprocess_cfg: Mapping[str, Any] | None, default: Mapping[str, Any],
                  where: str) -> dict:
    """This project's preprocessing fields for an open_clip model: ``default`` (the catalogue entry's), with
    the repo's ``preprocess_cfg`` (mean, std, interpolation) when it has one; size = the tower's input."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    pre = {"interpolation": "bicubic", "mean": list(OPENAI_DATASET_MEAN), "std": list(OPENAI_DATASET_STD),
           **dict(default or {})}
    theirs = dict(preprocess_cfg or {})
    mode = theirs.get("resize_mode", "shortest")
    if mode not in RESIZE_MODES:
        raise ModelConfigError(f"{where}: preprocess_cfg.resize_mode {mode!r}: stamp resizes the shorter side and "
                               "centre-crops (open_clip's 'shortest') only")
    for key in ("mean", "std", "interpolation"):
        if key in theirs:
            pre[key] = list(theirs[key]) if key != "interpolation" else theirs[key]
    size = image_size(model_cfg)
    pre["resize"], pre["crop"] = size, size
    return pre


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


class OpenClipImageEncoder(nn.Module):
    """An open_clip image tower; ``forward(pixels)`` = open_clip's ``encode_image(pixels, normalize=False)``."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return _first(self.visual(pixels))


class OpenClipAlignedModel(nn.Module):
    """An open_clip model with its image and text towers (the captioning decoder of a CoCa dropped).

    ``encode_image`` / ``encode_text`` are open_clip's (``normalize`` as asked); ``image_features`` /
    ``embed_genes`` are the unnormalised outputs the zoo's consumers read (a gene batch is the dict of
    :class:`GeneSentenceInput`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if getattr(model, "text_decoder", None) is not None:
            model.text_decoder = None  # captioning only; its tensors are checked at load, then freed
        self.model = model

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.model.encode_image(pixels, normalize=normalize)

    def encode_text(self, ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.model.encode_text(ids, normalize=normalize)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encode_image(pixels.to(self.device))

    def embed_genes(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.encode_text(batch["text"].to(self.device))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image_features(pixels)


class GeneSentenceInput(CountInput):
    """A spot as a "gene sentence" (OmiCLIP / Loki): the symbols of its ``top_k`` most expressed genes,
    highest first, space-separated, tokenized by open_clip's tokenizer of the model's text context.

    As Loki's ``generate_gene_df``: genes whose symbol contains one of ``skip_chars`` ('.' and '-') and
    the ``exclude`` symbols (Loki drops an MSigDB housekeeping list, not shipped here) are left out;
    ties in count keep the gene that comes first in the corpus. Genes are matched by symbol."""

    key = "symbol"

    def __init__(self, context_length: int, *, top_k: int = 50, skip_chars: Sequence[str] = (".", "-"),
                 exclude: Sequence[str] = ()) -> None:
        super().__init__()
        if not 0 < int(top_k) <= 100_000 or not 0 < int(context_length) <= 100_000:
            raise ModelConfigError(f"gene sentence: top_k {top_k} / context {context_length} out of range")
        self.context_length = int(context_length)
        self.top_k = int(top_k)
        self.skip_chars = tuple(skip_chars)
        self.exclude = frozenset(str(s) for s in exclude)
        self.symbols: np.ndarray | None = None
        self._n_genes = 0
        self._tokenizer = None

    @property
    def model_genes(self) -> int:
        return self._n_genes

    def column_of(self, genes: CorpusGenes) -> np.ndarray:
        self._n_genes = len(genes)
        self.symbols = np.asarray(genes.symbols, dtype=object)
        keep = [bool(s) and not any(c in s for c in self.skip_chars) and s not in self.exclude for s in genes.symbols]
        return np.where(keep, np.arange(len(genes)), -1)

    def sentences(self, X: sp.csr_matrix) -> list[str]:
        """The gene sentence of every row of raw counts (spots x corpus genes)."""
        X = self.model_counts(X)
        out = []
        for i in range(X.shape[0]):
            start, end = X.indptr[i], X.indptr[i + 1]
            cols, vals = X.indices[start:end], X.data[start:end]
            keep = vals > 0
            cols, vals = cols[keep], vals[keep]
            order = np.lexsort((cols, -vals))[: self.top_k]  # highest first, ties: corpus order
            out.append(" ".join(self.symbols[cols[order]].tolist()))
        return out

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        if self._tokenizer is None:
            from open_clip.tokenizer import SimpleTokenizer

            self._tokenizer = SimpleTokenizer(context_length=self.context_length)
        return self._tokenizer(texts, context_length=self.context_length)

    def __call__(self, X: sp.csr_matrix, *, slide: Any = None) -> dict[str, Any]:
        return {"text": self.tokenize(self.sentences(X))}

    def describe(self) -> dict[str, Any]:
        return {"rule": "gene-sentence", "top_k": self.top_k, "skip_chars": list(self.skip_chars),
                "excluded_symbols": len(self.exclude), "context_length": self.context_length, "key": self.key}


__all__ = ["check_model_config", "model_class", "build_model", "materialize_masks", "preprocessing", "image_size",
           "OpenClipImageEncoder", "OpenClipAlignedModel", "GeneSentenceInput", "CONFIG_FILE", "WEIGHT_FILES"]
