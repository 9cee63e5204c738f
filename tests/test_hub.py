"""stamp publish -> loopback fake Hub -> from_pretrained gives the local model's embeddings."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from stamp.train import PretrainArgs, pretrain
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
    from stamp.model import StampGeneEncoder
    from stamp.tokenizer import GeneTokenizer

    out, corpus = run
    with FakeHub(tmp_path / "hub") as hub:
        hub.activate(monkeypatch)
        publish(out, "org/stamp-tiny", token=WRITE_TOKEN)
        files = set(hub.list_files("org/stamp-tiny"))
        assert {"config.json", "model.safetensors", "README.md", "vocab.json", "gene_means.parquet",
                "tokenizer_config.json"} <= files
        card = hub.read_file("org/stamp-tiny", "README.md").decode()
        assert "library_name: stamp" in card and "generated" in card
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
