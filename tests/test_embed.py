"""stamp embed: Parquet of spot embeddings and obsm['X_stamp'] in the slide Zarr stores."""
from __future__ import annotations

import subprocess
import sys

import anndata as ad
import numpy as np
import pyarrow.parquet as pq
import torch

from spavis.corpus import open_corpus
from stamp.model import create_model
from stamp.tokenizer import GeneTokenizer
from stamp_helpers import make_corpus


def test_embed_cli_parquet_and_zarr(tmp_path):
    corpus, domains = make_corpus(tmp_path / "shards", slides=2, n_genes=80, max_row=10)
    torch.manual_seed(0)
    model = create_model("tiny", n_genes=80)
    tok = GeneTokenizer.from_corpus(corpus, max_length=128)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    out = tmp_path / "emb.parquet"
    res = subprocess.run([sys.executable, "-m", "stamp.cli", "embed", "--model", str(tmp_path / "m"), "--data",
                          str(corpus), "--out", str(out), "--zarr", "--batch-size", "50", "--no-progress"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    t = pq.read_table(out)
    assert t.column_names == ["spot_id", "embedding"] and t.num_rows == len(domains)
    assert sorted(t.column("spot_id").to_pylist()) == sorted(domains)
    emb = np.asarray(t.column("embedding").to_pylist(), dtype=np.float32)
    # same numbers as calling the model directly
    table = next(open_corpus(corpus).iter_slides(columns=["spot_id", "gene_index", "counts"]))
    direct = model.eval().embed(torch.from_numpy(tok.encode_table(table).astype(np.int64))).numpy()
    assert np.allclose(emb[: table.num_rows], direct, atol=1e-5)
    a = ad.read_zarr(corpus / "zarr" / "gen0.zarr")
    assert a.obsm["X_stamp"].shape == (table.num_rows, 64)
    assert np.allclose(a.obsm["X_stamp"], direct, atol=1e-5)
    assert a.X.nnz > 0  # X untouched


def test_embed_rejects_other_vocabulary(tmp_path):
    corpus, _ = make_corpus(tmp_path / "shards", slides=1, n_genes=60, max_row=6)
    model = create_model("tiny", n_genes=70)
    model.save_pretrained(tmp_path / "m")
    other, _ = make_corpus(tmp_path / "other", slides=1, n_genes=70, max_row=6)
    GeneTokenizer.from_corpus(other).save_pretrained(tmp_path / "m")
    res = subprocess.run([sys.executable, "-m", "stamp.cli", "embed", "--model", str(tmp_path / "m"), "--data",
                          str(corpus), "--out", str(tmp_path / "e.parquet"), "--no-progress"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "vocabulary" in res.stderr
    assert not (tmp_path / "e.parquet").exists()
