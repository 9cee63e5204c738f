"""``stamp embed``: one embedding per spot of a shard corpus, streamed slide by slide.

Output Parquet: ``spot_id`` (string) + ``embedding`` (list<float32>), rows in corpus order,
written to a temp file and renamed at the end (no partial file on failure). With
``zarr=True`` each slide's store ``DIR/zarr/<slide_id>.zarr`` also gets ``obsm['X_stamp']``
(rows in ``spot_index`` order); only that element is written, ``X`` is not touched.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from spavis.errors import SpavisError

OBSM_KEY = "X_stamp"


class EmbedError(SpavisError):
    """The model and the corpus do not fit together, or the output cannot be written."""


def load_model(model: str | os.PathLike, device: str | torch.device | None = None):
    """(encoder in eval mode, tokenizer) from a local folder (RUN, RUN/model) or a Hub repo id."""
    from stamp.model import StampGeneEncoder
    from stamp.tokenizer import GeneTokenizer

    source = str(model)
    path = Path(source)
    if path.is_dir() and (path / "model" / "model.safetensors").is_file():
        source = str(path / "model")
    encoder = StampGeneEncoder.from_pretrained(source)
    tokenizer = GeneTokenizer.from_pretrained(source)
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return encoder.to(dev).eval(), tokenizer


def _write_obsm(store: Path, spot_index: np.ndarray, emb: np.ndarray) -> None:
    import zarr
    from anndata.io import write_elem

    consolidated = (store / ".zmetadata").is_file() or (store / "zarr.json").is_file()
    group = zarr.open_group(str(store), mode="r+", use_consolidated=False)
    n_obs = int(group["obs"][group["obs"].attrs["_index"]].shape[0])
    if spot_index.size != n_obs or spot_index.max(initial=-1) >= n_obs:
        raise EmbedError(f"{store}: holds {n_obs} spots but the shards list {spot_index.size}; rebuild the corpus")
    full = np.zeros((n_obs, emb.shape[1]), dtype=np.float32)
    full[spot_index] = emb
    obsm = group.require_group("obsm")
    if OBSM_KEY in obsm:
        del obsm[OBSM_KEY]
    write_elem(obsm, OBSM_KEY, full)
    if consolidated:  # keep readers that trust consolidated metadata (anndata.read_zarr) in sync
        zarr.consolidate_metadata(str(store))


def embed_corpus(
    model: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    batch_size: int = 256,
    zarr: bool = False,
    device: str | None = None,
    progress: bool = True,
) -> Path:
    """Embed every spot of ``data`` (shard dir or Hub dataset id) with ``model``; returns ``out``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from spavis.corpus import open_corpus
    from stamp.tokenizer import to_model_input_ids

    encoder, tokenizer = load_model(model, device)
    corpus = open_corpus(data)
    genes = corpus.genes["ensembl_id"].astype(str).tolist()
    if genes != list(tokenizer.gene_ids):
        raise EmbedError(
            f"{data}: its {len(genes)}-gene vocabulary differs from the model's {tokenizer.n_genes} genes; "
            "build the shards with the vocabulary the model was trained on"
        )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    schema = pa.schema([("spot_id", pa.string()), ("embedding", pa.list_(pa.float32()))])
    context = encoder.config.context_length
    columns = ["spot_id", "gene_index", "counts"] + (["spot_index"] if zarr else [])
    bar = Progress(TextColumn("[bold]embed"), BarColumn(), MofNCompleteColumn(), TextColumn("spots"),
                   TimeRemainingColumn(), disable=not progress)
    try:
        with bar, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            task = bar.add_task("embed", total=corpus.n_spots)
            for table in corpus.iter_slides(columns=columns):
                parts = []
                for start in range(0, table.num_rows, batch_size):
                    chunk = table.slice(start, batch_size)
                    ids = to_model_input_ids(tokenizer.encode_table(chunk), tokenizer.pad_value, context)
                    emb = encoder.embed(torch.from_numpy(ids.astype(np.int64))).float().cpu().numpy()
                    flat = pa.array(emb.ravel(), pa.float32())
                    offsets = pa.array(np.arange(0, emb.size + 1, emb.shape[1], dtype=np.int32))
                    writer.write_table(pa.table({"spot_id": chunk.column("spot_id"),
                                                 "embedding": pa.ListArray.from_arrays(offsets, flat)}, schema=schema))
                    if zarr:
                        parts.append(emb)
                    bar.advance(task, chunk.num_rows)
                if zarr and parts:
                    slide_id = str(table.column("slide_id")[0])
                    spot_index = table.column("spot_index").to_numpy().astype(np.int64)
                    _write_obsm(corpus.zarr_path(slide_id), spot_index, np.concatenate(parts))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
