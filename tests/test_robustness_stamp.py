"""Robustness of the `stamp` CLI (issue 10, stamp side): the real command in subprocesses, with timeouts.

Nothing hangs (a corpus too small for one batch, no spatial group within D_max), resume
means the same run, `embed --zarr` is all-or-none and records its model, mistakes print one
line (permission, disk full, unreachable model id, bad numbers) unless STAMP_DEBUG=1, --init
checks the vocabulary by checksum, outputs are group-readable as the umask allows. Corpora
are GENERATED (spavis.simulate) and built with the real pipeline.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from stamp_helpers import gene_subset, make_corpus

TIMEOUT = 240  # generous: CPU is shared; a hang shows up as TimeoutExpired


def stamp(*args: str, cwd: Path | None = None, env: dict | None = None, umask: int | None = None,
          timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("stamp")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "stamp.cli"]
    full_env = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1", **(env or {})}
    for key in ("STAMP_DEBUG", "SPAVIS_DEBUG"):
        if key not in (env or {}):
            full_env.pop(key, None)

    return subprocess.run(cmd + list(args), cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)


def one_line_error(res: subprocess.CompletedProcess) -> str:
    """The stderr of a failed command: a single `error:` line, no traceback."""
    assert res.returncode == 1, (res.returncode, res.stderr[-3000:])
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith(("warning", "spatial stage"))]
    text = " ".join(ln.strip() for ln in lines)
    assert text.startswith("error:"), res.stderr
    return text


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root, _ = make_corpus(tmp_path_factory.mktemp("rob") / "shards", slides=2, n_genes=60, max_row=8)
    return root


def _foreign_model_folder(folder: Path) -> Path:
    """A model folder of another kind (a timm layout) - named like the `tiny` preset in the tests below."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224"}))
    save_file({"head.weight": torch.zeros(2, 2)}, str(folder / "model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def gene_run(corpus, tmp_path_factory):
    """A 2-step gene run, started in a working folder holding a `./tiny` folder of another model: `--config
    tiny` must still be the shipped preset (issue 24)."""
    run = tmp_path_factory.mktemp("runs") / "gene"
    _foreign_model_folder(run.parent / "tiny")
    res = stamp("pretrain", "--stage", "gene", "--data", str(corpus), "--out", str(run), "--config", "tiny",
                "--max-steps", "2", "--batch-size", "16", "--warmup-steps", "1", "--save-every", "1",
                "--no-progress", umask=0o022, cwd=run.parent)
    assert res.returncode == 0, res.stderr[-3000:]
    return run


# ---------------------------------------------------------------------------- 1. no loop without progress
def test_pretrain_corpus_smaller_than_one_batch_stops_at_once(corpus, tmp_path):
    res = stamp("pretrain", "--stage", "gene", "--data", str(corpus), "--out", str(tmp_path / "r"),
                "--config", "tiny", "--batch-size", "100000", "--max-steps", "3", "--no-progress")
    text = one_line_error(res)
    assert "fewer than one batch of 100000 spots" in text and "--batch-size" in text
    n_spots = int(text.split(" spots in ")[0].rsplit(" ", 1)[-1])
    assert 0 < n_spots < 100000


def test_spatial_stage_without_groups_within_dmax_stops_at_once(corpus, tmp_path):
    res = stamp("pretrain", "--stage", "spatial", "--data", str(corpus), "--out", str(tmp_path / "r"),
                "--config", "tiny", "--batch-size", "18", "--max-distance-um", "1", "--max-steps", "3",
                "--no-progress")
    text = one_line_error(res)
    assert "found 0 spatial groups of 9 spots within D_max=1 µm" in text
    assert "2 slide(s)" in text and "a batch needs 2 groups (18 spots)" in text and "--max-distance-um" in text


# ---------------------------------------------------------------------------- 3. resume means the same run
def test_resume_from_another_folder_keeps_paths_refuses_changes_records_max_steps(corpus, tmp_path):
    work = tmp_path / "work"
    (work / "a").mkdir(parents=True)
    (work / "b").mkdir()
    shutil.copytree(corpus, work / "a" / "data")
    first = stamp("pretrain", "--stage", "gene", "--data", "data", "--out", "run", "--config", "tiny",
                  "--max-steps", "3", "--batch-size", "16", "--save-every", "1", "--stop-after", "1",
                  "--warmup-steps", "1", "--no-progress", cwd=work / "a")
    assert first.returncode == 0, first.stderr[-3000:]
    stored = json.loads((work / "a" / "run" / "train_args.json").read_text())
    assert stored["data"] == str((work / "a" / "data").resolve()) and Path(stored["out"]).is_absolute()

    changed = stamp("pretrain", "--out", "../a/run", "--resume", "--lr", "0.5", "--seed", "7",
                    "--data", str(tmp_path), cwd=work / "b")
    text = one_line_error(changed)
    assert "--lr 0.0001 (now 0.5)" in text and "--seed 0 (now 7)" in text and "--max-steps" in text
    assert f"--data '{(work / 'a' / 'data').resolve()}' (now '{tmp_path.resolve()}')" in text

    ok = stamp("pretrain", "--out", "../a/run", "--resume", "--max-steps", "4", "--no-progress", cwd=work / "b")
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert json.loads((work / "a" / "run" / "train_args.json").read_text())["max_steps"] == 4
    steps = [json.loads(x)["step"] for x in (work / "a" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert json.loads((work / "a" / "run" / "run.json").read_text())["total_steps"] == 4


# ---------------------------------------------------------------------------- 4. embed --zarr all or none
def _stores(corpus: Path) -> list[Path]:
    return sorted((corpus / "zarr").glob("*.zarr"))


def test_embed_zarr_writes_all_slides_or_none_and_records_the_model(corpus, gene_run, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    shards = sorted((data / "data" / "expression").glob("*.parquet"))
    assert len(shards) == 2 and len(_stores(data)) == 2
    good = shards[1].read_bytes()
    bad = bytearray(good)
    mid = len(bad) // 2
    bad[mid:mid + 64] = bytes(64)  # same size (passes the open check), unreadable pages
    shards[1].write_bytes(bytes(bad))

    failed = stamp("embed", "--model", str(gene_run), "--data", str(data), "--out", str(tmp_path / "e.parquet"),
                   "--zarr", "--device", "cpu", "--no-progress")
    one_line_error(failed)
    for store in _stores(data):  # the first slide was embedded before the failure: still nothing changed
        assert not (store / "obsm" / "X_stamp").exists()
        assert not (store / "obsm" / "X_stamp.staging").exists()
    assert not (tmp_path / "e.parquet").exists()

    shards[1].write_bytes(good)
    ok = stamp("embed", "--model", str(gene_run), "--data", str(data), "--out", str(tmp_path / "e.parquet"),
               "--zarr", "--device", "cpu", "--no-progress")
    assert ok.returncode == 0, ok.stderr[-3000:]
    import anndata as ad
    import numpy as np
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "e.parquet")
    record = json.loads(table.schema.metadata[b"stamp.model"])
    assert record["stamp_model"] == str(gene_run) and len(record["stamp_model_sha256"]) == 64
    for store in _stores(data):
        adata = ad.read_zarr(store)
        assert adata.obsm["X_stamp"].shape[0] == adata.n_obs and np.abs(adata.obsm["X_stamp"]).sum(1).min() > 0
        import zarr

        attrs = dict(zarr.open_group(str(store), mode="r")["obsm"]["X_stamp"].attrs)
        assert attrs["stamp_model_sha256"] == record["stamp_model_sha256"]
        assert not (store / "obsm" / "X_stamp.staging").exists()
    from spavis.shards.validate import validate

    assert validate(data).ok


def test_staging_folder_is_invisible_to_readers(corpus, gene_run, tmp_path):
    """A staged X_stamp (interrupted before the swap) is not an obsm key for zarr or anndata."""
    import anndata as ad
    import zarr
    from anndata.io import write_elem
    import numpy as np

    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    store = _stores(data)[0]
    n = ad.read_zarr(store).n_obs
    stage = store / "obsm" / "X_stamp.staging"
    stage.mkdir(parents=True)
    write_elem(zarr.open_group(str(stage / "g"), mode="w", zarr_format=2), "X_stamp", np.ones((n, 4), np.float32))
    assert "X_stamp" not in ad.read_zarr(store).obsm and "X_stamp.staging" not in ad.read_zarr(store).obsm
    ok = stamp("embed", "--model", str(gene_run), "--data", str(data), "--out", str(tmp_path / "e.parquet"),
               "--zarr", "--device", "cpu", "--no-progress")
    assert ok.returncode == 0, ok.stderr[-3000:]
    width = json.loads((gene_run / "model" / "config.json").read_text())["hidden_size"]
    assert ad.read_zarr(store).obsm["X_stamp"].shape == (n, width) and not stage.exists()


# ---------------------------------------------------------------------------- 6. one line, not a traceback
INVALID = [
    (["pretrain", "--stage", "gene", "--data", "x", "--out", "y", "--lr", "0"], "--lr"),
    (["pretrain", "--stage", "gene", "--data", "x", "--out", "y", "--lr", "-1e-3"], "--lr"),
    (["pretrain", "--stage", "gene", "--data", "x", "--out", "y", "--max-steps", "0"], "--max-steps"),
    (["pretrain", "--stage", "gene", "--data", "x", "--out", "y", "--batch-size", "0"], "--batch-size"),
    (["pretrain", "--stage", "gene", "--data", "x", "--out", "y", "--mask-prob", "1.5"], "--mask-prob"),
    (["pretrain", "--stage", "genes", "--data", "x", "--out", "y"], "--stage"),
    (["tokenize", "--data", "x", "--out", "y", "--max-length", "0"], "--max-length"),
    (["embed", "--model", "m", "--data", "x", "--out", "y", "--batch-size", "0"], "--batch-size"),
]


def test_invalid_numbers_are_usage_errors_in_a_real_process():
    for argv, option in (INVALID[0], INVALID[6]):
        res = stamp(*argv, timeout=120)
        assert res.returncode == 2 and "Traceback" not in res.stderr
        assert f"Invalid value for '{option}'" in res.stderr


@pytest.mark.parametrize("argv, option", INVALID)
def test_invalid_numbers_are_usage_errors(argv, option):
    """Every number goes through a shared validator at parse time (the same app, in-process: cheap)."""
    from typer.testing import CliRunner

    from stamp.cli import app

    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 2, res.output
    assert "Invalid value for" in res.output and option in res.output


def test_unreachable_model_id_fails_fast_with_one_line(corpus, tmp_path):
    offline = stamp("embed", "--model", "someorg/no-such-model", "--data", str(corpus),
                    "--out", str(tmp_path / "e.parquet"), env={"HF_HUB_OFFLINE": "1"})
    text = one_line_error(offline)
    assert "someorg/no-such-model" in text and "HF_HUB_OFFLINE" in text
    refused = stamp("embed", "--model", "someorg/no-such-model", "--data", str(corpus),
                    "--out", str(tmp_path / "e.parquet"), env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"})
    text = one_line_error(refused)
    assert "cannot be fetched from http://127.0.0.1:9" in text and "Retrying" not in refused.stderr
    typo = stamp("embed", "--model", str(tmp_path / "no_such_run"), "--data", str(corpus), "--out",
                 str(tmp_path / "e.parquet"))
    assert "neither a local model folder nor a Hub repo id" in one_line_error(typo)


def test_debug_switch_shows_the_traceback(corpus, tmp_path):
    argv = ["embed", "--model", str(tmp_path / "nothing"), "--data", str(corpus), "--out", str(tmp_path / "e.pq")]
    assert "Traceback" in stamp(*argv, env={"STAMP_DEBUG": "1"}).stderr
    assert "Traceback" in stamp("--debug", *argv).stderr  # without either: one line (test above)


def test_permission_denied_run_folder_and_output_are_one_line(corpus, gene_run, tmp_path):
    """A run folder / output the user cannot create: mode 0555 (non-root) or an immutable folder (root
    ignores modes)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(locked)],
                                                            capture_output=True).returncode != 0:
            pytest.skip("running as root on a file system without immutable folders (chattr +i)")
    else:
        os.chmod(locked, 0o555)
    try:
        res = stamp("pretrain", "--stage", "gene", "--data", str(corpus), "--out", str(locked / "run"),
                    "--config", "tiny", "--max-steps", "1", "--no-progress")
        emb = stamp("embed", "--model", str(gene_run), "--data", str(corpus), "--out", str(locked / "e.parquet"),
                    "--device", "cpu", "--no-progress")
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(locked)], capture_output=True)
        os.chmod(locked, 0o755)
    text = one_line_error(res)
    assert ("permission denied" in text or "operation not permitted" in text) and str(locked / "run") in text
    text = one_line_error(emb)
    assert ("permission denied" in text or "operation not permitted" in text) and str(locked) in text
    assert not list(locked.iterdir())


def test_disk_full_is_one_line():
    """ENOSPC from a real device (/dev/full) through the stamp CLI's error handler."""
    if not Path("/dev/full").exists():
        pytest.skip("/dev/full not available")
    import typer
    from typer.testing import CliRunner

    from stamp.cli._common import friendly_errors

    app = typer.Typer()

    @app.command()
    @friendly_errors
    def write() -> None:
        with open("/dev/full", "w") as fh:
            fh.write("x" * 10)

    res = CliRunner().invoke(app, [])
    assert res.exit_code == 1 and "no space left on the device" in res.output and "Traceback" not in res.output


# ---------------------------------------------------------------------------- 7. nothing silently wrong
def _corpus_of_other_genes(root: Path, n_genes: int) -> Path:
    """A corpus with as many genes as `gene_subset(n_genes)` but a different vocabulary (shifted by one)."""
    from spavis.genes import Vocabulary
    from spavis.shards import build_shards
    from spavis.simulate import write_simulated_slice

    base = gene_subset(n_genes + 1)
    ids, syms = list(base.ensembl_ids)[1:], list(base.symbols)[1:]
    vocab = Vocabulary(f"shifted-{n_genes}", ids, syms, source="tests")
    folder = root / "inputs" / "gen0"
    write_simulated_slice(folder, genes=ids, symbols=syms, seed=0, n_domains=2, with_image=False, max_row=8,
                          n_markers=10)
    build_shards([folder], root / "shards", vocab=vocab, min_genes=5, k_neighbors=8)
    return root / "shards"


def test_init_checks_the_vocabulary_checksum_not_its_length(gene_run, tmp_path):
    other = _corpus_of_other_genes(tmp_path, 60)
    res = stamp("pretrain", "--stage", "spatial", "--data", str(other), "--init", str(gene_run), "--out",
                str(tmp_path / "r2"), "--batch-size", "18", "--max-steps", "1", "--no-progress")
    text = one_line_error(res)
    assert "(60 genes, sha256" in text and "differs from" in text and "first difference at gene 0" in text


def test_generated_fraction_in_run_json_and_card(gene_run):
    import pandas as pd

    from stamp.cards import model_card
    from stamp.training.run import generated_fraction

    info = json.loads((gene_run / "run.json").read_text())
    assert info["data"]["generated_fraction"] == 1.0 and info["data"]["generated"] is True
    assert "were generated (spavis.simulate), not measured" in (gene_run / "model" / "README.md").read_text()
    slides = pd.DataFrame({"slide_id": ["a", "b", "c"], "source": ["generated", "geo", "local"],
                           "n_spots_kept": [100, 250, 650]})
    assert generated_fraction(slides) == 0.1
    card = model_card({"data": {"generated_fraction": 0.1, "generated": False}}, {})
    assert "10.0% of the training spots were generated" in card


# ---------------------------------------------------------------------------- 8. group-readable outputs
def test_outputs_are_group_readable_as_the_umask_allows(gene_run):
    files = [p for p in gene_run.rglob("*") if p.is_file()]
    assert any(p.name == "model.safetensors" for p in files) and any(p.name == "vocab.json" for p in files)
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p
    for d in [gene_run, *(p for p in gene_run.rglob("*") if p.is_dir())]:
        assert stat.S_IMODE(d.stat().st_mode) == 0o755, d


# ---------------------------------------------------------------------------- CLI mirrors PretrainArgs
def test_every_pretrain_args_field_has_a_cli_option_with_the_same_default():
    import dataclasses

    import typer.main

    from stamp.cli import app
    from stamp.cli.pretrain import API_ONLY, RENAMED, RESUME_OPTIONAL
    from stamp.training.gene import PretrainArgs

    command = typer.main.get_command(app).commands["pretrain"]
    params = {p.name: p for p in command.params}
    for f in dataclasses.fields(PretrainArgs):
        if f.name in API_ONLY:
            continue
        name = RENAMED.get(f.name, f.name)
        assert name in params, f"PretrainArgs.{f.name} has no `stamp pretrain` option"
        param = params[name]
        if f.default is dataclasses.MISSING:
            assert param.required or f.name in RESUME_OPTIONAL, f.name
            continue
        default = (not param.default) if f.name in RENAMED else param.default
        assert default == f.default, (f.name, param.default, f.default)
    try:  # options of the align stage (stamp.train_align.AlignArgs) share the command
        from stamp.cli.align import ALIGN_OPTIONS
    except ImportError:
        ALIGN_OPTIONS = ()
    extra = set(params) - {RENAMED.get(f.name, f.name) for f in dataclasses.fields(PretrainArgs)} - set(ALIGN_OPTIONS)
    assert not extra, f"options without a PretrainArgs field: {extra}"


def test_builtin_config_name_wins_over_a_same_named_folder(corpus, gene_run, tmp_path, monkeypatch):
    """Issue 24: `--config tiny` with a `./tiny` folder in the working directory is the shipped preset (the
    gene_run fixture ran so, through the real CLI); the folder is read only when named as a path, and then
    a foreign config.json is named in the one line."""
    from typer.testing import CliRunner

    from stamp.cli import app

    assert (gene_run.parent / "tiny").is_dir()
    assert json.loads((gene_run / "train_args.json").read_text())["config"] == "tiny"
    assert json.loads((gene_run / "model" / "config.json").read_text())["hidden_size"] == 64  # the tiny preset
    monkeypatch.chdir(gene_run.parent)
    res = CliRunner().invoke(app, ["pretrain", "--stage", "gene", "--data", str(corpus), "--config", "./tiny",
                                   "--out", str(tmp_path / "run2"), "--max-steps", "1", "--no-progress"])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output[-3000:]
    lines = [ln for ln in res.output.splitlines() if ln.strip() and not ln.startswith("warning")]
    text = " ".join(ln.strip() for ln in lines)
    assert text.startswith("error:") and str(gene_run.parent / "tiny" / "config.json") in text
    assert "not a config of this model" in text
    assert not (tmp_path / "run2" / "model").exists() and not (tmp_path / "run2" / "checkpoints").exists()
