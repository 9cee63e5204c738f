"""stamp publish -> loopback fake Hub -> from_pretrained gives the local model's embeddings."""
from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from stamp.training.gene import PretrainArgs, pretrain
from stamp_helpers import make_corpus
from tests.fakes.hub import WRITE_TOKEN, FakeHub


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("hubrun")
    corpus, _ = make_corpus(base / "shards", slides=1, n_genes=120, max_row=16)
    out = base / "run"
    pretrain(PretrainArgs(stage="gene", data=str(corpus), out=str(out), config="tiny", max_steps=2,
                          batch_size=16, warmup_steps=1, save_every=2, progress=False))
    return out, corpus


def test_publish_then_from_pretrained_matches_local(run, tmp_path, monkeypatch):
    from stamp.hub import publish
    from stamp.models.gene_encoder import StampGeneEncoder
    from stamp.tokenizer import GeneTokenizer

    out, corpus = run
    with FakeHub(tmp_path / "hub") as hub:
        hub.activate(monkeypatch)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            publish(out, "org/stamp-tiny", token=WRITE_TOKEN)
        assert not [w for w in caught if "data file" in str(w.message)]  # huggingface_hub's model-repo check
        files = set(hub.list_files("org/stamp-tiny"))
        assert {"config.json", "model.safetensors", "README.md", "vocab.json", "gene_means.safetensors",
                "tokenizer_config.json"} <= files
        assert not [f for f in files if f.endswith((".parquet", ".arrow"))]
        card = hub.read_file("org/stamp-tiny", "README.md").decode()
        assert "library_name: stamp" in card and "generated" in card
        assert 'from_pretrained("org/stamp-tiny")' in card and "REPO_ID" not in card
        remote = StampGeneEncoder.from_pretrained("org/stamp-tiny").eval()
        remote_tok = GeneTokenizer.from_pretrained("org/stamp-tiny")
    local = StampGeneEncoder.from_pretrained(str(out / "model")).eval()
    local_tok = GeneTokenizer.from_pretrained(out / "model")
    from spavis.corpus import open_corpus
    table = next(open_corpus(corpus).iter_slides(columns=["gene_index", "counts"])).slice(0, 40)
    ids_local, ids_remote = local_tok.encode_table(table), remote_tok.encode_table(table)
    assert np.array_equal(ids_local, ids_remote)
    x = torch.from_numpy(ids_local[:, :128].astype(np.int64))
    assert torch.equal(local.embed(x), remote.embed(x))


def test_publish_cli_never_prints_the_token(run, tmp_path):
    out, _ = run
    with FakeHub(tmp_path / "hub") as hub:
        env = hub.env(tmp_path / "home")
        env["HF_TOKEN"] = WRITE_TOKEN  # a user's usual way to authenticate
        env.pop("HF_HUB_DISABLE_IMPLICIT_TOKEN", None)
        res = subprocess.run([sys.executable, "-m", "stamp.cli", "publish", str(out), "--repo-id", "org/cli"],
                             env=env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        assert WRITE_TOKEN not in res.stdout + res.stderr
        assert "model.safetensors" in hub.list_files("org/cli")
        bad = subprocess.run([sys.executable, "-m", "stamp.cli", "publish", str(tmp_path), "--repo-id", "org/x"],
                             env=env, capture_output=True, text=True, timeout=120)
        assert bad.returncode == 1 and "no model folder" in bad.stderr


def embeddings_of(model_dir, corpus) -> torch.Tensor:
    from spavis.corpus import open_corpus
    from stamp.models.gene_encoder import StampGeneEncoder
    from stamp.tokenizer import GeneTokenizer, to_model_input_ids

    model = StampGeneEncoder.from_pretrained(str(model_dir)).eval()
    tok = GeneTokenizer.from_pretrained(model_dir)
    table = next(open_corpus(corpus).iter_slides(columns=["gene_index", "counts"])).slice(0, 40)
    ids = to_model_input_ids(tok.encode_table(table), tok.pad_value, model.config.context_length)
    with torch.no_grad():
        return model.embed(torch.from_numpy(ids.astype(np.int64)))


def test_publish_local_dir_cli(run, tmp_path):
    """stamp publish RUN --local-dir DIR: the folder loads with from_pretrained and embeds like the run."""
    from typer.testing import CliRunner

    from stamp.cli import app

    out, corpus = run
    dest = tmp_path / "published" / "stamp-tiny"
    runner = CliRunner()
    res = runner.invoke(app, ["publish", str(out), "--local-dir", str(dest)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        p.name for p in (out / "model").iterdir() if not p.name.startswith("."))
    assert "gene_means.safetensors" in {p.name for p in dest.iterdir()}
    assert not list(dest.parent.glob(".stamp-tiny.tmp-*"))  # no staging folder left
    assert torch.equal(embeddings_of(dest, corpus), embeddings_of(out / "model", corpus))

    before = {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}
    res = runner.invoke(app, ["publish", str(out), "--local-dir", str(dest)])
    assert res.exit_code == 1 and "already exists" in res.output and "--overwrite" in res.output
    assert "Traceback" not in res.output
    assert {p.name: p.stat().st_mtime_ns for p in dest.iterdir()} == before
    res = runner.invoke(app, ["publish", str(out), "--local-dir", str(dest), "--overwrite"])
    assert res.exit_code == 0, res.output

    res = runner.invoke(app, ["publish", str(out), "--local-dir", str(tmp_path / "x"), "--repo-id", "org/x"])
    assert res.exit_code == 1 and "exactly one of --repo-id" in res.output and not (tmp_path / "x").exists()
    res = runner.invoke(app, ["publish", str(out)])
    assert res.exit_code == 1 and "exactly one of --repo-id" in res.output
    # publishing a run into itself would delete it
    res = runner.invoke(app, ["publish", str(out), "--local-dir", str(out), "--overwrite"])
    assert res.exit_code == 1 and "holds the run being published" in res.output
    assert (out / "model" / "model.safetensors").is_file() and (out / "checkpoints").is_dir()


def test_tokenizer_reads_legacy_parquet_means(run, tmp_path):
    """Folders saved before gene_means.safetensors (gene_means.parquet) still load, identically."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from stamp.tokenizer import GeneTokenizer

    out, corpus = run
    tok = GeneTokenizer.from_pretrained(out / "model")
    legacy = tmp_path / "legacy"
    shutil.copytree(out / "model", legacy)
    (legacy / "gene_means.safetensors").unlink()
    pq.write_table(pa.table({"ensembl_id": tok.gene_ids, "mean": tok.raw_means, "symbol": tok.symbols}),
                   legacy / "gene_means.parquet")
    old = GeneTokenizer.from_pretrained(legacy)
    assert old.gene_ids == tok.gene_ids and old.symbols == tok.symbols and old.config() == tok.config()
    np.testing.assert_array_equal(old.raw_means, tok.raw_means)
    assert torch.equal(embeddings_of(legacy, corpus), embeddings_of(out / "model", corpus))
    old.save_pretrained(legacy)  # re-saving converts the folder: one means file, the new format
    assert {p.name for p in legacy.iterdir()} >= {"gene_means.safetensors"}
    assert not (legacy / "gene_means.parquet").exists()
    (legacy / "gene_means.safetensors").unlink()
    with pytest.raises(Exception, match="lacks gene_means.parquet"):
        GeneTokenizer.from_pretrained(legacy)
