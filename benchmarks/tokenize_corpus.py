"""`stamp tokenize` end to end: slides read ahead on a thread vs read one after another, same run.

Builds a corpus of ``--slides`` GENERATED Visium slides (``spavis.simulate``; or takes
``--corpus``), then runs ``stamp.cli.tokenize.tokenize_corpus`` alternately with its
read-ahead (``stamp.data.prefetch``, 2 slides) and with plain serial reading, ``--repeat`` times
each. Both write the same bytes (checked). Prints wall seconds of every run and the ratio of
the medians.

    python benchmarks/tokenize_corpus.py                  # 8 generated slides
    python benchmarks/tokenize_corpus.py --corpus path/to/corpus --repeat 5
"""
from __future__ import annotations

import argparse
import filecmp
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from _generated import generated_corpus  # benchmarks/_generated.py


def main(argv: list[str] | None = None) -> int:
    import stamp.cli.tokenize as tok
    from spavis.format import open_corpus

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, help="A built corpus (default: build one of --slides generated slides).")
    ap.add_argument("--slides", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="stamp-tok-"))
    try:
        corpus = open_corpus(args.corpus or generated_corpus(work, args.slides, workers=2))
        read_ahead = tok.prefetch
        modes = {"read-ahead": read_ahead, "serial": lambda items, depth=2: items}
        walls: dict[str, list[float]] = {m: [] for m in modes}
        tok.tokenize_corpus(corpus, work / "warm.parquet", progress=False)  # imports, numba compile, page cache
        for _ in range(args.repeat):
            for mode, fn in modes.items():
                tok.prefetch = fn
                t0 = time.perf_counter()
                tok.tokenize_corpus(corpus, work / f"{mode}.parquet", progress=False)
                walls[mode].append(time.perf_counter() - t0)
        tok.prefetch = read_ahead
        assert filecmp.cmp(work / "read-ahead.parquet", work / "serial.parquet", shallow=False)
        print(f"{corpus.n_spots:,} spots ({'GENERATED slides' if args.corpus is None else args.corpus})")
        for mode, w in walls.items():
            print(f"{mode:10s} wall s: {', '.join(f'{x:.2f}' for x in w)}")
        ratio = statistics.median(walls["serial"]) / statistics.median(walls["read-ahead"])
        print(f"read-ahead is x{ratio:.2f} faster (medians); identical output")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
