"""The run contract every ``stamp pretrain`` stage shares (stamp.training.run), checked on the align stage,
which gained it: absolute paths in train_args.json, --resume refusing changed options, a Hub corpus
pinned to its commit, the vocabulary checked by identity (a reordered vocabulary of the same size is
refused), and run folders written before the change still resume. Tiny configs, CPU, GENERATED data."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from paired_helpers import make_paired_corpus
from stamp.errors import TrainingError
from stamp.training.align import AlignArgs, align
from stamp.training.gene import PretrainArgs, pretrain

FIXTURES = Path(__file__).parent / "data" / "runs_v0"


@pytest.fixture(scope="module")
def paired(tmp_path_factory):
    """A one-slide paired corpus (GENERATED) and a 1-step gene-stage run to initialise from."""
    root = tmp_path_factory.mktemp("contract")
    corpus, _ = make_paired_corpus(root / "shards", slides=1, n_genes=40, max_row=3, seed=3)
    pretrain(PretrainArgs(stage="gene", data=str(corpus), out=str(root / "run1"), config="tiny", max_steps=1,
                          batch_size=8, warmup_steps=1, progress=False))
    return root, corpus


def _align(root: Path, out: Path | str, **kw) -> AlignArgs:
    base = dict(data=str(root / "shards"), out=str(out), init=str(root / "run1"), vision="tiny", max_steps=2,
                batch_size=4, grad_accum=1, warmup_steps=1, save_every=1, progress=False, loader_threads=1)
    base.update(kw)
    return AlignArgs(**base)


def _reordered_init(root: Path, dest: Path) -> Path:
    """A copy of run1 whose tokenizer holds the same genes with the first two swapped (same size)."""
    from stamp.tokenizer import GeneTokenizer

    shutil.copytree(root / "run1", dest)
    tok = GeneTokenizer.from_pretrained(dest / "model")
    order = [1, 0, *range(2, tok.n_genes)]
    swapped = GeneTokenizer([tok.gene_ids[i] for i in order], tok.raw_means[order],
                            symbols=[tok.symbols[i] for i in order] if tok.symbols is not None else None,
                            mode=tok.mode, max_length=tok.max_length, mean_source=tok.mean_source)
    swapped.save_pretrained(dest / "model")
    assert swapped.n_genes == tok.n_genes and swapped.gene_ids != tok.gene_ids
    return dest


def test_align_stores_absolute_paths_and_refuses_changed_options_on_resume(paired, tmp_path, monkeypatch):
    root, _ = paired
    monkeypatch.chdir(root)  # relative --data / --init / --out, as typed in a shell
    args = _align(root, "runs/a", data="shards", init="run1", stop_after=1)
    align(args)
    run = root / "runs" / "a"
    stored = json.loads((run / "train_args.json").read_text())
    assert stored["data"] == str(root / "shards") and stored["init"] == str(root / "run1")
    assert stored["out"] == str(run) and stored["vision"] == "tiny"  # a preset name stays a name
    assert json.loads((run / "run.json").read_text())["init"] == str(root / "run1")

    # a changed run-defining option is refused, naming the stored and the given value
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TrainingError, match=r"was started with other options: --batch-size 4 \(now 8\)"):
        align(_align(root, run, batch_size=8, resume=True))
    with pytest.raises(TrainingError, match=r"--lr 0.0001 \(now 0.001\)"):
        align(_align(root, run, lr=1e-3, resume=True))
    # the same options from another working directory (absolute now) resume; --max-steps may change
    align(_align(root, run, max_steps=3, resume=True))
    assert json.loads((run / "train_args.json").read_text())["max_steps"] == 3
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]

    # the CLI: only the options typed are compared; a gene run is not resumed as an align run
    from typer.testing import CliRunner

    from stamp.cli import app

    res = CliRunner().invoke(app, ["pretrain", "--stage", "align", "--resume", "--out", str(run), "--batch-size",
                                   "8", "--no-progress"])
    assert res.exit_code == 1 and "--batch-size 4 (now 8)" in res.output and "Traceback" not in res.output
    with pytest.raises(TrainingError, match="is a 'gene' run; resume it with --stage gene"):
        align(_align(root, root / "run1", resume=True))


def test_align_checks_the_vocabulary_by_identity_not_length(paired, tmp_path):
    root, _ = paired
    bad = _reordered_init(root, tmp_path / "run1-reordered")
    with pytest.raises(TrainingError) as err:
        align(_align(root, tmp_path / "r", init=str(bad)))
    text = str(err.value)
    assert "(40 genes, sha256" in text and "differs from that of" in text and "first difference at gene 0" in text
    assert "\n" not in text and not (tmp_path / "r" / "checkpoints").exists()
    # the gene stages refuse the same reordered vocabulary
    with pytest.raises(TrainingError, match="first difference at gene 0"):
        pretrain(PretrainArgs(stage="spatial", data=str(root / "shards"), out=str(tmp_path / "s"), init=str(bad),
                              config="tiny", max_steps=1, batch_size=18, progress=False))


def test_align_run_folder_written_before_the_change_resumes(paired, tmp_path, monkeypatch):
    """train_args.json as the align stage wrote it before stamp.training (relative paths, no pin:
    tests/data/runs_v0) with a checkpoint at step 1: resumed from another directory, it finishes."""
    root, corpus = paired
    work = tmp_path / "work"
    work.mkdir()
    os.symlink(corpus, work / "shards")
    os.symlink(root / "run1", work / "run1")
    run = work / "run3"
    align(_align(root, run, stop_after=1))  # the checkpoint (format unchanged) ...
    shutil.copy(FIXTURES / "align_train_args.json", run / "train_args.json")  # ... under the old options file
    old = json.loads((run / "train_args.json").read_text())
    assert (old["data"], old["init"], old["out"]) == ("shards", "run1", "run3")
    monkeypatch.chdir(tmp_path)  # not the directory the paths were relative to

    from stamp.training.align import read_run_args

    stored = read_run_args(run)
    assert stored["data"] == str((work / "shards").resolve()) and stored["init"] == str((work / "run1").resolve())
    from typer.testing import CliRunner

    from stamp.cli import app

    res = CliRunner().invoke(app, ["pretrain", "--resume", "--out", str(run), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((run / "run.json").read_text())["steps"] == 2


def test_align_pins_a_hub_corpus_to_its_commit(paired, tmp_path, monkeypatch):
    from fakes.hub import FakeHub

    root, corpus = paired
    files = {p.relative_to(corpus).as_posix(): p for p in corpus.rglob("*")
             if p.is_file() and not p.relative_to(corpus).as_posix().startswith(("zarr/", "figures/"))}
    with FakeHub(tmp_path / "hub") as hub:
        hub.activate(monkeypatch, cache_dir=tmp_path / "hf")
        hub.create_repo("org/paired", repo_type="dataset")
        commit = hub.add_files("org/paired", files, repo_type="dataset")
        # the paired loader opens the shards by path (it does not download them on use), so the
        # snapshot is fetched first; what is pinned is the commit open_corpus resolved
        from spavis.format.hub import snapshot

        snapshot("org/paired", revision=commit, patterns=["data/paired/*.parquet", "data/expression/*.parquet"])
        run = tmp_path / "hubrun"
        align(_align(root, run, data="org/paired", max_steps=1))
        stored = json.loads((run / "train_args.json").read_text())
        assert stored["data"] == f"org/paired@{commit}"
        info = json.loads((run / "run.json").read_text())
        assert info["data"]["hub_id"] == "org/paired" and info["data"]["hub_revision"] == commit
        # a new version of the corpus does not move the run; the bare id is not a changed option
        hub.add_files("org/paired", {"NOTES.md": "new version"}, repo_type="dataset")
        align(_align(root, run, data="org/paired", max_steps=2, resume=True))
        assert json.loads((run / "train_args.json").read_text())["data"] == f"org/paired@{commit}"
        with pytest.raises(TrainingError, match="--data"):
            align(_align(root, run, data=str(corpus), max_steps=2, resume=True))
