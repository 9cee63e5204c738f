"""``stamp embed``: one embedding per spot of a shard corpus from the gene side of any encoder.

The model comes from :func:`stamp.load` (a gene encoder or an aligned model: its gene side),
batches from :class:`stamp.data.tokens.TokenBatchLoader` (``mode="spots"``, corpus order, one pass,
last batch kept), the same loader and the same typed :class:`~stamp.data.tokens.Batch` as
pretraining, so tokens are cut to the context in one place.

Gene encoders with their own input rules (scGPT, Nicheformer, Geneformer: ``Encoder.counts``) read
raw counts instead, one slide at a time (:func:`stamp.data.counts.count_batches`), the corpus's genes
matched to their vocabulary once (by Ensembl id, or by symbol for scGPT) and the match logged.

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
    from stamp.zoo.concat import parts_without

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
        missing = parts_without(encoder, "gene")
        if missing:
            raise EmbedError(f"{model}: {', '.join(missing)} has no gene side; spot embeddings concatenate the gene "
                             "features of every part (use --modality fused for one part's images with another's genes)")
        if encoder.counts is not None:  # scGPT, Nicheformer, Geneformer: their own input rules, slide by slide
            return _embed_counts(encoder, model, corpus, out, batch_size=batch_size, zarr=zarr, progress=progress)
        tokenizer = encoder.tokenizer
        check_vocabulary(corpus, tokenizer, data)
        loader = TokenBatchLoader(corpus, tokenizer, mode="spots", batch_size=batch_size, shuffle=False, epochs=1,
                                  drop_last=False, context_length=context_length(encoder))
        batches = ((b.spot_ids, b.slide_ids, b.spot_index, encoder.encode_genes(b.input_ids)) for b in loader)
        return _write(batches, corpus, out, model_record(encoder, model, "gene"), encoder.embed_dim, zarr=zarr,
                      progress=progress)


def _write(batches, corpus, out, record: dict, dim: int, *, zarr: bool, progress: bool) -> Path:
    """Spot embeddings ``(spot_ids, slide_ids, spot_index, vectors)`` in corpus order -> the Parquet file (and,
    with ``zarr``, every slide's ``obsm`` - all or none), under no_grad, with a progress bar."""
    bar = counter("spots", enabled=progress)
    staging = ZarrObsmWriter(corpus, dim, record) if zarr else None
    try:
        with torch.no_grad(), bar, ParquetEmbeddings(out, "spot_id", record) as writer:
            task = bar.add_task("embed", total=corpus.n_spots)
            for spot_ids, slide_ids, spot_index, vectors in batches:
                emb = vectors.float().cpu().numpy()
                writer.write(spot_ids, emb)
                if staging is not None:
                    staging.write(slide_ids, spot_index, emb)
                bar.advance(task, len(spot_ids))
            if staging is not None:
                staging.check_complete()  # before the Parquet is committed: all or nothing
    except BaseException:
        if staging is not None:
            staging.discard()
        raise
    if staging is not None:
        staging.swap()
    return Path(out)


def _embed_counts(encoder, model, corpus, out, *, batch_size: int, zarr: bool, progress: bool) -> Path:
    """``embed_corpus`` for an encoder reading raw counts (``encoder.counts``): same outputs, same order."""
    import json
    import logging

    from stamp.data.counts import COLUMNS, count_batches
    from stamp.errors import ModelConfigError
    from stamp.models.gene_inputs import CorpusGenes

    try:
        match = encoder.counts.bind(CorpusGenes.from_table(corpus.genes))
    except ModelConfigError as exc:
        raise EmbedError(f"{model}: {exc}") from None
    logging.getLogger(__name__).info("%s: %s", model, match.describe())
    record = model_record(encoder, model, "gene")
    record["stamp_model_inputs"] = json.dumps({**encoder.counts.describe(), "genes_matched": match.matched,
                                               "corpus_genes": match.corpus_genes})
    tables = corpus.iter_slides(columns=[c for c in COLUMNS if c != "slide_id"])
    batches = ((b.spot_ids, b.slide_ids, b.spot_index, encoder.embed_counts(b.X, slide=b.slide))
               for b in count_batches(tables, corpus.n_genes, encoder.counts, batch_size=batch_size))
    return _write(batches, corpus, out, record, encoder.embed_dim, zarr=zarr, progress=progress)
