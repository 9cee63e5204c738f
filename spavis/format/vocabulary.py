"""The gene vocabulary's identity, as spavis records it and stamp checks it (one definition).

A corpus is indexed by an ordered gene vocabulary (``genes.parquet``: row i is gene_index i);
a model is trained on one (its tokenizer's ``vocab.json``). Two vocabularies are the same
when they hold the same Ensembl ids in the same order: a model is only valid on corpora of
its vocabulary, and two vocabularies of one size give garbage silently. So identity is never
compared by length.

* :data:`CONDITIONS`: the slide-condition vocabulary of ``slides.parquet`` ``condition`` (input
  manifests, ``slice.json`` sidecars and builds all check against it; re-exported by
  ``spavis.format.schema``).
* :func:`vocabulary_fingerprint`: sha256 of the ordered Ensembl ids, one per line. It is the
  ``vocab_sha256`` stamp has always written into ``tokenizer_config.json`` (same bytes, so every
  existing tokenizer folder stays valid) and what ``manifest.json`` records as
  ``vocabulary.fingerprint``. It is not ``vocabulary.checksum`` (spavis.genes.Vocabulary.checksum:
  sha256 of the whole vocab.json, name, version and symbols included), which stays what it was
  so corpus bytes and build keys do not change; the checksum says "this vocab.json file", the
  fingerprint says "these genes in this order".
* :func:`corpus_vocabulary_fingerprint`: a corpus's fingerprint, from its manifest when recorded,
  else computed from ``genes.parquet`` (corpora built before it was recorded).
* :func:`vocabulary_difference` / :func:`require_same_vocabulary`: the one equality check every
  consumer (training, embedding, evaluation) uses; the message names both sides, their sizes and
  fingerprints and the first differing position.

Standard library only (no pyarrow/pandas import here), so any layer may use it.
"""
from __future__ import annotations

import hashlib
from typing import Any, Iterable, Sequence

from spavis.errors import VocabularyError

__all__ = ["CONDITIONS", "vocabulary_fingerprint", "corpus_vocabulary_fingerprint", "vocabulary_difference",
           "require_same_vocabulary", "recorded_fingerprint", "FINGERPRINT_KEY", "LEGACY_TOKENIZER_KEY"]

CONDITIONS = ("cancer", "diseased", "healthy", "treated", "unknown")

FINGERPRINT_KEY = "fingerprint"  # manifest.json "vocabulary": {"name", "checksum", "fingerprint", "n_genes"}
LEGACY_TOKENIZER_KEY = "vocab_sha256"  # tokenizer_config.json key of the same value


def vocabulary_fingerprint(gene_ids: Iterable[str]) -> str:
    """sha256 (hex) of the ordered Ensembl ids, one per line: equal iff the vocabularies are equal, in order."""
    return hashlib.sha256("".join(f"{g}\n" for g in gene_ids).encode()).hexdigest()


def recorded_fingerprint(config: dict) -> str | None:
    """The fingerprint a tokenizer_config.json (or any metadata dict) records, under either key:
    ``vocabulary_fingerprint`` or the older ``vocab_sha256`` (the same value); None when absent."""
    for key in ("vocabulary_fingerprint", LEGACY_TOKENIZER_KEY):
        if config.get(key):
            return str(config[key])
    return None


def corpus_vocabulary_fingerprint(corpus: Any) -> str:
    """The fingerprint of an open corpus (``spavis.format.Corpus``): manifest.json's when recorded,
    else computed from ``genes.parquet`` (so corpora written before it was recorded read the same)."""
    recorded = ((getattr(corpus, "manifest", None) or {}).get("vocabulary") or {}).get(FINGERPRINT_KEY)
    if recorded:
        return str(recorded)
    return vocabulary_fingerprint(corpus.genes["ensembl_id"].astype(str).tolist())


def _ids(genes: Any) -> list[str]:
    """Ensembl ids of a vocabulary in any of its forms: a list, a tokenizer (``gene_ids``), a
    ``spavis.genes.Vocabulary`` (``ensembl_ids``), a corpus or a genes table (``ensembl_id`` column)."""
    for attr in ("gene_ids", "ensembl_ids"):
        if hasattr(genes, attr):
            return [str(g) for g in getattr(genes, attr)]
    if hasattr(genes, "genes") and hasattr(genes, "iter_slides"):  # an open corpus
        genes = genes.genes
    if hasattr(genes, "columns") and "ensembl_id" in genes.columns:
        return genes["ensembl_id"].astype(str).tolist()
    return [str(g) for g in genes]


def _first_difference(ids_a: list[str], ids_b: list[str]) -> str:
    first = next((i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y), min(len(ids_a), len(ids_b)))
    at_a = ids_a[first] if first < len(ids_a) else "-"
    at_b = ids_b[first] if first < len(ids_b) else "-"
    return f"first difference at gene {first}: {at_a} vs {at_b}"


def _describe(ids: list[str]) -> str:
    return f"{len(ids)} genes, sha256 {vocabulary_fingerprint(ids)[:12]}"


def vocabulary_difference(a: Sequence[str] | Any, b: Sequence[str] | Any) -> str | None:
    """None when ``a`` and ``b`` hold the same genes in the same order, else a short description:
    ``"N genes, sha256 X vs M genes, sha256 Y; first difference at gene i: A vs B"``."""
    ids_a, ids_b = _ids(a), _ids(b)
    if ids_a == ids_b:
        return None
    return f"{_describe(ids_a)} vs {_describe(ids_b)}; {_first_difference(ids_a, ids_b)}"


def require_same_vocabulary(a: Sequence[str] | Any, b: Sequence[str] | Any, *, a_name: str, b_name: str,
                            fix: str, error: type[Exception] = VocabularyError) -> None:
    """Raise ``error`` (one line: both names, sizes, fingerprints, the first difference and ``fix``)
    unless ``a`` and ``b`` are the same vocabulary in the same order (``a``/``b``: id lists,
    tokenizers, ``Vocabulary`` objects, corpora or genes tables)."""
    ids_a, ids_b = _ids(a), _ids(b)
    if ids_a == ids_b:
        return
    raise error(f"the vocabulary of {a_name} ({_describe(ids_a)}) differs from that of {b_name} "
                f"({_describe(ids_b)}; {_first_difference(ids_a, ids_b)}); {fix}")
