"""Stage 3 (alignment): losses, cross-rank gather, the `--stage align` run contract, StampModel
loading / publishing / embedding, and evidence that a short CPU run learns (GENERATED data)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from paired_helpers import make_paired_corpus
from stamp.models.alignment import alignment_losses, csp_logits, gather_features


# ----------------------------------------------------------------------------- losses
def _np_ce(logits: np.ndarray, labels: np.ndarray) -> float:
    m = logits.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True)))[:, 0]
    return float(np.mean(lse - logits[np.arange(len(labels)), labels]))


def _unit(rng, *shape):
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_four_losses_follow_the_paper_equations():
    rng = np.random.default_rng(0)
    b, e = 6, 8
    spot, patch, region = _unit(rng, b, e), _unit(rng, b, e), _unit(rng, b, e)
    cells, pretext = rng.normal(size=(b, 9, e)), rng.normal(size=(b, e))
    label = rng.integers(0, 9, b)
    scale = 1 / 0.07
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    out = alignment_losses(t(spot), t(patch), t(region), t(cells), t(pretext), torch.tensor(label), t(scale))
    eye = np.arange(b)
    ps = 0.5 * (_np_ce(scale * patch @ spot.T, eye) + _np_ce(scale * spot @ patch.T, eye))
    rs = 0.5 * (_np_ce(scale * region @ spot.T, eye) + _np_ce(scale * spot @ region.T, eye))
    pr = _np_ce(scale * patch @ region.T, eye)
    cos = np.einsum("bd,bkd->bk", pretext / np.linalg.norm(pretext, axis=1, keepdims=True),
                    cells / np.linalg.norm(cells, axis=2, keepdims=True))
    csp = _np_ce(scale * cos, label)
    np.testing.assert_allclose([out.ps.item(), out.rs.item(), out.pr.item(), out.csp.item()], [ps, rs, pr, csp],
                               rtol=1e-10)
    assert math.isclose(out.loss.item(), ps + rs + pr + csp, rel_tol=1e-10)
    assert out.csp_correct == int((cos.argmax(1) == label).sum()) and out.csp_total == b
    # aligned pairs give a lower loss than shuffled ones
    aligned = alignment_losses(t(spot), t(spot), t(spot), t(cells), t(pretext), torch.tensor(label), t(scale))
    assert aligned.ps < out.ps and aligned.pr < out.pr
    assert tuple(csp_logits(t(cells), t(pretext), t(scale)).shape) == (b, 9)


def _gather_worker(rank: int, world: int, init: str, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(0)
        full = [F.normalize(torch.randn(8, 4, generator=g, dtype=torch.float64), dim=-1) for _ in range(3)]
        cells = torch.randn(8, 9, 4, generator=g, dtype=torch.float64)
        pre = torch.randn(8, 4, generator=g, dtype=torch.float64)
        label = torch.randint(0, 9, (8,), generator=g)
        rows = slice(4 * rank, 4 * rank + 4)
        local = [x[rows].clone().requires_grad_(True) for x in full]
        results = {}
        for with_grad in (False, True):
            out = alignment_losses(*local, cells[rows], pre[rows], label[rows], torch.tensor(10.0, dtype=torch.float64),
                                   gather_with_grad=with_grad)
            (out.ps + out.rs + out.pr).backward()
            results[with_grad] = (out.ps.item(), out.rs.item(), out.pr.item(), local[0].grad.abs().sum().item())
            for x in local:
                x.grad = None
        gathered = gather_features(local[0].detach())[0]
        queue.put((rank, results, gathered.shape[0]))
        dist.barrier()  # leave together: gloo aborts a rank whose peer tears down mid-send
    finally:
        dist.destroy_process_group()


def test_contrastive_logits_see_every_rank(tmp_path):
    """Two gloo ranks with 4 spots each see 8 candidates: the mean of their losses is the 8-spot loss."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    init = f"file://{tmp_path / 'pg'}"
    procs = [ctx.Process(target=_gather_worker, args=(r, 2, init, queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict((r, (res, n)) for r, res, n in (queue.get(timeout=240) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    g = torch.Generator().manual_seed(0)
    full = [F.normalize(torch.randn(8, 4, generator=g, dtype=torch.float64), dim=-1) for _ in range(3)]
    cells = torch.randn(8, 9, 4, generator=g, dtype=torch.float64)
    pre = torch.randn(8, 4, generator=g, dtype=torch.float64)
    label = torch.randint(0, 9, (8,), generator=g)
    single = alignment_losses(*full, cells, pre, label, torch.tensor(10.0, dtype=torch.float64))
    for with_grad in (False, True):
        for k, name in enumerate(("ps", "rs", "pr")):
            mean = (got[0][0][with_grad][k] + got[1][0][with_grad][k]) / 2
            assert math.isclose(mean, getattr(single, name).item(), rel_tol=1e-9), (with_grad, name)
        assert got[0][0][with_grad][3] > 0  # gradients reach this rank's rows
    assert got[0][1] == got[1][1] == 8


# ----------------------------------------------------------------------------- the run contract
def _cli(args: list[str]):
    from stamp.cli import app

    return CliRunner().invoke(app, args, catch_exceptions=False)


@pytest.fixture(scope="module")
def paired(tmp_path_factory):
    """A one-shard paired corpus (GENERATED) and a 2-step gene-stage run to initialise from."""
    root = tmp_path_factory.mktemp("align")
    corpus, domains = make_paired_corpus(root / "shards", slides=1, n_genes=60, max_row=4, seed=3)
    res = _cli(["pretrain", "--stage", "gene", "--data", str(corpus), "--out", str(root / "run1"), "--config", "tiny",
                "--max-steps", "2", "--batch-size", "16", "--warmup-steps", "1", "--no-progress"])
    assert res.exit_code == 0, res.output
    return root, corpus


def _align_args(root: Path, corpus: Path, out: str, *extra: str) -> list[str]:
    return ["pretrain", "--stage", "align", "--init", str(root / "run1"), "--vision", "tiny", "--data", str(corpus),
            "--out", str(root / out), "--max-steps", "4", "--batch-size", "4", "--grad-accum", "2",
            "--warmup-steps", "1", "--save-every", "2", "--no-progress", *extra]


def test_align_run_checkpoints_resumes_exactly_and_publishes(paired, tmp_path):
    from safetensors.torch import load_file

    from stamp.models.aligned_model import StampModel

    root, corpus = paired
    res = _cli(_align_args(root, corpus, "full"))
    assert res.exit_code == 0, res.output
    run = root / "full"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["spots"] == 8 for r in rows)
    for r in rows:
        parts = r["ps_loss"] + r["rs_loss"] + r["pr_loss"] + r["csp_loss"]
        assert math.isclose(r["loss"], parts, rel_tol=1e-5) and 0 <= r["csp_acc"] <= 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2", "step-4"]
    args = json.loads((run / "train_args.json").read_text())
    assert (args["stage"], args["weight_decay"], args["vision"], args["grad_accum"]) == ("align", 1e-3, "tiny", 2)

    # interrupted after step 2, resumed: the same weights and metrics as the uninterrupted run
    assert _cli(_align_args(root, corpus, "cut", "--stop-after", "2")).exit_code == 0
    assert not (root / "cut" / "model").exists() or json.loads((root / "cut" / "run.json").read_text())["steps"] == 2
    res = _cli(["pretrain", "--resume", "--out", str(root / "cut"), "--no-progress"])
    assert res.exit_code == 0, res.output
    a, b = load_file(str(run / "model" / "model.safetensors")), load_file(str(root / "cut" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    def metrics(path: Path) -> list[dict]:  # everything but the wall-clock speed
        return [{k: v for k, v in json.loads(x).items() if k != "spots_per_s"} for x in path.read_text().splitlines()]

    assert metrics(root / "cut" / "metrics.jsonl") == metrics(run / "metrics.jsonl")

    # the model folder: StampModel + tokenizer + a card naming the data and the stages
    card = (run / "model" / "README.md").read_text()
    assert "| 1 | gene |" in card and "| 2 | align |" in card and str(corpus) in card and "generated" in card.lower()
    assert _cli(["publish", str(run), "--local-dir", str(tmp_path / "pub")]).exit_code == 0
    model = StampModel.from_pretrained(str(tmp_path / "pub")).eval()
    assert {"gene", "vision", "embed_dim"} <= set(json.loads((tmp_path / "pub" / "config.json").read_text()))
    assert model.gene_encoder.mlm_head is None and model.config.vision.name == "tiny"
    from safetensors.torch import save_file

    from stamp.errors import ModelConfigError

    broken = dict(load_file(str(tmp_path / "pub" / "model.safetensors")))
    broken.pop("logit_scale")
    (tmp_path / "broken").mkdir()
    save_file(broken, str(tmp_path / "broken" / "model.safetensors"))
    (tmp_path / "broken" / "config.json").write_text((tmp_path / "pub" / "config.json").read_text())
    with pytest.raises(ModelConfigError, match="logit_scale"):
        StampModel.from_pretrained(str(tmp_path / "broken"))
    pixels = model.image_transform(np.zeros((50, 50, 3), np.uint8))[None]
    with torch.no_grad():
        emb = model.encode_image(pixels)
    assert tuple(emb.shape) == (1, 512) and math.isclose(float(emb.norm()), 1.0, rel_tol=1e-5)


def test_embed_gene_image_fused_and_plain_images(paired, tmp_path, caplog):
    from PIL import Image

    from stamp.models.aligned_model import StampModel
    from stamp.data.paired import decode_png

    root, corpus = paired
    run = root / "emb"
    assert _cli(_align_args(root, corpus, "emb")[:-11] + ["--max-steps", "1", "--batch-size", "4", "--grad-accum", "1",
                                                           "--warmup-steps", "1", "--no-progress"]).exit_code == 0
    widths = {}
    for modality in ("gene", "image", "fused"):
        out = tmp_path / f"{modality}.parquet"
        res = _cli(["embed", "--model", str(run), "--data", str(corpus), "--modality", modality, "--out", str(out),
                    "--batch-size", "16", "--no-progress"])
        assert res.exit_code == 0, res.output
        table = pq.read_table(out)
        widths[modality] = len(table.column("embedding")[0].as_py())
        assert table.num_rows == open_n_spots(corpus)
    assert widths == {"gene": 512, "image": 512, "fused": 1024}
    model = StampModel.from_pretrained(str(run)).eval()
    first = pq.read_table(sorted((corpus / "data" / "paired").glob("*.parquet"))[0]).slice(0, 1)
    with torch.no_grad():
        expect = model.encode_image(model.pixels(torch.from_numpy(decode_png(first.column("patch")[0].as_py()))[None]))
    got = pq.read_table(tmp_path / "image.parquet").slice(0, 1)
    assert got.column("spot_id")[0].as_py() == first.column("spot_id")[0].as_py()
    np.testing.assert_allclose(np.array(got.column("embedding")[0].as_py()), expect[0].numpy(), atol=1e-5)
    fused = np.array(pq.read_table(tmp_path / "fused.parquet").column("embedding")[0].as_py())
    np.testing.assert_allclose(fused[512:], expect[0].numpy(), atol=1e-5)

    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(np.full((300, 300, 3), 180, np.uint8)).save(folder / "a.png")
    Image.fromarray(np.full((224, 224), 90, np.uint8), mode="L").save(folder / "sub" / "b.jpg")
    Image.fromarray(np.full((100, 100, 4), 200, np.uint8), mode="RGBA").save(folder / "c.png")
    out = tmp_path / "plain.parquet"
    res = _cli(["embed", "--model", str(run), "--images", str(folder), "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    table = pq.read_table(out)
    assert table.column("image").to_pylist() == ["a.png", "c.png", "sub/b.jpg"]
    assert "2 of 3 images were not RGB (L: 1, RGBA: 1) and were converted to RGB" in caplog.text
    (folder / "d.png").write_bytes(b"\x89PNG truncated")
    res = CliRunner().invoke(__import__("stamp.cli", fromlist=["app"]).app,
                             ["embed", "--model", str(run), "--images", str(folder), "--out", str(tmp_path / "x.parquet")])
    assert res.exit_code == 1 and "d.png: not a readable image" in res.output
    assert not (tmp_path / "x.parquet").exists()


def open_n_spots(corpus: Path) -> int:
    from spavis.format import open_corpus

    return open_corpus(corpus).n_spots


def test_every_align_args_field_has_a_pretrain_option():
    import dataclasses

    import typer.main

    from stamp.cli import app
    from stamp.cli.align import ALIGN_API_ONLY, ALIGN_OPTIONS
    from stamp.training.gene import PretrainArgs
    from stamp.training.align import AlignArgs

    command = typer.main.get_command(app).commands["pretrain"]
    params = {p.name for p in command.params}
    fields = {f.name for f in dataclasses.fields(AlignArgs)} - set(ALIGN_API_ONLY)
    assert {"no_progress" if f == "progress" else f for f in fields} <= params
    assert set(ALIGN_OPTIONS) == fields - {f.name for f in dataclasses.fields(PretrainArgs)}


def test_bad_align_inputs_fail_with_one_line(paired, tmp_path):
    from stamp.cli import app

    root, corpus = paired
    res = CliRunner().invoke(app, ["pretrain", "--stage", "align", "--vision", "tiny", "--data", str(corpus),
                                   "--out", str(tmp_path / "r")])
    assert res.exit_code == 1 and "--init RUN2" in res.output
    res = CliRunner().invoke(app, _align_args(root, corpus, "x") + ["--mask-prob", "0.2"])
    assert res.exit_code == 1 and "--mask-prob applies to the gene stages only" in res.output
    # a diverging run stops at the first non-finite loss and saves nothing past the last good checkpoint
    res = CliRunner().invoke(app, _align_args(root, corpus, "nan")[:-11] + [
        "--max-steps", "6", "--batch-size", "4", "--grad-accum", "1", "--warmup-steps", "0", "--lr", "1e30",
        "--clip-norm", "1e30", "--save-every", "1", "--no-progress"])
    assert res.exit_code == 1 and "loss became" in res.output and "Traceback" not in res.output
    steps = [json.loads(x)["step"] for x in (root / "nan" / "metrics.jsonl").read_text().splitlines()]
    saved = sorted(int(p.name.split("-")[1]) for p in (root / "nan" / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert saved == steps and not (root / "nan" / "model").exists()
    plain = tmp_path / "plain"
    from stamp_helpers import make_corpus

    make_corpus(plain, slides=1, n_genes=60, max_row=4, seed=3)
    res = CliRunner().invoke(app, ["pretrain", "--stage", "align", "--init", str(root / "run1"), "--vision", "tiny",
                                   "--data", str(plain), "--out", str(tmp_path / "r2"), "--no-progress"])
    assert res.exit_code == 1 and "--with-images" in res.output and "Traceback" not in res.output


def test_torchrun_two_cpu_processes_align(tmp_path):
    """--stage align under torchrun (gloo): each rank reads its own paired shard, metrics count both ranks."""
    import shutil
    import socket
    import subprocess
    import sys

    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists() and not shutil.which("torchrun"):
        pytest.skip("torchrun not installed")
    corpus, _ = make_paired_corpus(tmp_path / "shards", slides=2, n_genes=60, max_row=3, seed=5)
    res = _cli(["pretrain", "--stage", "gene", "--data", str(corpus), "--out", str(tmp_path / "run1"), "--config",
                "tiny", "--max-steps", "1", "--batch-size", "8", "--warmup-steps", "1", "--no-progress"])
    assert res.exit_code == 0, res.output
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(Path.cwd())}
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
           "-m", "stamp.cli", "pretrain", "--stage", "align", "--init", str(tmp_path / "run1"), "--vision", "tiny",
           "--data", str(corpus), "--out", str(tmp_path / "run3"), "--max-steps", "2", "--batch-size", "4",
           "--grad-accum", "1", "--warmup-steps", "1", "--save-every", "2", "--no-progress"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "run3" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["spots"] == 8 for r in rows)
    ck = tmp_path / "run3" / "checkpoints" / "step-2"
    assert (ck / "rank-0.json").is_file() and (ck / "rank-1.json").is_file()
    assert json.loads((ck / "trainer_state.json").read_text())["world"] == 2
    assert (tmp_path / "run3" / "model" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------- evidence (GENERATED data)
def _retrieval_and_csp(model, corpus, tokenizer, *, pool: int = 20, reps: int = 5) -> tuple[float, float]:
    """Patch -> spot top-5 accuracy among pools of ``pool`` spots (chance 5/pool), and CSP accuracy."""
    from stamp.data.paired import PairedBatchLoader

    model.eval()
    loader = PairedBatchLoader(corpus, tokenizer, batch_size=128, context_length=model.config.gene.context_length,
                               epochs=1, shuffle=False, drop_last=False)
    genes, patches, correct, total = [], [], 0, 0
    with torch.no_grad():
        for b in loader:
            patch = model.pixels(b.patch)
            genes.append(model.encode_gene(b.input_ids))
            patches.append(model.encode_image(patch))
            out = model.vision_encoder(model.pixels(b.region), region_of=patch)
            cells = model.positioning_projection(model.vision_encoder.region_cells(out.grid))
            logits = csp_logits(cells, model.positioning_projection(out.pretext), model.scale())
            correct += int((logits.argmax(1) == b.region_cell).sum())
            total += len(b)
    g, p = torch.cat(genes), torch.cat(patches)
    hits = []
    for r in range(reps):
        perm = torch.from_numpy(np.random.default_rng(r).permutation(len(g)))
        for a in range(0, len(g) - pool + 1, pool):
            idx = perm[a:a + pool]
            top5 = (p[idx] @ g[idx].T).topk(5, dim=1).indices
            hits.append((top5 == torch.arange(pool)[:, None]).any(1).float())
    return float(torch.cat(hits).mean()), correct / total


def test_short_alignment_learns(tmp_path):
    """A generated slice whose domains drive expression AND H&E texture (real build-shards --with-images):
    after a short CPU run (tiny ViT, gene encoder frozen) patches find their spots above chance and
    above the untrained model, and CSP places patches in their region above 1/9."""
    from spavis.format import open_corpus
    from stamp.models.aligned_model import StampModel
    from stamp.training.gene import PretrainArgs, pretrain
    from stamp.training.align import AlignArgs, align, build_model

    data, _ = make_paired_corpus(tmp_path / "shards", slides=1, n_genes=80, max_row=6, seed=0, marker_lfc=4.0,
                                 n_markers=15)
    pretrain(PretrainArgs(stage="gene", data=str(data), out=str(tmp_path / "run1"), config="tiny", max_steps=10,
                          batch_size=64, lr=1e-3, warmup_steps=2, progress=False))
    args = AlignArgs(data=str(data), out=str(tmp_path / "run3"), init=str(tmp_path / "run1"), vision="tiny",
                     max_steps=ALIGN_STEPS, batch_size=32, grad_accum=1, lr=ALIGN_LR, warmup_steps=2,
                     freeze_gene=True, save_every=10 ** 6, progress=False)
    corpus = open_corpus(data)
    untrained, tokenizer, _ = build_model(args, len(corpus.genes))  # the exact starting point (same seed)
    model_dir = align(args)
    chance = 5 / 20
    top5_before, csp_before = _retrieval_and_csp(untrained, corpus, tokenizer)
    top5_after, csp_after = _retrieval_and_csp(StampModel.from_pretrained(str(model_dir)), corpus, tokenizer)
    assert top5_after > chance + 0.08, (top5_after, chance)
    assert top5_after > top5_before + 0.08, (top5_after, top5_before)
    assert csp_after > 1 / 9 + 0.1, csp_after


ALIGN_STEPS = 25
ALIGN_LR = 3e-3
