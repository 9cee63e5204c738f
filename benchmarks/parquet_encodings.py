"""Parquet settings of expression files: encode time, size and read time, same shard, same run.

Builds a corpus of two GENERATED slides (``spavis.simulate``; or takes ``--corpus``), reads
its first expression file and re-writes it in memory with each candidate setting: the
codec level and the column encodings of ``gene_index`` / ``counts`` (delta and
byte-stream-split against plain). Times are the best of ``--repeat`` runs (CPU seconds of
this process, so other load matters less); the read is ``pyarrow.parquet.read_table`` of
the whole file. The setting spavis uses is marked.

    python benchmarks/parquet_encodings.py
    python benchmarks/parquet_encodings.py --corpus path/to/corpus --repeat 5
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from _generated import generated_corpus  # benchmarks/_generated.py

GENE, COUNTS = "gene_index.list.element", "counts.list.element"
CANDIDATES = {
    "plain, zstd 3 (spavis before)": (3, {}),
    "plain, zstd 1": (1, {}),
    "delta gene_index, zstd 1": (1, {GENE: "DELTA_BINARY_PACKED"}),
    "delta + byte-stream-split, zstd 3": (3, {GENE: "DELTA_BINARY_PACKED", COUNTS: "BYTE_STREAM_SPLIT"}),
    "delta + byte-stream-split, zstd 1": (1, {GENE: "DELTA_BINARY_PACKED", COUNTS: "BYTE_STREAM_SPLIT"}),
}


def _best(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.process_time()
        out = fn()
        best = min(best, time.process_time() - t0)
    return best, out


def main(argv: list[str] | None = None) -> int:
    from spavis.format import schema as S
    from spavis.shards.write import expression_write_options

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, help="A built corpus (default: build one of 2 generated slides).")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="spavis-enc-"))
    try:
        root = args.corpus or generated_corpus(work, 2, max_spots_per_shard=100_000)
        path = sorted((root / S.EXPRESSION_DIR).glob("*.parquet"))[0]
        table = pq.read_table(path)
        ours = (S.EXPRESSION_COMPRESSION_LEVEL, S.EXPRESSION_COLUMN_ENCODING)
        nnz = len(table.column("gene_index").combine_chunks().values)
        origin = "GENERATED slides" if args.corpus is None else str(path)
        print(f"{path.name}: {table.num_rows:,} spots, {nnz:,} nonzeros ({origin})")
        print("| setting | encode CPU s | file MB | read CPU s |")
        print("|---|---:|---:|---:|")
        for label, (level, encoding) in CANDIDATES.items():
            options = dict(expression_write_options(table.schema), compression_level=level, column_encoding=encoding)
            if not encoding:
                options.pop("column_encoding")

            def write(options=options) -> pa.Buffer:
                sink = pa.BufferOutputStream()
                with pq.ParquetWriter(sink, table.schema, **options) as writer:
                    for batch in table.to_batches(max_chunksize=S.ROW_GROUP_SIZE):
                        writer.write_table(pa.Table.from_batches([batch]), row_group_size=S.ROW_GROUP_SIZE)
                return sink.getvalue()

            enc_s, data = _best(write, args.repeat)
            read_s, back = _best(lambda data=data: pq.read_table(pa.BufferReader(data)), args.repeat)
            assert back.equals(table), label  # every setting stores the same values
            mark = " (spavis)" if (level, encoding) == ours else ""
            print(f"| {label}{mark} | {enc_s:.2f} | {data.size / 1e6:.1f} | {read_s:.2f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
