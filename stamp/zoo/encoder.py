"""The one object every consumer of the zoo receives: :class:`Encoder`.

``stamp.load(name_or_path)`` returns an :class:`Encoder` whatever the source (a zoo name such
as ``uni`` or ``stamp-v1``, a run folder, a model folder, a Hub repo id). Embedding commands
(``stamp embed``, ``stamp embed-slides``, ``stamp evaluate``) only use this contract, so a new
model family needs a factory entry, never a change to them.

Contract
--------
* ``kind``: ``"image"`` (patch encoder), ``"gene"`` (spot expression encoder) or ``"aligned"``
  (both, one embedding space: STAMP).
* ``embed_dim``: width of the vectors ``encode_*`` return.
* ``transform``: image encoders and aligned models: uint8 RGB array (H, W, 3) or PIL image ->
  float tensor (3, S, S), the encoder's own preprocessing (resize, crop, mean/std). ``None``
  for gene encoders. The zoo's transforms also offer its two halves (:mod:`stamp.models.pixels`):
  ``to_uint8`` (geometry, run in loader workers) and ``normalize`` (on the model's device).
* ``tokenizer``: gene encoders and aligned models: a :class:`stamp.tokenizer.GeneTokenizer`
  (``None`` when the model needs a means file it was not given, or reads raw counts); ``None`` for
  image encoders.
* ``encode_images(pixels)``: (B, 3, S, S) stacked ``transform`` outputs -> (B, embed_dim) float
  tensor, not normalised unless the model's own pooling normalises.
* ``encode_genes(input_ids)``: (B, L) token ids from ``tokenizer`` -> (B, embed_dim).
* ``counts``: every gene side with its own input rules (scGPT, Nicheformer, Geneformer, OmiCLIP's
  gene sentences, a ``stamp finetune`` run's gene projection, the gene parts of ``A+B``): a
  :class:`stamp.models.gene_inputs.CountInput` that turns raw counts of the corpus's genes into the
  model's inputs (``tokenizer`` is then None); ``encode_genes(counts(X, slide=...))`` embeds them.
  Consumers go slide by slide (:meth:`Encoder.embed_counts`, :mod:`stamp.zoo.counts`).
* ``provenance``: :class:`Provenance` (name, Hub id, revision, license, ...), recorded by every
  embeddings writer.
* ``module``: the underlying ``torch.nn.Module``; ``to(device)``, ``device``, ``eval()``.
* ``architecture`` (image entries of the zoo only): how to rebuild the module without its weights
  (the catalogue entry as data and the repo's config), what ``stamp finetune`` records.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

KINDS = ("image", "gene", "aligned")


@dataclass(frozen=True)
class Provenance:
    """Where an encoder's weights came from; written into every embeddings file."""

    name: str
    source: str = ""  # what the user passed (zoo name, folder, repo id)
    hub_id: Optional[str] = None
    revision: Optional[str] = None  # Hub commit sha when the weights came from the Hub
    license: str = "unknown"
    commercial: Optional[bool] = None
    weights_sha256: Optional[str] = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, {}, "")}


def marks_of(encoder: "Encoder") -> str:
    """Table 1's V / L / G marks of an encoder (modalities seen in pretraining): its provenance's record
    (catalogue entries, fine-tuned runs, concatenations), else what its kind implies."""
    marks = (encoder.provenance.extra or {}).get("marks")
    return str(marks) if marks else {"image": "V", "gene": "G", "aligned": "V+G"}[encoder.kind]


class Encoder:
    """A loaded encoder with its preprocessing and provenance (see the module docstring)."""

    def __init__(self, module: Any, *, kind: str, embed_dim: int, provenance: Provenance,
                 transform: Optional[Callable[[Any], Any]] = None, tokenizer: Any = None,
                 image_fn: Optional[Callable[[Any], Any]] = None, gene_fn: Optional[Callable[[Any], Any]] = None,
                 input_size: Optional[int] = None, counts: Any = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.module = module
        self.kind = kind
        self.embed_dim = int(embed_dim)
        self.provenance = provenance
        self.transform = transform
        self.tokenizer = tokenizer
        self.input_size = input_size
        self._image_fn = image_fn
        self._gene_fn = gene_fn
        self.counts = counts

    @property
    def name(self) -> str:
        return self.provenance.name

    @property
    def device(self):
        import torch

        for p in self.module.parameters():
            return p.device
        return torch.device("cpu")

    def to(self, device: Any) -> "Encoder":
        self.module.to(device)
        return self

    def eval(self) -> "Encoder":
        self.module.eval()
        return self

    def gene_side_problem(self) -> Optional[str]:
        """Why this encoder cannot embed spot expression (None when it can): an image encoder, or a gene
        side whose tokenizer needs a means file it was not given. Callers raise it with their own fix."""
        if self.kind == "image":
            return "an image encoder has no gene side"
        if self.tokenizer is None and self.counts is None:
            return ("no gene tokenizer (tokenizer_config.json missing, or a gene means file needed: pass --means, "
                    "the released Visium_mean.npy for stamp-v1, or register it once with `stamp models set-means`)")
        return None

    def encode_images(self, pixels: Any) -> Any:
        if self._image_fn is None:
            from stamp.errors import StampError

            raise StampError(f"{self.name}: a {self.kind} encoder has no image side; pick an image or aligned model")
        return self._image_fn(pixels)

    def encode_genes(self, input_ids: Any) -> Any:
        if self._gene_fn is None:
            from stamp.errors import StampError

            raise StampError(f"{self.name}: a {self.kind} encoder has no gene side; pick a gene or aligned model")
        return self._gene_fn(input_ids)

    def embed_counts(self, X: Any, *, slide: Any = None) -> Any:
        """Raw counts (scipy CSR, spots x the corpus genes given to ``counts.bind``) -> (B, embed_dim);
        ``slide``: ``counts.slide_context`` of the whole slide these spots come from."""
        if self.counts is None:
            from stamp.errors import StampError

            raise StampError(f"{self.name}: this encoder reads token ids of its tokenizer, not raw counts")
        return self.encode_genes(self.counts(X, slide=slide))

    def __repr__(self) -> str:
        return f"Encoder(name={self.name!r}, kind={self.kind!r}, embed_dim={self.embed_dim})"


__all__ = ["Encoder", "Provenance", "KINDS", "marks_of"]
