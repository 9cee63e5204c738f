"""The settings of a corpus build, in one place: the CLI, ``build_shards`` and the Snakefile read them here.

Only what changes output bytes is here (vocabulary, QC threshold, graph size, shard size,
paired images, annotation columns); how a build runs (workers, work dir, progress) is not,
since it never changes a byte. ``build_shards(inputs, out, config, *, workers, ...)`` takes
these settings only through a ``BuildConfig``; its vocabulary is resolved once
(``BuildConfig.vocabulary``) and reused by everything the build does in this process.

This module sits below ``prepare``/``write``/``builder`` (they import it, it imports none
of them), so the layering test finds no cycle.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Mapping

from spavis.errors import SpavisError
from spavis.format.io import not_regular

DEFAULT_VOCAB = "stamp-v1"
DEFAULT_MIN_GENES = 100
DEFAULT_K_NEIGHBORS = 8
DEFAULT_MAX_SPOTS_PER_SHARD = 50_000


@lru_cache(maxsize=4)
def _vocab_by_name(name: str):
    from spavis.genes import load_vocabulary

    return load_vocabulary(name)


def resolve_vocab(vocab: Any):
    """A Vocabulary object from a preset name, vocab.json path or Vocabulary (loaded once per process)."""
    if isinstance(vocab, (str, os.PathLike)):
        what = not_regular(vocab) if os.path.lexists(vocab) else None
        if what not in (None, "missing"):  # a FIFO or /dev/zero given as vocab.json would hang the read
            raise SpavisError(f"--vocab {os.fspath(vocab)}: is {what}, not a regular file; pass a preset name "
                              "or a vocab.json file.")
        return _vocab_by_name(str(vocab))
    return vocab


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

    @classmethod
    def from_settings(cls, **settings: Any) -> "BuildConfig":
        """The defaults with the given settings (None = default); a TypeError names unknown ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise TypeError(f"unknown build setting(s) {', '.join(unknown)}; BuildConfig fields: "
                            f"{', '.join(sorted(known))}")
        return cls().replace(**settings)

    def replace(self, **changes: Any) -> "BuildConfig":
        """A copy with the given fields changed (None values are ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    @cached_property
    def vocabulary(self):
        """The ``Vocabulary`` this build maps genes to, resolved once (preset, vocab.json or object)."""
        return resolve_vocab(self.vocab)

    def params(self) -> dict[str, Any]:
        """The parameters recorded in the manifest and hashed into the build key.

        Images and annotation columns are recorded only when asked for, so builds without them
        keep the keys (and bytes) they had before these options existed.
        """
        from spavis.shards.annotations import annotations_param

        vocab_obj = self.vocabulary
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

    def prepare_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``prepare_slice`` for this build (what ``build_shards`` and the Snakefile pass).

        The vocabulary travels by name or path when it has one (cheap to send to a worker, which
        resolves it once per process), else as the object.
        """
        from spavis.shards.annotations import annotations_param

        vocab = self.vocab if isinstance(self.vocab, str) else self.vocabulary
        kwargs: dict[str, Any] = {"vocab": vocab, "min_genes": self.min_genes, "k_neighbors": self.k_neighbors}
        if self.obs_columns:
            recorded = annotations_param(self.annotations)
            annotations = None if recorded is None else {"path": str(Path(self.annotations).resolve()), **recorded}
            kwargs |= {"obs_columns": self.obs_columns, "annotations": annotations}
        if self.with_images:
            kwargs["with_images"] = True
        return kwargs
