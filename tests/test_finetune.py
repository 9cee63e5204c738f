"""``stamp finetune`` (issue 28): the ‡ protocol on a GENERATED paired corpus for a few steps, its run
loaded / embedded / evaluated like any aligned model; exact resume; ``--method adapter`` (STAMP_Con +
BLEEP) on the run. The base encoder is a tiny timm ViT in timm's Hub layout (a folder in no catalogue),
so no weights are downloaded.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tests.test_zoo_vl import labelled_paired_corpus, one_thread  # noqa: F401  (autouse: one torch thread)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tests.test_zoo_catalogue import timm_repo

    root = tmp_path_factory.mktemp("finetune")
    corpus = labelled_paired_corpus(root)
    files = timm_repo(root, "vit_small_patch16_224", {"num_classes": 0, "embed_dim": 32, "depth": 1, "num_heads": 2,
                                                      "img_size": 64},
                      {"input_size": [3, 64, 64], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic",
                       "num_classes": 0})
    base = root / "base"
    base.mkdir()
    (base / "config.json").write_text(files["config.json"])
    (base / "model.safetensors").write_bytes(files["model.safetensors"].read_bytes())
    return corpus, base, root


def args(setup, out, **kw):
    from stamp.training.finetune import FinetuneArgs

    corpus, base, _ = setup
    return FinetuneArgs(model=str(base), data=str(corpus), out=str(out), max_steps=3, batch_size=16, n_hvgs=20,
                        save_every=1, device="cpu", progress=False, **kw)


def test_finetuned_run_is_an_aligned_model_that_loads_embeds_and_resumes_exactly(setup, tmp_path):
    from safetensors.torch import load_file

    import stamp
    from stamp.embed.multimodal import embed_paired_corpus
    from stamp.evaluate import evaluate
    from stamp.training.finetune import finetune

    corpus, base, _ = setup
    model_dir = finetune(args(setup, tmp_path / "run"))
    assert sorted(p.name for p in model_dir.iterdir()) == ["README.md", "config.json", "genes.json", "model.safetensors"]
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["stage"] == "finetune" and info["steps"] == 3 and info["data"]["generated"] is True
    assert info["base"]["weights_sha256"] and info["genes"]["n"] == 20 and info["marks"] == "V+G"
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3
    card = (model_dir / "README.md").read_text()
    assert "generated" in card and info["base"]["weights_sha256"] in card
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["model_type"] == "stamp-finetuned" and cfg["embed_dim"] == 32 and cfg["n_genes"] == 20

    enc = stamp.load(str(tmp_path / "run"), device="cpu")
    assert enc.kind == "aligned" and enc.embed_dim == 32
    saved = load_file(str(model_dir / "model.safetensors"))
    for k, v in enc.module.state_dict().items():
        torch.testing.assert_close(v, saved[k])
    base_state = load_file(str(base / "model.safetensors"))
    moved = [k for k in base_state if not torch.equal(base_state[k], saved[f"image_encoder.trunk.{k}"])]
    assert moved, "fine-tuning changed no weight of the image encoder"

    # the same run stopped after 2 steps and resumed: byte-identical weights (exact resume)
    finetune(args(setup, tmp_path / "split", stop_after=2))
    finetune(args(setup, tmp_path / "split", resume=True))
    again = load_file(str(tmp_path / "split" / "model" / "model.safetensors"))
    assert all(torch.equal(saved[k], again[k]) for k in saved)

    # embeds and evaluates like any aligned model: fused embedding = [genes | image], each of norm 1
    emb = embed_paired_corpus(str(tmp_path / "run"), str(corpus), tmp_path / "f.parquet", modality="fused",
                              device="cpu")
    import pyarrow.parquet as pq

    x = np.stack(pq.read_table(emb).column("embedding").to_numpy(zero_copy_only=False))
    assert x.shape[1] == 64 and np.allclose(np.linalg.norm(x[:, :32], axis=1), 1, atol=1e-5)
    df = evaluate("cluster", [str(tmp_path / "run")], str(corpus), out=tmp_path / "ev", label="domain",
                  modality="image", figures=False, progress=False, device="cpu")
    assert {"run", "random-init", "pca"} == set(df["model"])


def test_cli_finetune_and_the_adapter_protocol(setup, tmp_path):
    from stamp.cli import app

    corpus, base, _ = setup
    runner = CliRunner()
    res = runner.invoke(app, ["finetune", "--model", str(base), "--data", str(corpus), "--out", str(tmp_path / "r"),
                              "--max-steps", "2", "--batch-size", "16", "--n-hvgs", "20", "--device", "cpu",
                              "--no-progress"])
    assert res.exit_code == 0, res.output
    stored = json.loads((tmp_path / "r" / "train_args.json").read_text())
    assert stored["lr"] == 5e-5 and stored["epochs"] == 15 and stored["weight_decay"] == 0.2  # the protocol's
    res = runner.invoke(app, ["finetune", "--model", str(base), "--data", str(corpus), "--out", str(tmp_path / "r"),
                              "--max-steps", "2", "--lr", "1e-3", "--resume", "--device", "cpu"])
    assert res.exit_code != 0 and "--lr" in res.output and "Traceback" not in res.output

    res = runner.invoke(app, ["finetune", "--method", "adapter", "--model", str(tmp_path / "r"), "--data",
                              str(corpus), "--out", str(tmp_path / "a"), "--epochs", "2", "--n-hvgs", "30",
                              "--device", "cpu"])
    assert res.exit_code == 0, res.output
    import pandas as pd

    df = pd.read_csv(tmp_path / "a" / "results.csv")
    assert set(df["method"]) == {"stamp-con", "bleep"} and set(df["fold"]) == {"gen0", "gen1"}
    assert df["pcc_v"].notna().all() and sorted(p.name for p in (tmp_path / "a" / "adapters").iterdir()) == \
        ["gen0.safetensors", "gen1.safetensors"]
    # a rerun reuses the trained adapters: same numbers
    res = runner.invoke(app, ["finetune", "--method", "adapter", "--model", str(tmp_path / "r"), "--data",
                              str(corpus), "--out", str(tmp_path / "a"), "--epochs", "2", "--n-hvgs", "30",
                              "--device", "cpu"])
    assert res.exit_code == 0, res.output
    pd.testing.assert_frame_equal(df, pd.read_csv(tmp_path / "a" / "results.csv"))
    # an image encoder is not an aligned model: one line
    res = runner.invoke(app, ["finetune", "--method", "adapter", "--model", str(base), "--data", str(corpus),
                              "--out", str(tmp_path / "b"), "--device", "cpu"])
    assert res.exit_code != 0 and "aligned model" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "b").exists()
