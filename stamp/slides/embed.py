"""``embed_slides``: one feature bag per slide from any image encoder of the zoo.

Per slide: open (:mod:`stamp.slides.reader`), tissue mask and tile grid
(:mod:`stamp.slides.tiling`), QC thumbnail, then the tiles are read, resized to the target scale
and put through the encoder's own ``transform`` in DataLoader worker processes while the model
runs (``torch.inference_mode``, bf16 autocast on CUDA). The bag is written atomically; a slide
whose bag exists is skipped (after checking it was made with the same model and tiling), so a
killed run resumes where it stopped. A slide that fails is recorded in ``manifest.json`` with
its reason and the next one starts (``fail_fast`` stops instead).

Several processes: under ``torchrun`` (``RANK`` / ``WORLD_SIZE`` in the environment) each rank
takes every WORLD_SIZE-th slide of the sorted list, on its own GPU (``LOCAL_RANK``), with no
collectives; the manifest is merged under a file lock, as for Snakemake's one job per slide.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from stamp.errors import StampError
from stamp.slides import bags
from stamp.errors import BagError, SlideError
from stamp.slides.reader import SLIDE_SUFFIXES, fingerprint, open_slide, slide_name
from stamp.slides.tissue import TissueParams

log = logging.getLogger(__name__)


@dataclass
class EmbedSlidesResult:
    """What one call did: manifest entries of this process's slides, by status."""

    out: Path
    entries: list[dict[str, Any]] = field(default_factory=list)

    def _by(self, status: str) -> list[dict[str, Any]]:
        return [e for e in self.entries if e["status"] == status]

    @property
    def done(self) -> list[dict[str, Any]]:
        return self._by("done")

    @property
    def skipped(self) -> list[dict[str, Any]]:
        return self._by("skipped")

    @property
    def failed(self) -> list[dict[str, Any]]:
        return self._by("failed")

    @property
    def empty(self) -> list[dict[str, Any]]:
        return self._by("empty")

    def summary(self) -> str:
        """One line: counts, and the first failures with their reasons."""
        parts = [f"{len(self.done)} embedded", f"{len(self.skipped)} already done"]
        if self.empty:
            parts.append(f"{len(self.empty)} without tissue")
        line = ", ".join(parts)
        if self.failed:
            first = "; ".join(f"{e['slide']}: {e['reason']}" for e in self.failed[:3])
            more = f" (+{len(self.failed) - 3} more)" if len(self.failed) > 3 else ""
            line = f"{len(self.failed)} of {len(self.entries)} slides failed ({first}{more}); {line}; " \
                   f"see {self.out / bags.MANIFEST}"
        return line


def expand_slides(slides: Sequence[str | os.PathLike]) -> list[Path]:
    """Slide files from files and folders (a folder: its files with a slide suffix), sorted by name,
    duplicate names refused (two bags cannot share ``<slide>.h5``)."""
    paths: list[Path] = []
    for s in slides:
        p = Path(s)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in SLIDE_SUFFIXES
                           and not q.name.startswith("."))
            if not found:
                raise SlideError(f"{p}: no slide files ({', '.join(SLIDE_SUFFIXES)}) in this folder")
            paths.extend(found)
        else:
            paths.append(p)
    seen: dict[str, Path] = {}
    for p in paths:
        name = slide_name(p)
        if name in seen and seen[name].resolve() != p.resolve():
            raise SlideError(f"{p} and {seen[name]} share the slide name {name!r} (bags are <slide>.h5); "
                             "rename one or embed them into different --out folders")
        seen[name] = p
    return sorted(seen.values(), key=lambda q: slide_name(q))


def rank_share(paths: list[Path], rank: Optional[int] = None, world_size: Optional[int] = None) -> list[Path]:
    """This process's slides: every ``world_size``-th from ``rank`` (torchrun's RANK / WORLD_SIZE)."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise StampError(f"RANK={rank} WORLD_SIZE={world_size}: need 0 <= RANK < WORLD_SIZE")
    return paths[rank::world_size]


class TileDataset:
    """Map-style dataset of one slide's tiles: read at ``level``, then the encoder's preprocessing.

    A transform with two stages (:mod:`stamp.models.pixels`: ``to_uint8`` + ``normalize``) gets the tile as read
    (``read_px``) and resizes it once, straight to the model's input, in uint8: items are uint8
    tensors and ``normalize`` runs on the model's device (:func:`_embed_tiles`). Any other callable gets
    the tile resized to ``tile_px`` (PIL) and runs whole in the workers. The slide is opened lazily in
    each worker process (handles are never shared across a fork).
    """

    def __init__(self, path: Path, um_per_px: Optional[float], coords: np.ndarray, level: int, read_px: int,
                 tile_px: int, transform: Any) -> None:
        from stamp.models.pixels import two_stages

        self.path, self.um_per_px = path, um_per_px
        self.coords, self.level, self.read_px, self.tile_px = coords, level, read_px, tile_px
        self.transform = transform
        self.stages = two_stages(transform)
        self._slide = None
        self._pid = None

    def __len__(self) -> int:
        return len(self.coords)

    def region(self, i: int) -> np.ndarray:
        """Tile ``i`` as read: (read_px, read_px, 3 or 4) uint8, RGB first (:meth:`Slide.read_tile`)."""
        if self._slide is None or self._pid != os.getpid():
            self._slide = open_slide(self.path, um_per_px=self.um_per_px)
            self._pid = os.getpid()
        x, y = self.coords[i]
        return self._slide.read_tile(int(x), int(y), self.level, self.read_px, self.read_px)

    def tile(self, i: int) -> np.ndarray:
        """uint8 RGB (tile_px, tile_px, 3) of tile ``i`` at the target scale."""
        from stamp.models.pixels import as_uint8_rgb

        img = as_uint8_rgb(self.region(i))
        if self.read_px != self.tile_px:
            from PIL import Image

            img = np.asarray(Image.fromarray(img).resize((self.tile_px, self.tile_px), Image.BILINEAR))
        return img

    def __getitem__(self, i: int):
        if self.stages is not None:
            return self.stages[0](self.region(i))
        img = self.tile(i)
        return self.transform(img) if self.transform is not None else img


def _provenance_attrs(encoder) -> dict[str, Any]:
    """The bag's model attributes, derived from the one embeddings record (stamp.embed.writer)."""
    from stamp.embed.writer import model_record

    r = model_record(encoder, embedding="tiles")
    return {"model": r["stamp_model_name"], "model_source": r["stamp_model"], "model_revision": r["stamp_model_revision"],
            "model_hub_id": r["stamp_model_hub_id"], "model_license": r["stamp_model_license"],
            "model_sha256": r["stamp_model_sha256"], "embed_dim": encoder.embed_dim}


def _config_key(encoder, params: TissueParams) -> dict[str, Any]:
    """What must match for an existing bag to count as this run's (model + tiling)."""
    return {"model": encoder.provenance.name, "model_revision": encoder.provenance.revision or "",
            "tissue_params": params.to_dict()}


def _check_existing(path: Path, key: dict[str, Any]) -> int:
    attrs = bags.read_attrs(path)
    have = {"model": attrs.get("model"), "model_revision": attrs.get("model_revision", ""),
            "tissue_params": json.loads(attrs.get("tissue_params", "{}"))}
    if have != key:
        what = f"another model ({have['model']})" if (have["model"], have["model_revision"]) != \
            (key["model"], key["model_revision"]) else "other tiling options"
        raise BagError(f"{path}: made with {what}; use another --out folder, or delete the bag to embed "
                       "the slide again")
    import h5py

    with h5py.File(path, "r") as f:
        return int(f["features"].shape[0])


def _embed_tiles(dataset: TileDataset, encoder, device, *, batch_size: int, workers: int, on_batch=None) -> np.ndarray:
    import torch
    from torch.utils.data import DataLoader

    n = len(dataset)
    feats = np.empty((n, encoder.embed_dim), np.float32)
    if n == 0:
        return feats
    cuda = device.type == "cuda"
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=cuda,
                        prefetch_factor=4 if workers else None, persistent_workers=False)
    pos = 0
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        for batch in loader:
            batch = batch.to(device, non_blocking=True)
            if dataset.stages is not None:  # uint8 from the workers: scaled and normalised here, on the device
                batch = dataset.stages[1](batch)
            out = encoder.encode_images(batch)
            k = out.shape[0]
            feats[pos:pos + k] = out.float().cpu().numpy()
            pos += k
            if on_batch:
                on_batch(k)
    return feats


def embed_one(path: Path, encoder, out: Path, params: TissueParams, *, um_per_px: Optional[float], device,
              batch_size: int, workers: int, on_plan=None, on_batch=None,
              model_attrs: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Embed one slide into ``out/<slide>.h5`` (+ ``out/qc/<slide>.png``); returns its manifest entry.
    ``model_attrs``: the bag's model attributes when the caller has them (one per run, not per slide)."""
    from spavis.format.io import atomic_open

    from stamp import __version__
    from stamp.slides.tiling import qc_image

    name = slide_name(path)
    t0 = time.time()
    fp = fingerprint(path) if path.is_file() else None
    with open_slide(path, um_per_px=um_per_px) as slide:
        from stamp.slides.tiling import plan_tiles

        plan = plan_tiles(slide, params)
        qc = qc_image(plan)
        qc_rel = f"{bags.QC_DIR}/{name}.png"
        with atomic_open(out / qc_rel, "wb") as fh:
            qc.save(fh, format="PNG")
        qc_ds = slide.dimensions[0] / qc.size[0]
        attrs: dict[str, Any] = {
            "format": bags.BAG_FORMAT, "slide": name, **(model_attrs or _provenance_attrs(encoder)),
            "tile_um": params.tile_um, "tile_px": plan.tile_px, "tile_px_level0": plan.tile0,
            "um_per_px": params.um_per_px, "slide_um_per_px": plan.slide_um_per_px,
            "scale_source": slide.scale.source if slide.scale else "", "level": plan.level,
            "level_downsample": plan.level_downsample, "read_px": plan.read_px,
            "slide_width": slide.dimensions[0], "slide_height": slide.dimensions[1], "slide_fingerprint": fp or "",
            "slide_vendor": slide.vendor, "backend": slide.backend, "tissue_params": params.to_dict(),
            "qc_png": qc_rel, "qc_downsample": qc_ds, "stamp_version": __version__,
        }
    if on_plan:
        on_plan(name, len(plan.coords))
    dataset = TileDataset(path, um_per_px, plan.coords, plan.level, plan.read_px, plan.tile_px, encoder.transform)
    feats = _embed_tiles(dataset, encoder, device, batch_size=batch_size, workers=workers, on_batch=on_batch)
    bags.write_bag(bags.bag_path(out, name), feats, plan.coords, attrs)
    entry = {"slide": name, "path": str(path), "status": "done" if len(feats) else "empty", "tiles": len(feats),
             "bag": f"{name}{bags.BAG_SUFFIX}", "qc": qc_rel, "fingerprint": fp, "seconds": round(time.time() - t0, 2)}
    if not len(feats):
        entry["reason"] = (f"no tile with >= {params.min_tissue:g} tissue (see {qc_rel}); lower --min-tissue or "
                           "--min-tissue-area")
    return entry


def _failure_reason(exc: BaseException) -> str:
    msg = " ".join(str(exc).split()) or type(exc).__name__
    return msg if isinstance(exc, StampError) else f"{type(exc).__name__}: {msg}"


def embed_slides(slides: Sequence[str | os.PathLike], model: Any, out: str | os.PathLike, *,
                 params: TissueParams = TissueParams(), um_per_px: Optional[float] = None, batch_size: int = 64,
                 workers: Optional[int] = None, device: Optional[str] = None, progress: bool = True,
                 fail_fast: bool = False, rank: Optional[int] = None, world_size: Optional[int] = None
                 ) -> EmbedSlidesResult:
    """Embed ``slides`` (files or folders) with ``model`` (a zoo name / folder / Hub id, or an already
    loaded :class:`stamp.zoo.encoder.Encoder`) into ``out``; see the module docstring.

    ``um_per_px``: the slides' level-0 scale when the files have none (overrides the files' own).
    ``workers``: tile-reading processes (default: CPU count, at most 8; 0 reads in this process).
    """
    import torch

    from stamp.zoo.encoder import Encoder
    from stamp.slides.progress import SlideProgress

    out = Path(out)
    paths = rank_share(expand_slides(slides), rank, world_size)
    local_rank = os.environ.get("LOCAL_RANK")
    if device is None and torch.cuda.is_available():
        device = f"cuda:{local_rank}" if local_rank is not None else "cuda"
    dev = torch.device(device or "cpu")
    if isinstance(model, Encoder):
        encoder = model.to(dev).eval()
    else:
        import stamp

        encoder = stamp.load(str(model), device=str(dev), kind="image")
    if encoder.kind not in ("image", "aligned") or encoder.transform is None:
        raise SlideError(f"{model}: a {encoder.kind} encoder has no image side; embed-slides needs an image or "
                         "aligned model (see `stamp models`)")
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    out.mkdir(parents=True, exist_ok=True)
    key = _config_key(encoder, params)
    model_attrs = _provenance_attrs(encoder)  # the model is resolved and its weights hashed once per run
    header = {"model": encoder.provenance.name, "model_revision": encoder.provenance.revision or "",
              "tissue_params": params.to_dict()}
    result = EmbedSlidesResult(out)
    with SlideProgress(len(paths), enabled=progress) as bar:
        for path in paths:
            name = slide_name(path)
            bag = bags.bag_path(out, name)
            if bag.exists():
                n = _check_existing(bag, key)
                result.entries.append({"slide": name, "status": "skipped", "tiles": n})
                bar.slide_done(name, "already done")
                continue
            try:
                entry = embed_one(path, encoder, out, params, um_per_px=um_per_px, device=dev, batch_size=batch_size,
                                  workers=workers, on_plan=bar.start_slide, on_batch=bar.tiles,
                                  model_attrs=model_attrs)
            except KeyboardInterrupt:
                raise
            except Exception as exc:
                from spavis.errors import debug_enabled

                if debug_enabled():
                    raise
                entry = {"slide": name, "path": str(path), "status": "failed", "tiles": 0,
                         "reason": _failure_reason(exc)}
                bags.update_manifest(out, [entry], header)
                result.entries.append(entry)
                bar.slide_done(name, "failed")
                if fail_fast:
                    raise SlideError(f"{path}: {entry['reason']} (--fail-fast: stopped; "
                                     f"{len(result.done)} slides embedded)") from exc
                log.warning("%s", entry["reason"] if str(path) in entry["reason"] else f"{path}: {entry['reason']}")
                continue
            bags.update_manifest(out, [entry], header)
            result.entries.append(entry)
            bar.slide_done(name, f"{entry['tiles']} tiles")
    return result


__all__ = ["embed_slides", "embed_one", "expand_slides", "rank_share", "TileDataset", "EmbedSlidesResult"]
