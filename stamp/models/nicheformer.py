"""Nicheformer (Tejada-Lapuerta, Schaar et al., Nat Methods 2025) as a gene encoder of the zoo.

Written from the authors' code (theislab/nicheformer: ``models/_nicheformer.py`` ``get_embeddings``,
``models/_utils.complete_masking``, ``data/dataset.py``, the tokenization notebooks), nothing copied:

* **vocabulary**: the 20,310 genes of the authors' ``model.h5ad``, in its order (the same genes in the
  same order as this project's ``stamp-v1`` vocabulary); corpus genes are matched by Ensembl id, genes
  outside it are dropped. Token of gene ``i`` = ``i + 30`` (30 reserved ids: 0 MASK, 1 PAD, 2 CLS ...).
* **input** of a spot (their ``sf_normalize`` + ``tokenize_data``): counts scaled to 10,000 in float32
  (``x * (10000 / total)``), divided by the technology mean of each gene (float64), nonzero genes ranked
  by that value, descending; ties (equal values) by vocabulary order. Technology means as the
  pretraining notebooks prepare them: NaN -> 0, rounded half up, 0 -> 1. Then the context tokens
  ``[specie, assay, modality]`` in front (their ``on_after_batch_transfer``), padded with PAD to, and cut
  at, ``context_length`` (1,500): 1,497 genes at most.
* **model**: token + learned position embeddings, post-norm ``nn.TransformerEncoderLayer`` blocks (ReLU,
  LayerNorm eps 1e-12); ``get_embeddings(layer=-1, with_context=False)``: the last layer averaged over
  positions 3..end INCLUDING padding (the authors' mean). This is the architecture and pooling of
  :class:`~stamp.models.gene_encoder.StampGeneEncoder` with ``pooling="released"`` (STAMP's gene encoder
  descends from Nicheformer's), so that class runs it: :func:`gene_encoder_config` gives its config.
* **weights**: the Lightning checkpoint's ``state_dict`` (``embeddings.weight`` with ``n_tokens + 5`` rows,
  ``positional_embedding.weight``, ``encoder.layers.N.*``; the ``encoder_layer`` template and the
  MLM / pooler / classification heads are not used) or the Hub copy (``model.safetensors``, the same
  names under ``nicheformer.``); :func:`released_state_dict` maps either. Sizes come from the
  checkpoint's ``hyper_parameters`` / the Hub ``config.json`` (the same field names).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import scipy.sparse as sp
import torch

from stamp.errors import ModelConfigError
from stamp.models.gene_encoder import StampConfig
from stamp.models.gene_inputs import CorpusGenes, CountInput

AUX_TOKENS = 30
PAD_TOKEN = 1
CONTEXT_TOKENS = ("specie", "assay", "modality")  # their order in front of the genes
# token ids of the authors' tokenization notebooks, their names lower-cased. Id 9 is "Xenium" in the Xenium
# notebooks (which tokenised Xenium panels with it) and "visium" in the others, get_embeddings.ipynb included;
# the authors ship no Visium technology-mean file (cosmx, dissociated, iss, merfish, xenium only).
MODALITY_TOKENS = {"dissociated": 3, "spatial": 4}
SPECIE_TOKENS = {"human": 5, "homo sapiens": 5, "mouse": 6, "mus musculus": 6}
ASSAY_TOKENS = {"merfish": 7, "cosmx": 8, "nanostring digital spatial profiling": 8, "xenium": 9, "visium": 9,
                "10x 5' v2": 10, "10x 3' v3": 11, "10x 3' v2": 12, "10x 5' v1": 13, "10x 3' v1": 14,
                "10x 3' transcription profiling": 15, "10x transcription profiling": 15,
                "10x 5' transcription profiling": 16, "cite-seq": 17, "smart-seq v4": 18}
REQUIRED_HPARAMS = ("dim_model", "nheads", "dim_feedforward", "nlayers", "n_tokens", "context_length")
UNUSED_PREFIXES = ("encoder_layer.", "classifier_head.", "pooler_head.", "cls_head.")


def gene_encoder_config(hparams: Mapping[str, Any], where: str) -> StampConfig:
    """The :class:`StampConfig` that runs a Nicheformer checkpoint, from its hyper-parameters (the
    Lightning ``hyper_parameters`` or the Hub ``config.json``)."""
    missing = [k for k in REQUIRED_HPARAMS if k not in hparams]
    if missing:
        raise ModelConfigError(f"{where}: the hyper-parameters lack {', '.join(missing)}; not a Nicheformer "
                               "checkpoint")
    for flag in CONTEXT_TOKENS:
        if hparams.get(flag, True) is not True:
            raise ModelConfigError(f"{where}: {flag} = {hparams.get(flag)!r}: only checkpoints trained with the "
                                   "specie, assay and modality tokens are supported (the released one is)")
    try:
        small = [k for k in REQUIRED_HPARAMS if int(hparams[k]) < 1]
        if small:
            raise ModelConfigError(f"{', '.join(small)} must be at least 1 (got "
                                   f"{', '.join(str(hparams[k]) for k in small)}); the checkpoint is corrupt")
        n_tokens = int(hparams["n_tokens"])
        return StampConfig(n_genes=n_tokens - AUX_TOKENS, n_reserved=AUX_TOKENS, hidden_size=int(hparams["dim_model"]),
                           intermediate_size=int(hparams["dim_feedforward"]), num_layers=int(hparams["nlayers"]),
                           num_heads=int(hparams["nheads"]), dropout=0.0, layer_norm_eps=1e-12,
                           context_length=int(hparams["context_length"]), activation="relu", pooling="released",
                           heads=False).validate()
    except (TypeError, ValueError) as exc:
        raise ModelConfigError(f"{where}: hyper-parameters are not whole numbers ({exc})") from None
    except ModelConfigError as exc:
        raise ModelConfigError(f"{where}: {exc}") from None


def sinusoid_table(length: int, dim: int) -> torch.Tensor:
    """The authors' fixed ``PositionalEncoding`` (``learnable_pe=False``) as a position table."""
    position = torch.arange(0, length, dtype=torch.float).unsqueeze(1)
    div = torch.exp(torch.arange(0, dim, 2).float() * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * div)
    table[:, 1::2] = torch.cos(position * div)
    return table


def released_state_dict(state: Mapping[str, Any], config: StampConfig,
                        learnable_pe: bool = True) -> tuple[dict[str, Any], list[str]]:
    """(tensors named for :class:`StampGeneEncoder`, released names not used by embeddings).

    ``nicheformer.`` (the Hub copy) and ``module.`` prefixes are stripped; ``embeddings.weight`` keeps its
    first ``n_tokens`` rows (the last 5 are never indexed: gene tokens stop at ``n_tokens - 1``); a
    checkpoint with fixed positions gets the sinusoid table."""
    keys = list(state)
    mapped, unused = {}, []
    for key in keys:
        name = key
        for prefix in ("module.", "nicheformer."):
            if name.startswith(prefix):
                name = name[len(prefix):]
        if name == "embeddings.weight":
            mapped[name] = state[key][: config.vocab_size] if state[key].shape[0] > config.vocab_size else state[key]
        elif name == "positional_embedding.weight" and learnable_pe:
            mapped[name] = state[key]
        elif name.startswith("encoder.layers."):
            mapped[name[len("encoder."):]] = state[key]
        elif name.startswith(UNUSED_PREFIXES) or name in ("pos", "positional_embedding.encoding"):
            unused.append(key)
        else:
            mapped[name] = state[key]  # unknown: the loader's strict check names it
    if not learnable_pe:
        mapped["positional_embedding.weight"] = sinusoid_table(config.context_length, config.hidden_size)
    return mapped, unused


def technology_means(means: np.ndarray) -> np.ndarray:
    """Divisors from a technology-mean vector, as the pretraining tokenization notebooks prepare them:
    NaN -> 0, rounded half up, 0 -> 1 (float64; negative values kept, as theirs)."""
    m = np.nan_to_num(np.asarray(means, dtype=np.float64))
    rounded = np.where(m % 1 >= 0.5, np.ceil(m), np.floor(m))
    return np.where(rounded == 0, 1.0, rounded)


class NicheformerInput(CountInput):
    """Nicheformer's input rules (module docstring): ``gene_ids`` is the model's vocabulary (Ensembl ids
    in token order), ``means`` the raw technology-mean vector, ``context`` the three token ids."""

    def __init__(self, gene_ids: Sequence[str], means: np.ndarray, *, context: Mapping[str, int],
                 context_length: int = 1500) -> None:
        super().__init__()
        self.gene_ids = [str(g) for g in gene_ids]
        means = np.asarray(means, dtype=np.float64).ravel()
        if means.shape[0] != len(self.gene_ids):
            raise ModelConfigError(f"the technology means have {means.shape[0]} values for {len(self.gene_ids)} "
                                   "genes; one per gene of the model's vocabulary, in its order")
        missing = [k for k in CONTEXT_TOKENS if k not in context]
        if missing:
            raise ModelConfigError(f"context tokens {', '.join(missing)} are not given")
        self.divisors = technology_means(means)
        self.context = [int(context[k]) for k in CONTEXT_TOKENS]
        if not all(0 <= t < AUX_TOKENS for t in self.context):
            raise ModelConfigError(f"context tokens {self.context} must lie in 0..{AUX_TOKENS - 1}")
        self.context_length = int(context_length)
        if self.context_length <= len(self.context):
            raise ModelConfigError(f"context_length {self.context_length} leaves no room for genes")
        self._index = {g: i for i, g in enumerate(self.gene_ids)}

    @property
    def model_genes(self) -> int:
        return len(self.gene_ids)

    def column_of(self, genes: CorpusGenes) -> np.ndarray:
        return np.array([self._index.get(g, -1) for g in genes.ensembl_ids], dtype=np.int64)

    def __call__(self, X: sp.csr_matrix, *, slide: Any = None) -> dict[str, torch.Tensor]:
        M = self.model_counts(X)  # spots x model genes, float32, columns ascending within each row
        totals = np.asarray(M.sum(axis=1, dtype=np.float64)).ravel().astype(np.float32)  # exact for counts < 2**24
        totals[totals == 0] = 1
        scale = np.float32(10000.0) / totals  # float32, as 10000. / counts of a float32 matrix
        ids = np.full((M.shape[0], self.context_length), PAD_TOKEN, dtype=np.int64)
        ids[:, : len(self.context)] = self.context
        n_genes = self.context_length - len(self.context)
        for i in range(M.shape[0]):
            a, b = M.indptr[i], M.indptr[i + 1]
            values = (M.data[a:b] * scale[i]).astype(np.float64) / self.divisors[M.indices[a:b]]
            nonzero = np.flatnonzero(values != 0)
            # value descending; equal values in vocabulary order (a stable sort of an ascending row)
            ranked = nonzero[np.argsort(-values[nonzero], kind="stable")][:n_genes]
            ids[i, len(self.context): len(self.context) + ranked.size] = M.indices[a:b][ranked] + AUX_TOKENS
        return {"input_ids": torch.from_numpy(ids)}

    def describe(self) -> dict[str, Any]:
        return {"match_by": self.key, "context_tokens": dict(zip(CONTEXT_TOKENS, self.context)),
                "context_length": self.context_length, "means": "technology means (NaN->0, half-up, 0->1)"}


__all__ = ["NicheformerInput", "gene_encoder_config", "released_state_dict", "technology_means", "sinusoid_table",
           "MODALITY_TOKENS", "SPECIE_TOKENS", "ASSAY_TOKENS", "CONTEXT_TOKENS", "AUX_TOKENS"]
