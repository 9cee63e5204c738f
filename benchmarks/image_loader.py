"""Does the paired image loader keep up with the ``uni`` vision encoder? (same-run ratio)

Builds a small GENERATED paired corpus (``spavis.simulate`` slice with a generated H&E
image -> ``build_shards --with-images``), then measures in one run:

* loader: paired batches per second from :class:`stamp.data.paired.PairedBatchLoader`
  (read Parquet, tokenize expression, decode 2 PNGs per spot on ``--threads`` threads);
* model: spots per second the ``uni`` architecture (ViT-L/16, RANDOM weights -- no download)
  consumes for one alignment step's vision work: patch + region forward and backward
  (``--no-backward``: inference only), on CUDA when present, else CPU.

Prints ``loader / model``: above 1 the loader is not the bottleneck at that batch size.

    python benchmarks/image_loader.py [--batch-size 16] [--batches 4] [--threads 4] [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--device", default=None)
    ap.add_argument("--no-backward", action="store_true")
    ap.add_argument("--max-row", type=int, default=6, help="rows of the generated capture area (spots ~ 52/row)")
    args = ap.parse_args()

    import torch

    from paired_helpers import make_paired_corpus
    from spavis.format import open_corpus
    from stamp.models.aligned_model import StampModel, StampModelConfig
    from stamp.zoo.factory import vision_config
    from stamp.data.paired import PairedBatchLoader
    from stamp.tokenizer import GeneTokenizer

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        corpus_dir, _ = make_paired_corpus(Path(tmp) / "shards", slides=1, n_genes=80, max_row=args.max_row)
        corpus = open_corpus(corpus_dir)
        tok = GeneTokenizer.from_corpus(corpus, max_length=128)
        loader = PairedBatchLoader(corpus, tok, batch_size=args.batch_size, context_length=128,
                                   threads=args.threads, epochs=None)
        stream = iter(loader)
        next(stream)  # warm: first file read
        t0 = time.perf_counter()
        for _ in range(args.batches):
            batch = next(stream)
        loader_sps = args.batches * args.batch_size / (time.perf_counter() - t0)

        torch.manual_seed(0)
        cfg = StampModelConfig(gene={"n_genes": len(corpus.genes), "hidden_size": 64, "intermediate_size": 128,
                                     "num_layers": 1, "num_heads": 4, "context_length": 128, "heads": False},
                               vision=vision_config("uni"))
        model = StampModel(cfg).to(device)  # random weights: the cost of UNI's architecture, not its values
        model.train(not args.no_backward)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None

        def step() -> None:
            patch, region = model.pixels(batch.patch), model.pixels(batch.region)
            with torch.set_grad_enabled(not args.no_backward):
                if autocast is not None:
                    with autocast:
                        out = model(batch.input_ids.to(device), patch, region, batch.region_cell.to(device))
                else:
                    out = model(batch.input_ids.to(device), patch, region, batch.region_cell.to(device))
                if not args.no_backward:
                    out.loss.backward()
                    model.zero_grad(set_to_none=True)

        step()  # warm-up (kernels, allocator)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        n_model = max(1, args.batches // 2)
        for _ in range(n_model):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        model_sps = n_model * args.batch_size / (time.perf_counter() - t0)
    result = {"device": str(device), "batch_size": args.batch_size, "threads": args.threads,
              "loader_spots_per_s": float(f"{loader_sps:.3g}"), "uni_spots_per_s": float(f"{model_sps:.3g}"),
              "backward": not args.no_backward, "loader_over_model": float(f"{loader_sps / model_sps:.3g}")}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
