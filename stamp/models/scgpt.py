"""scGPT (Cui et al., Nat Methods 2024) and scGPT-spatial (Wang et al., 2025) as gene encoders of the zoo.

Written from the authors' published inference path (``scgpt.tasks.embed_data`` /
``get_batch_cell_embeddings``, ``DataCollator``, ``preprocess.binning``, ``TransformerModel._encode``,
``utils.load_pretrained``; scGPT-spatial's copies of them), nothing copied:

* **vocabulary**: ``vocab.json`` maps gene SYMBOLS to token ids; ``<pad>``, ``<cls>``, ``<eoc>`` are
  appended when absent. Corpus genes are matched by symbol (by Ensembl id when the symbol is missing or
  unknown: CELLxGENE's ``feature_name`` names symbol-less genes by their id); genes outside the
  vocabulary are dropped (as ``embed_data`` does; two corpus genes with one symbol both stay, with the
  same token).
* **input** of a spot: its nonzero in-vocabulary genes; the raw counts binned into ``n_bins`` (51)
  per spot by quantiles of the spot's own values (edges ``np.quantile(values, linspace(0, 1, 50))``;
  a value between equal edges gets a uniform draw among its bins, as the authors' ``_digitize``);
  ``<cls>`` first with ``pad_value`` (-2); more than ``max_length`` (1,200) tokens: a random subset
  (``<cls>`` kept), as the collator's sampling. The authors draw from the global numpy / torch RNGs;
  here each spot draws from its own seed (``seed`` and the spot's data), so a spot's embedding does
  not depend on batch, order or run, and the same draws as the authors' code seeded with that number.
  scGPT-spatial first divides the slide's counts by their mean nonzero count (``slide_mean``) and each
  value by the gene's mean from ``all_dict_mean_std.csv`` (genes missing there: their nonzero mean in
  the slide), then bins.
* **model**: gene embedding + LayerNorm, value encoder (Linear 1->d, ReLU, Linear, LayerNorm) added,
  post-norm Transformer blocks (ReLU, LayerNorm eps 1e-5, no positions); embedding = the ``<cls>``
  state, L2-normalised (``cell_embedding_mode="cls"``). fp32 (the authors use CUDA autocast fp16).
* **weights**: ``best_model.pt`` is a pickled state dict with flash-attention names
  (``self_attn.Wqkv.*`` or ``self_attn._impl.Wqkv.*``); :func:`released_state_dict` renames them as
  ``load_pretrained`` does for PyTorch attention (``Wqkv.`` -> ``in_proj_``). The decoders
  (expression, MVC, classification, MoE ...) are not needed for embeddings.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from stamp.errors import ModelConfigError
from stamp.models.gene_encoder import EncoderBlock, StampConfig
from stamp.models.gene_inputs import CorpusGenes, CountInput, pad_rows, row_seed

SPECIAL_TOKENS = ("<pad>", "<cls>", "<eoc>")  # appended to the vocabulary when absent, in this order
ENCODER_PREFIXES = ("encoder.", "value_encoder.", "transformer_encoder.")  # what embeddings use
N_BINS = 51  # hard-coded in the authors' collator call
MAX_LENGTH = 1200  # embed_data's default
_RENAMES = ((".self_attn._impl.Wqkv.", ".self_attn.in_proj_"), (".self_attn.Wqkv.", ".self_attn.in_proj_"),
            (".self_attn._impl.out_proj.", ".self_attn.out_proj."))


@dataclass
class ScGPTConfig:
    """Sizes from the release's ``args.json`` (``embsize``, ``nheads``, ``d_hid``, ``nlayers``) and its
    vocabulary (``ntoken`` = vocabulary size after the special tokens, ``pad_token_id``)."""

    ntoken: int
    embsize: int = 512
    nheads: int = 8
    d_hid: int = 512
    nlayers: int = 12
    pad_token_id: int = 0
    layer_norm_eps: float = 1e-5
    max_value: float = 512.0  # the value encoder clamps its input here

    def __post_init__(self) -> None:
        if min(self.ntoken, self.embsize, self.nheads, self.d_hid, self.nlayers) < 1:
            raise ModelConfigError(f"scGPT sizes must be positive: {asdict(self)}")
        if self.embsize % self.nheads:
            raise ModelConfigError(f"scGPT embsize {self.embsize} is not divisible by nheads {self.nheads}")

    @classmethod
    def from_args(cls, args: Mapping[str, Any], *, ntoken: int, pad_token_id: int, where: str) -> "ScGPTConfig":
        missing = [k for k in ("embsize", "nheads", "d_hid", "nlayers") if k not in args]
        if missing:
            raise ModelConfigError(f"{where}: args.json lacks {', '.join(missing)}; not an scGPT release")
        try:
            return cls(ntoken=ntoken, embsize=int(args["embsize"]), nheads=int(args["nheads"]),
                       d_hid=int(args["d_hid"]), nlayers=int(args["nlayers"]), pad_token_id=pad_token_id)
        except (TypeError, ValueError) as exc:
            raise ModelConfigError(f"{where}: args.json sizes are not whole numbers ({exc})") from None
        except ModelConfigError as exc:
            raise ModelConfigError(f"{where}: {exc}") from None


class _GeneEncoder(nn.Module):
    def __init__(self, c: ScGPTConfig) -> None:
        super().__init__()
        self.embedding = nn.Embedding(c.ntoken, c.embsize, padding_idx=c.pad_token_id)
        self.enc_norm = nn.LayerNorm(c.embsize, eps=c.layer_norm_eps)

    def forward(self, genes: torch.Tensor) -> torch.Tensor:
        return self.enc_norm(self.embedding(genes))


class _ValueEncoder(nn.Module):
    def __init__(self, c: ScGPTConfig) -> None:
        super().__init__()
        self.linear1 = nn.Linear(1, c.embsize)
        self.linear2 = nn.Linear(c.embsize, c.embsize)
        self.norm = nn.LayerNorm(c.embsize, eps=c.layer_norm_eps)
        self.max_value = c.max_value

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        x = torch.clamp(values.unsqueeze(-1), max=self.max_value)
        return self.norm(self.linear2(F.relu(self.linear1(x))))


class ScGPTModel(nn.Module):
    """scGPT's encoder: ``forward(genes, values)`` -> states (B, L, D); :meth:`embed` -> the L2-normalised
    ``<cls>`` state. Parameter names are the authors' (after the ``Wqkv`` rename)."""

    def __init__(self, config: ScGPTConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = _GeneEncoder(config)
        self.value_encoder = _ValueEncoder(config)
        block = StampConfig(hidden_size=config.embsize, num_heads=config.nheads, intermediate_size=config.d_hid,
                            layer_norm_eps=config.layer_norm_eps, dropout=0.0, activation="relu")
        self.transformer_encoder = nn.Module()
        self.transformer_encoder.layers = nn.ModuleList(EncoderBlock(block) for _ in range(config.nlayers))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, EncoderBlock):
                nn.init.xavier_uniform_(module.self_attn.in_proj_weight)
                nn.init.zeros_(module.self_attn.in_proj_bias)
        nn.init.uniform_(self.encoder.embedding.weight, -0.1, 0.1)  # the authors' init_weights

    @property
    def device(self) -> torch.device:
        return self.encoder.embedding.weight.device

    def forward(self, genes: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        genes = genes.to(self.device, torch.long)
        values = values.to(self.device, torch.float32)
        x = self.encoder(genes) + self.value_encoder(values)
        keys = genes != self.config.pad_token_id
        mask = None if bool(keys.all()) else keys[:, None, None, :]
        for layer in self.transformer_encoder.layers:
            x = layer(x, mask)
        return x

    @torch.no_grad()
    def embed(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(B, embsize) float32: the ``<cls>`` state, L2-normalised."""
        return F.normalize(self.forward(batch["genes"], batch["values"])[:, 0].float(), dim=-1)


def released_state_dict(state: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(tensors renamed for :class:`ScGPTModel`, names of the released tensors embeddings do not use).

    ``module.`` (DDP) is stripped; flash-attention names become PyTorch's as in the authors'
    ``load_pretrained``; everything outside the encoder (decoders, MVC, classifier, MoE heads ...) is
    returned as unused. Whether the mapped set is complete is the loader's strict check."""
    keys = list(state)
    strip = "module." if keys and all(k.startswith("module.") for k in keys) else ""
    mapped, unused = {}, []
    for key in keys:
        name = key[len(strip):]
        for old, new in _RENAMES:
            name = name.replace(old, new)
        if name.startswith(ENCODER_PREFIXES):
            mapped[name] = state[key]
        else:
            unused.append(key)
    return mapped, unused


def read_vocab(data: Any, where: str) -> dict[str, int]:
    """A ``vocab.json`` (token -> index, indices 0..n-1) with the special tokens appended when absent."""
    if not isinstance(data, dict) or not data:
        raise ModelConfigError(f"{where}: vocab.json must be a JSON object token -> index")
    if not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in data.items()):
        raise ModelConfigError(f"{where}: vocab.json must map strings to whole numbers")
    if sorted(data.values()) != list(range(len(data))):
        raise ModelConfigError(f"{where}: vocab.json indices are not 0..{len(data) - 1} (each once), as scGPT's "
                               "GeneVocab requires")
    vocab = dict(data)
    for token in SPECIAL_TOKENS:
        if token not in vocab:
            vocab[token] = len(vocab)
    return vocab


def read_gene_means(table: Any, ntoken: int, where: str) -> np.ndarray:
    """scGPT-spatial's ``all_dict_mean_std.csv`` (index = token id, column ``mean``) as float64 per token
    id; NaN for tokens it lacks (their mean is then taken from the slide, as the authors do)."""
    if "mean" not in table.columns:
        raise ModelConfigError(f"{where}: no 'mean' column; not scGPT-spatial's gene statistics file")
    try:
        ids = np.asarray(table.index, dtype=np.int64)
    except (TypeError, ValueError):
        raise ModelConfigError(f"{where}: the first column must hold vocabulary token ids") from None
    if ids.size and (ids.min() < 0 or ids.max() >= ntoken):
        raise ModelConfigError(f"{where}: token ids outside the vocabulary (0..{ntoken - 1})")
    try:
        values = np.asarray(table["mean"], dtype=np.float64)
    except (TypeError, ValueError):
        raise ModelConfigError(f"{where}: the 'mean' column holds values that are not numbers") from None
    bad = np.flatnonzero(~np.isnan(values) & ~(np.isfinite(values) & (values > 0)))
    if bad.size:  # values are divided by these means
        raise ModelConfigError(f"{where}: the mean of token {ids[bad[0]]} is {values[bad[0]]:g} ({bad.size} such); gene "
                               "means must be positive numbers")
    means = np.full(ntoken, np.nan)
    means[ids] = values
    return means


@dataclass
class SlideStats:
    """scGPT-spatial's slide statistics: the mean nonzero count and the slide means of genes missing from
    the released statistics."""

    slide_mean: np.float32
    gene_means: np.ndarray  # float64 per token id


class ScGPTInput(CountInput):
    """scGPT's input rules (module docstring). ``gene_means`` (float64 per token id, NaN = from the slide)
    switches on scGPT-spatial's normalisation."""

    key = "symbol"

    def __init__(self, vocab: Mapping[str, int], *, pad_value: float = -2.0, pad_token: str = "<pad>",
                 max_length: int = MAX_LENGTH, n_bins: int = N_BINS, seed: int = 0,
                 gene_means: np.ndarray | None = None) -> None:
        super().__init__()
        if pad_token not in vocab or "<cls>" not in vocab:
            raise ModelConfigError(f"the vocabulary lacks {pad_token!r} or '<cls>'")
        if max_length < 2 or n_bins < 2:
            raise ModelConfigError(f"max_length ({max_length}) and n_bins ({n_bins}) must be at least 2")
        self.vocab = dict(vocab)
        self.pad_id = int(vocab[pad_token])
        self.cls_id = int(vocab["<cls>"])
        self.pad_value = float(pad_value)
        self.max_length = int(max_length)
        self.n_bins = int(n_bins)
        self.seed = int(seed)
        self.gene_means = gene_means
        self._edges_at = np.linspace(0, 1, self.n_bins - 1)

    @property
    def model_genes(self) -> int:
        return sum(1 for t in self.vocab if t not in SPECIAL_TOKENS)

    def column_of(self, genes: CorpusGenes) -> np.ndarray:
        """The token of each corpus gene's symbol; a gene without one (or whose symbol the vocabulary lacks) by its
        Ensembl id, as CELLxGENE's ``feature_name`` (scGPT's gene column) names genes that have no symbol."""
        def token(symbol: str, ensembl_id: str) -> int:
            for key in (symbol, ensembl_id):
                if key and key not in SPECIAL_TOKENS and key in self.vocab:
                    return self.vocab[key]
            return -1

        return np.array([token(s, e) for s, e in zip(genes.symbols, genes.ensembl_ids)], dtype=np.int64)

    def _in_vocab(self, X: sp.csr_matrix) -> sp.csr_matrix:
        """The corpus matrix restricted to in-vocabulary columns (corpus order kept, counts float32)."""
        X = sp.csr_matrix(X, dtype=np.float32)
        X.sort_indices()
        return X[:, np.flatnonzero(self.columns >= 0)] if self.columns is not None else X

    def slide_context(self, X: sp.csr_matrix) -> SlideStats | None:
        if self.gene_means is None:
            return None
        Xv = self._in_vocab(X)
        Xv.eliminate_zeros()
        if Xv.nnz == 0:
            return SlideStats(np.float32(1.0), self.gene_means)
        slide_mean = np.mean(Xv.data)  # float32, as np.mean over the dense matrix's nonzero entries
        tokens = self.columns[self.columns >= 0]
        means = self.gene_means.copy()
        missing = np.unique(tokens[np.isnan(means[tokens])])
        if missing.size:
            scaled = Xv.copy()
            scaled.data = scaled.data / slide_mean
            for token in missing:  # row-major over the gene's columns, as the authors' flatten()
                cols = np.flatnonzero(tokens == token)
                values = scaled[:, cols].toarray().ravel()
                values = values[values != 0]
                if values.size:
                    means[token] = float(values.mean())
        return SlideStats(np.float32(slide_mean), means)

    def __call__(self, X: sp.csr_matrix, *, slide: SlideStats | None = None) -> dict[str, torch.Tensor]:
        if self.columns is None:
            raise ModelConfigError("bind(corpus genes) must come before encoding")
        if self.gene_means is not None and slide is None:
            raise ModelConfigError("scGPT-spatial inputs need the slide's statistics (slide_context)")
        Xv = self._in_vocab(X)
        tokens = self.columns[self.columns >= 0]
        genes_rows, value_rows = [], []
        for i in range(Xv.shape[0]):
            a, b = Xv.indptr[i], Xv.indptr[i + 1]
            counts = Xv.data[a:b]
            nz = counts != 0
            genes = tokens[Xv.indices[a:b][nz]]
            values = counts[nz]
            if slide is not None:  # (row / slide_mean) in float32, / gene mean in float64, back to float32
                values = (values / slide.slide_mean).astype(np.float32)
                values = np.divide(values, slide.gene_means[genes]).astype(np.float32)
            genes, bins = self._bin_and_sample(genes, values)
            genes_rows.append(np.concatenate([[self.cls_id], genes]))
            value_rows.append(np.concatenate([[self.pad_value], bins]))
        return {"genes": torch.from_numpy(pad_rows(genes_rows, self.pad_id)),
                "values": torch.from_numpy(pad_rows(value_rows, self.pad_value, dtype=np.float32))}

    def _bin_and_sample(self, genes: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One spot: quantile bins of its values with a seeded uniform draw between equal edges, then a
        seeded subset when it has more genes than fit beside ``<cls>``."""
        if values.size == 0:
            return genes.astype(np.int64), values.astype(np.float32)
        seed = row_seed(self.seed, genes.astype(np.int64), values.astype(np.float32))
        edges = np.quantile(values, self._edges_at)
        left = np.digitize(values, edges)
        right = np.digitize(values, edges, right=True)
        draws = np.random.RandomState(seed).rand(values.size)
        bins = np.ceil(draws * (right - left) + left).astype(np.int64).astype(np.float32)
        if values.size + 1 > self.max_length:
            keep = torch.randperm(values.size, generator=torch.Generator().manual_seed(seed))
            keep = keep[: self.max_length - 1].numpy()
            genes, bins = genes[keep], bins[keep]
        return genes.astype(np.int64), bins

    def describe(self) -> dict[str, Any]:
        return {"match_by": self.key, "n_bins": self.n_bins, "max_length": self.max_length, "seed": self.seed,
                "pad_value": self.pad_value, "slide_normalised": self.gene_means is not None}


__all__ = ["ScGPTConfig", "ScGPTModel", "ScGPTInput", "SlideStats", "released_state_dict", "read_vocab",
           "read_gene_means", "SPECIAL_TOKENS", "N_BINS", "MAX_LENGTH"]
