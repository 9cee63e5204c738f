"""Input-rule throughput of the zoo's gene models (scGPT, scGPT-spatial, Nicheformer, Geneformer V2) against
STAMP's own GeneTokenizer on the same spots, in the same run.

Data are GENERATED (not real; ``benchmarks/tokenizer.py``'s generator): spots over the 20,310 genes of
the stamp-v1 vocabulary with about ``--nnz`` nonzero genes each; each model's vocabulary is the stamp-v1
genes (symbols for scGPT), with random gene statistics. Only the input rules are timed (raw counts ->
the model's input tensors), not the networks. Each rule runs ``--repeats`` times; the table gives the
best spots/s and the ratio to the GeneTokenizer (which is vectorised over the batch; the zoo's rules
bin / sort spot by spot as their authors do, scGPT also draws from a per-spot seed).

    python benchmarks/gene_inputs.py [--spots 2000] [--nnz 2000] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import resources
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from tokenizer import generate  # noqa: E402

from stamp.models.gene_inputs import CorpusGenes  # noqa: E402
from stamp.models.geneformer import GeneformerInput  # noqa: E402
from stamp.models.nicheformer import NicheformerInput  # noqa: E402
from stamp.models.scgpt import ScGPTInput, read_vocab  # noqa: E402
from stamp.tokenizer import GeneTokenizer  # noqa: E402


def stamp_v1() -> tuple[list[str], list[str]]:
    genes = json.loads((resources.files("spavis") / "data" / "vocab" / "stamp-v1.json").read_text())["genes"]
    return [g["ensembl_id"] for g in genes], [g.get("symbol") or "" for g in genes]


def rate(fn, n: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return n / best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spots", type=int, default=2000)
    ap.add_argument("--nnz", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    X, means = generate(args.spots, args.nnz)
    ids, symbols = stamp_v1()
    genes = CorpusGenes.of(ids, symbols)
    rng = np.random.default_rng(1)
    symbol_vocab = {s: i for i, s in enumerate(dict.fromkeys(s for s in symbols if s))}
    symbol_vocab["<pad>"] = len(symbol_vocab)
    vocab = read_vocab(symbol_vocab, "generated")
    spatial_means = rng.uniform(0.2, 3.0, len(vocab))
    tokens = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3, **{g: i + 4 for i, g in enumerate(ids)}}
    rules = {
        "scgpt": ScGPTInput(vocab),
        "scgpt-spatial": ScGPTInput(vocab, gene_means=spatial_means),
        "nicheformer": NicheformerInput(ids, means, context={"specie": 5, "assay": 15, "modality": 4}),
        "geneformer (V2, 4,096)": GeneformerInput(tokens, {g: float(m) for g, m in zip(ids, means)}, input_size=4096),
    }
    tok = GeneTokenizer(ids, means)
    base = rate(lambda: tok.encode_csr(X), X.shape[0], args.repeats)
    print(f"GENERATED spots: {X.shape[0]:,} x {X.shape[1]:,} genes, {X.nnz / X.shape[0]:,.0f} nonzero per spot")
    print(f"{'input rules':<26}{'spots/s':>12}{'x GeneTokenizer':>18}")
    print(f"{'stamp GeneTokenizer':<26}{base:>12,.0f}{1.0:>18.2f}")
    for name, inputs in rules.items():
        inputs.bind(genes)
        ctx = inputs.slide_context(X)
        r = rate(lambda: inputs(X, slide=ctx), X.shape[0], args.repeats)
        print(f"{name:<26}{r:>12,.0f}{r / base:>18.3f}")


if __name__ == "__main__":
    main()
