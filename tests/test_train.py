"""stamp pretrain: stages, exact resume, NaN stop, pickle-free checkpoints (tiny config, CPU)."""
from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from stamp.errors import TrainingError
from stamp.training.gene import PretrainArgs, pretrain
from stamp.training.run import lr_at
from stamp_helpers import make_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root, _ = make_corpus(tmp_path_factory.mktemp("c") / "shards", slides=1, n_genes=200, max_row=24)
    return root


def _args(corpus, out, **kw):
    base = dict(stage="gene", data=str(corpus), out=str(out), config="tiny", max_steps=6, batch_size=16,
                warmup_steps=2, lr=1e-3, save_every=3, progress=False, seed=3)
    base.update(kw)
    return PretrainArgs(**base)


def _losses(run):
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_schedule_warmup_cosine_floor():
    vals = [lr_at(s, lr=1e-3, min_lr=1e-5, warmup=10, total=100) for s in range(1, 101)]
    assert vals[9] == pytest.approx(1e-3) and vals[0] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(vals[9:], vals[10:]))
    assert min(vals) == pytest.approx(1e-5)


def test_resume_continues_exactly(corpus, tmp_path):
    full = tmp_path / "full"
    pretrain(_args(corpus, full))
    part = tmp_path / "part"
    pretrain(_args(corpus, part, stop_after=3))
    assert len(_losses(part)) == 3
    pretrain(_args(corpus, part, resume=True))
    assert _losses(part) == _losses(full)
    assert load_file(str(part / "model" / "model.safetensors")).keys() == load_file(
        str(full / "model" / "model.safetensors")).keys()
    a = load_file(str(part / "model" / "model.safetensors"))
    b = load_file(str(full / "model" / "model.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)
    names = {p.name for p in (full / "checkpoints" / "step-6").iterdir()}
    assert names == {"model.safetensors", "optimizer.safetensors", "optimizer.json", "trainer_state.json",
                     "rank-0.json", "rng-rank-0.safetensors"}
    model_files = {p.name for p in (full / "model").iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "vocab.json", "tokenizer_config.json"} <= model_files
    with pytest.raises(TrainingError, match="--resume"):
        pretrain(_args(corpus, full))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(corpus, tmp_path):
    run = tmp_path / "nan"
    with pytest.raises(TrainingError, match="loss became"):
        pretrain(_args(corpus, run, lr=1e30, warmup_steps=0, min_lr=1e30, save_every=1, max_steps=5))
    steps = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert steps and all(s.startswith("step-") for s in steps)
    assert not (run / "model").exists()
    assert len(_losses(run)) == int(steps[-1].split("-")[1])


def test_spatial_stage_from_gene_run(corpus, tmp_path):
    r1 = tmp_path / "r1"
    pretrain(_args(corpus, r1, max_steps=2))
    r2 = tmp_path / "r2"
    pretrain(_args(corpus, r2, stage="spatial", init=str(r1), batch_size=18, max_steps=2))
    rows = [json.loads(x) for x in (r2 / "metrics.jsonl").read_text().splitlines()]
    assert all(r["cgr_loss"] > 0 and r["loss"] == pytest.approx(r["igr_loss"] + r["cgr_loss"]) for r in rows)
    info = json.loads((r2 / "run.json").read_text())
    assert info["stage"] == "spatial" and info["init"] == str(r1) and info["data"]["generated"]
    assert "spatial" in (r2 / "model" / "README.md").read_text()
