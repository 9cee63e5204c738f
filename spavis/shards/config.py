"""The settings of a corpus build, in one place: the CLI, ``build_shards`` and the Snakefile read them here.

Only what changes output bytes is here (vocabulary, QC threshold, graph size, shard size,
paired images, annotation columns); how a build runs (workers, work dir, progress) is not,
since it never changes a byte.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from spavis.errors import SpavisError

DEFAULT_VOCAB = "stamp-v1"
DEFAULT_MIN_GENES = 100
DEFAULT_K_NEIGHBORS = 8
DEFAULT_MAX_SPOTS_PER_SHARD = 50_000


@dataclass(frozen=True)
class BuildConfig:
    """What a corpus is built with (hashed into the build key through ``params``).

    vocab: preset name (``stamp-v1``, ``gencode48-pc-mt``), a ``vocab.json`` path or a
    ``Vocabulary``; min_genes: detected vocabulary genes a spot needs to be kept;
    k_neighbors: spatial neighbours stored per spot; max_spots_per_shard: spots per
    expression file (a slide never spans two files); with_images: paired H&E patches and
    regions (spavis.shards.images); obs_columns / annotations: label columns carried into the
    rows, from the slides' obs or a CSV keyed by barcode (spavis.shards.annotations).
    """

    vocab: Any = DEFAULT_VOCAB
    min_genes: int = DEFAULT_MIN_GENES
    k_neighbors: int = DEFAULT_K_NEIGHBORS
    max_spots_per_shard: int = DEFAULT_MAX_SPOTS_PER_SHARD
    with_images: bool = False
    obs_columns: Any = ()
    annotations: Any = None

    def __post_init__(self) -> None:
        for name, low in (("min_genes", 0), ("k_neighbors", 1), ("max_spots_per_shard", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                flag = "--" + name.replace("_", "-")
                raise SpavisError(f"{flag} must be an integer of at least {low} (got {value!r}).")
        if isinstance(self.vocab, os.PathLike):
            object.__setattr__(self, "vocab", os.fspath(self.vocab))
        from spavis.shards.annotations import AnnotationError, parse_obs_columns

        object.__setattr__(self, "obs_columns", parse_obs_columns(self.obs_columns))
        object.__setattr__(self, "with_images", bool(self.with_images))
        if self.annotations is not None:
            object.__setattr__(self, "annotations", os.fspath(self.annotations))
            if not self.obs_columns:
                raise AnnotationError("--annotations needs --obs-columns naming the columns to take from it")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "BuildConfig":
        """From a config mapping (e.g. Snakemake's ``config``): known keys, None = default."""
        known = {f.name for f in dataclasses.fields(cls)}
        given = {k: values[k] for k in known if values.get(k) is not None}
        for k in ("min_genes", "k_neighbors", "max_spots_per_shard"):
            if k in given and isinstance(given[k], str) and given[k].strip().isdigit():
                given[k] = int(given[k])
        return cls(**given)

    def replace(self, **changes: Any) -> "BuildConfig":
        """A copy with the given fields changed (None values are ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def params(self, vocab_obj=None) -> dict[str, Any]:
        """The parameters recorded in the manifest and hashed into the build key.

        Images and annotation columns are recorded only when asked for, so builds without them
        keep the keys (and bytes) they had before these options existed.
        """
        from spavis.shards.annotations import annotations_param
        from spavis.shards.prepare import resolve_vocab

        vocab_obj = vocab_obj if vocab_obj is not None else resolve_vocab(self.vocab)
        params: dict[str, Any] = {
            "vocab": vocab_obj.name,
            "min_genes": int(self.min_genes),
            "k_neighbors": int(self.k_neighbors),
            "max_spots_per_shard": int(self.max_spots_per_shard),
        }
        if self.obs_columns:
            params["obs_columns"] = list(self.obs_columns)
            recorded = annotations_param(self.annotations)
            if recorded is not None:
                params["annotations"] = recorded
        if self.with_images:
            params["with_images"] = True
        return params

    def prepare_kwargs(self, vocab_arg=None) -> dict[str, Any]:
        """Keyword arguments of ``prepare_slice`` for this build (what the CLI and Snakefile pass)."""
        from spavis.shards.annotations import annotations_param

        kwargs: dict[str, Any] = {"vocab": self.vocab if vocab_arg is None else vocab_arg,
                                  "min_genes": self.min_genes, "k_neighbors": self.k_neighbors}
        if self.obs_columns:
            recorded = annotations_param(self.annotations)
            annotations = None if recorded is None else {"path": str(Path(self.annotations).resolve()), **recorded}
            kwargs |= {"obs_columns": self.obs_columns, "annotations": annotations}
        if self.with_images:
            kwargs["with_images"] = True
        return kwargs
