"""Feature bags on disk: ``FEATURES/<slide>.h5`` and ``FEATURES/manifest.json``.

Bag layout (the CLAM / TRIDENT one, so their readers work unchanged):

* ``features``: (N, D) float32, one row per tile, in ``coords`` order;
* ``coords``: (N, 2) int64, level-0 pixel (x, y) of each tile's top-left corner, row by row;
  attributes ``patch_size`` (tile px at the target scale), ``patch_size_level0``, ``patch_level``
  (pyramid level read) as CLAM / TRIDENT write them;
* root attributes: see :data:`BAG_ATTRS` (model, revision, license, tile µm / px, µm/px used,
  slide size and fingerprint, tissue parameters as JSON, the QC thumbnail and its downsample).

A bag appears only when complete (written to a hidden temporary beside it, then renamed), so an
existing ``<slide>.h5`` is a finished slide. The manifest is rewritten under a file lock (ranks
of ``torchrun`` and Snakemake jobs share it) and atomically.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from stamp.embed.writer import write_feature_bag as write_bag  # noqa: F401  (the one embeddings writer)
from stamp.errors import BagError

BAG_FORMAT = "stamp-slide-bag/1"
MANIFEST = "manifest.json"
QC_DIR = "qc"
BAG_SUFFIX = ".h5"
#: Root attributes of every bag (documented in docs/slides.md).
BAG_ATTRS = (
    "format", "slide", "model", "model_source", "model_revision", "model_hub_id", "model_license", "model_sha256",
    "embed_dim",
    "tile_um", "tile_px", "tile_px_level0", "um_per_px", "slide_um_per_px", "scale_source", "level",
    "level_downsample", "read_px", "slide_width", "slide_height", "slide_fingerprint", "slide_vendor",
    "backend", "tissue_params", "qc_png", "qc_downsample", "stamp_version",
)


@dataclass
class Bag:
    """One slide's tiles: features (N, D), coords (N, 2) and the root attributes."""

    features: np.ndarray
    coords: np.ndarray
    attrs: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.attrs.get("slide", ""))


def bag_path(out: str | os.PathLike, slide: str) -> Path:
    return Path(out) / f"{slide}{BAG_SUFFIX}"


def _plain(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return v


def read_attrs(path: str | os.PathLike) -> dict[str, Any]:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return {k: _plain(v) for k, v in f.attrs.items()}
    except OSError as exc:
        raise BagError(f"{path}: not a readable feature bag ({exc}); delete it and run embed-slides again") from None


def read_bag(path: str | os.PathLike) -> Bag:
    """Read a bag written by ``embed-slides`` (or CLAM / TRIDENT: ``features`` + ``coords``)."""
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f or "coords" not in f:
                raise BagError(f"{path}: no 'features' / 'coords' datasets; not a feature bag")
            feats = np.asarray(f["features"], np.float32)
            coords = np.asarray(f["coords"], np.int64).reshape(-1, 2)
            attrs = {k: _plain(v) for k, v in f.attrs.items()}
    except OSError as exc:
        raise BagError(f"{path}: not a readable feature bag ({exc}); delete it and embed the slide again") from None
    if feats.ndim == 3 and feats.shape[0] == 1:  # CLAM's (1, N, D)
        feats = feats[0]
    attrs.setdefault("slide", path.name[: -len(BAG_SUFFIX)])
    return Bag(feats, coords, attrs)


def list_bags(folder: str | os.PathLike) -> dict[str, Path]:
    """{slide: bag path} of a features folder (hidden temporaries ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BagError(f"{folder}: no such features folder; run `stamp embed-slides ... --out {folder}` first")
    return {p.name[: -len(BAG_SUFFIX)]: p for p in sorted(folder.glob(f"*{BAG_SUFFIX}")) if not p.name.startswith(".")}


def update_manifest(out: str | os.PathLike, entries: Iterable[dict[str, Any]], header: dict[str, Any] | None = None) -> Path:
    """Merge slide ``entries`` (keyed by ``slide``) into ``out/manifest.json`` under a file lock."""
    from filelock import FileLock

    from spavis.format.io import atomic_write_text

    out = Path(out)
    path = out / MANIFEST
    with FileLock(str(out / f".{MANIFEST}.lock")):
        data = read_manifest(out)
        slides = {e["slide"]: e for e in data.get("slides", [])}
        for e in entries:
            slides[e["slide"]] = e
        data["slides"] = [slides[k] for k in sorted(slides)]
        if header:
            data.update(header)
        data["format"] = BAG_FORMAT
        atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def read_manifest(out: str | os.PathLike) -> dict[str, Any]:
    path = Path(out) / MANIFEST
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise BagError(f"{path}: not valid JSON ({exc}); delete it (the bags are kept) and run again") from None


__all__ = ["Bag", "BAG_ATTRS", "BAG_FORMAT", "MANIFEST", "QC_DIR", "bag_path", "write_bag", "read_bag", "read_attrs",
           "list_bags", "update_manifest", "read_manifest"]
