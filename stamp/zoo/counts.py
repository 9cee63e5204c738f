"""Spot features from raw counts, for encoders whose gene side reads counts rather than STAMP's tokens.

STAMP's own encoders read rank tokens of the corpus's vocabulary (a :class:`stamp.tokenizer.GeneTokenizer`
as ``Encoder.tokenizer``). Every other gene side (scGPT, Nicheformer, Geneformer, OmiCLIP's gene
sentences, the gene projection of a ``stamp finetune`` run, a concatenation ``A+B``) carries a
:class:`stamp.models.gene_inputs.CountInput` as ``Encoder.counts`` instead: bound once to the corpus's genes, then fed raw counts slide by slide. The consumers
(``stamp embed``, ``stamp evaluate``) use these three functions for them.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import scipy.sparse as sp

__all__ = ["count_input", "bind_genes", "encode_counts"]


def count_input(encoder: Any):
    """The encoder's :class:`CountInput` when its gene side reads raw counts, else None."""
    return getattr(encoder, "counts", None)


def bind_genes(encoder: Any, gene_ids, symbols, *, model: str, data: str, error: type[Exception]) -> Any:
    """Bind the encoder's count input to a corpus's genes (Ensembl ids + symbols, vocabulary order); a corpus
    with no gene in common is one ``error`` line naming both."""
    from stamp.errors import ModelConfigError
    from stamp.models.gene_inputs import CorpusGenes

    inputs = count_input(encoder)
    try:
        return inputs.bind(CorpusGenes.of(list(gene_ids), list(symbols) if symbols is not None else None))
    except ModelConfigError as exc:
        raise error(f"{model} on {data}: {exc}") from None


def encode_counts(encoder: Any, X: sp.csr_matrix, *, batch_size: int = 256,
                  gene_fn: Optional[Callable[[Any], Any]] = None, progress: Optional[Callable[[int], None]] = None
                  ) -> np.ndarray:
    """(spots, D) float32 features of ONE slide's raw counts (spots x corpus genes, bound before): the slide's
    context once (a model may need whole-slide statistics), then batches. ``gene_fn``: the feature function
    (default ``encoder.encode_genes``)."""
    import torch

    inputs = count_input(encoder)
    fn = gene_fn or encoder.encode_genes
    X = sp.csr_matrix(X, dtype=np.float32)
    ctx = inputs.slide_context(X)
    out = []
    for a in range(0, X.shape[0], batch_size):
        with torch.no_grad():
            z = fn(inputs(X[a:a + batch_size], slide=ctx))
        out.append(z.float().cpu().numpy())
        if progress is not None:
            progress(min(batch_size, X.shape[0] - a))
    width = int(getattr(encoder, "embed_dim", 0))
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, width), np.float32)
