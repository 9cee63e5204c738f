"""``--model A+B``: the features of several encoders concatenated per spot (the paper's "Hop+scS" row).

A concatenation is one :class:`stamp.zoo.encoder.Encoder`, so every command that takes a model takes
one. Its parts keep their own preprocessing, tokenizers and devices:

* **image side**: the parts that have one (image or aligned encoders); each part's ``encode_images``,
  L2-normalised, concatenated in the order given. The transform (:class:`ConcatTransform`) runs every
  part's own transform on the image and hands the results on flattened end to end, so loaders that stack
  transform outputs (``stamp embed``, ``stamp evaluate``, ``stamp embed-slides``) need no change;
* **gene side**: the parts that have one; each part's gene input (its raw-count input, or its STAMP
  tokenizer through :class:`TokenizerInput`), features L2-normalised and concatenated;
* ``kind``: ``image`` (no part has a gene side), ``gene`` (none has an image side), else ``aligned``:
  ``--modality fused`` then gives [gene sides, image sides] -- h-optimus-0+scgpt-spatial is the image of
  one and the expression of the other. A single modality asks every part for that side
  (:func:`parts_without`): a part without it is an error, never silently dropped.

Each part is L2-normalised (as ``--modality fused`` does) so that no part dominates by its scale.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import scipy.sparse as sp

from stamp.models.gene_inputs import CorpusGenes, CountInput
from stamp.zoo.encoder import Encoder, Provenance, marks_of

SEPARATOR = "+"

__all__ = ["SEPARATOR", "split_spec", "ConcatEncoder", "ConcatTransform", "ConcatInput", "TokenizerInput",
           "parts_without"]


def split_spec(text: str) -> list[str] | None:
    """``"A+B"`` -> ``["A", "B"]``; None when ``text`` names one model (no separator, or empty parts)."""
    if SEPARATOR not in text:
        return None
    parts = [p.strip() for p in text.split(SEPARATOR)]
    return parts if len(parts) > 1 and all(parts) else None


class TokenizerInput(CountInput):
    """A STAMP :class:`~stamp.tokenizer.GeneTokenizer` seen as a count input (for a concatenation's parts):
    the corpus must hold the tokenizer's vocabulary, in order; counts become the model's token ids."""

    def __init__(self, tokenizer: Any, context_length: int) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.context_length = int(context_length)

    @property
    def model_genes(self) -> int:
        return int(self.tokenizer.n_genes)

    def column_of(self, genes: CorpusGenes) -> np.ndarray:
        from spavis.format.vocabulary import require_same_vocabulary

        from stamp.errors import ModelConfigError

        require_same_vocabulary(self.tokenizer, list(genes.ensembl_ids), a_name="the model's tokenizer",
                                b_name="the corpus", error=ModelConfigError,
                                fix="build the corpus with the vocabulary the model was trained on (--vocab)")
        return np.arange(len(genes))

    def __call__(self, X: sp.csr_matrix, *, slide: Any = None) -> dict[str, Any]:
        import torch

        from stamp.tokenizer import to_model_input_ids

        ids = to_model_input_ids(self.tokenizer.encode_csr(sp.csr_matrix(X)), self.tokenizer.pad_value,
                                 self.context_length)
        return {"input_ids": torch.from_numpy(ids.astype(np.int64))}


class ConcatInput(CountInput):
    """The gene inputs of several parts, bound to one corpus; a batch is one sub-batch per part."""

    def __init__(self, inputs: Sequence[CountInput]) -> None:
        super().__init__()
        self.inputs = list(inputs)

    @property
    def model_genes(self) -> int:
        return sum(i.model_genes for i in self.inputs)

    def column_of(self, genes: CorpusGenes) -> np.ndarray:
        for i in self.inputs:
            i.bind(genes)
        return np.arange(len(genes))

    def slide_context(self, X: sp.csr_matrix) -> Any:
        return [i.slide_context(X) for i in self.inputs]

    def __call__(self, X: sp.csr_matrix, *, slide: Any = None) -> dict[str, Any]:
        ctx = slide if slide is not None else [None] * len(self.inputs)
        return {"parts": [i(X, slide=c) for i, c in zip(self.inputs, ctx)]}

    def describe(self) -> dict[str, Any]:
        return {"rule": "concat", "parts": [i.describe() for i in self.inputs]}


class ConcatTransform:
    """Every part's transform on the same image, the results flattened and concatenated (uint8 stage and
    float stage alike); :meth:`split` cuts a stacked batch back into each part's (B, 3, S, S) pixels."""

    def __init__(self, transforms: Sequence[Any], sizes: Sequence[int]) -> None:
        self.transforms = list(transforms)
        self.sizes = [int(s) for s in sizes]

    def _cat(self, xs):
        import torch

        return torch.cat([x.reshape(-1) for x in xs])

    def to_uint8(self, image: Any):
        from stamp.models.pixels import two_stages

        outs = []
        for t in self.transforms:
            stages = two_stages(t)
            outs.append(stages[0](image) if stages else t(image))
        return self._cat(outs)

    def normalize(self, batch):
        import torch

        from stamp.models.pixels import two_stages

        out, start = [], 0
        for t, s in zip(self.transforms, self.sizes):
            n = 3 * s * s
            part = batch[:, start:start + n].reshape(batch.shape[0], 3, s, s)
            stages = two_stages(t)
            out.append((stages[1](part) if stages else part.float()).reshape(batch.shape[0], -1))
            start += n
        return torch.cat(out, dim=1)

    def __call__(self, image: Any):
        return self._cat([t(image) for t in self.transforms])

    def split(self, pixels) -> list:
        out, start = [], 0
        for s in self.sizes:
            n = 3 * s * s
            out.append(pixels[:, start:start + n].reshape(pixels.shape[0], 3, s, s))
            start += n
        return out

    def __repr__(self) -> str:
        return "ConcatTransform(" + ", ".join(repr(t) for t in self.transforms) + ")"


def _unit(z):
    import torch.nn.functional as F

    return F.normalize(z.float(), dim=-1)


def _context_length(part: Encoder) -> int:
    config = getattr(part.module, "config", None)
    for cfg in (getattr(config, "gene", None), config):
        value = getattr(cfg, "context_length", None)
        if isinstance(value, int) and value > 0:
            return value
    return int(part.tokenizer.max_length)


def _gene_input(part: Encoder) -> CountInput:
    return part.counts if part.counts is not None else TokenizerInput(part.tokenizer, _context_length(part))


def _gene_batch(part: Encoder, batch: dict):
    """A part's sub-batch as its ``encode_genes`` wants it (token ids for STAMP tokenizers)."""
    return batch["input_ids"] if part.counts is None else batch


def parts_without(encoder: Any, side: str) -> list[str]:
    """Names of a concatenation's parts without the ``side`` ("image" or "gene"); [] for any other encoder."""
    parts = getattr(encoder, "parts", None)
    if not parts:
        return []
    if side == "image":
        return [p.name for p in parts if p.kind == "gene" or p.transform is None]
    return [p.name for p in parts if p.gene_side_problem() is not None]


def _combined_commercial(values: list) -> Any:
    if any(v is False for v in values):
        return False
    return True if all(v is True for v in values) else None


class ConcatEncoder(Encoder):
    """Several encoders as one (see the module docstring); ``parts`` in the order given."""

    def __init__(self, parts: Sequence[Encoder], source: str) -> None:
        import torch

        self.parts = list(parts)
        images = [p for p in self.parts if p.kind != "gene" and p.transform is not None]
        genes = [p for p in self.parts if p.gene_side_problem() is None]
        kind = "aligned" if images and genes else ("image" if images else "gene")
        self.image_parts, self.gene_parts = images, genes
        dims = {"image": sum(p.embed_dim for p in images), "gene": sum(p.embed_dim for p in genes)}
        prov = Provenance(
            name=SEPARATOR.join(p.name for p in self.parts), source=source,
            license=" + ".join(dict.fromkeys(p.provenance.license for p in self.parts)),
            commercial=_combined_commercial([p.provenance.commercial for p in self.parts]),
            extra={"parts": [p.provenance.to_dict() for p in self.parts],
                   "marks": "+".join(m for m in ("V", "L", "G")
                                     if any(m in marks_of(p).split("+") for p in self.parts))})
        transform = ConcatTransform([p.transform for p in images], [p.input_size or 224 for p in images]) \
            if images else None
        counts = ConcatInput([_gene_input(p) for p in genes]) if genes else None
        super().__init__(torch.nn.ModuleList([p.module for p in self.parts]), kind=kind,
                         embed_dim=dims["image"] if kind == "image" else dims["gene"], provenance=prov,
                         transform=transform, counts=counts,
                         image_fn=self._images if images else None, gene_fn=self._genes if genes else None,
                         input_size=max((p.input_size or 224) for p in images) if images else None)
        self.image_dim, self.gene_dim = dims["image"], dims["gene"]

    def _images(self, pixels):
        import torch

        chunks = self.transform.split(pixels)
        return torch.cat([_unit(p.encode_images(x.to(p.device))) for p, x in zip(self.image_parts, chunks)], dim=1)

    def _genes(self, batch: dict):
        import torch

        return torch.cat([_unit(p.encode_genes(_gene_batch(p, b)))
                          for p, b in zip(self.gene_parts, batch["parts"])], dim=1)

    def to(self, device: Any) -> "ConcatEncoder":
        for p in self.parts:
            p.to(device)
        return self

    def eval(self) -> "ConcatEncoder":
        for p in self.parts:
            p.eval()
        return self
