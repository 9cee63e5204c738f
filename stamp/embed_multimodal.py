"""Embeddings from an aligned :class:`stamp.multimodal.StampModel`.

* :func:`embed_paired_corpus` -- one row per spot of a shard corpus: ``gene`` (spot
  expression, every spot), ``image`` (the spot's H&E patch; spots of imaged slides) or
  ``fused`` (both concatenated, the paper's STAMP_F; spots of imaged slides).
* :func:`embed_image_folder` -- plain image files, no expression at all (resize to the
  model's size, ImageNet mean/std, as the released inference).

Output Parquet: an id column (``spot_id`` or ``image``) + ``embedding`` (list<float32>),
written to a temp file and renamed at the end (no partial file on failure). Embeddings are
L2-normalised per modality (fused = [gene, image], each of norm 1).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from stamp.errors import EmbedError

logger = logging.getLogger(__name__)

MODALITIES = ("gene", "image", "fused")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


def is_stamp_model(folder: str | os.PathLike) -> bool:
    """True when ``folder/config.json`` describes a StampModel (gene + vision), not a gene encoder alone."""
    path = Path(folder) / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data.get("vision", data.get("config", {}).get("vision") if isinstance(data.get("config"), dict)
                               else None), dict)


def load_stamp_model(model: str | os.PathLike, device: str | None = None, means: str | os.PathLike | None = None,
                     *, need_tokenizer: bool = True):
    """(StampModel in eval mode, tokenizer or None, folder) from RUN, RUN/model, a folder, a Hub repo id or
    a registry name (``stamp-v1``). ``means``: gene means file for models whose tokenizer ships none
    (converted releases); the tokenizer is loaded only when ``need_tokenizer`` (gene / fused)."""
    from stamp.hub import resolve_model_source
    from stamp.multimodal import StampModel

    folder = resolve_model_source(model)
    if not is_stamp_model(folder):
        raise EmbedError(
            f"{model}: a gene encoder without a vision encoder; --modality image/fused and --images need a "
            "model from `stamp pretrain --stage align` (or a converted STAMP release)"
        )
    net = StampModel.from_pretrained(str(folder))
    tokenizer = None
    if need_tokenizer and (folder / "tokenizer_config.json").is_file():
        from stamp.registry import load_tokenizer

        tokenizer = load_tokenizer(folder, means)
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return net.to(dev).eval(), tokenizer, folder


def _list_rows(ids: list[str], emb: np.ndarray, id_name: str, schema: pa.Schema) -> pa.Table:
    flat = pa.array(emb.astype(np.float32, copy=False).ravel(), pa.float32())
    offsets = pa.array(np.arange(0, emb.size + 1, max(1, emb.shape[1]), dtype=np.int32))
    return pa.table({id_name: pa.array(ids, pa.string()), "embedding": pa.ListArray.from_arrays(offsets, flat)},
                    schema=schema)


def _write(out: Path, id_name: str, chunks: Iterator[tuple[list[str], np.ndarray]]) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    schema = pa.schema([(id_name, pa.string()), ("embedding", pa.list_(pa.float32()))])
    try:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for ids, emb in chunks:
                writer.write_table(_list_rows(ids, emb, id_name, schema))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


@torch.no_grad()
def embed_paired_corpus(model: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *,
                        modality: str = "fused", batch_size: int = 64, device: str | None = None,
                        progress: bool = False, means: str | os.PathLike | None = None) -> Path:
    """Embed the spots of ``data`` with a StampModel; see the module docstring for ``modality``.

    ``means``: gene means file for models whose tokenizer ships none (``stamp-v1``: Visium_mean.npy)."""
    from spavis.format import open_corpus
    from stamp.paired_data import _EXPR_COLUMNS, decode_png, paired_pairs
    from stamp.tokenizer import to_model_input_ids

    if modality not in MODALITIES:
        raise EmbedError(f"--modality {modality!r} must be one of {', '.join(MODALITIES)}")
    if batch_size < 1:
        raise EmbedError(f"batch size must be at least 1, got {batch_size}")
    net, tokenizer, folder = load_stamp_model(model, device, means, need_tokenizer=modality != "image")
    corpus = open_corpus(data)
    if modality != "image":
        if tokenizer is None:
            raise EmbedError(f"{folder}: no tokenizer files; gene and fused embeddings need them")
        genes = corpus.genes["ensembl_id"].astype(str).tolist()
        if genes != list(tokenizer.gene_ids):
            raise EmbedError(f"{data}: its {len(genes)}-gene vocabulary differs from the model's {tokenizer.n_genes} "
                             "genes; build the shards with the vocabulary the model was trained on")
    context = net.config.gene.context_length

    def gene_emb(table: pa.Table) -> np.ndarray:
        ids = to_model_input_ids(tokenizer.encode_table(table), tokenizer.pad_value, context)
        return net.encode_gene(torch.from_numpy(ids.astype(np.int64)).to(net.device)).float().cpu().numpy()

    def image_emb(column) -> np.ndarray:
        pixels = net.pixels(torch.from_numpy(np.stack([decode_png(v) for v in column.to_pylist()])))
        return net.encode_image(pixels).float().cpu().numpy()

    def chunks() -> Iterator[tuple[list[str], np.ndarray]]:
        if modality == "gene":
            for table in corpus.iter_slides(columns=_EXPR_COLUMNS):
                for a in range(0, table.num_rows, batch_size):
                    part = table.slice(a, batch_size)
                    yield part.column("spot_id").to_pylist(), gene_emb(part)
            return
        for paired, expr_file in paired_pairs(corpus):
            pf = pq.ParquetFile(paired)
            expr = pq.read_table(expr_file, columns=_EXPR_COLUMNS) if modality == "fused" else None
            offset = 0
            for rb in pf.iter_batches(batch_size=batch_size, columns=["spot_id", "patch"]):
                ids = rb.column(0).to_pylist()
                parts = [image_emb(rb.column(1))]
                if expr is not None:
                    rows = expr.slice(offset, len(ids))
                    if rows.column("spot_id").to_pylist() != ids:
                        raise EmbedError(f"{paired}: spots differ from {expr_file}; rebuild the corpus with --with-images")
                    parts.insert(0, gene_emb(rows))
                offset += len(ids)
                yield ids, np.concatenate(parts, axis=1)

    return _write(Path(out), "spot_id", chunks())


def list_images(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise EmbedError(f"{folder}: not a folder; --images takes a folder of image files")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not p.name.startswith("."))
    if not files:
        raise EmbedError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def read_image(path: Path) -> tuple[np.ndarray, str]:
    """An image file as uint8 RGB and its original mode; grayscale / RGBA / palette images are converted."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB")), im.mode
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise EmbedError(f"{path}: not a readable image ({exc}); remove or re-export it") from None


@torch.no_grad()
def embed_image_folder(model: str | os.PathLike, images: str | os.PathLike, out: str | os.PathLike, *,
                       batch_size: int = 64, device: str | None = None, progress: bool = False) -> Path:
    """Embed every image file under ``images`` (sorted, recursive); the id is the path relative to it."""
    net, _, _ = load_stamp_model(model, device, need_tokenizer=False)
    files = list_images(images)
    transform = net.image_transform
    root = Path(images)

    converted: dict[str, int] = {}

    def chunks() -> Iterator[tuple[list[str], np.ndarray]]:
        for a in range(0, len(files), batch_size):
            batch = files[a:a + batch_size]
            arrays = []
            for p in batch:
                arr, mode = read_image(p)
                if mode != "RGB":
                    converted[mode] = converted.get(mode, 0) + 1
                arrays.append(arr)
            pixels = torch.stack([transform(x) for x in arrays]).to(net.device)
            yield [p.relative_to(root).as_posix() for p in batch], net.encode_image(pixels).float().cpu().numpy()

    path = _write(Path(out), "image", chunks())
    if converted:
        logger.warning("%d of %d images were not RGB (%s) and were converted to RGB", sum(converted.values()),
                       len(files), ", ".join(f"{m}: {n}" for m, n in sorted(converted.items())))
    return path


__all__ = ["MODALITIES", "embed_paired_corpus", "embed_image_folder", "load_stamp_model", "is_stamp_model"]
