"""Image and fused embeddings of any encoder with an image side, from a corpus or a folder of images.

* :func:`embed_paired_corpus` -- one row per spot of a shard corpus: ``image`` (the spot's H&E
  patch; spots of imaged slides; any image or aligned encoder), ``fused`` (gene and image
  concatenated, the paper's STAMP_F; an aligned model) or ``gene`` (delegated to
  :func:`stamp.embed.genes.embed_corpus`).
* :func:`embed_image_folder` -- plain image files, no expression at all, with any image or
  aligned encoder (its own preprocessing: ``Encoder.transform``). Files are decoded by
  :func:`spavis.format.imagefile.read_image_file` (the decoding build-shards uses: 16-bit
  rescaled, oversized pictures refused in one line).

Models come from :func:`stamp.load`; outputs are written by :mod:`stamp.embed.writer` (Parquet:
an id column, ``spot_id`` or ``image``, + ``embedding``; atomic; the model's name, revision and
license in the schema metadata). Aligned models L2-normalise each modality (fused = [gene,
image], each of norm 1); other encoders give their own features.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq
import torch

from stamp.errors import EmbedError

logger = logging.getLogger(__name__)

MODALITIES = ("gene", "image", "fused")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


def image_side(encoder, model: str | os.PathLike, what: str) -> None:
    """Refuse an encoder without an image side (a gene encoder) in one line."""
    if encoder.kind == "gene" or encoder.transform is None:
        raise EmbedError(f"{model}: a gene encoder has no image side; {what} needs an image encoder (e.g. a zoo "
                         "name from `stamp models`) or an aligned model (`stamp pretrain --stage align`)")


@torch.no_grad()
def embed_paired_corpus(model: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *,
                        modality: str = "fused", batch_size: int = 64, device: str | None = None,
                        progress: bool = False, means: str | os.PathLike | None = None) -> Path:
    """Embed the spots of ``data``; see the module docstring for ``modality``.

    ``means``: gene means file for models whose tokenizer ships none (``stamp-v1``: Visium_mean.npy)."""
    import stamp
    from spavis.format import open_corpus
    from stamp.embed.genes import check_vocabulary, context_length, embed_corpus, gene_side
    from stamp.embed.writer import model_record, write_parquet
    from stamp.data.paired import _EXPR_COLUMNS, decode_rows, paired_pairs
    from stamp.tokenizer import to_model_input_ids
    from stamp.zoo.concat import parts_without
    from stamp.zoo.counts import bind_genes, count_input, encode_counts

    if modality not in MODALITIES:
        raise EmbedError(f"--modality {modality!r} must be one of {', '.join(MODALITIES)}")
    if batch_size < 1:
        raise EmbedError(f"batch size must be at least 1, got {batch_size}")
    if modality == "gene":
        return embed_corpus(model, data, out, batch_size=batch_size, device=device, progress=progress, means=means)
    encoder = stamp.load(model, device=device, means=means, kind="image" if modality == "image" else None)
    image_side(encoder, model, f"--modality {modality}")
    if modality == "image" and parts_without(encoder, "image"):
        raise EmbedError(f"{model}: {', '.join(parts_without(encoder, 'image'))} has no image side; --modality image "
                         "concatenates the image features of every part (--modality fused joins images and genes)")
    corpus = open_corpus(data)
    counts = False
    if modality == "fused":
        if encoder.kind != "aligned":
            raise EmbedError(f"{model}: an {encoder.kind} encoder; --modality fused needs an aligned model (gene and "
                             "image in one space: `stamp pretrain --stage align`, or stamp-v1)")
        gene_side(encoder, model, "--modality fused")
        counts = count_input(encoder) is not None
        if counts:
            genes = corpus.genes
            bind_genes(encoder, genes["ensembl_id"].astype(str), genes["symbol"].fillna("").astype(str),
                       model=str(model), data=str(data), error=EmbedError)
        else:
            check_vocabulary(corpus, encoder.tokenizer, data)
            context = context_length(encoder)
    tokenizer = encoder.tokenizer
    transform = encoder.transform

    def gene_emb(table) -> np.ndarray:
        ids = to_model_input_ids(tokenizer.encode_table(table), tokenizer.pad_value, context)
        return encoder.encode_genes(torch.from_numpy(ids.astype(np.int64))).float().cpu().numpy()

    def file_gene_emb(expr) -> np.ndarray:
        """Raw-count gene sides: a whole expression file, slide by slide (a model may need slide statistics)."""
        from spavis.format import rows_to_csr

        slides = expr.column("slide_id").to_numpy(zero_copy_only=False).astype(str)
        out, start = [], 0
        while start < len(slides):
            end = start + int((slides[start:] == slides[start]).argmin() or len(slides) - start)
            out.append(encode_counts(encoder, rows_to_csr(expr.slice(start, end - start), corpus.n_genes),
                                     batch_size=batch_size))
            start = end
        return np.concatenate(out) if out else np.zeros((0, encoder.embed_dim), np.float32)

    def image_emb(rb, path: str, first_row: int) -> np.ndarray:
        spots = rb.column(0).to_pylist()
        cells = [(v, f"{path} row {first_row + i} (spot_id {spots[i]}) patch")
                 for i, v in enumerate(rb.column(1).to_pylist())]
        pixels = torch.stack([transform(x) for x in decode_rows(None, cells)]).to(encoder.device)
        return encoder.encode_images(pixels).float().cpu().numpy()

    def chunks() -> Iterator[tuple[list[str], np.ndarray]]:
        for paired, expr_file in paired_pairs(corpus):
            pf = pq.ParquetFile(paired)
            expr = pq.read_table(expr_file, columns=_EXPR_COLUMNS + (["slide_id"] if counts else [])) \
                if modality == "fused" else None
            expr_gene = file_gene_emb(expr) if counts else None
            offset = 0
            for rb in pf.iter_batches(batch_size=batch_size, columns=["spot_id", "patch"]):
                ids = rb.column(0).to_pylist()
                parts = [image_emb(rb, paired, offset)]
                if expr is not None:
                    rows = expr.slice(offset, len(ids))
                    if rows.column("spot_id").to_pylist() != ids:
                        raise EmbedError(f"{paired}: spots differ from {expr_file}; rebuild the corpus with --with-images")
                    parts.insert(0, expr_gene[offset:offset + len(ids)] if counts else gene_emb(rows))
                offset += len(ids)
                yield ids, np.concatenate([_unit_rows(p) for p in parts] if counts else parts, axis=1)

    return write_parquet(Path(out), "spot_id", chunks(), model_record(encoder, model, modality))


def _unit_rows(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(n > 0, n, 1.0)).astype(np.float32)


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
    """An image file as uint8 RGB and its original mode (the shared decoding: 16-bit rescaled,
    grayscale / RGBA / palette converted, oversized pictures refused in one line)."""
    from spavis.format.imagefile import ImageFileError, read_image_file

    try:
        return read_image_file(path)
    except ImageFileError as exc:
        raise EmbedError(str(exc)) from None


@torch.no_grad()
def embed_image_folder(model: str | os.PathLike, images: str | os.PathLike, out: str | os.PathLike, *,
                       batch_size: int = 64, device: str | None = None, progress: bool = False) -> Path:
    """Embed every image file under ``images`` (sorted, recursive) with any image or aligned encoder;
    the id is the path relative to ``images``."""
    import stamp
    from stamp.embed.writer import model_record, write_parquet

    files = list_images(images)
    encoder = stamp.load(model, device=device, kind="image")
    image_side(encoder, model, "--images")
    transform = encoder.transform
    root = Path(images)
    converted: dict[str, int] = {}

    def chunks() -> Iterator[tuple[list[str], np.ndarray]]:
        for a in range(0, len(files), batch_size):
            batch = files[a:a + batch_size]
            tensors = []
            for p in batch:
                arr, mode = read_image(p)
                if mode != "RGB":
                    converted[mode] = converted.get(mode, 0) + 1
                tensors.append(transform(arr))
            pixels = torch.stack(tensors).to(encoder.device)
            yield [p.relative_to(root).as_posix() for p in batch], encoder.encode_images(pixels).float().cpu().numpy()

    path = write_parquet(Path(out), "image", chunks(), model_record(encoder, model, "image"))
    if converted:
        logger.warning("%d of %d images were not RGB (%s) and were converted to RGB", sum(converted.values()),
                       len(files), ", ".join(f"{m}: {n}" for m, n in sorted(converted.items())))
    return path


__all__ = ["MODALITIES", "embed_paired_corpus", "embed_image_folder", "image_side", "read_image", "list_images"]
