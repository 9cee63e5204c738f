"""``stamp embed``: one embedding per spot of a shard corpus, streamed through the training loader.

Batches come from :class:`stamp.data.TokenBatchLoader` (``mode="spots"``, corpus order,
one pass, last batch kept), the same loader and the same typed :class:`~stamp.data.Batch`
as pretraining, so tokens are cut to the context in one place.

Output Parquet: ``spot_id`` (string) + ``embedding`` (list<float32>), rows in corpus order,
written to a hidden temp file and renamed at the end (no partial file on failure); its
schema metadata ``stamp.model`` records which model wrote it.

``zarr=True`` also gives each slide store ``DIR/zarr/<slide_id>.zarr`` an ``obsm['X_stamp']``
(rows in ``spot_index`` order) — for all slides or for none:

1. stage: every store gets ``obsm/X_stamp.staging/g/X_stamp``, filled batch by batch. The
   staging folder has no Zarr metadata of its own, so readers (zarr, anndata) do not see
   it, and ``spavis validate`` ignores ``obsm/X_*``;
2. once every spot of every slide is written (and the Parquet is complete), swap: each
   store's old ``X_stamp`` is moved aside, the staged one renamed in, consolidated metadata
   rewritten. Renames only, so this takes milliseconds for the whole corpus.

A failure in step 1 changes no store (staging is removed); an interruption in step 2 is
completed by rerunning the command (it re-stages and swaps every slide). ``X_stamp`` records
the model that wrote it in its attributes (``stamp_model``, ``stamp_model_sha256``), so a
reader can tell which model wrote each slide.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from spavis.format.io import apply_umask, remove_tree, sha256_file, temp_sibling
from stamp.errors import EmbedError

OBSM_KEY = "X_stamp"
STAGING = f"{OBSM_KEY}.staging"


def load_model(model: str | os.PathLike, device: str | torch.device | None = None,
               means: str | os.PathLike | None = None):
    """(encoder in eval mode, tokenizer) from a local folder (RUN, RUN/model) or a Hub repo id.

    A Hub id is fetched once (``stamp.hub.resolve_model_source``; fails at once when the Hub
    cannot be reached), then both are read from that folder. ``means``: a gene means file for
    models whose tokenizer ships none (converted releases: the released ``Visium_mean.npy``).
    """
    from stamp.hub import resolve_model_source
    from stamp.model import StampGeneEncoder
    from stamp.registry import load_tokenizer

    source = resolve_model_source(model)
    encoder = StampGeneEncoder.from_pretrained(str(source))
    tokenizer = load_tokenizer(source, means)
    if encoder.config.vocab_size != tokenizer.vocab_size:
        raise EmbedError(
            f"{model}: the encoder has {encoder.config.n_genes} genes but the tokenizer files {tokenizer.n_genes}; "
            "the folder mixes two models: save the model and its tokenizer together (stamp pretrain does)"
        )
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return encoder.to(dev).eval(), tokenizer


def model_record(model: str | os.PathLike) -> dict[str, str]:
    """Which model wrote an embedding: the id as given, its resolved folder and its weights' sha256."""
    from stamp.hub import resolve_model_source

    folder = resolve_model_source(model)
    weights = folder / "model.safetensors"
    return {"stamp_model": str(model), "stamp_model_dir": str(folder.resolve()),
            "stamp_model_sha256": sha256_file(weights) if weights.is_file() else ""}


def _store_n_obs(store: Path) -> int:
    import zarr

    group = zarr.open_group(str(store), mode="r", use_consolidated=False)
    return int(group["obs"][group["obs"].attrs["_index"]].shape[0])


class _Staging:
    """The staged ``X_stamp`` of every slide store (step 1 of the module docstring)."""

    def __init__(self, corpus, width: int, record: dict[str, str]) -> None:
        import zarr
        from anndata.io import write_elem

        self.stores: dict[str, Path] = {}
        self.arrays: dict[str, object] = {}
        self.seen: dict[str, np.ndarray] = {}
        self.pending: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        self.record = record
        try:
            for sid in corpus.slides["slide_id"].astype(str):
                store = corpus.zarr_path(sid)
                n_obs = _store_n_obs(store)
                stage = store / "obsm" / STAGING
                remove_tree(stage)  # a previous, interrupted run
                stage.mkdir(parents=True)
                group = zarr.open_group(str(stage / "g"), mode="w", zarr_format=_zarr_format(store))
                write_elem(group, OBSM_KEY, np.zeros((n_obs, width), dtype=np.float32))
                self.stores[sid] = store
                self.arrays[sid] = group[OBSM_KEY]
                self.seen[sid] = np.zeros(n_obs, dtype=bool)
        except BaseException:
            self.discard()
            raise

    def write(self, slide_ids: list[str], spot_index: np.ndarray, emb: np.ndarray) -> None:
        """Buffer a batch's rows; a slide's rows go to its staged array (one write) once the
        batches move on to other slides (corpus order keeps a slide's spots together)."""
        sids = np.asarray(slide_ids, dtype=object)
        present = list(dict.fromkeys(slide_ids))
        for sid in [k for k in self.pending if k not in present]:
            self._flush(sid)
        for sid in present:
            rows = np.flatnonzero(sids == sid)
            self.pending.setdefault(sid, []).append((spot_index[rows], emb[rows]))

    def _flush(self, sid: str) -> None:
        parts = self.pending.pop(sid, [])
        if not parts:
            return
        idx = np.concatenate([p[0] for p in parts])
        emb = np.concatenate([p[1] for p in parts])
        seen = self.seen.get(sid)
        if seen is None or idx.max(initial=-1) >= seen.size:
            raise EmbedError(f"{self.stores.get(sid, sid)}: the shards list spots of slide {sid} that its "
                             "Zarr store does not hold; rebuild the corpus (spavis build-shards)")
        order = np.argsort(idx)
        if not seen.any() and np.array_equal(idx[order], np.arange(seen.size)):
            self.arrays[sid][...] = emb[order]  # the whole slide at once (the usual case)
        else:
            self.arrays[sid].oindex[idx[order], :] = emb[order]
        seen[idx] = True

    def check_complete(self) -> None:
        for sid in list(self.pending):
            self._flush(sid)
        for sid, seen in self.seen.items():
            if not seen.all():
                raise EmbedError(f"{self.stores[sid]}: {int((~seen).sum())} of {seen.size} spots of slide {sid} are "
                                 "not in the shards; rebuild the corpus so shards and Zarr stores agree")

    def swap(self) -> None:
        """Step 2: move each staged X_stamp into place (renames), record the model, consolidate."""
        import zarr

        for sid, store in self.stores.items():
            stage = store / "obsm" / STAGING
            staged = stage / "g" / OBSM_KEY
            self.arrays[sid].attrs.update(self.record)
            apply_umask(staged, recursive=True)
            final = store / "obsm" / OBSM_KEY
            if final.exists():
                os.replace(final, temp_sibling(stage / "old", "old"))
            os.replace(staged, final)
            if (store / ".zmetadata").is_file() or (store / "zarr.json").is_file():
                zarr.consolidate_metadata(str(store))  # readers that trust consolidated metadata stay in sync
            remove_tree(stage)

    def discard(self) -> None:
        for store in self.stores.values():
            remove_tree(store / "obsm" / STAGING)


def _zarr_format(store: Path) -> int:
    return 3 if (store / "zarr.json").is_file() else 2


def embed_corpus(
    model: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    batch_size: int = 256,
    zarr: bool = False,
    device: str | None = None,
    progress: bool = True,
    means: str | os.PathLike | None = None,
) -> Path:
    """Embed every spot of ``data`` (shard dir or Hub dataset id) with ``model``; returns ``out``.

    ``means``: gene means file for models whose tokenizer ships none (``stamp-v1-gene``).

    With ``zarr=True`` every slide store gets ``obsm['X_stamp']``, all or none (module docstring).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from spavis.format import open_corpus
    from stamp.data import TokenBatchLoader

    if batch_size < 1:
        raise EmbedError(f"batch size must be at least 1, got {batch_size}")
    corpus = open_corpus(data)
    if zarr and getattr(corpus, "repo_id", None) is not None:
        raise EmbedError(
            f"{data}: --zarr writes into the corpus's Zarr stores, which needs a local shard directory; "
            "download the corpus (e.g. `hf download --repo-type dataset`) and pass its folder"
        )
    encoder, tokenizer = load_model(model, device, means)
    genes = corpus.genes["ensembl_id"].astype(str).tolist()
    if genes != list(tokenizer.gene_ids):
        raise EmbedError(
            f"{data}: its {len(genes)}-gene vocabulary differs from the model's {tokenizer.n_genes} genes; "
            "build the shards with the vocabulary the model was trained on"
        )
    record = model_record(model)
    loader = TokenBatchLoader(corpus, tokenizer, mode="spots", batch_size=batch_size, shuffle=False, epochs=1,
                              drop_last=False, context_length=encoder.config.context_length)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out)
    schema = pa.schema([("spot_id", pa.string()), ("embedding", pa.list_(pa.float32()))],
                       metadata={"stamp.model": json.dumps(record, sort_keys=True)})
    bar = Progress(TextColumn("[bold]embed"), BarColumn(), MofNCompleteColumn(), TextColumn("spots"),
                   TimeRemainingColumn(), disable=not progress)
    staging = _Staging(corpus, encoder.config.hidden_size, record) if zarr else None
    try:
        with bar, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            task = bar.add_task("embed", total=corpus.n_spots)
            for batch in loader:
                emb = encoder.embed(batch.input_ids).float().cpu().numpy()
                flat = pa.array(emb.ravel(), pa.float32())
                offsets = pa.array(np.arange(0, emb.size + 1, emb.shape[1], dtype=np.int32))
                writer.write_table(pa.table({"spot_id": pa.array(batch.spot_ids, pa.string()),
                                             "embedding": pa.ListArray.from_arrays(offsets, flat)}, schema=schema))
                if staging is not None:
                    staging.write(batch.slide_ids, batch.spot_index, emb)
                bar.advance(task, len(batch))
        if staging is not None:
            staging.check_complete()
        os.replace(tmp, out)
    except BaseException:
        if staging is not None:
            staging.discard()
        raise
    finally:
        tmp.unlink(missing_ok=True)
    if staging is not None:
        staging.swap()
    return out
