"""``stamp embed``: one embedding per spot of a shard corpus, streamed slide by slide.

Output Parquet: ``spot_id`` (string) + ``embedding`` (list<float32>), rows in corpus order,
written to a temp file and renamed at the end (no partial file on failure). With
``zarr=True`` each slide's store ``DIR/zarr/<slide_id>.zarr`` also gets ``obsm['X_stamp']``
(rows in ``spot_index`` order); only that element is written, ``X`` is not touched, and
only once every spot is embedded and every store checked (a failure changes no store).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from stamp.errors import EmbedError

OBSM_KEY = "X_stamp"


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
    if encoder.config.vocab_size != tokenizer.vocab_size:
        raise EmbedError(
            f"{model}: the encoder has {encoder.config.n_genes} genes but the tokenizer files {tokenizer.n_genes}; "
            "the folder mixes two models: save the model and its tokenizer together (stamp pretrain does)"
        )
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return encoder.to(dev).eval(), tokenizer


def _store_n_obs(store: Path, spot_index: np.ndarray) -> int:
    """Spots in a slide store; an error unless the shards' spot_index values cover exactly them."""
    import zarr

    group = zarr.open_group(str(store), mode="r", use_consolidated=False)
    n_obs = int(group["obs"][group["obs"].attrs["_index"]].shape[0])
    if spot_index.size != n_obs or spot_index.max(initial=-1) >= n_obs:
        raise EmbedError(f"{store}: holds {n_obs} spots but the shards list {spot_index.size}; rebuild the corpus")
    return n_obs


def _write_obsm(store: Path, spot_index: np.ndarray, emb: np.ndarray) -> None:
    import zarr
    from anndata.io import write_elem

    n_obs = _store_n_obs(store, spot_index)
    consolidated = (store / ".zmetadata").is_file() or (store / "zarr.json").is_file()
    group = zarr.open_group(str(store), mode="r+", use_consolidated=False)
    full = np.zeros((n_obs, emb.shape[1]), dtype=np.float32)
    full[spot_index] = emb
    obsm = group.require_group("obsm")
    if OBSM_KEY in obsm:
        del obsm[OBSM_KEY]
    write_elem(obsm, OBSM_KEY, full)
    if consolidated:  # keep readers that trust consolidated metadata (anndata.read_zarr) in sync
        zarr.consolidate_metadata(str(store))


def _slide_embeddings(parquet: Path, slides: list[tuple[str, np.ndarray]], width: int):
    """(slide_id, spot_index, embeddings) per slide, read back in order from the finished Parquet."""
    import pyarrow.compute as pc

    batches = pq.ParquetFile(parquet).iter_batches(columns=["embedding"], batch_size=8192)
    pending: list[np.ndarray] = []
    have = 0
    for slide_id, spot_index in slides:
        while have < spot_index.size:
            col = next(batches).column(0)
            pending.append(pc.list_flatten(col).to_numpy(zero_copy_only=False).reshape(len(col), width))
            have += len(col)
        block = np.concatenate(pending)
        yield slide_id, spot_index, block[: spot_index.size]
        rest = block[spot_index.size:]
        pending, have = ([rest] if len(rest) else []), len(rest)


def _write_stores(corpus, parquet: Path, slides: list[tuple[str, np.ndarray]], width: int) -> None:
    """obsm['X_stamp'] for every slide, after checking every store (a slide may span shards)."""
    merged: dict[str, list[np.ndarray]] = {}
    for sid, idx in slides:
        merged.setdefault(sid, []).append(idx)
    stores = {sid: corpus.zarr_path(sid) for sid in merged}
    for sid, parts in merged.items():  # check every store before changing any
        _store_n_obs(stores[sid], np.concatenate(parts))
    last = {sid: i for i, (sid, _) in enumerate(slides)}
    pieces: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for i, (sid, idx, emb) in enumerate(_slide_embeddings(parquet, slides, width)):
        pieces.setdefault(sid, []).append((idx, emb))
        if last[sid] == i:
            parts = pieces.pop(sid)
            _write_obsm(stores[sid], np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


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
    """Embed every spot of ``data`` (shard dir or Hub dataset id) with ``model``; returns ``out``.

    With ``zarr=True`` the slide stores get ``obsm['X_stamp']`` only after every spot was
    embedded (read back from the finished Parquet), so a failure part-way changes no store.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from spavis.format import open_corpus
    from stamp.tokenizer import to_model_input_ids

    if batch_size < 1:
        raise EmbedError(f"batch size must be at least 1, got {batch_size}")
    corpus = open_corpus(data)
    if zarr and getattr(corpus, "repo_id", None) is not None:
        raise EmbedError(
            f"{data}: --zarr writes into the corpus's Zarr stores, which needs a local shard directory; "
            "download the corpus (e.g. `hf download --repo-type dataset`) and pass its folder"
        )
    encoder, tokenizer = load_model(model, device)
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
    slides: list[tuple[str, np.ndarray]] = []  # (slide_id, spot_index) in output order, for --zarr
    bar = Progress(TextColumn("[bold]embed"), BarColumn(), MofNCompleteColumn(), TextColumn("spots"),
                   TimeRemainingColumn(), disable=not progress)
    try:
        with bar, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            task = bar.add_task("embed", total=corpus.n_spots)
            for table in corpus.iter_slides(columns=columns):
                for start in range(0, table.num_rows, batch_size):
                    chunk = table.slice(start, batch_size)
                    ids = to_model_input_ids(tokenizer.encode_table(chunk), tokenizer.pad_value, context)
                    emb = encoder.embed(torch.from_numpy(ids.astype(np.int64))).float().cpu().numpy()
                    flat = pa.array(emb.ravel(), pa.float32())
                    offsets = pa.array(np.arange(0, emb.size + 1, emb.shape[1], dtype=np.int32))
                    writer.write_table(pa.table({"spot_id": chunk.column("spot_id"),
                                                 "embedding": pa.ListArray.from_arrays(offsets, flat)}, schema=schema))
                    bar.advance(task, chunk.num_rows)
                if zarr and table.num_rows:
                    slides.append((str(table.column("slide_id")[0]),
                                   table.column("spot_index").to_numpy().astype(np.int64)))
        if zarr:
            _write_stores(corpus, tmp, slides, encoder.config.hidden_size)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
