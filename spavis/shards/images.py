"""Paired image data for ``build-shards --with-images``: a patch and a region per kept spot.

Per slide (in the worker that prepares it): find the best image the slice has (a full-resolution
WSI / Space Ranger ``--image`` input / STimage picture, else the hires, else the lowres PNG),
calibrate it (µm per pixel from the slide's own calibration, never a magnification string),
cut every spot's 112 µm patch and 336 µm region at 0.5 µm/px into 224 x 224 pictures, and write
them twice: ``paired.arrow`` (PNG bytes; merged into ``data/paired/part-NNNNN.parquet`` by the
writer) and the ``images/`` group of the slide's Zarr store (raw uint8). Spots are handled in
chunks of 64 in expression order, so memory stays flat whatever the slide size.

Region cell: drawn from a salted sha256 of the spot id (same bytes on every build). When the
drawn region would leave the image, the region is moved inside (by whole cells) and the label
follows; when no cell fits, the drawn one is kept, padded and flagged. Never -1, never dropped.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spavis.errors import SpavisWarning
from spavis.format import schema as S
from spavis.images import (
    cache_budget_mb,
    TIFF_SUFFIXES,
    ImageError,
    ImageSource,
    WindowReader,
    encode_png,
    from_array,
    is_fullres_image_name,
    image_threads,
    open_image,
    read_window,
    resize_window,
)

PAIRED_FILE = "paired.arrow"  # in a prepared slice folder
TARGET_UM_PER_PX = S.PATCH_UM / S.PATCH_PX
# how slides.parquet um_per_px was found: these measure the slide; "spot-spacing" (the median
# nearest-neighbour gap taken as 100 µm) is a guess, too weak to cut 112 µm patches by
CALIBRATED_METHODS = ("scalefactors", "lattice")
_IMAGE_ATTRS = ("image_file", "image_kind", "image_um_per_px", "n_patches_upsampled", "n_patches_padded")


@dataclass(frozen=True)
class SlideImage:
    """Where a slide's picture is and how its pixels map to full-resolution coordinates."""

    kind: str  # wsi | fullres | hires | lowres
    name: str  # what slides.parquet records (relative to the slice folder)
    scale: float  # image pixels per full-resolution pixel
    path: Path | None = None
    array: np.ndarray | None = None

    def open(self) -> ImageSource:
        if self.array is not None:
            return from_array(self.array, self.name)
        return open_image(self.path)


# ------------------------------------------------------------------------- discovery


def _spatial_entry(adata) -> dict:
    spatial = adata.uns.get("spatial") or {}
    if not isinstance(spatial, dict) or not spatial:
        return {}
    entry = spatial[sorted(spatial)[0]]
    return entry if isinstance(entry, dict) else {}


def _scalefactors(adata) -> dict[str, float]:
    sf = _spatial_entry(adata).get("scalefactors") or {}
    out = {}
    for k, v in dict(sf).items():
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            continue
    return out


def _files(root: Path, files: Iterable[str]) -> list[Path]:
    base = root if root.is_dir() else root.parent
    return [base / f for f in files] if root.is_dir() else [root]


def _fullres_candidates(s, adata) -> list[Path]:
    """Full-resolution pictures in the slice: HEST wsis/, STimage image/, Space Ranger --image."""
    meta = adata.uns.get("spavis") or {}
    named = str(meta.get("image_path") or "")
    if named and Path(named).is_file():
        return [Path(named)]
    found = []
    paths = _files(Path(s.root), s.files)
    data = Path(s.data_path)
    if data.is_file() and data.suffix == ".h5ad":  # HEST: st/<id>.h5ad -> wsis/<id>.tif
        stem = data.name[: -len(".h5ad")]
        paths += [data.parent.parent / "wsis" / f"{stem}{ext}" for ext in (".tif", ".tiff")]
    for p in paths:
        # a loose PNG is a plot or a Space Ranger picture; STimage's full image is a PNG in image/
        stimage_png = p.name.lower().endswith(".png") and p.parent.name == "image"
        if (is_fullres_image_name(p.name) or stimage_png) and p.is_file():
            found.append(p)
    return sorted(set(found), key=lambda p: (-p.stat().st_size, str(p)))


def slide_images(s, adata) -> list[SlideImage]:
    """Every image the slice offers, finest first: full-resolution, hires, lowres."""
    root = Path(s.root)
    base = root if root.is_dir() else root.parent

    def rel(p: Path) -> str:  # as slides.parquet records it: relative to the slice's folder
        return Path(os.path.relpath(p.resolve(), base.resolve())).as_posix()

    out = []
    full = _fullres_candidates(s, adata)
    if full:
        p = full[0]
        kind = "wsi" if p.name.lower().endswith(TIFF_SUFFIXES) else "fullres"
        out.append(SlideImage(kind, rel(p), 1.0, path=p))
    sf = _scalefactors(adata)
    hires = sorted(p for p in _files(root, s.files) if "tissue_hires_image" in p.name.lower())
    if hires and sf.get("tissue_hires_scalef"):
        out.append(SlideImage("hires", rel(hires[0]), sf["tissue_hires_scalef"], path=hires[0]))
    lowres = (_spatial_entry(adata).get("images") or {}).get("lowres")
    if lowres is not None and sf.get("tissue_lowres_scalef"):
        files = sorted(p for p in _files(root, s.files) if "tissue_lowres_image" in p.name.lower())
        name = rel(files[0]) if files else "uns/spatial/images/lowres"
        out.append(SlideImage("lowres", name, sf["tissue_lowres_scalef"], array=np.asarray(lowres)))
    return out


def _is_blank(src: ImageSource) -> bool:
    """One colour all over (10x ships an all-black hires placeholder for some datasets), judged on
    the coarsest level, whatever its size: scanned block by block (bounded memory), stopping at
    the first block that holds a second colour (a real H&E stops in its first block)."""
    first: int | None = None
    for block in WindowReader(src, len(src.levels) - 1, cache_mb=0).iter_blocks():
        if not block.size:
            continue
        lo, hi = int(block.min()), int(block.max())
        if lo != hi or (first is not None and lo != first):
            return False
        first = lo
    return first is not None


def calibration(adata, slide: dict) -> tuple[float, str] | None:
    """µm per full-resolution pixel and where it came from, or None when the slide has none.

    The source's own µm/px (HEST metadata) first, then the build's value in slides.parquet
    (65 µm / spot_diameter_fullres, or pixel vs lattice distances), then spot_diameter_fullres.
    """
    meta = adata.uns.get("spavis") or {}
    raw = meta.get("source_metadata_json")
    if raw:
        try:
            src = json.loads(raw)
        except ValueError:
            src = {}
        for key in ("pixel_size_um_estimated", "pixel_size_um_embedded", "pixel_size_um"):
            v = _positive(src.get(key))
            if v:
                return v, f"source metadata {key}"
    v = _positive(slide.get("um_per_px"))
    if v and slide.get("um_per_px_method") in CALIBRATED_METHODS:
        return v, f"slides.parquet um_per_px ({slide['um_per_px_method']})"
    d = _positive(meta.get("spot_diameter_fullres")) or _positive(_scalefactors(adata).get("spot_diameter_fullres"))
    if d:
        return S.SPACERANGER_SPOT_DIAMETER_UM / d, "spot_diameter_fullres"
    return None


def _positive(v: Any) -> float | None:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) and v > 0 else None


# ------------------------------------------------------------------------- geometry


def drawn_cells(spot_ids: Iterable[str]) -> np.ndarray:
    """The region cell (0..8) each spot draws: salted sha256 of its id, so builds are identical."""
    salt = S.REGION_CELL_SALT.encode()
    n_cells = S.REGION_GRID * S.REGION_GRID
    return np.array(
        [int.from_bytes(hashlib.sha256(salt + b"\0" + str(x).encode()).digest()[:8], "big") % n_cells
         for x in spot_ids],
        dtype=np.int8,
    )


def fit_cells(drawn: np.ndarray, ex: np.ndarray, ey: np.ndarray, width: float, height: float,
              step: float, half_region: float) -> np.ndarray:
    """Move each region inside the image by whole cells (the label follows); keep the drawn
    cell where no cell fits. ``ex``/``ey``: spot centres (edge coordinates, level pixels)."""
    g = S.REGION_GRID
    mid = (g - 1) / 2
    k = np.arange(g)
    out = []
    for centre, limit, want in ((ex, width, drawn % g), (ey, height, drawn // g)):
        c = centre[:, None] + (mid - k[None, :]) * step  # region centre for each cell index
        fits = (c - half_region >= -1e-6) & (c + half_region <= limit + 1e-6)
        cost = np.abs(k[None, :] - want[:, None]) + np.where(fits, 0, 100)
        best = np.argmin(cost, axis=1)  # ties: the lower index (deterministic)
        out.append(np.where(fits.any(axis=1), best, want))
    col, row = out
    return (row * g + col).astype(np.int8)


# ------------------------------------------------------------------------- per slice


def prepare_images(tmp: Path, s, adata, slide: dict, barcodes, pxl_row, pxl_col, zarr_path: Path) -> dict:
    """Cut the slide's patches/regions into ``tmp/paired.arrow`` and ``zarr_path/images``.

    Returns the slides.parquet image fields (all None when the slice has no image). Raises
    ImageError (one line) for an unreadable image, an image that does not cover the spots or
    a slide without calibration; the caller's temporary folder then disappears whole.
    """
    none = dict.fromkeys(_IMAGE_ATTRS)
    skipped = []
    for img in slide_images(s, adata):
        with img.open() as probe:
            if not _is_blank(probe):
                break
        skipped.append(f"{img.name} is one colour (a placeholder, not an H&E); skipped")
    else:
        img = None
    for note in skipped:
        warnings.warn(f"{s.slide_id}: {note}", SpavisWarning, stacklevel=2)
        slide["warnings"] = list(slide.get("warnings") or []) + [f"image: {note}"]
    if img is None:
        return none
    n = len(barcodes)
    if pxl_row is None or pxl_col is None:
        if n == 0:
            return none
        raise ImageError(f"{s.slide_id}: has an image ({img.name}) but no spot pixel coordinates; add "
                         "spatial/tissue_positions.csv or build without --with-images.")
    cal = calibration(adata, slide)
    if cal is None:
        raise ImageError(
            f"{s.slide_id}: image {img.name} has no calibration (no spot_diameter_fullres in "
            "scalefactors_json.json and no µm/px in the source metadata); add scalefactors_json.json "
            "or build without --with-images.")
    um_full, _how = cal
    spot_ids = [f"{s.slide_id}:{b}" for b in barcodes]
    with img.open() as src:
        um0 = um_full / img.scale  # µm per level-0 image pixel
        # continuous edge coordinates (pixel i covers [i, i+1)) of the spot centres, level 0
        ex = (np.asarray(pxl_col, np.float64) + 0.5) * img.scale
        ey = (np.asarray(pxl_row, np.float64) + 0.5) * img.scale
        _check_covers(s.slide_id, img, src, ex, ey)
        if img.scale == 1.0:
            _check_matches_lowres(s.slide_id, img, src, adata)
        step = S.PATCH_UM / um0  # level-0 pixels per patch width (= one region cell)
        finite = np.isfinite(ex) & np.isfinite(ey)
        cells = fit_cells(drawn_cells(spot_ids), np.where(finite, ex, 0), np.where(finite, ey, 0),
                          src.width, src.height, step, step * S.REGION_SCALE / 2)
        # patches from the level closest to 0.5 µm/px, regions (1.5 µm/px once resized) from theirs
        li_patch = src.choose_level(um0, TARGET_UM_PER_PX)
        li_region = src.choose_level(um0, TARGET_UM_PER_PX * S.REGION_SCALE)
        um = um0 * src.levels[li_patch].factor
        upsampled = um / TARGET_UM_PER_PX > S.UPSAMPLE_FLAG
        budget = cache_budget_mb() / (1 if li_region == li_patch else 2)
        patch_reader = WindowReader(src, li_patch, cache_mb=budget)
        region_reader = (patch_reader if li_region == li_patch
                         else WindowReader(src, li_region, cache_mb=budget))
        n_pad = _write_pairs(tmp / PAIRED_FILE, zarr_path, patch_reader, region_reader, s.slide_id, spot_ids,
                             ex, ey, cells, step, um, upsampled)
        notes = list(src.notes)
    if upsampled:
        notes.append(f"image resolution {um:.2f} µm/px is below the {TARGET_UM_PER_PX} µm/px of a patch: "
                     f"every patch is upsampled {um / TARGET_UM_PER_PX:.1f}x (flagged)")
    for note in notes:
        warnings.warn(f"{s.slide_id}: {img.name}: {note}", SpavisWarning, stacklevel=2)
    if notes:
        slide["warnings"] = list(slide.get("warnings") or []) + [f"image: {x}" for x in notes]
    return {
        "image_file": img.name, "image_kind": img.kind, "image_um_per_px": float(um),
        "n_patches_upsampled": int(n) if upsampled else 0, "n_patches_padded": int(n_pad),
    }


def _check_covers(slide_id: str, img: SlideImage, src: ImageSource, ex0: np.ndarray, ey0: np.ndarray) -> None:
    finite = np.isfinite(ex0) & np.isfinite(ey0)
    out = finite & ((ex0 < 0) | (ey0 < 0) | (ex0 > src.width) | (ey0 > src.height))
    if out.any():
        i = int(np.flatnonzero(out)[0])
        raise ImageError(
            f"{slide_id}: image {img.name} ({src.width}x{src.height} px, {img.kind}, {img.scale:g} px per "
            f"full-res px) does not cover {int(out.sum())} of {int(finite.sum())} spots (e.g. a spot at "
            f"x={ex0[i]:.0f}, y={ey0[i]:.0f} px); it is not this slide's image or its scale factor is wrong.")


def _check_matches_lowres(slide_id: str, img: SlideImage, src: ImageSource, adata) -> None:
    """A full-resolution image must be the one the scale factors describe: the lowres picture is
    that image scaled by tissue_lowres_scalef (Space Ranger, HEST), so their sizes must agree."""
    lowres = (_spatial_entry(adata).get("images") or {}).get("lowres")
    scalef = _scalefactors(adata).get("tissue_lowres_scalef")
    if lowres is None or not scalef:
        return
    expected = max(np.shape(lowres)[:2]) / scalef
    actual = max(src.width, src.height)
    if abs(actual - expected) > 0.03 * expected + 2 / scalef:
        raise ImageError(
            f"{slide_id}: image {img.name} is {src.width}x{src.height} px but the slide's lowres image and "
            f"tissue_lowres_scalef={scalef:g} describe a full-resolution image of about {expected:.0f} px; "
            "it is not this slide's full-resolution image: remove it or replace it with the right one.")


def _write_pairs(path: Path, zarr_path: Path, patch_reader: WindowReader, region_reader: WindowReader,
                 slide_id: str, spot_ids: list[str], ex, ey, cells, step, um, upsampled) -> int:
    """Cut, then write chunk by chunk (64 spots); ``ex``/``ey``/``step`` in level-0 pixels."""
    import numcodecs
    import zarr

    n = len(spot_ids)
    px, chunk, g = S.PATCH_PX, S.ZARR_IMAGE_CHUNK, S.REGION_GRID
    mid = (g - 1) / 2
    fp, fr = patch_reader.level.factor, region_reader.level.factor
    root = zarr.open_group(str(zarr_path), mode="a", zarr_format=2)
    grp = root.create_group(S.IMAGES_GROUP)
    comp = numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.BITSHUFFLE)
    arr = {
        name: grp.create_array(name, shape=(n, px, px, 3), chunks=(chunk, px, px, 3), dtype="uint8",
                               compressors=comp, fill_value=0)
        for name in ("patch", "region")
    }
    flags = {}
    n_pad = 0
    options = pa.ipc.IpcWriteOptions(compression=None)  # PNG is already compressed
    threads = image_threads()
    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    with contextlib.ExitStack() as stack, pa.OSFile(str(path), "wb") as sink, \
            pa.ipc.new_file(sink, S.PAIRED_SCHEMA, options=options) as writer:
        if pool is not None:
            stack.enter_context(pool)
        padded_all = np.zeros(n, bool)
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            windows = []  # reads stay on this thread: the block cache is not thread-safe
            for i in range(a, b):
                col, row = int(cells[i]) % g, int(cells[i]) // g
                wp = read_window(patch_reader, ex[i] / fp, ey[i] / fp, step / 2 / fp)
                wr = read_window(region_reader, (ex[i] + (mid - col) * step) / fr,
                                 (ey[i] + (mid - row) * step) / fr, step * S.REGION_SCALE / 2 / fr)
                windows += [wp, wr]
                padded_all[i] = wp.padded or wr.padded
            done = list(pool.map(_cut, windows) if pool is not None else map(_cut, windows))  # in order
            patches = np.stack([d[0] for d in done[0::2]])
            regions = np.stack([d[0] for d in done[1::2]])
            arr["patch"][a:b] = patches
            arr["region"][a:b] = regions
            batch = pa.record_batch(
                [
                    pa.array(spot_ids[a:b], pa.string()),
                    pa.array([slide_id] * (b - a), pa.string()),
                    _images([d[1] for d in done[0::2]]),
                    _images([d[1] for d in done[1::2]]),
                    pa.array(cells[a:b], pa.int8()),
                    pa.array(np.full(b - a, um, np.float32), pa.float32()),
                    pa.array(np.full(b - a, upsampled, bool), pa.bool_()),
                    pa.array(padded_all[a:b], pa.bool_()),
                ],
                schema=S.PAIRED_SCHEMA,
            )
            writer.write_batch(batch)
        n_pad = int(padded_all.sum())
    flags["region_cell"] = np.asarray(cells, np.int8)
    flags["upsampled"] = np.full(n, upsampled, bool)
    flags["padded"] = padded_all
    for name, values in flags.items():
        z = grp.create_array(name, shape=(n,), chunks=(max(n, 1),), dtype=values.dtype, compressors=comp,
                             fill_value=0)
        z[:] = values
    grp.attrs.update({"patch_px": px, "patch_um": S.PATCH_UM, "region_scale": S.REGION_SCALE,
                      "region_grid": g, "um_per_px": float(um)})
    return n_pad


def _cut(window) -> tuple[np.ndarray, bytes]:
    """Resize one window to 224 px and encode it (both release the GIL: run on threads)."""
    img = resize_window(window, S.PATCH_PX)
    return img, encode_png(img)


def _images(data: list[bytes]) -> pa.Array:
    return pa.StructArray.from_arrays(
        [pa.array(data, pa.binary()), pa.nulls(len(data), pa.string())], fields=list(S.IMAGE_TYPE)
    )


# ------------------------------------------------------------------------- writer hook


def paired_write_options() -> dict[str, Any]:
    """Parquet settings of paired files (PNG is compressed already: zstd 1; dictionary on slide_id only)."""
    return dict(S.PARQUET_WRITE_OPTIONS, use_dictionary=["slide_id"], compression="zstd", compression_level=1)


class PairedShards:
    """Writes ``data/paired/part-NNNNN.parquet`` beside the expression parts (same number, same order)."""

    def __init__(self, tmp: Path):
        self.tmp = Path(tmp)
        self.writer: pq.ParquetWriter | None = None
        self.part: int | None = None
        self.rows: dict[int, int] = {}

    def _name(self, part: int, width: int) -> str:
        return f"{S.PAIRED_DIR}/part-{part:0{width}d}.parquet"

    def add(self, prepared: Path, part: int) -> None:
        """Append a prepared slice's pairs (if any) to paired part ``part``."""
        src = Path(prepared) / PAIRED_FILE
        if not src.is_file():
            return
        if self.part != part:
            self.close()
            (self.tmp / S.PAIRED_DIR).mkdir(parents=True, exist_ok=True)
            self.writer = pq.ParquetWriter(self.tmp / self._name(part, 5), S.PAIRED_SCHEMA, **paired_write_options())
            self.part = part
            self.rows[part] = 0
        with pa.memory_map(str(src), "r") as source:
            reader = pa.ipc.open_file(source)
            for i in range(reader.num_record_batches):
                batch = reader.get_batch(i)
                self.writer.write_table(pa.Table.from_batches([batch], schema=S.PAIRED_SCHEMA),
                                        row_group_size=S.PAIRED_ROW_GROUP_SIZE)
                self.rows[part] += batch.num_rows

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def outputs(self, width: int) -> list[dict[str, Any]]:
        """Manifest entries (renaming the parts when the expression parts needed a wider number)."""
        self.close()
        out = []
        for part, rows in sorted(self.rows.items()):
            rel = self._name(part, width)
            if width != 5:
                os.replace(self.tmp / self._name(part, 5), self.tmp / rel)
            out.append({"path": rel, "kind": "paired", "rows": rows})
        return out


def image_summary(out: str | os.PathLike) -> list[str]:
    """Lines for the CLI: per imaged slide its image, resolution and flags; slides without one."""
    t = pq.read_table(Path(out) / S.SLIDES_FILE).to_pylist()
    lines, missing = [], []
    for s in t:
        if s.get("image_file") is None:
            missing.append(s["slide_id"])
            continue
        um = s["image_um_per_px"]
        res = (f"{um:.2f} µm/px, below the {TARGET_UM_PER_PX} µm/px of a patch"
               if um / TARGET_UM_PER_PX > S.UPSAMPLE_FLAG else f"{um:.3f} µm/px")
        lines.append(f"images {s['slide_id']}: {s['image_file']} ({s['image_kind']}, {res}); "
                     f"{s['n_spots_kept']:,} patches, {s['n_patches_upsampled']:,} flagged upsampled "
                     f">{S.UPSAMPLE_FLAG:g}x, {s['n_patches_padded']:,} padded at the image border")
    if missing:
        lines.append(f"no H&E image (no patches): {len(missing)} slide(s): {', '.join(missing[:10])}"
                     + (" …" if len(missing) > 10 else ""))
    return lines


# ------------------------------------------------------------------------- validate

DEEP_SAMPLE = 64  # spots per slide whose PNGs are decoded and compared with the Zarr arrays


def check_paired(root: Path, listed: dict[str, Any], rep, deep: bool) -> None:
    """``spavis validate`` for data/paired: one part per imaged expression part, the same spots in
    the same order, labels 0-8, flags matching slides.parquet, (deep) PNGs equal to the Zarr arrays."""
    from spavis.format.corpus import decode_image, iter_file_slides

    files = sorted(k for k in listed if k.startswith(S.PAIRED_DIR + "/"))
    slides = {s["slide_id"]: s for s in pq.read_table(root / S.SLIDES_FILE).to_pylist()}
    imaged = {sid for sid, s in slides.items() if s.get("image_file") and s.get("n_spots_kept")}
    seen: set[str] = set()
    for rel in files:
        path = root / rel
        actual = pq.read_schema(path).remove_metadata()
        if actual.names != S.PAIRED_SCHEMA.names or any(
                a.type != e.type for a, e in zip(actual, S.PAIRED_SCHEMA)):
            rep.error(f"{path}: schema differs from the spavis paired format (spavis.format.schema.PAIRED_SCHEMA)")
            continue
        expr_rel = f"{S.EXPRESSION_DIR}/{Path(rel).name}"
        if expr_rel not in listed:
            rep.error(f"{path}: no expression part {expr_rel} to pair with")
            continue
        cols = ["spot_id", "region_cell", "um_per_px", "upsampled", "padded"] + (["patch", "region"] if deep else [])
        for table in iter_file_slides(path, columns=cols):
            sid = table.column("slide_id")[0].as_py()
            where = f"{path} slide {sid!r}"
            meta = slides.get(sid)
            if sid in seen or meta is None or sid not in imaged:
                rep.error(f"{where}: {'appears twice' if sid in seen else 'has no image in slides.parquet'}")
                continue
            seen.add(sid)
            if meta.get("expression_file") != expr_rel:
                rep.error(f"{where}: the slide's expression rows are in {meta.get('expression_file')}, not {expr_rel}")
                continue
            expr = next(iter_file_slides(root / expr_rel, columns=["spot_id"], slide_ids=[sid]), None)
            if expr is None or expr.column("spot_id").to_pylist() != table.column("spot_id").to_pylist():
                rep.error(f"{where}: spot_id differs from the expression rows (same spots, same order expected)")
                continue
            _check_flags(where, table, meta, rep)
            if deep:
                _check_images_zarr(root, sid, table, rep, decode_image)
    for sid in sorted(imaged - seen):
        rep.error(f"{root}: slide {sid!r} has an image in slides.parquet but no rows in {S.PAIRED_DIR}/")
    rep.checked["paired"] = len(seen)


def _check_flags(where: str, table: pa.Table, meta: dict, rep) -> None:
    for name in ("region_cell", "um_per_px", "upsampled", "padded"):
        if table.column(name).null_count:
            rep.error(f"{where}: {name} has nulls")
            return
    cells = table.column("region_cell").to_numpy()
    if cells.size and (cells.min() < 0 or cells.max() >= S.REGION_GRID * S.REGION_GRID):
        rep.error(f"{where}: region_cell outside 0..{S.REGION_GRID ** 2 - 1}")
    um = table.column("um_per_px").to_numpy()
    if not np.allclose(um, np.float32(meta.get("image_um_per_px") or np.nan)):
        rep.error(f"{where}: um_per_px differs from slides.parquet image_um_per_px")
    for name, col in (("n_patches_upsampled", "upsampled"), ("n_patches_padded", "padded")):
        if int(np.sum(table.column(col).to_numpy(zero_copy_only=False))) != meta.get(name):
            rep.error(f"{where}: {col} count differs from slides.parquet {name}")


def _check_images_zarr(root: Path, sid: str, table: pa.Table, rep, decode_image) -> None:
    import zarr

    path = root / S.ZARR_DIR / f"{sid}.zarr" / S.IMAGES_GROUP
    try:
        g = zarr.open_group(str(path), mode="r", zarr_format=2)
        arrays = {k: g[k] for k in ("patch", "region", "region_cell", "upsampled", "padded")}
    except Exception as exc:  # noqa: BLE001 — any failure is a finding
        rep.error(f"{path}: unreadable images group ({type(exc).__name__}: {exc})")
        return
    n = table.num_rows
    if arrays["patch"].shape != (n, S.PATCH_PX, S.PATCH_PX, 3) or arrays["region"].shape != arrays["patch"].shape:
        rep.error(f"{path}: patch/region shape {arrays['patch'].shape}, expected ({n}, {S.PATCH_PX}, {S.PATCH_PX}, 3)")
        return
    for name in ("region_cell", "upsampled", "padded"):
        if arrays[name][:].tolist() != table.column(name).to_pylist():
            rep.error(f"{path}/{name}: differs from the paired Parquet rows")
    for i in sorted(set(np.linspace(0, n - 1, min(n, DEEP_SAMPLE)).round().astype(int).tolist())) if n else []:
        for name in ("patch", "region"):
            try:
                img = decode_image(table.column(name)[i].as_py())
            except Exception as exc:  # noqa: BLE001
                rep.error(f"{path}: row {i} {name} is not a readable PNG ({exc})")
                return
            if not np.array_equal(img, arrays[name][i]):
                rep.error(f"{path}/{name}[{i}]: differs from the PNG in the paired Parquet rows")
                return
