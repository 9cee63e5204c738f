"""`datasets.load_dataset(CORPUS)` never returns another corpus's rows from its cache.

``datasets`` caches a local folder with card ``configs`` under ``<folder name>/<config>/<version>/<hash>``
where the hash covers only the card's YAML (not the folder's path or files): the card's configs
carry the build key (spavis.shards.card.config_description) so the key follows the content.
Every test here shares one HF_DATASETS_CACHE between the corpora it loads (conftest's per-test cache).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from spavis.corpus import open_corpus
from spavis.shards import build_shards

MIN_GENES = 10


@pytest.fixture(scope="module")
def slices(tmp_path_factory):
    """Two folders of generated slices with different slide ids and spot counts, and a small vocabulary."""
    from spavis.genes import Vocabulary, load_vocabulary
    from spavis.simulate import write_simulated_slice

    root = tmp_path_factory.mktemp("slices")
    stamp = load_vocabulary("stamp-v1")
    genes = [e for e in stamp.ensembl_ids if str(e).startswith("ENSG")][:200]
    vocab = Vocabulary("cache-200", genes, [stamp.symbols[stamp.index[e]] for e in genes])
    vocab_path = vocab.write(root / "vocab.json")
    folders = {}
    for name, frac, seed in (("first", 0.03, 1), ("second", 0.06, 2)):
        write_simulated_slice(root / name / f"{name}_slide", genes=genes, tissue_fraction=frac, seed=seed,
                              median_umis=800)
        folders[name] = root / name
    return {"vocab": str(vocab_path), **folders}


def _build(slices, which: str, out: Path, **kw) -> Path:
    return build_shards([slices[which]], out, vocab=slices["vocab"], min_genes=MIN_GENES, k_neighbors=4, **kw)


def _expected(out: Path) -> tuple[int, set[str]]:
    corpus = open_corpus(out)
    return corpus.n_spots, set(corpus.slides["slide_id"])


def _check_loads(path: str | Path, out: Path) -> None:
    """Every way of loading ``path`` gives the rows of the corpus now at ``out``."""
    n, slide_ids = _expected(out)
    spots = datasets.load_dataset(str(path), split="train")
    assert spots.num_rows == n and set(spots["slide_id"]) == slide_ids
    streamed = {row["slide_id"] for row in datasets.load_dataset(str(path), split="train", streaming=True)}
    assert streamed == slide_ids
    slides = datasets.load_dataset(str(path), "slides", split="train")
    assert set(slides["slide_id"]) == slide_ids
    genes = datasets.load_dataset(str(path), "genes", split="train")
    assert genes.num_rows == open_corpus(out).n_genes
    loaded = open_corpus(out).load()
    assert loaded.num_rows == n and set(loaded["slide_id"]) == slide_ids


def test_rebuild_in_place_loads_the_new_rows(slices, tmp_path):
    out = tmp_path / "corpus"
    _build(slices, "first", out)
    _check_loads(out, out)
    n_first, first_ids = _expected(out)
    # the CLI, as a user rebuilds: same --out, other slices, --overwrite; the cache is shared
    spavis = str(Path(sys.executable).with_name("spavis"))
    res = subprocess.run([spavis, "build-shards", str(slices["second"]), "--out",
                          str(out), "--vocab", slices["vocab"], "--min-genes", str(MIN_GENES), "--k-neighbors",
                          "4", "--overwrite", "--quiet"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    n_second, ids = _expected(out)
    assert n_second != n_first and ids.isdisjoint(first_ids)
    _check_loads(out, out)


def test_same_named_corpora_in_two_folders_load_their_own_rows(slices, tmp_path, monkeypatch):
    a = _build(slices, "first", tmp_path / "a" / "corpus")
    b = _build(slices, "second", tmp_path / "b" / "corpus")
    monkeypatch.chdir(tmp_path)
    for rel, out in (("a/corpus", a), ("b/corpus", b)):  # relative paths, one cache
        _check_loads(rel, out)
    for out in (b, a):  # absolute paths, in the other order, same cache
        _check_loads(out, out)
    assert set(datasets.load_dataset("a/corpus", split="train")["slide_id"]).isdisjoint(
        datasets.load_dataset("b/corpus", split="train")["slide_id"])


def test_card_without_the_build_key_is_rewritten_by_a_rerun(slices, tmp_path):
    """A corpus whose card predates the build key in its configs is not 'up to date': a rerun rewrites it."""
    from spavis.shards.card import config_description
    import json

    out = _build(slices, "first", tmp_path / "corpus")
    key = json.loads((out / "manifest.json").read_text())["build_key"]
    card = (out / "README.md").read_text()
    assert card.count(config_description(key)) == 3  # default, genes, slides
    old = "\n".join(line for line in card.splitlines() if "description:" not in line) + "\n"
    (out / "README.md").write_text(old)
    _build(slices, "first", out)
    assert (out / "README.md").read_text() == card
