"""Loader throughput (shards -> token batches) vs the model's consumption, on this machine.

Shards are GENERATED (not real): ``--slides`` Visium-like hex-lattice slides of
``--spots`` spots with about ``--nnz`` nonzero genes per spot over 20,310 genes, written
with the public shard schema (spavis.shards.schema) and read back through spavis.corpus.
Measured in the same run: ``stamp.data.tokens.TokenBatchLoader`` spots/s in ``spots`` (stage 1)
and ``spatial`` (stage 2, Algorithm 2) modes, and the ``tiny`` StampGeneEncoder's
forward and forward+backward spots/s on batches of the same shape (skipped when
stamp.model is not importable). The loader keeps up when its rate exceeds the model's.

    python benchmarks/loader.py [--slides 4] [--spots 2000] [--nnz 2000] [--config tiny]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from scipy.spatial import cKDTree

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spavis.format import schema as S  # noqa: E402
from spavis.corpus import open_corpus  # noqa: E402
from stamp.data.tokens import TokenBatchLoader  # noqa: E402
from stamp.tokenizer import GeneTokenizer  # noqa: E402

N_GENES = 20_310


def generated_slide(slide_id: str, n_spots: int, nnz: int, rng: np.random.Generator) -> pa.Table:
    cols = int(np.ceil(np.sqrt(n_spots * 2 / np.sqrt(3)))) * 2
    rr, cc = np.divmod(np.arange(n_spots * 2), cols)
    keep = (rr + cc) % 2 == 0
    ar, ac = rr[keep][:n_spots], cc[keep][:n_spots]
    xy = np.column_stack([ac * 50.0, ar * 50.0 * np.sqrt(3)])
    dist, idx = cKDTree(xy).query(xy, k=9)
    lens = np.clip(rng.normal(nnz, nnz * 0.15, n_spots).astype(int), 1, N_GENES)
    gene_index = [np.sort(rng.choice(N_GENES, k, replace=False)).astype(np.int32) for k in lens]
    counts = [rng.geometric(0.45, k).astype(np.float32) for k in lens]
    return pa.table({
        "spot_id": [f"{slide_id}:{i}" for i in range(n_spots)], "slide_id": [slide_id] * n_spots,
        "barcode": [str(i) for i in range(n_spots)], "spot_index": np.arange(n_spots, dtype=np.int32),
        "gene_index": pa.array(gene_index, pa.list_(pa.int32())), "counts": pa.array(counts, pa.list_(pa.float32())),
        "total_counts": np.array([c.sum() for c in counts], np.float32), "n_genes": lens.astype(np.int32),
        "array_row": ar.astype(np.int32), "array_col": ac.astype(np.int32),
        "pxl_row": xy[:, 1] * 2.7, "pxl_col": xy[:, 0] * 2.7,
        "neighbors": pa.array(list(idx[:, 1:].astype(np.int32)), pa.list_(pa.int32())),
        "neighbor_distances": pa.array(list(dist[:, 1:].astype(np.float32)), pa.list_(pa.float32())),
    }).cast(S.EXPRESSION_SCHEMA)


def write_corpus(root: Path, slides: int, spots: int, nnz: int) -> Path:
    rng = np.random.default_rng(0)
    (root / S.EXPRESSION_DIR).mkdir(parents=True)
    genes = pa.table({
        "gene_index": np.arange(N_GENES, dtype=np.int32), "ensembl_id": [f"ENSG{i:011d}" for i in range(N_GENES)],
        "symbol": [f"G{i}" for i in range(N_GENES)], "nnz": np.ones(N_GENES, np.int64),
        "nonzero_sum_raw": np.ones(N_GENES), "nonzero_mean_raw": rng.gamma(2.0, 1.2, N_GENES) + 1,
        "nonzero_sum_cp10k": np.ones(N_GENES), "nonzero_mean_cp10k": rng.gamma(2.0, 6.0, N_GENES) + 1,
        "n_slides_detected": np.ones(N_GENES, np.int32),
    }).cast(S.GENES_SCHEMA)
    pq.write_table(genes, root / S.GENES_FILE)
    for i in range(slides):
        pq.write_table(generated_slide(f"GEN{i}", spots, nnz, rng), root / S.EXPRESSION_DIR / f"part-{i:05d}.parquet",
                       row_group_size=S.ROW_GROUP_SIZE)
    return root


def loader_rate(corpus, tok, mode: str, context: int) -> tuple[float, tuple[int, ...]]:
    import torch  # noqa: F401  (imported before timing: batches are torch tensors)

    loader = TokenBatchLoader(corpus, tok, mode=mode, batch_size=216, groups_per_batch=24, epochs=1,
                              context_length=context, seed=0)
    t, n, shape = time.perf_counter(), 0, ()
    for batch in loader:
        n += batch["input_ids"].shape[0]
        shape = tuple(batch["input_ids"].shape)
    return n / (time.perf_counter() - t), shape


def model_rates(config: str, shape: tuple[int, int], repeats: int = 3) -> tuple[float, float] | None:
    try:
        import torch

        from stamp.models.gene_encoder import create_gene_encoder as create_model
    except ImportError as exc:
        print(f"model part skipped: {exc}")
        return None
    torch.manual_seed(0)
    model = create_model(config)
    ids = torch.randint(30, 30 + N_GENES, shape)
    ids[:, shape[1] * 3 // 4:] = 1  # some padding, as real spots have
    with torch.no_grad():
        model(ids)  # warm-up
        t = time.perf_counter()
        for _ in range(repeats):
            model(ids)
        fwd = shape[0] * repeats / (time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(repeats):
        model.zero_grad()
        model(ids).float().pow(2).mean().backward()
    train = shape[0] * repeats / (time.perf_counter() - t)
    return fwd, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=4)
    ap.add_argument("--spots", type=int, default=2000)
    ap.add_argument("--nnz", type=int, default=2000)
    ap.add_argument("--config", default="tiny")
    args = ap.parse_args()
    try:
        from stamp.models.gene_encoder import load_config

        context = load_config(args.config).context_length
    except ImportError:
        context = 1500
    with tempfile.TemporaryDirectory() as tmp:
        corpus = open_corpus(write_corpus(Path(tmp) / "shards", args.slides, args.spots, args.nnz))
        tok = GeneTokenizer.from_corpus(corpus)
        print(f"generated shards: {args.slides} slides x {args.spots} spots, ~{args.nnz} nonzero genes/spot")
        spots_rate, shape = loader_rate(corpus, tok, "spots", context)
        spatial_rate, _ = loader_rate(corpus, tok, "spatial", context)
    print(f"loader, independent spots (stage 1): {spots_rate:9.0f} spots/s  batches {shape}")
    print(f"loader, spatial groups (stage 2)   : {spatial_rate:9.0f} spots/s")
    rates = model_rates(args.config, shape)
    if rates:
        fwd, train = rates
        print(f"model '{args.config}' forward          : {fwd:9.0f} spots/s")
        print(f"model '{args.config}' forward+backward : {train:9.0f} spots/s")
        print(f"loader / training consumption: {min(spots_rate, spatial_rate) / train:.1f}x "
              f"({'keeps up' if min(spots_rate, spatial_rate) >= train else 'is the bottleneck'})")


if __name__ == "__main__":
    main()
