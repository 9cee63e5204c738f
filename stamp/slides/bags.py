"""Feature bags on disk: one h5 per slide, in TRIDENT's layout (default) or CLAM's, plus ``manifest.json``.

Both projects store ``features`` (N, D) and ``coords`` (N, 2: level-0 x, y of each tile's top-left
corner) per slide, but they give the attributes of ``coords`` different meanings, and each reads
tiles back from those attributes:

* **TRIDENT** (``--layout trident``, default; ``FEATURES/<slide>.h5``): ``patch_size`` is the tile at
  the *target* magnification; ``level0_magnification`` / ``target_magnification`` give the scale
  (``WSIPatcher``: level-0 side = ``round(patch_size * (10 / target) / (10 / level0))``), plus
  ``patch_size_level0``, ``overlap``, ``name``, ``level0_width`` / ``level0_height``; ``features``
  carries ``name`` and ``encoder``. We write the magnifications as ``10 / µm per px`` exactly (an
  integer when it is one), so TRIDENT recomputes our level-0 tile to the pixel, and no ``patch_level``:
  CLAM's reader would take ``patch_size`` pixels at that level, a 64 µm tile on a 40x slide read at
  level 0. TRIDENT's ``savetodir`` (an absolute path nothing reads) is left out.
* **CLAM** (``--layout clam``; ``FEATURES/h5_files/<slide>.h5`` + ``FEATURES/pt_files/<slide>.pt``, as
  ``extract_features_fp.py`` writes them, read by ``Generic_MIL_Dataset``): ``patch_level`` is the
  pyramid level read and ``patch_size`` the tile in *that level's* pixels (512 at level 0 on a 40x slide
  without a 20x level), with CLAM's ``downsample``, ``level_dim``, ``downsampled_level_dim``, ``name``:
  ``Whole_Slide_Bag_FP`` reads back exactly the pixels we embedded. No TRIDENT magnifications there,
  so TRIDENT takes its legacy (CLAM) reader, which reads the same region. The ``.pt`` is the plain
  float32 tensor (``torch.load(path, weights_only=True)``); it is written before the h5, whose
  appearance marks a finished slide.

Root attributes (both layouts): :data:`BAG_ATTRS` (model, revision, license, tile µm / px, µm/px used,
level read, slide size and fingerprint, tissue parameters as JSON, the QC thumbnail relative to the
features folder and its downsample, the layout). A bag appears only when complete (hidden temporary,
then renamed); the manifest is rewritten under a file lock (ranks of ``torchrun`` and Snakemake jobs
share it) and atomically. :func:`list_bags` finds the bags of a folder in either layout.
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

BAG_FORMAT = "stamp-slide-bag/2"
MANIFEST = "manifest.json"
QC_DIR = "qc"
BAG_SUFFIX = ".h5"
LAYOUTS = ("trident", "clam")
DEFAULT_LAYOUT = "trident"
#: CLAM's feature folders (extract_features_fp.py, Generic_MIL_Dataset).
CLAM_H5_DIR, CLAM_PT_DIR = "h5_files", "pt_files"
#: Root attributes of every bag (documented in docs/slides.md).
BAG_ATTRS = (
    "format", "layout", "slide", "model", "model_source", "model_revision", "model_hub_id", "model_license",
    "model_sha256", "embed_dim",
    "tile_um", "tile_px", "tile_px_level0", "um_per_px", "slide_um_per_px", "scale_source", "level",
    "level_downsample", "level_width", "level_height", "read_px", "slide_width", "slide_height",
    "slide_fingerprint", "slide_vendor", "backend", "tissue_params", "qc_png", "qc_downsample", "stamp_version",
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


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise BagError(f"--layout {layout!r}: not a bag layout; pass one of {', '.join(LAYOUTS)}")
    return layout


def bag_path(out: str | os.PathLike, slide: str, layout: str = DEFAULT_LAYOUT) -> Path:
    """Where ``slide``'s h5 bag goes in the features folder ``out``."""
    out = Path(out)
    return (out / CLAM_H5_DIR if check_layout(layout) == "clam" else out) / f"{slide}{BAG_SUFFIX}"


def pt_path(out: str | os.PathLike, slide: str) -> Path:
    """CLAM's ``pt_files/<slide>.pt`` (``--layout clam`` only)."""
    return Path(out) / CLAM_PT_DIR / f"{slide}.pt"


def magnification(um_per_px: float) -> int | float:
    """TRIDENT's magnification of a scale: ``10 / µm per px`` (stamp.slides.reader.UM_PER_PX_AT_1X), an int
    when it is one (0.25 -> 40), else exact (0.2527 -> 39.57...), so TRIDENT's ``10 / magnification``
    gives the scale back."""
    from stamp.slides.reader import UM_PER_PX_AT_1X

    m = UM_PER_PX_AT_1X / float(um_per_px)
    return int(round(m)) if abs(m - round(m)) <= 1e-9 * m else m


def coords_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """The ``coords`` attributes of a bag from its root attributes, in the meaning of its ``layout``."""
    name = attrs["slide"]
    if attrs["layout"] == "clam":
        ds = float(attrs["level_downsample"])
        dim = (int(attrs["level_width"]), int(attrs["level_height"]))
        return {"patch_size": int(attrs["read_px"]), "patch_level": int(attrs["level"]), "downsample": (ds, ds),
                "downsampled_level_dim": dim, "level_dim": dim, "name": name}
    return {"patch_size": int(attrs["tile_px"]), "patch_size_level0": int(attrs["tile_px_level0"]),
            "level0_magnification": magnification(attrs["slide_um_per_px"]),
            "target_magnification": magnification(attrs["um_per_px"]), "overlap": 0, "name": name,
            "level0_width": int(attrs["slide_width"]), "level0_height": int(attrs["slide_height"])}


def write_slide_bag(out: str | os.PathLike, features: np.ndarray, coords: np.ndarray, attrs: dict[str, Any]) -> Path:
    """Write one slide's bag into the features folder ``out`` in ``attrs['layout']`` (module docstring);
    returns the h5 path, which appears last."""
    from spavis.format.io import atomic_open

    name, layout = attrs["slide"], attrs["layout"]
    if layout == "clam":
        import torch

        with atomic_open(pt_path(out, name), "wb") as fh:
            torch.save(torch.from_numpy(np.ascontiguousarray(features, np.float32)), fh)
    features_attrs = {"name": name, "encoder": attrs["model"], "encoder_revision": attrs.get("model_revision", "")}
    return write_bag(bag_path(out, name, layout), features, coords, attrs,
                     {"coords": coords_attrs(attrs), "features": features_attrs})


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


def folder_layout(folder: str | os.PathLike) -> str:
    """``clam`` when ``folder`` has CLAM's ``h5_files/``, else ``trident`` (bags at the top)."""
    return "clam" if (Path(folder) / CLAM_H5_DIR).is_dir() else "trident"


def list_bags(folder: str | os.PathLike) -> dict[str, Path]:
    """{slide: h5 bag} of a features folder in either layout (CLAM's ``h5_files/`` or bags at the top;
    hidden temporaries ignored). The one way bags are found (``stamp evaluate mil``, heatmaps)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BagError(f"{folder}: no such features folder; run `stamp embed-slides ... --out {folder}` first")
    top = {p.name[: -len(BAG_SUFFIX)]: p for p in sorted(folder.glob(f"*{BAG_SUFFIX}")) if not p.name.startswith(".")}
    if folder_layout(folder) == "trident":
        if not top and (folder / CLAM_PT_DIR).is_dir():
            raise BagError(f"{folder}: CLAM's {CLAM_PT_DIR}/ without {CLAM_H5_DIR}/; the h5 files hold the tile "
                           f"coordinates: copy {CLAM_H5_DIR}/ (written beside {CLAM_PT_DIR}/) into this folder too")
        return top
    if top:
        raise BagError(f"{folder}: bags both at the top and in {CLAM_H5_DIR}/ (two layouts in one folder); keep "
                       "one of them, or pass each as its own --features folder")
    h5 = folder / CLAM_H5_DIR
    return {p.name[: -len(BAG_SUFFIX)]: p for p in sorted(h5.glob(f"*{BAG_SUFFIX}")) if not p.name.startswith(".")}


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


__all__ = ["Bag", "BAG_ATTRS", "BAG_FORMAT", "MANIFEST", "QC_DIR", "LAYOUTS", "DEFAULT_LAYOUT", "CLAM_H5_DIR",
           "CLAM_PT_DIR", "bag_path", "pt_path", "magnification", "coords_attrs", "write_slide_bag", "write_bag",
           "read_bag", "read_attrs", "folder_layout", "list_bags", "update_manifest", "read_manifest",
           "check_layout"]
