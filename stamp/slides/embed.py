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
import re
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
            # not only regular files: a FIFO or a dangling link named like a slide is reported, not skipped
            found = sorted(q for q in p.iterdir() if not q.is_dir() and q.suffix.lower() in SLIDE_SUFFIXES
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


def _config_key(encoder, params: TissueParams, layout: str) -> dict[str, Any]:
    """What must match for an existing bag to count as this run's (bag format + layout, model, tiling)."""
    return {"format": bags.BAG_FORMAT, "layout": layout, "model": encoder.provenance.name,
            "model_revision": encoder.provenance.revision or "", "tissue_params": params.to_dict()}


def _reusable(bag: Path, key: dict[str, Any], path: Path, previous: Optional[dict[str, Any]]) -> Optional[int]:
    """Tiles of ``bag`` when this run may keep it; None when the slide must be embedded again.

    Kept only when it was made the same way (else the run stops: one line, use another --out) and from the
    same slide: its recorded fingerprint equals ``path``'s now. A different fingerprint from the path the
    manifest records means the file changed there: embedded again (and said so). From another path it is
    another slide with the same name: that slide fails (one line), the bag is kept."""
    attrs = bags.read_attrs(bag)
    have = {"format": attrs.get("format"), "layout": attrs.get("layout", "trident"), "model": attrs.get("model"),
            "model_revision": attrs.get("model_revision", ""),
            "tissue_params": json.loads(attrs.get("tissue_params", "{}"))}
    if have != key:
        if have["format"] != key["format"]:
            what = f"another stamp version (bag format {have['format']})"
        elif have["layout"] != key["layout"]:
            what = f"--layout {have['layout']}"
        elif (have["model"], have["model_revision"]) != (key["model"], key["model_revision"]):
            what = f"another model ({have['model']})"
        else:
            what = "other tiling options"
        raise BagError(f"{bag}: made with {what}; use another --out folder, or delete the bag to embed "
                       "the slide again")
    if attrs.get("slide_fingerprint") == fingerprint(path):
        import h5py

        with h5py.File(bag, "r") as f:
            return int(f["features"].shape[0])
    before = (previous or {}).get("path")
    if before and os.path.abspath(before) == os.path.abspath(path):
        log.warning("%s: the slide file changed since %s was made; embedding it again", path, bag)
        return None
    raise SlideError(f"{bag} holds the slide {slide_name(path)!r} of {before or 'another file'}, whose content "
                     f"differs from {path}; two slides named {slide_name(path)!r} cannot share one --out: use "
                     "another --out folder, or delete the bag to embed this file")


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
    batches = iter(loader)
    try:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            for batch in batches:
                batch = batch.to(device, non_blocking=True)
                if dataset.stages is not None:  # uint8 from the workers: scaled and normalised here, on the device
                    batch = dataset.stages[1](batch)
                out = encoder.encode_images(batch)
                k = out.shape[0]
                feats[pos:pos + k] = out.float().cpu().numpy()
                pos += k
                if on_batch:
                    on_batch(k)
    finally:
        # after a failed tile the iterator would linger in a reference cycle; collected later inside the next
        # slide's forked worker it prints "AssertionError: can only test a child process": stop its workers now
        stop = getattr(batches, "_shutdown_workers", None)
        if stop is not None:
            stop()
    return feats


def embed_one(path: Path, encoder, out: Path, params: TissueParams, *, um_per_px: Optional[float], device,
              batch_size: int, workers: int, layout: str = bags.DEFAULT_LAYOUT, on_plan=None,
              on_batch=None, model_attrs: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Embed one slide into ``out`` (its bag in ``layout``, ``qc/<slide>.png``); returns its manifest entry.
    Nothing is written before the features are computed: a slide that fails leaves no file.
    ``model_attrs``: the bag's model attributes when the caller has them (one per run, not per slide)."""
    from spavis.format.io import atomic_open

    from stamp import __version__
    from stamp.slides.tiling import plan_tiles, qc_image

    name = slide_name(path)
    t0 = time.time()
    fp = fingerprint(path)  # regular files only (a FIFO is refused here, not waited on)
    with open_slide(path, um_per_px=um_per_px) as slide:
        plan = plan_tiles(slide, params)
        qc = qc_image(plan)
        qc_rel = f"{bags.QC_DIR}/{name}.png"
        level_w, level_h = slide.level_dimensions[plan.level]
        attrs: dict[str, Any] = {
            "format": bags.BAG_FORMAT, "layout": layout, "slide": name, **(model_attrs or _provenance_attrs(encoder)),
            "tile_um": params.tile_um, "tile_px": plan.tile_px, "tile_px_level0": plan.tile0,
            "um_per_px": params.um_per_px, "slide_um_per_px": plan.slide_um_per_px,
            "scale_source": slide.scale.source if slide.scale else "", "level": plan.level,
            "level_downsample": plan.level_downsample, "level_width": level_w, "level_height": level_h,
            "read_px": plan.read_px, "slide_width": slide.dimensions[0], "slide_height": slide.dimensions[1],
            "slide_fingerprint": fp, "slide_vendor": slide.vendor, "backend": slide.backend,
            "tissue_params": params.to_dict(), "qc_png": qc_rel, "qc_downsample": slide.dimensions[0] / qc.size[0],
            "stamp_version": __version__,
        }
    if on_plan:
        on_plan(name, len(plan.coords))
    dataset = TileDataset(path, um_per_px, plan.coords, plan.level, plan.read_px, plan.tile_px, encoder.transform)
    feats = _embed_tiles(dataset, encoder, device, batch_size=batch_size, workers=workers, on_batch=on_batch)
    with atomic_open(out / qc_rel, "wb") as fh:
        qc.save(fh, format="PNG")
    bag = bags.write_slide_bag(out, feats, plan.coords, attrs)
    entry = {"slide": name, "path": os.path.abspath(path), "status": "done" if len(feats) else "empty",
             "tiles": len(feats), "bag": bag.relative_to(out).as_posix(), "qc": qc_rel, "fingerprint": fp,
             "seconds": round(time.time() - t0, 2)}
    if not len(feats):
        entry["reason"] = (f"no tile with >= {params.min_tissue:g} tissue (see {qc_rel}); lower --min-tissue, "
                           "--min-saturation or --min-tissue-area")
    return entry


def _entry_of(bag: Path, out: Path, path: Path, tiles: int) -> dict[str, Any]:
    """The manifest entry of a finished bag, from its attributes."""
    attrs = bags.read_attrs(bag)
    return {"slide": slide_name(path), "path": os.path.abspath(path), "status": "done" if tiles else "empty",
            "tiles": tiles, "bag": bag.relative_to(out).as_posix(), "qc": attrs.get("qc_png", ""),
            "fingerprint": attrs.get("slide_fingerprint", "")}


def _failure_reason(exc: BaseException) -> str:
    """One line for a failed slide. An error raised in a DataLoader worker arrives wrapped ("Caught
    SlideError in DataLoader worker process 0. Original Traceback ..."): its last line is the message."""
    text = str(exc)
    if "Original Traceback" in text:
        text = re.sub(r"^[\w.]+: ", "", text.strip().splitlines()[-1])
    msg = " ".join(text.split()) or type(exc).__name__
    return msg if isinstance(exc, StampError) else f"{type(exc).__name__}: {msg}"


def check_embed_args(out: Path, um_per_px: Optional[float], layout: str) -> None:
    """Refusals that hold for every slide, before the model loads or anything is written (one line each)."""
    from stamp.slides.reader import check_scale

    bags.check_layout(layout)
    if out.exists() and not out.is_dir():
        raise SlideError(f"--out {out}: a file, not a folder; pass a folder for the bags (created if missing)")
    if um_per_px is not None:
        check_scale(um_per_px, f"--slide-um-per-px {um_per_px:g}", "pass the slides' µm per level-0 pixel")
    have = bags.read_manifest(out).get("layout") if out.is_dir() else None
    if have and have != layout:
        raise BagError(f"{out}: holds --layout {have} bags; use another --out folder for --layout {layout}")


def embed_slides(slides: Sequence[str | os.PathLike], model: Any, out: str | os.PathLike, *,
                 params: TissueParams = TissueParams(), um_per_px: Optional[float] = None, batch_size: int = 64,
                 workers: Optional[int] = None, device: Optional[str] = None, progress: bool = True,
                 fail_fast: bool = False, rank: Optional[int] = None, world_size: Optional[int] = None,
                 layout: str = bags.DEFAULT_LAYOUT) -> EmbedSlidesResult:
    """Embed ``slides`` (files or folders) with ``model`` (a zoo name / folder / Hub id, or an already
    loaded :class:`stamp.zoo.encoder.Encoder`) into ``out``; see the module docstring.

    ``um_per_px``: the slides' level-0 scale when the files have none (overrides the files' own).
    ``workers``: tile-reading processes (default: CPU count, at most 8; 0 reads in this process).
    ``layout``: ``trident`` (``out/<slide>.h5``) or ``clam`` (``out/h5_files/`` + ``out/pt_files/``);
    see :mod:`stamp.slides.bags`.
    """
    out = Path(out)
    check_embed_args(out, um_per_px, layout)
    paths = rank_share(expand_slides(slides), rank, world_size)

    import torch

    from stamp.zoo.encoder import Encoder
    from stamp.slides.progress import SlideProgress

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
    key = _config_key(encoder, params, layout)
    model_attrs = _provenance_attrs(encoder)  # the model is resolved and its weights hashed once per run
    header = {"model": encoder.provenance.name, "model_revision": encoder.provenance.revision or "",
              "tissue_params": params.to_dict(), "layout": layout}
    previous = {e["slide"]: e for e in bags.read_manifest(out).get("slides", [])}
    result = EmbedSlidesResult(out)
    with SlideProgress(len(paths), enabled=progress) as bar:
        for path in paths:
            name = slide_name(path)
            bag = bags.bag_path(out, name, layout)
            try:
                replacing = False
                if bag.exists():
                    n = _reusable(bag, key, path, previous.get(name))
                    if n is not None:
                        before = previous.get(name, {})
                        if before.get("status") not in ("done", "empty") or \
                                os.path.abspath(before.get("path", "")) != os.path.abspath(path):
                            # killed between the bag's rename and its manifest entry, or the same file moved:
                            # the entry (and the path a later change is checked against) is written now
                            bags.update_manifest(out, [_entry_of(bag, out, path, n)], header)
                        result.entries.append({"slide": name, "status": "skipped", "tiles": n})
                        bar.slide_done(name, "already done")
                        continue
                    replacing = True
                entry = embed_one(path, encoder, out, params, um_per_px=um_per_px, device=dev, batch_size=batch_size,
                                  workers=workers, layout=layout, on_plan=bar.start_slide, on_batch=bar.tiles,
                                  model_attrs=model_attrs)
                if replacing:
                    entry["replaced"] = "the slide file changed since its previous bag"
            except (KeyboardInterrupt, BagError):
                raise  # BagError: this folder's bags were made another way; the run cannot go on
            except Exception as exc:
                from spavis.errors import debug_enabled

                if debug_enabled():
                    raise
                entry = {"slide": name, "path": os.path.abspath(path), "status": "failed", "tiles": 0,
                         "reason": _failure_reason(exc)}
                if not bag.exists():  # else the manifest goes on describing the finished bag kept on disk
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


__all__ = ["embed_slides", "embed_one", "check_embed_args", "expand_slides", "rank_share", "TileDataset", "EmbedSlidesResult"]
