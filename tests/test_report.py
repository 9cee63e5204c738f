"""spavis report (corpus composition figures + HTML), the card figure of build-shards, and
`spavis manifest summary --plot`. Corpora are built from GENERATED slices (spavis.simulate)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from spavis.cli import app
from stamp_helpers import gene_subset

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from spavis.shards import build_shards
    from spavis.simulate import write_simulated_slice

    tmp = tmp_path_factory.mktemp("report")
    vocab = gene_subset(100)
    folders = [write_simulated_slice(tmp / "in" / f"gen{s}", genes=list(vocab.ensembl_ids),
                                     symbols=list(vocab.symbols), seed=s, n_domains=3, with_image=False,
                                     max_row=8 + 4 * s, n_markers=10) for s in range(2)]
    return build_shards(folders, tmp / "corpus", vocab=vocab, min_genes=5)


def test_report_figures_and_page(corpus, tmp_path):
    res = CliRunner().invoke(app, ["report", str(corpus), "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    out = tmp_path / "r"
    for name in ("composition.png", "distributions.png", "quality.png"):
        assert (out / name).read_bytes().startswith(PNG)
    page = (out / "index.html").read_text()
    assert all(f'src="{n}"' in page for n in ("composition.png", "distributions.png", "quality.png"))
    summary = json.loads((out / "summary.json").read_text())
    slides = pq.read_table(corpus / "slides.parquet").to_pandas()
    assert summary["n_slides"] == 2 and summary["n_generated_slides"] == 2
    assert summary["n_spots"] == int(slides["n_spots_kept"].sum())
    assert summary["slides_by_source"] == {"generated": 2}
    assert summary["spots_by_source"] == {"generated": int(slides["n_spots_kept"].sum())}
    assert summary["share_with_coordinates"] == 1.0 and summary["share_with_images"] == 0.0
    assert "GENERATED" in page


def test_genes_per_spot_histogram_counts_every_spot(corpus):
    from spavis.format import open_corpus
    from spavis.report import genes_per_spot_histogram, top_genes

    edges, counts = genes_per_spot_histogram(corpus)
    n_genes = np.concatenate([t.column("n_genes").to_numpy() for t in open_corpus(corpus).iter_slides(columns=["n_genes"])])
    assert counts.sum() == len(n_genes)
    assert np.array_equal(counts, np.histogram(np.clip(n_genes, edges[0], edges[-1] - 1), bins=edges)[0])
    top = top_genes(corpus, n=5)
    genes = pq.read_table(corpus / "genes.parquet").to_pandas()
    genes = genes[genes["nnz"] >= 0.01 * len(n_genes)]
    assert list(top["ensembl_id"]) == list(genes.sort_values("nonzero_mean_cp10k", ascending=False)["ensembl_id"][:5])


def test_build_embeds_the_composition_figure(corpus):
    from spavis.shards import validate

    card = (corpus / "README.md").read_text()
    assert "![corpus composition](figures/composition.png)" in card
    assert (corpus / "figures" / "composition.png").read_bytes().startswith(PNG)
    outputs = {o["path"]: o for o in json.loads((corpus / "manifest.json").read_text())["outputs"]}
    assert outputs["figures/composition.png"]["kind"] == "figure"
    assert validate(corpus).ok


def test_report_of_a_folder_that_is_no_corpus(tmp_path):
    res = CliRunner().invoke(app, ["report", str(tmp_path), "--out", str(tmp_path / "r")])
    assert res.exit_code == 1
    assert "not" in res.output.lower() or "no slides.parquet" in res.output
    assert "Traceback" not in res.output


def test_manifest_summary_plot(tmp_path):
    root = Path(__file__).resolve().parents[1] / "manifests"
    res = CliRunner().invoke(app, ["manifest", "summary", str(root / "tenx-v1.csv"), "--plot", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "tenx-v1-composition.png").read_bytes().startswith(PNG)
