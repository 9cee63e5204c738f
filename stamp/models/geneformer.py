"""Geneformer (Theodoris et al., Nature 2023; V2: Chen et al., 2024) as a gene encoder of the zoo.

Written from the authors' code (ctheodoris/Geneformer: ``tokenizer.TranscriptomeTokenizer``,
``emb_extractor.EmbExtractor`` / ``get_embs``, ``perturber_utils``), nothing copied:

* **dictionaries** (pickles, read with :func:`stamp.safety.load_plain_pickle`): ``token_dictionary``
  (Ensembl id -> token; ``<pad>``, ``<mask>``, and for V2 ``<cls>`` / ``<eos>``),
  ``gene_median_dictionary`` (Ensembl id -> nonzero median of normalised expression over Genecorpus),
  ``ensembl_mapping_dict`` (Ensembl id -> the id it is collapsed to; counts of genes collapsed onto one
  id are summed; without it, ids map to themselves).
* **input** of a spot (rank value encoding): ``counts / total * 10,000 / median`` (float64) of its
  genes in the token dictionary (total = the spot's total count, ``n_counts`` in their code), nonzero
  ones ranked descending (``np.argsort(-values)``, their sort, so ties fall alike), cut to the
  model's input size (``max_position_embeddings``: 2,048 V1, 4,096 V2); V2 dictionaries (with
  ``<cls>``/``<eos>``): ``<cls>`` + the first ``input_size - 2`` genes + ``<eos>``.
* **model**: ``transformers`` BERT (``BertForMaskedLM`` weights under ``bert.``); the embedding is
  EmbExtractor's default: layer ``emb_layer=-1`` = the output of the second-to-last layer (the last
  one is not even run), ``emb_mode="cls"`` (the ``<cls>`` state) for V2 and, as EmbExtractor switches
  V1 to ``"cell"``, the mean over the non-padding gene tokens (``<cls>``/``<eos>`` excluded) for V1.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from stamp.errors import ModelConfigError
from stamp.models.gene_inputs import CorpusGenes, CountInput, pad_rows

POOLINGS = ("cls", "mean")
BERT_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
               "type_vocab_size", "initializer_range", "layer_norm_eps", "pad_token_id", "position_embedding_type")
SPECIAL = ("<pad>", "<mask>", "<cls>", "<eos>")


@dataclass
class GeneformerConfig:
    """``bert``: the BERT sizes of the release's ``config.json``; ``emb_layer``: -1 (second-to-last layer,
    EmbExtractor's default) or 0 (last); ``pooling``: ``cls`` or ``mean`` (non-padding gene tokens);
    ``cls_token_id`` / ``eos_token_id``: present in V2 dictionaries (None for V1)."""

    bert: dict = field(default_factory=dict)
    emb_layer: int = -1
    pooling: str = "cls"
    pad_token_id: int = 0
    cls_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ModelConfigError(f"Geneformer pooling {self.pooling!r} must be one of {', '.join(POOLINGS)}")
        if self.emb_layer not in (-1, 0):
            raise ModelConfigError(f"Geneformer emb_layer {self.emb_layer} must be -1 (second-to-last) or 0 (last)")
        if self.pooling == "cls" and self.cls_token_id is None:
            raise ModelConfigError("pooling 'cls' needs a <cls> token (a V2 token dictionary); V1 models use 'mean'")

    @property
    def layers_run(self) -> int:
        """Transformer layers the embedding needs: all but the last for ``emb_layer=-1``."""
        return int(self.bert["num_hidden_layers"]) + self.emb_layer

    def bert_config(self, layers: int | None = None):
        from transformers import BertConfig

        data = {k: v for k, v in self.bert.items() if k in BERT_FIELDS}
        if layers is not None:
            data["num_hidden_layers"] = layers
        try:
            return BertConfig(**data)
        except (TypeError, ValueError) as exc:
            raise ModelConfigError(f"not a BERT config ({exc})") from None

    def to_dict(self) -> dict:
        return asdict(self)


class GeneformerModel(nn.Module):
    """BERT run up to the extracted layer; :meth:`embed` pools it as EmbExtractor does.

    ``full=True`` builds every layer (the released architecture, for parameter counts)."""

    def __init__(self, config: GeneformerConfig, *, full: bool = False) -> None:
        super().__init__()
        from transformers import BertModel

        self.config = config
        self.bert = BertModel(config.bert_config(None if full else config.layers_run), add_pooling_layer=False)

    @property
    def device(self) -> torch.device:
        return self.bert.embeddings.word_embeddings.weight.device

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        input_ids = input_ids.to(self.device, torch.long)
        positions = torch.arange(input_ids.shape[1], device=self.device)
        mask = (positions[None, :] < lengths.to(self.device)[:, None]).long()
        return self.bert(input_ids=input_ids, attention_mask=mask).last_hidden_state

    @torch.no_grad()
    def embed(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.forward(batch["input_ids"], batch["lengths"]).float()
        c = self.config
        if c.pooling == "cls":
            return hidden[:, 0]
        lengths = batch["lengths"].to(hidden.device)
        first = 1 if c.cls_token_id is not None else 0  # mean over gene tokens: <cls>, <eos> excluded
        n = lengths - first - (1 if c.eos_token_id is not None else 0)
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        keep = (positions[None, :] >= first) & (positions[None, :] < (first + n)[:, None])
        total = (hidden * keep.unsqueeze(-1)).sum(dim=1)
        return total / n.clamp(min=1).unsqueeze(-1).float()


def released_state_dict(state: Mapping[str, Any], config: GeneformerConfig) -> tuple[dict[str, Any], list[str]]:
    """(``BertModel`` tensors of the layers run, released names not used): ``bert.`` stripped; the MLM head
    (``cls.predictions.*``), a pooler and the layers after the extracted one are not used."""
    run = config.layers_run
    mapped, unused = {}, []
    for key in state:
        name = key[len("bert."):] if key.startswith("bert.") else key
        if key.startswith("cls.") or name.startswith("pooler."):
            unused.append(key)
            continue
        if name.startswith("encoder.layer."):
            if int(name.split(".")[2]) >= run:
                unused.append(key)
                continue
        mapped[name] = state[key]
    return mapped, unused


def check_dictionary(data: Any, name: str, where: str, value_type: type) -> dict:
    if not isinstance(data, dict) or not data:
        raise ModelConfigError(f"{where}: {name} is not a non-empty dictionary")
    bad = next(((k, v) for k, v in data.items() if not isinstance(k, str) or isinstance(v, bool)
                or not isinstance(v, value_type)), None)
    if bad is not None:
        raise ModelConfigError(f"{where}: {name} maps {bad[0]!r} to {bad[1]!r}; expected str -> "
                               f"{value_type.__name__ if isinstance(value_type, type) else 'number'}")
    return data


class GeneformerInput(CountInput):
    """Geneformer's rank value encoding (module docstring)."""

    def __init__(self, tokens: Mapping[str, int], medians: Mapping[str, float], *, input_size: int,
                 mapping: Mapping[str, Any] | None = None, special_tokens: bool | None = None) -> None:
        super().__init__()
        self.tokens = dict(tokens)
        if "<pad>" not in self.tokens:
            raise ModelConfigError("the token dictionary has no <pad>")
        self.pad_id = int(self.tokens["<pad>"])
        has_special = "<cls>" in self.tokens and "<eos>" in self.tokens
        self.special = has_special if special_tokens is None else bool(special_tokens)
        if self.special and not has_special:
            raise ModelConfigError("special tokens asked for, but the token dictionary has no <cls> / <eos> (a V1 "
                                   "dictionary)")
        self.cls_id = int(self.tokens["<cls>"]) if self.special else None
        self.eos_id = int(self.tokens["<eos>"]) if self.special else None
        self.input_size = int(input_size)
        if self.input_size < (3 if self.special else 1):
            raise ModelConfigError(f"input size {self.input_size} leaves no room for genes")
        genes = [g for g in self.tokens if g not in SPECIAL]
        missing = [g for g in genes if g not in medians]
        if missing:
            raise ModelConfigError(f"{len(missing)} genes of the token dictionary have no median (first: {missing[0]}); "
                                   "the two dictionaries do not belong together")
        self.medians = {g: float(medians[g]) for g in genes}
        bad = next((g for g, m in self.medians.items() if not (np.isfinite(m) and m > 0)), None)
        if bad is not None:  # the values are divided by the medians
            raise ModelConfigError(f"the median of {bad} is {self.medians[bad]:g}; gene medians must be positive numbers "
                                   "(the dictionary is damaged)")
        # the mapping dictionary, kept to the ids the token dictionary has (as the authors filter it)
        self.mapping = None if mapping is None else {str(k): str(v) for k, v in mapping.items()
                                                     if isinstance(v, str) and v in self.medians}
        self.targets: list[str] = []

    @property
    def model_genes(self) -> int:
        return len(self.medians)

    @property
    def n_columns(self) -> int:
        return len(self.targets)

    def column_of(self, genes: CorpusGenes) -> np.ndarray:
        """Columns = the dictionary genes the corpus has, in the order first met (collapsed ids share one)."""
        seen: dict[str, int] = {}
        cols = []
        for gid in genes.ensembl_ids:
            key = gid.upper()  # the authors upper-case the ids before mapping
            target = self.mapping.get(key) if self.mapping is not None else (key if key in self.medians else None)
            if target is None:
                cols.append(-1)
                continue
            cols.append(seen.setdefault(target, len(seen)))
        self.targets = list(seen)
        self._median = np.array([self.medians[t] for t in self.targets], dtype=np.float64)
        self._token = np.array([self.tokens[t] for t in self.targets], dtype=np.int64)
        return np.array(cols, dtype=np.int64)

    def __call__(self, X: sp.csr_matrix, *, slide: Any = None) -> dict[str, torch.Tensor]:
        X = sp.csr_matrix(X, dtype=np.float32)
        totals = np.asarray(X.sum(axis=1, dtype=np.float64)).ravel()  # the spot's total count (n_counts)
        M = self.model_counts(X)
        rows_out = []
        n_genes = self.input_size - (2 if self.special else 0)
        for i in range(M.shape[0]):
            a, b = M.indptr[i], M.indptr[i + 1]
            cols = M.indices[a:b]
            values = M.data[a:b].astype(np.float64) / totals[i] * 10_000 / self._median[cols]
            nz = values != 0
            cols, values = cols[nz], values[nz]
            ranked = self._token[cols[np.argsort(-values)]][:n_genes]
            if self.special:
                ranked = np.concatenate([[self.cls_id], ranked, [self.eos_id]])
            rows_out.append(ranked)
        lengths = torch.tensor([len(r) for r in rows_out], dtype=torch.long)
        return {"input_ids": torch.from_numpy(pad_rows(rows_out, self.pad_id)), "lengths": lengths}

    def describe(self) -> dict[str, Any]:
        return {"match_by": self.key, "input_size": self.input_size, "special_tokens": self.special,
                "collapse": self.mapping is not None}


__all__ = ["GeneformerConfig", "GeneformerModel", "GeneformerInput", "released_state_dict", "check_dictionary",
           "POOLINGS"]
