"""Independent references of the authors' embedding paths of scGPT (+ scGPT-spatial), Nicheformer and
Geneformer, written step by step from their published code (issue 27), for tests/test_zoo_genes.py.

The authors' packages cannot be imported here (scGPT pins torchtext, Nicheformer needs Lightning,
Geneformer pulls loompy / datasets pipelines), so each path is rebuilt from plain torch / numpy /
transformers, on a DENSE count matrix (spots x the corpus's genes) as their AnnData code reads it:

* scGPT ``embed_data``: symbols -> ``vocab.json`` ids (unknown genes dropped, specials appended), per
  cell nonzero genes, ``<cls>`` + ``pad_value``, ``DataCollator`` (``binning`` with ``_digitize``'s
  uniform draws, then random sampling above ``max_length``), ``TransformerModel._encode`` with
  ``nn.TransformerEncoderLayer`` (the authors' no-flash path; the checkpoint's ``Wqkv`` renamed to
  ``in_proj_`` as ``load_pretrained`` does), ``<cls>`` state / its norm. The authors draw from the global
  numpy / torch generators; here they are re-seeded before each cell with the seed the project derives
  for it (the only thing taken from the project: which random numbers; every step is the authors').
* scGPT-spatial ``get_batch_cell_embeddings``: ``count_matrix / slide_mean``, ``/ gene mean`` from
  ``all_dict_mean_std.csv`` (missing genes: their nonzero mean in the data), then as scGPT.
* Nicheformer: the Lightning module's tree (``embeddings`` n_tokens + 5, ``positional_embedding``,
  ``encoder`` = ``nn.TransformerEncoder``, the ``encoder_layer`` template, heads), the tokenization
  notebooks (``sf_normalize``, technology mean NaN->0 / half-up / 0->1, ``argsort`` of the nonzero values,
  equal values in vocabulary order, +30), ``on_after_batch_transfer`` (specie, assay, modality prepended, cut to the context),
  ``complete_masking(p=0)`` (0 -> PAD 1) and ``get_embeddings`` (layers one by one, ``[:, 3:].mean(1)``).
* Geneformer ``TranscriptomeTokenizer`` (``X / n_counts * 10000 / median``, ``argsort(-x)``, V2
  ``<cls>``/``<eos>``) and ``EmbExtractor`` (``BertForMaskedLM.from_pretrained(..., output_hidden_states=True)``,
  ``hidden_states[n_layers - 1]``, ``cls`` or the mean over the gene tokens).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn


# ----------------------------------------------------------------------------- scGPT
class RefGeneEncoder(nn.Module):
    def __init__(self, ntoken: int, d: int, pad: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(ntoken, d, padding_idx=pad)
        self.enc_norm = nn.LayerNorm(d)


class RefValueEncoder(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(1, d)
        self.activation = nn.ReLU()
        self.linear2 = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        x = torch.clamp(x.unsqueeze(-1), max=512)
        return self.norm(self.linear2(self.activation(self.linear1(x))))


class ReferenceScGPT(nn.Module):
    """The module tree of scGPT's TransformerModel (encoder parts + a few decoder tensors, as released)."""

    def __init__(self, ntoken: int, d: int, nhead: int, d_hid: int, nlayers: int, pad: int) -> None:
        super().__init__()
        self.encoder = RefGeneEncoder(ntoken, d, pad)
        self.value_encoder = RefValueEncoder(d)
        layer = nn.TransformerEncoderLayer(d, nhead, d_hid, dropout=0.0, batch_first=True)
        self.transformer_encoder = nn.TransformerEncoder(layer, nlayers, enable_nested_tensor=False)
        self.decoder = nn.Sequential(nn.Linear(d, d), nn.LeakyReLU(), nn.Linear(d, 1))  # ExprDecoder.fc
        self.mvc_decoder = nn.Linear(d, d, bias=False)
        self.pad = pad

    def encode(self, genes, values):
        x = self.encoder.enc_norm(self.encoder.embedding(genes)) + self.value_encoder(values)
        return self.transformer_encoder(x, src_key_padding_mask=genes.eq(self.pad))

    def flash_state_dict(self) -> dict:
        """The state dict as the flash-attention model saves it (``self_attn.Wqkv.*``)."""
        out = {}
        for k, v in self.state_dict().items():
            out[k.replace("self_attn.in_proj_weight", "self_attn.Wqkv.weight")
                 .replace("self_attn.in_proj_bias", "self_attn.Wqkv.bias")] = v.clone()
        return out


def randomize_(module: nn.Module, seed: int, scale: float = 0.2) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return module


def _digitize_ref(x: np.ndarray, bins: np.ndarray) -> np.ndarray:
    left = np.digitize(x, bins)
    right = np.digitize(x, bins, right=True)
    rands = np.random.rand(len(x))
    return np.ceil(rands * (right - left) + left).astype(np.int64)


def _binning_ref(row: torch.Tensor, n_bins: int) -> torch.Tensor:
    values = row.cpu().numpy()
    if values.max() == 0:
        return torch.zeros_like(row)
    if values.min() <= 0:
        nz = values.nonzero()
        out = np.zeros_like(values, dtype=np.int64)
        out[nz] = _digitize_ref(values[nz], np.quantile(values[nz], np.linspace(0, 1, n_bins - 1)))
        return torch.from_numpy(out)
    return torch.from_numpy(_digitize_ref(values, np.quantile(values, np.linspace(0, 1, n_bins - 1))))


def scgpt_embed(counts: np.ndarray, symbols: list[str], folder: Path, model: ReferenceScGPT, *, seed_for,
                max_length: int = 1200, spatial: bool = False) -> np.ndarray:
    """embed_data / get_batch_cell_embeddings (one AnnData = ``counts``), the collator run cell by cell."""
    token2idx = json.loads((folder / "vocab.json").read_text())
    vocab = {t: i for t, i in sorted(token2idx.items(), key=lambda kv: kv[1])}
    for s in ["<pad>", "<cls>", "<eoc>"]:
        if s not in vocab:
            vocab[s] = len(vocab)
    args = json.loads((folder / "args.json").read_text())
    in_vocab = np.array([vocab.get(g, -1) for g in symbols])
    keep = in_vocab >= 0
    matrix = counts[:, keep].astype(np.float32)
    gene_ids = in_vocab[keep]
    if spatial:
        slide_mean = np.mean(matrix[matrix.nonzero()[0], matrix.nonzero()[1]])
        matrix = matrix / slide_mean
        stats = pd.read_csv(folder / "all_dict_mean_std.csv", index_col=0)
        for gene in set(gene_ids) - set(stats.index.values):
            col = matrix[:, np.where(gene_ids == gene)[0]].flatten()
            values = col[np.nonzero(col)[0]]
            stats.loc[gene] = [float(values.mean())] + [np.nan] * (stats.shape[1] - 1)
    out = []
    for row in matrix:
        nz = np.nonzero(row)[0]
        values, genes = row[nz], gene_ids[nz]
        if spatial:
            values = np.divide(values, stats.loc[genes, "mean"].values)
        seed = seed_for(genes.astype(np.int64), values.astype(np.float32))
        np.random.seed(seed)
        torch.manual_seed(seed)
        genes = torch.from_numpy(np.insert(genes, 0, vocab["<cls>"])).long()
        expr = torch.from_numpy(np.insert(values, 0, args["pad_value"])).float()
        expr[1:] = _binning_ref(expr[1:], 51)  # DataCollator: n_bins=51, keep_first_n_tokens=1
        if len(genes) > max_length:  # _sample: keep <cls>, permute and cut the rest
            idx = torch.randperm(len(genes) - 1)[: max_length - 1]
            idx = torch.cat([torch.arange(1), idx + 1])
            genes, expr = genes[idx], expr[idx]
        with torch.no_grad():
            state = model.encode(genes[None], expr[None])[0, 0]
        out.append(state.numpy())
    emb = np.stack(out).astype(np.float32)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def write_scgpt_release(folder: Path, model: ReferenceScGPT, vocab: dict, args: dict,
                        gene_stats: pd.DataFrame | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.flash_state_dict(), folder / "best_model.pt")
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "args.json").write_text(json.dumps(args))
    if gene_stats is not None:
        gene_stats.to_csv(folder / "all_dict_mean_std.csv")
    return folder


# ----------------------------------------------------------------------------- Nicheformer
class ReferenceNicheformer(nn.Module):
    """The Lightning module's tree (state_dict names and shapes of the released checkpoint)."""

    def __init__(self, dim: int, heads: int, ffn: int, layers: int, n_tokens: int, context: int) -> None:
        super().__init__()
        self.encoder_layer = nn.TransformerEncoderLayer(dim, heads, ffn, batch_first=True, dropout=0.0,
                                                        layer_norm_eps=1e-12)
        self.encoder = nn.TransformerEncoder(self.encoder_layer, layers, enable_nested_tensor=False)
        self.embeddings = nn.Embedding(n_tokens + 5, dim, padding_idx=1)
        self.positional_embedding = nn.Embedding(context, dim)
        self.classifier_head = nn.Linear(dim, n_tokens, bias=False)
        self.classifier_head.bias = nn.Parameter(torch.zeros(n_tokens))
        self.pooler_head = nn.Linear(dim, dim)
        self.cls_head = nn.Linear(dim, 164)
        self.context = context
        self.hparams = dict(dim_model=dim, nheads=heads, dim_feedforward=ffn, nlayers=layers, dropout=0.0,
                            batch_first=True, masking_p=0.15, n_tokens=n_tokens, context_length=context, lr=1e-4,
                            warmup=1000, batch_size=32, max_epochs=1, cls_classes=164, supervised_task=None,
                            learnable_pe=True, specie=True, assay=True, modality=True, contrastive=False)

    def lightning_checkpoint(self) -> dict:
        return {"epoch": 1, "global_step": 265000, "pytorch-lightning_version": "2.1.0",
                "state_dict": {k: v.clone() for k, v in self.state_dict().items()},
                "hyper_parameters": dict(self.hparams), "hparams_name": "kwargs"}

    def get_embeddings(self, x: torch.Tensor, specie: int, assay: int, modality: int) -> torch.Tensor:
        n = x.shape[0]
        x = torch.cat((torch.full((n, 1), modality, dtype=torch.int32), x), dim=1)
        x = torch.cat((torch.full((n, 1), assay, dtype=torch.int32), x), dim=1)
        x = torch.cat((torch.full((n, 1), specie, dtype=torch.int32), x), dim=1)
        x = x[:, : self.context].long()
        x = torch.where(x == 0, torch.tensor(1), x)  # complete_masking, p = 0
        mask = x == 1
        h = self.embeddings(x) + self.positional_embedding(torch.arange(self.context))
        for layer in self.encoder.layers:
            h = layer(h, src_key_padding_mask=mask, is_causal=False)
        return h[:, 3:, :].mean(dim=1)


def nicheformer_tokens(counts: np.ndarray, means: np.ndarray, max_seq_len: int) -> np.ndarray:
    """sf_normalize + the notebook's technology-mean rule + _sub_tokenize_data (numpy argsort)."""
    x = np.nan_to_num(counts.astype(np.float32))
    totals = np.array(x.sum(axis=1))
    totals += totals == 0.0
    x = x * (10000.0 / totals).reshape((-1, 1))
    m = np.nan_to_num(means)
    rounded = np.where((m % 1) >= 0.5, np.ceil(m), np.floor(m))
    m = np.where(rounded == 0, 1, rounded)
    x = x / m.reshape((1, -1))
    out = np.zeros((x.shape[0], max_seq_len), dtype=np.int32)
    for i, cell in enumerate(x):
        nz = np.nonzero(cell)[0]
        # their numba argsort leaves the order of equal values unspecified; the project documents vocabulary
        # order for them, which a stable sort of the vocabulary-ordered row gives
        ranked = nz[np.argsort(-cell[nz], kind="stable")][:max_seq_len] + 30
        out[i, : len(ranked)] = ranked
    return out


# ----------------------------------------------------------------------------- Geneformer
def geneformer_tokens(counts: np.ndarray, ensembl_ids: list[str], tokens: dict, medians: dict,
                      mapping: dict | None, input_size: int, special: bool) -> list[np.ndarray]:
    """TranscriptomeTokenizer.tokenize_anndata (+ create_dataset's truncation) on a dense matrix; the cell
    totals (n_counts) are the row sums over all genes."""
    n_counts = counts.sum(axis=1, dtype=np.float64)[:, None]
    ids = pd.Series([g.upper() for g in ensembl_ids])
    collapsed = ids.map(mapping) if mapping is not None else ids.where(ids.isin(tokens))
    frame = pd.DataFrame(counts.T, index=collapsed.values)
    frame = frame[frame.index.notna()]
    frame = frame[[g in tokens and g not in ("<pad>", "<mask>", "<cls>", "<eos>") for g in frame.index]]
    frame = frame.groupby(frame.index, sort=False).sum()  # collapse duplicate ids (sum)
    genes = list(frame.index)
    X = frame.values.T.astype(np.float32)
    norm = np.array([medians[g] for g in genes])
    gene_tokens = np.array([tokens[g] for g in genes])
    X_norm = X / n_counts * 10_000 / norm
    out = []
    for row in X_norm:
        nz = np.nonzero(row)[0]
        ranked = gene_tokens[nz][np.argsort(-row[nz])]
        if special:
            ranked = np.concatenate([[tokens["<cls>"]], ranked[: input_size - 2], [tokens["<eos>"]]])
        else:
            ranked = ranked[:input_size]
        out.append(ranked)
    return out


def geneformer_embed(model_dir: Path, cells: list[np.ndarray], pad_id: int, *, mode: str,
                     has_cls: bool, has_eos: bool) -> np.ndarray:
    """EmbExtractor.extract_embs with emb_layer=-1: BertForMaskedLM hidden_states[n_layers - 1]."""
    from transformers import BertForMaskedLM

    model = BertForMaskedLM.from_pretrained(str(model_dir), output_hidden_states=True).eval()
    layer = model.config.num_hidden_layers - 1
    lengths = torch.tensor([len(c) for c in cells])
    max_len = int(lengths.max())
    ids = torch.stack([torch.nn.functional.pad(torch.as_tensor(c, dtype=torch.long), (0, max_len - len(c)),
                                               value=pad_id) for c in cells])
    mask = torch.tensor([[1] * int(n) + [0] * (max_len - int(n)) for n in lengths])
    with torch.no_grad():
        h = model(input_ids=ids, attention_mask=mask).hidden_states[layer]
    if mode == "cls":
        return h[:, 0, :].numpy()
    if has_cls:
        h = h[:, 1:, :]
        lengths = lengths - (2 if has_eos else 1)
    keep = torch.arange(h.shape[1])[None, :] < lengths[:, None]
    return ((h * keep.unsqueeze(2)).sum(1) / lengths[:, None].float()).numpy()
