"""Two CPU processes under torchrun (gloo): DDP pretraining of the tiny config for 2 steps."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from stamp_helpers import make_corpus


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_cpu_processes(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists() and not shutil.which("torchrun"):
        pytest.skip("torchrun not installed")
    corpus, _ = make_corpus(tmp_path / "shards", slides=2, n_genes=60, max_row=10)
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(Path.cwd())}
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "stamp.cli", "pretrain", "--stage", "gene", "--data", str(corpus), "--out", str(run),
           "--config", "tiny", "--max-steps", "2", "--batch-size", "8", "--warmup-steps", "1", "--save-every", "2",
           "--no-progress"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["spots"] == 16 for r in rows)
    ck = run / "checkpoints" / "step-2"
    assert (ck / "rank-0.json").is_file() and (ck / "rank-1.json").is_file()
    assert json.loads((ck / "trainer_state.json").read_text())["world"] == 2
    assert (run / "model" / "model.safetensors").is_file()
