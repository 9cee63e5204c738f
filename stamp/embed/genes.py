"""``stamp embed``: one embedding per spot of a shard corpus from the gene side of any encoder.

The model comes from :func:`stamp.load` (a gene encoder or an aligned model: its gene side),
batches from :class:`stamp.data.tokens.TokenBatchLoader` (``mode="spots"``, corpus order, one pass,
last batch kept), the same loader and the same typed :class:`~stamp.data.tokens.Batch` as
pretraining, so tokens are cut to the context in one place.

Output (written by :mod:`stamp.embed.writer`, the one embeddings writer): Parquet ``spot_id`` +
``embedding`` rows in corpus order, atomic, its schema metadata ``stamp.model`` naming the
model (name, revision, license, weights sha256). ``zarr=True`` also gives each slide store
``DIR/zarr/<slide_id>.zarr`` an ``obsm['X_stamp']`` (rows in ``spot_index`` order) -- for all
slides or for none, one writer per corpus at a time (see :mod:`stamp.embed.writer`).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from spavis.format.progress import counter
from stamp.embed.writer import OBSM_KEY, STAGING, ParquetEmbeddings, ZarrObsmWriter, model_record, zarr_writer_lock
from stamp.errors import EmbedError

__all__ = ["embed_corpus", "load_model", "gene_side", "context_length", "OBSM_KEY", "STAGING"]


def load_model(model: str | os.PathLike, device: str | torch.device | None = None,
               means: str | os.PathLike | None = None):
    """(encoder in eval mode, tokenizer) from a local folder (RUN, RUN/model) or a Hub repo id.

    A Hub id is fetched once (``stamp.zoo.resolve.resolve_model_source``; fails at once when the Hub
    cannot be reached), then both are read from that folder. ``means``: a gene means file for
    models whose tokenizer ships none (converted releases: the released ``Visium_mean.npy``).
    """
    from stamp.zoo.resolve import resolve_model_source
    from stamp.models.gene_encoder import StampGeneEncoder
    from stamp.zoo.resolve import load_tokenizer

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


def gene_side(encoder, model: str | os.PathLike, what: str = "--data") -> None:
    """Refuse an encoder without a gene side, or one whose tokenizer needs the means file it was not given."""
    problem = encoder.gene_side_problem()
    if problem is not None:
        raise EmbedError(f"{model}: {problem}; {what} spot embeddings need a gene or aligned model with its "
                         "tokenizer (for an image encoder use --modality image for patches, or --images FOLDER)")


def check_vocabulary(corpus, tokenizer, data) -> None:
    """The corpus's genes, in order, must be the model's vocabulary."""
    from spavis.format.vocabulary import require_same_vocabulary

    require_same_vocabulary(tokenizer, corpus, a_name="the model", b_name=str(data), error=EmbedError,
                            fix="build the shards with the vocabulary the model was trained on")


def context_length(encoder) -> int:
    """Tokens per spot the encoder reads: its gene config's context, else the tokenizer's length."""
    config = getattr(encoder.module, "config", None)
    for cfg in (getattr(config, "gene", None), config):
        value = getattr(cfg, "context_length", None)
        if isinstance(value, int) and value > 0:
            return value
    return int(encoder.tokenizer.max_length)


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
    wait: float = 0.0,
) -> Path:
    """Embed every spot of ``data`` (shard dir or Hub dataset id) with the gene side of ``model``
    (anything :func:`stamp.load` takes: gene encoder or aligned model); returns ``out``.

    ``means``: gene means file for models whose tokenizer ships none (``stamp-v1-gene``).
    With ``zarr=True`` every slide store gets ``obsm['X_stamp']``, all or none; another
    ``--zarr`` run on the same corpus is refused, or awaited up to ``wait`` seconds.
    """
    import stamp
    from spavis.format import open_corpus
    from spavis.format.schema import ZARR_DIR
    from stamp.data.tokens import TokenBatchLoader

    if batch_size < 1:
        raise EmbedError(f"batch size must be at least 1, got {batch_size}")
    corpus = open_corpus(data)
    if zarr and getattr(corpus, "repo_id", None) is not None:
        raise EmbedError(
            f"{data}: --zarr writes into the corpus's Zarr stores, which needs a local shard directory; "
            "download the corpus (e.g. `hf download --repo-type dataset`) and pass its folder"
        )
    lock = zarr_writer_lock(Path(corpus.root) / ZARR_DIR, wait=wait) if zarr else contextlib.nullcontext()
    with lock:
        encoder = stamp.load(model, device=device, means=means)
        gene_side(encoder, model)
        tokenizer = encoder.tokenizer
        check_vocabulary(corpus, tokenizer, data)
        record = model_record(encoder, model, "gene")
        loader = TokenBatchLoader(corpus, tokenizer, mode="spots", batch_size=batch_size, shuffle=False, epochs=1,
                                  drop_last=False, context_length=context_length(encoder))
        bar = counter("spots", enabled=progress)
        staging = ZarrObsmWriter(corpus, encoder.embed_dim, record) if zarr else None
        try:
            with torch.no_grad(), bar, ParquetEmbeddings(out, "spot_id", record) as writer:
                task = bar.add_task("embed", total=corpus.n_spots)
                for batch in loader:
                    emb = encoder.encode_genes(batch.input_ids).float().cpu().numpy()
                    writer.write(batch.spot_ids, emb)
                    if staging is not None:
                        staging.write(batch.slide_ids, batch.spot_index, emb)
                    bar.advance(task, len(batch))
                if staging is not None:
                    staging.check_complete()  # before the Parquet is committed: all or nothing
        except BaseException:
            if staging is not None:
                staging.discard()
            raise
        if staging is not None:
            staging.swap()
    return Path(out)
