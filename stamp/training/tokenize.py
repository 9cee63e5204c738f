"""Pre-tokenize a corpus into spot_id + input_ids Parquet (as Geneformer users do); ``stamp tokenize``
is its thin command (:mod:`stamp.cli.tokenize`).

Output: one row per spot, ``spot_id`` (string) and ``input_ids`` (list<int32>, the tokenizer's
full padded row: ``max_length`` ids, padded with the tokenizer's ``pad_value``); the tokenizer config is stored in the
Parquet schema metadata under ``stamp.tokenizer``. Streams one slide at a time, the next two
read ahead on a thread (memory bounded by three of the largest slides), writes to a temporary
file and renames it when complete.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spavis.format.io import temp_sibling
from spavis.format.progress import counter
from stamp.data.prefetch import prefetch
from stamp.tokenizer import GeneTokenizer

logger = logging.getLogger(__name__)


def tokenize_corpus(
    data: Any,
    out: str | os.PathLike,
    *,
    tokenizer: GeneTokenizer | None = None,
    mean: str = "nonzero_mean_cp10k",
    compat: str | None = None,
    means: str | os.PathLike | None = None,
    max_length: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize every spot of a corpus (dir or Hub id) into ``out`` (Parquet). Returns a summary."""
    from spavis.format import open_corpus

    corpus = data if hasattr(data, "iter_slides") else open_corpus(data)
    if tokenizer is None:
        tokenizer = GeneTokenizer.from_genes(corpus.genes, mean=mean, mode=compat or "native",
                                             means=means, max_length=max_length)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([pa.field("spot_id", pa.string(), nullable=False),
                        pa.field("input_ids", pa.list_(pa.int32()), nullable=False)],
                       metadata={"stamp.tokenizer": json.dumps(tokenizer.config())})
    n_spots = n_empty = 0
    total = corpus.n_spots
    tmp = temp_sibling(out, "part")
    try:
        with counter("spots", enabled=progress, transient=True) as bar, \
                pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            task = bar.add_task("tokenize", total=total)
            # the next slides are read (decompressed) on a thread while this one is encoded and written
            for table in prefetch(corpus.iter_slides(columns=["spot_id", "gene_index", "counts"]), depth=2):
                ids, empty = tokenizer.encode_table(table, return_n_empty=True)
                width = ids.shape[1]
                offsets = pa.array(np.arange(0, ids.size + 1, width, dtype=np.int32))
                input_ids = pa.ListArray.from_arrays(offsets, pa.array(ids.ravel(), pa.int32()))
                writer.write_table(pa.Table.from_arrays([table.column("spot_id").combine_chunks(), input_ids],
                                                        schema=schema))
                n_spots += table.num_rows
                n_empty += empty
                bar.advance(task, table.num_rows)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if n_empty:
        logger.warning("%d of %d spots had no vocabulary gene and were written as all-padding rows", n_empty, n_spots)
    return {"out": str(out), "n_spots": n_spots, "n_empty": n_empty, "mode": tokenizer.mode,
            "max_length": tokenizer.max_length, "mean_source": tokenizer.mean_source}


__all__ = ["tokenize_corpus"]
