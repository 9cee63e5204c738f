"""stamp embed: Parquet of spot embeddings and obsm['X_stamp'] in the slide Zarr stores."""
from __future__ import annotations

import subprocess
import sys

import anndata as ad
import numpy as np
import pyarrow.parquet as pq
import torch

from spavis.corpus import open_corpus
from stamp.models.gene_encoder import create_model
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
    # the corpus stays valid: embeddings added under obsm['X_*'] are not part of the build digest
    from spavis.shards import validate

    assert validate(corpus).ok, validate(corpus).errors


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


def test_embed_errors_are_clear_and_change_nothing(tmp_path):
    """A model folder mixing two vocabularies, and a corpus missing one slide store with --zarr:
    one-line errors (exit 1), no Parquet, and no Zarr store touched."""
    import shutil

    import pytest
    from typer.testing import CliRunner

    from stamp.cli import app
    from stamp.embed.genes import embed_corpus
    from stamp.errors import StampError

    corpus, _ = make_corpus(tmp_path / "shards", slides=2, n_genes=60, max_row=6)
    tok = GeneTokenizer.from_corpus(corpus, max_length=128)
    create_model("tiny", n_genes=70).save_pretrained(tmp_path / "mixed")
    tok.save_pretrained(tmp_path / "mixed")
    with pytest.raises(StampError, match="mixes two models"):  # raised while loading (stamp.load)
        embed_corpus(tmp_path / "mixed", corpus, tmp_path / "x.parquet", device="cpu", progress=False)

    create_model("tiny", n_genes=60).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    slides = [t.column("slide_id")[0].as_py() for t in open_corpus(corpus).iter_slides(columns=["slide_id"])]
    shutil.rmtree(corpus / "zarr" / f"{slides[-1]}.zarr")  # the last slide's store is gone
    out = tmp_path / "e.parquet"
    res = CliRunner().invoke(app, ["embed", "--model", str(tmp_path / "m"), "--data", str(corpus), "--out", str(out),
                                   "--zarr", "--no-progress", "--device", "cpu"])
    assert res.exit_code == 1, res.output
    assert "error:" in res.output and "no Zarr store for slide" in res.output and "Traceback" not in res.output
    assert not out.exists() and not list(tmp_path.glob(".e.parquet*"))
    assert "X_stamp" not in ad.read_zarr(corpus / "zarr" / f"{slides[0]}.zarr").obsm  # first store untouched
