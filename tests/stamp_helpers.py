"""Small shard corpora for the stamp tests, from GENERATED slices (spavis.simulate).

Written in the shard format of spavis.build.schema directly (a few hundred synthetic genes,
a cropped slice), so training tests stay fast; the learning benchmark uses the real
``spavis build-shards`` pipeline. Everything here is generated data, not measurements.
"""
from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
from sklearn.neighbors import NearestNeighbors

from spavis.build import schema as S
from spavis.simulate import simulate_slice


def _list(values: list[np.ndarray], typ) -> pa.Array:
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum([len(v) for v in values], out=offsets[1:])
    flat = np.concatenate(values) if values else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, typ))


def make_corpus(
    root: Path,
    *,
    slides: int = 1,
    n_genes: int = 300,
    max_row: int | None = 30,
    n_domains: int = 4,
    seed: int = 0,
    k: int = 12,
) -> tuple[Path, dict[str, str]]:
    """Write a corpus under ``root``; returns (root, {spot_id: true domain})."""
    root = Path(root)
    (root / S.EXPRESSION_DIR).mkdir(parents=True, exist_ok=True)
    rows, domains, slide_rows = [], {}, []
    gene_ids = None
    for s in range(slides):
        sid = f"gen{s}"
        a = simulate_slice(sid, genes=n_genes, seed=seed + s, n_domains=n_domains, with_image=False,
                           n_markers=max(10, n_genes // 10))
        if max_row is not None:
            a = a[a.obs["array_row"].to_numpy() < max_row].copy()
        gene_ids = a.var["gene_ids"].astype(str).tolist()
        X = sp.csr_matrix(a.X, dtype=np.float32)
        xy = np.column_stack([a.obs["array_col"] * 50.0, a.obs["array_row"] * 50.0 * np.sqrt(3)])
        dist, idx = NearestNeighbors(n_neighbors=k + 1).fit(xy).kneighbors(xy)
        n = a.n_obs
        spot_ids = [f"{sid}:{b}" for b in a.obs_names]
        domains.update(zip(spot_ids, a.obs["domain"].astype(str)))
        rows.append({
            "spot_id": spot_ids, "slide_id": [sid] * n, "barcode": list(a.obs_names),
            "spot_index": np.arange(n, dtype=np.int32),
            "gene_index": [X.indices[X.indptr[i]:X.indptr[i + 1]].astype(np.int32) for i in range(n)],
            "counts": [X.data[X.indptr[i]:X.indptr[i + 1]].astype(np.float32) for i in range(n)],
            "total_counts": np.asarray(X.sum(1)).ravel().astype(np.float32),
            "n_genes": np.diff(X.indptr).astype(np.int32),
            "array_row": a.obs["array_row"].to_numpy(np.int32), "array_col": a.obs["array_col"].to_numpy(np.int32),
            "pxl_row": a.obs["pxl_row"].to_numpy(np.float64), "pxl_col": a.obs["pxl_col"].to_numpy(np.float64),
            "neighbors": [idx[i, 1:].astype(np.int32) for i in range(n)],
            "neighbor_distances": [dist[i, 1:].astype(np.float32) for i in range(n)],
        })
        store = root / S.ZARR_DIR / f"{sid}.zarr"
        store.parent.mkdir(parents=True, exist_ok=True)
        ad.AnnData(X=X, obs=a.obs[["array_row", "array_col"]].copy()).write_zarr(store)
        slide_rows.append({"slide_id": sid, "source": "generated", "license": "CC0-1.0 (generated)",
                           "n_spots_kept": n})
    cols = {}
    for name in S.EXPRESSION_SCHEMA.names:
        field = S.EXPRESSION_SCHEMA.field(name)
        vals = [v for r in rows for v in (r[name] if not isinstance(r[name], np.ndarray) else r[name].tolist())]
        if pa.types.is_list(field.type):
            cols[name] = _list([np.asarray(v) for v in vals], field.type.value_type)
        else:
            cols[name] = pa.array(vals, field.type)
    table = pa.Table.from_pydict(cols, schema=S.EXPRESSION_SCHEMA)
    start = 0
    for i, r in enumerate(rows):  # one slide per shard
        n = len(r["spot_id"])
        pq.write_table(table.slice(start, n), root / S.EXPRESSION_DIR / f"part-{i:05d}.parquet", row_group_size=1024)
        start += n
    X_all = sp.vstack([sp.csr_matrix((np.concatenate(r["counts"]), np.concatenate(r["gene_index"]),
                                      np.concatenate([[0], np.cumsum(r["n_genes"])])), shape=(len(r["spot_id"]), n_genes))
                       for r in rows]).tocsc()
    nnz = np.diff(X_all.indptr)
    sums = np.asarray(X_all.sum(0)).ravel()
    tot = np.asarray(X_all.sum(1)).ravel()
    cp = sp.diags(1e4 / np.maximum(tot, 1)) @ X_all.tocsr()
    cp_sums = np.asarray(cp.sum(0)).ravel()
    with np.errstate(invalid="ignore", divide="ignore"):
        genes = pa.table({
            "gene_index": pa.array(np.arange(n_genes, dtype=np.int32)),
            "ensembl_id": pa.array(gene_ids), "symbol": pa.array([""] * n_genes),
            "nnz": pa.array(nnz.astype(np.int64)), "nonzero_sum_raw": pa.array(sums.astype(np.float64)),
            "nonzero_mean_raw": pa.array(np.where(nnz > 0, sums / nnz, np.nan)),
            "nonzero_sum_cp10k": pa.array(cp_sums.astype(np.float64)),
            "nonzero_mean_cp10k": pa.array(np.where(nnz > 0, cp_sums / nnz, np.nan)),
            "n_slides_detected": pa.array(np.full(n_genes, slides, dtype=np.int32)),
        }, schema=S.GENES_SCHEMA)
    pq.write_table(genes, root / S.GENES_FILE)
    pq.write_table(pa.Table.from_pylist(slide_rows), root / S.SLIDES_FILE)
    (root / S.MANIFEST_FILE).write_text(json.dumps({"generated": True}))
    return root, domains
