"""spavis publish / validate ORG/NAME / open_corpus by id, against the loopback Hub (real clients, with LFS).

Corpora are built from GENERATED slices (spavis.simulate); two of them carry slice.json records
of a HEST-like and a 10x-like source so the license rules have something to decide.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from fakes.hub import WRITE_TOKEN, FakeHub
from spavis.errors import CorpusError, PublishError, SpavisError
from spavis.format import open_corpus
from spavis.publish import build_tag, corpus_files, publish, validate_hub
from spavis.shards.card import LICENSE_ORDER, most_restrictive, normalize_license

SLIDES = [  # slide_id, source, license (None = a local slice without a recorded license)
    ("gen_0", None, None),
    ("HEST01", "hest", "CC BY-NC-SA 4.0 (HEST-1k)"),
    ("TENX01", "tenx", "CC BY 4.0 (10x Genomics)"),
]


def _build(root: Path, slides, *, max_spots: int = 60) -> Path:
    from spavis.genes import Vocabulary, load_vocabulary
    from spavis.shards import build_shards
    from spavis.simulate import write_simulated_slice
    from spavis.sources.sidecar import write_sidecar

    stamp = load_vocabulary("stamp-v1")
    ids = [str(e) for e in stamp.ensembl_ids if str(e).startswith("ENSG")][:120]
    root.mkdir(parents=True, exist_ok=True)
    vocab = Vocabulary("test-120", ids, [stamp.symbols[stamp.index[e]] for e in ids]).write(root / "vocab.json")
    folders = []
    for i, (sid, source, lic) in enumerate(slides):
        folder = root / "in" / sid
        folders.append(folder)
        write_simulated_slice(folder, genes=ids, tissue_fraction=0.03, seed=i, median_umis=800, max_row=20)
        if source:
            write_sidecar(folder, slide_id=sid, source=source, license=lic, citation=f"{source} et al. (2024)",
                          organ="heart", condition="healthy")
    return build_shards(folders, root / "out", vocab=str(vocab), min_genes=10, k_neighbors=4,
                        max_spots_per_shard=max_spots)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("pub"), SLIDES)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with FakeHub(tmp_path / "hub") as h:
        h.activate(monkeypatch, cache_dir=tmp_path / "hf")
        yield h


def _uploads(hub, since: int = 0) -> list[str]:
    return [p.rsplit("/", 1)[1] for m, p in hub.requests[since:] if m == "PUT" and p.startswith("/_lfs/upload/")]


def _rows(ds) -> list[dict]:
    return [dict(r) for r in ds]


# ----------------------------------------------------------------------------- licenses and card
def test_license_normalization_and_order():
    assert normalize_license("CC BY-NC-SA 4.0 (HEST-1k)") == "cc-by-nc-sa-4.0"
    assert normalize_license("MIT (STimage-1K4M)") == "mit"
    assert normalize_license("CC BY 4.0 (10x Genomics)") == "cc-by-4.0"
    assert normalize_license("CC0-1.0") == "cc0-1.0"
    assert normalize_license(None) == normalize_license("  ") == "unknown"
    assert normalize_license("GEO public data, see original publication") == "other"
    assert most_restrictive(["cc0-1.0", "mit", "cc-by-4.0"]) == "cc-by-4.0"
    assert most_restrictive(["mit", "cc-by-nc-sa-4.0", "cc-by-4.0"]) == "cc-by-nc-sa-4.0"
    assert most_restrictive(["cc-by-sa-4.0", "cc-by-nc-4.0"]) == "cc-by-nc-sa-4.0"  # both terms hold
    assert most_restrictive(["cc-by-4.0", "other"]) == "other"
    assert most_restrictive(["mit", "unknown"]) == "other"
    assert LICENSE_ORDER.index("cc-by") < LICENSE_ORDER.index("cc-by-nc-sa") < LICENSE_ORDER.index("other")


def test_card_is_complete_for_the_hub(corpus):
    import datasets

    card = (corpus / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert [c["config_name"] for c in front["configs"]][:3] == ["default", "genes", "slides"]
    # gen_0 has CC0 (generated), HEST01 CC BY-NC-SA, TENX01 CC BY: the most restrictive wins
    assert front["license"] == "cc-by-nc-sa-4.0"
    infos = {i["config_name"]: i for i in front["dataset_info"]}
    names = [f["name"] for f in infos["default"]["features"]]
    assert names == pq.read_schema(next((corpus / "data" / "expression").glob("*.parquet"))).names
    assert {"hest", "tenx", "generated"} <= {line.split("|")[1].strip() for line in card.splitlines()
                                              if line.startswith("| ") and line.count("|") == 6}
    assert "hest et al. (2024)" in card and "tenx et al. (2024)" in card  # every source cited
    manifest = json.loads((corpus / "manifest.json").read_text())
    assert manifest["vocabulary"]["checksum"] in card and "## Limitations" in card
    # datasets reads the card's features and configs
    genes = datasets.load_dataset(str(corpus), "genes", split="train")
    assert genes.features["ensembl_id"].dtype == "string" and len(genes) == 120


def test_card_features_follow_annotations_and_paired_images():
    from spavis.genes import Vocabulary
    from spavis.shards.card import render_card

    vocab = Vocabulary("v2", ["ENSG00000000003", "ENSG00000000005"], ["TSPAN6", "TNMD"])
    stats = {"n_slides": 2, "n_spots": 10, "n_spots_input": 12, "n_expression_files": 1, "n_genes_detected": 2,
             "sources": {"geo": 1, "stimage": 1}, "organs": {"skin": 2}}
    slides = [{"slide_id": "A", "source": "geo", "license": "GEO public data, see original publication",
               "citation": "GEO et al.", "n_spots_kept": 4},
              {"slide_id": "B", "source": "stimage", "license": "MIT (STimage-1K4M)", "citation": "Chen et al.",
               "n_spots_kept": 6}]
    card = render_card(vocab=vocab, params={"obs_columns": ["domain"]}, stats=stats, slides=slides,
                       build_key="0" * 64, paired=True)
    front = yaml.safe_load(card.split("---")[1])
    infos = {i["config_name"]: i["features"] for i in front["dataset_info"]}
    assert infos["default"][-1] == {"name": "domain", "dtype": "string"}
    assert {"name": "patch", "dtype": "image"} in infos["paired"]
    assert [c["config_name"] for c in front["configs"]] == ["default", "genes", "slides", "paired"]
    # recorded terms that are no standard license: "other", with the per-slide terms in the card
    assert front["license"] == "other" and front["license_name"] == "per-slide"
    assert "GEO public data, see original publication" in card and "Chen et al." in card


# ----------------------------------------------------------------------------- publish and read back
def test_publish_tag_load_stream_and_lazy_open(corpus, hub, tmp_path):
    import datasets

    res = publish(corpus, "org/visium", token=WRITE_TOKEN, max_files_per_commit=100, revision_tag="v1.0")
    files = corpus_files(corpus)
    manifest = json.loads((corpus / "manifest.json").read_text())
    assert res.tag == build_tag(manifest) == f"build-{manifest['build_key']}"
    assert res.n_uploaded == len(files) and res.n_commits > 2 and res.license == "cc-by-nc-sa-4.0"
    assert hub.tags("org/visium", "dataset") == {res.tag: res.commit, "v1.0": res.commit}
    assert hub.head("org/visium", "dataset") == res.commit
    assert set(hub.list_files("org/visium", "dataset")) == set(files) | {".gitattributes"}
    titles = hub.commits("org/visium", "dataset")
    assert titles[-1].startswith("spavis publish: card and manifest")  # card + manifest go last
    big = next(p for p in files if p.startswith("data/expression/"))
    assert hashlib.sha256(files[big].read_bytes()).hexdigest() in _uploads(hub)  # went through LFS

    # lazy (fresh cache): opening reads metadata only; one slide downloads the one shard holding it
    c = open_corpus("org/visium", revision=res.tag)
    assert c.repo_id == "org/visium" and c.revision == res.commit
    assert not (c.root / "data").exists() and not (c.root / "zarr").exists()
    assert c.n_spots == sum(o["rows"] for o in manifest["outputs"] if o["kind"] == "expression")
    assert not (c.root / "data").exists()
    target = c.slides.set_index("slide_id").loc["TENX01", "expression_file"]
    (table,) = list(c.iter_slides(slide_ids=["TENX01"]))
    got = sorted(p.relative_to(c.root).as_posix() for p in (c.root / "data").rglob("*.parquet"))
    assert got == [target] and len(manifest["outputs"]) > 4
    local_table = next(open_corpus(corpus).iter_slides(slide_ids=["TENX01"]))
    assert table.equals(local_table)

    # the same rows by id, downloaded and streamed, as from the local folder
    local = datasets.load_dataset(str(corpus), split="train")
    remote = datasets.load_dataset("org/visium", split="train", revision=res.tag)
    assert remote.num_rows == local.num_rows and remote[:]["spot_id"] == local[:]["spot_id"]
    assert remote[:]["counts"] == local[:]["counts"]
    streamed = datasets.load_dataset("org/visium", split="train", streaming=True)
    assert [r["spot_id"] for r in streamed] == local[:]["spot_id"]
    assert [r["spot_id"] for r in c.load(streaming=True)] == local[:]["spot_id"]

    # publishing again: nothing to upload, no commit, same tag
    before, n_commits = len(hub.requests), len(hub.commits("org/visium", "dataset"))
    again = publish(corpus, "org/visium", token=WRITE_TOKEN, max_files_per_commit=100)
    assert again.n_uploaded == 0 and again.n_commits == 0 and again.commit == res.commit
    assert _uploads(hub, before) == [] and len(hub.commits("org/visium", "dataset")) == n_commits

    # validate by id: clean, then a tampered file on the Hub is reported
    rep = validate_hub("org/visium", res.tag)
    assert rep.ok, rep.errors
    hub.add_files("org/visium", {big: b"PAR1 not really"}, "dataset", message="tamper")
    bad = validate_hub("org/visium")
    assert not bad.ok and any(big in e for e in bad.errors)
    damaged = open_corpus("org/visium")  # metadata still fine; the shard is caught when first read
    with pytest.raises(CorpusError, match="damaged"):
        list(damaged.iter_slides())
    assert validate_hub("org/visium", res.tag).ok  # the tag still names the good bytes
    deep = validate_hub("org/visium", res.tag, deep=True)  # downloaded: schemas, rows, Zarr vs Parquet, sums
    assert deep.ok and deep.checked["slides"] == 3, deep.errors


def test_interrupted_publish_resumes_with_only_the_missing_files(corpus, hub):
    files = corpus_files(corpus)
    # a rate limit (429 + Retry-After) is waited out, not an interruption
    rate = hub.add_fault("/commit/main", "status", status=429, retry_after=0, methods=("POST",), after=1)
    # the Hub fails the 3rd commit (after two batches were committed)
    hub.add_fault("/commit/main", "status", status=500, methods=("POST",), after=2)
    with pytest.raises(PublishError, match=r"stopped after 2 of \d+ commit\(s\).*run the same command again"):
        publish(corpus, "org/resume", token=WRITE_TOKEN, max_files_per_commit=40)
    on_hub = set(hub.list_files("org/resume", "dataset")) - {".gitattributes"}
    assert rate.fired == 1 and len(on_hub) == 80 < len(files)
    assert "manifest.json" not in on_hub and not hub.tags("org/resume", "dataset")  # no half-announced version

    # the rerun is cut too: an LFS upload fails midway through its first batch (HTTP 403: not retried)
    second = len(hub.requests)
    hub.add_fault("/_lfs/upload/", "status", status=403, methods=("PUT",), after=3)
    with pytest.raises(PublishError, match=r"stopped after \d+ of \d+ commit\(s\).*Error while uploading.*run the "
                                           r"same command again"):
        publish(corpus, "org/resume", token=WRITE_TOKEN, max_files_per_commit=40)
    committed = {hashlib.sha256(files[p].read_bytes()).hexdigest() for p in on_hub}
    assert len(_uploads(hub, second)) >= 4 and not committed & set(_uploads(hub, second))
    on_hub = set(hub.list_files("org/resume", "dataset")) - {".gitattributes"}
    assert "manifest.json" not in on_hub
    stored = {p.name for p in (hub.root / "blobs").iterdir()}  # LFS objects the Hub keeps

    third = len(hub.requests)
    res = publish(corpus, "org/resume", token=WRITE_TOKEN, max_files_per_commit=40)
    assert res.n_uploaded == len(files) - len(on_hub)
    assert set(hub.list_files("org/resume", "dataset")) == set(files) | {".gitattributes"}
    # nothing already committed, nor any LFS object uploaded before the cut, was sent again
    assert _uploads(hub, third) and not stored & set(_uploads(hub, third))
    assert hub.tags("org/resume", "dataset") == {res.tag: res.commit}
    assert validate_hub("org/resume").ok


def test_versions_unknown_license_local_dir_private_and_refusals(corpus, tmp_path, hub):
    first = publish(corpus, "org/versions", token=WRITE_TOKEN)
    big = corpus
    corpus = _build(tmp_path / "c", [("LOCAL1", "local", None)])
    with pytest.raises(PublishError, match="no recorded license.*--allow-unknown-license"):
        publish(corpus, "org/unknown", token=WRITE_TOKEN)
    assert ("dataset", "org/unknown") not in hub.repos  # refused before touching the Hub
    card = (corpus / "README.md").read_text()
    assert "without a recorded license" in card and "`LOCAL1`" in card
    res = publish(corpus, local_dir=tmp_path / "repo", allow_unknown_license=True)
    assert res.unknown_license_slides == ["LOCAL1"] and res.license == "other"
    out = corpus_files(tmp_path / "repo")
    assert out.keys() == corpus_files(corpus).keys()
    assert all(out[k].read_bytes() == v.read_bytes() for k, v in corpus_files(corpus).items())
    assert publish(corpus, local_dir=tmp_path / "repo", allow_unknown_license=True).n_uploaded == 0
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "mine.txt").write_text("keep me")
    with pytest.raises(PublishError, match="not empty and not a published corpus"):
        publish(corpus, local_dir=tmp_path / "docs", allow_unknown_license=True)
    assert (tmp_path / "docs" / "mine.txt").read_text() == "keep me"
    # --private: created private; a reader without a token gets one line naming the fix
    publish(corpus, "org/private", private=True, token=WRITE_TOKEN, allow_unknown_license=True)
    assert hub.repos[("dataset", "org/private")].private
    with pytest.raises(CorpusError, match="or it is private.*HF_TOKEN"):
        open_corpus("org/private")
    # a new version of a published corpus: old files removed in the final commit, each tag keeps its bytes
    second = publish(corpus, "org/versions", token=WRITE_TOKEN, allow_unknown_license=True)
    assert second.n_deleted > 0 and second.tag != first.tag
    assert set(hub.list_files("org/versions", "dataset")) == set(corpus_files(corpus)) | {".gitattributes"}
    assert set(hub.list_files("org/versions", "dataset", revision=first.tag)) == set(corpus_files(big)) | {
        ".gitattributes"}
    assert validate_hub("org/versions", first.tag).ok and validate_hub("org/versions").ok
    # a dataset that holds something else is not overwritten; a bad tag name is refused up front
    hub.create_repo("org/other", repo_type="dataset")
    hub.add_files("org/other", {"notes.txt": "mine"}, "dataset")
    with pytest.raises(PublishError, match="not part of this corpus.*notes.txt"):
        publish(corpus, "org/other", token=WRITE_TOKEN, allow_unknown_license=True)
    assert hub.list_files("org/other", "dataset") == [".gitattributes", "notes.txt"]
    with pytest.raises(PublishError, match="no Hugging Face token.*hf auth login"):
        publish(corpus, "org/x", allow_unknown_license=True)  # no HF_TOKEN, no login in this test
    with pytest.raises(PublishError, match="--revision-tag"):
        publish(corpus, "org/x", token=WRITE_TOKEN, allow_unknown_license=True, revision_tag="main")
    # a corpus that no longer matches its manifest is not published
    (corpus / "genes.parquet").write_bytes(b"changed")
    with pytest.raises(PublishError, match="genes.parquet"):
        publish(corpus, "org/unknown", token=WRITE_TOKEN, allow_unknown_license=True)


def test_gated_corpus_and_missing_revision_are_one_clear_line(corpus, hub):
    res = publish(corpus, "org/gated", token=WRITE_TOKEN, gated="manual")
    assert hub.repos[("dataset", "org/gated")].gated
    with pytest.raises(CorpusError) as info:
        open_corpus("org/gated")
    msg = str(info.value)
    assert "gated" in msg and "hf auth login" in msg and "\n" not in msg and WRITE_TOKEN not in msg
    with pytest.raises(CorpusError, match="gated"):
        open_corpus(f"org/gated@{res.tag}")

    hub.create_repo("org/open", repo_type="dataset")
    hub.add_files("org/open", corpus_files(corpus), "dataset")
    with pytest.raises(CorpusError, match=r"org/open has no revision 'v9' \(it has: main\)"):
        open_corpus("org/open", revision="v9")
    with pytest.raises(SpavisError, match="no revision 'v9'"):
        validate_hub("org/open", "v9")
    with pytest.raises(CorpusError, match="no such dataset"):
        open_corpus("org/nothing")


def test_cli_publish_and_validate_by_id(corpus, tmp_path):
    with FakeHub(tmp_path / "hub") as hub:
        env = hub.env(tmp_path)
        env["HF_TOKEN"] = WRITE_TOKEN
        run = [str(Path(sys.executable).parent / "spavis")]  # the console script
        out = subprocess.run(run + ["publish", str(corpus), "--repo-id", "org/cli", "--files-per-commit", "50"],
                             env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "tag build-" in out.stderr and WRITE_TOKEN not in out.stdout + out.stderr
        env.pop("HF_TOKEN")
        ok = subprocess.run(run + ["validate", "org/cli"], env=env, capture_output=True, text=True, timeout=120)
        assert ok.returncode == 0 and "valid" in ok.stdout, ok.stdout + ok.stderr
        bad = subprocess.run(run + ["validate", "org/cli", "--revision", "nope"], env=env, capture_output=True,
                             text=True, timeout=120)
        assert bad.returncode == 1 and "no revision 'nope'" in bad.stderr and "Traceback" not in bad.stderr


def test_pretrain_from_a_hub_corpus_is_lazy_and_records_the_revision(tmp_path, hub):
    pytest.importorskip("torch")
    from stamp.data.tokens import TokenBatchLoader
    from stamp.tokenizer import GeneTokenizer
    from stamp.training.gene import PretrainArgs, pretrain
    from stamp_helpers import make_corpus

    root, _ = make_corpus(tmp_path / "shards", slides=3, n_genes=120, max_row=16)  # one slide per shard
    res = publish(root, "org/stamp-corpus", token=WRITE_TOKEN)
    snap = tmp_path / "hf" / "hub" / "datasets--org--stamp-corpus" / "snapshots" / res.commit
    corpus = open_corpus("org/stamp-corpus")
    loader = TokenBatchLoader(corpus, GeneTokenizer.from_corpus(corpus, max_length=64), batch_size=8,
                              shuffle_buffer=8, context_length=64)
    assert not (snap / "data").exists()  # built from metadata only
    next(iter(loader))
    fetched = list((snap / "data" / "expression").glob("*.parquet"))
    assert len(fetched) == 1 and not (snap / "zarr").exists()  # the first batch needed one shard of three

    run = tmp_path / "run"
    model = pretrain(PretrainArgs(stage="gene", data=f"org/stamp-corpus@{res.tag}", out=str(run), config="tiny", max_steps=2,
                                  batch_size=8, warmup_steps=1, save_every=2, progress=False, seed=0))
    info = json.loads((run / "run.json").read_text())
    assert info["data"]["hub_id"] == "org/stamp-corpus" and info["data"]["hub_revision"] == res.commit
    card = (Path(model) / "README.md").read_text()
    assert f"org/stamp-corpus@{res.commit}" in card and "- org/stamp-corpus" in card

    # A run started from the bare id is pinned to the commit it read, so --resume reads the same bytes
    # even after the corpus gets a new version, and resuming with the bare id is not a changed option.
    run2 = tmp_path / "run2"
    pretrain(PretrainArgs(stage="gene", data="org/stamp-corpus", out=str(run2), config="tiny", max_steps=2,
                          batch_size=8, warmup_steps=1, save_every=2, progress=False, seed=0))
    stored = json.loads((run2 / "train_args.json").read_text())
    assert stored["data"] == f"org/stamp-corpus@{res.commit}"
    pretrain(PretrainArgs(stage="gene", data="org/stamp-corpus", out=str(run2), config="tiny", max_steps=3,
                          batch_size=8, warmup_steps=1, save_every=2, progress=False, seed=0, resume=True))
    assert json.loads((run2 / "train_args.json").read_text())["max_steps"] == 3
