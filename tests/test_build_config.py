"""BuildConfig is the one place the CLI, build_shards and the Snakefile read build settings from."""
from __future__ import annotations

import pytest

from spavis.errors import SpavisError
from spavis.shards.config import BuildConfig


def test_defaults_keep_the_keys_of_image_and_label_free_builds():
    params = BuildConfig().params()
    assert set(params) == {"vocab", "min_genes", "k_neighbors", "max_spots_per_shard"}
    assert BuildConfig().prepare_kwargs() == {"vocab": "stamp-v1", "min_genes": 100, "k_neighbors": 8}


def test_snakemake_mapping_carries_images_and_labels(tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("barcode,layer\nAAAC-1,L1\n")
    cfg = BuildConfig.from_mapping({"with_images": True, "obs_columns": "layer", "annotations": str(csv),
                                    "min_genes": "5", "k_neighbors": None})
    params = cfg.params()
    assert params["with_images"] is True and params["obs_columns"] == ["layer"]
    assert params["annotations"]["name"] == "labels.csv" and len(params["annotations"]["sha256"]) == 64
    kwargs = cfg.prepare_kwargs()
    assert kwargs["with_images"] is True and kwargs["obs_columns"] == ("layer",) and kwargs["min_genes"] == 5
    assert kwargs["annotations"]["path"] == str(csv.resolve())


def test_bad_settings_are_one_clear_error(tmp_path):
    with pytest.raises(SpavisError, match="--annotations needs --obs-columns"):
        BuildConfig(annotations=str(tmp_path / "x.csv"))
    with pytest.raises(SpavisError, match="--k-neighbors must be an integer of at least 1"):
        BuildConfig(k_neighbors=0)


def test_build_shards_takes_the_settings_from_one_carrier(tmp_path):
    """A BuildConfig or the same settings as keywords (shorthand), never both; unknown names are refused."""
    from spavis.shards import build_shards

    with pytest.raises(TypeError, match="not both"):
        build_shards([tmp_path], tmp_path / "out", BuildConfig(), min_genes=5)
    with pytest.raises(TypeError, match="unknown build setting.*min_gene\\b"):
        build_shards([tmp_path], tmp_path / "out", min_gene=5)
    assert BuildConfig.from_settings(min_genes=5, k_neighbors=None) == BuildConfig(min_genes=5)


def test_a_build_resolves_its_vocabulary_once(tmp_path):
    """The vocabulary file is read once per build (BuildConfig.vocabulary), not once per step."""
    from spavis.genes import Vocabulary, load_vocabulary
    from spavis.shards import build_shards
    from spavis.shards.config import _vocab_by_name
    from spavis.simulate import write_simulated_slice

    stamp = load_vocabulary("stamp-v1")
    genes = [e for e in stamp.ensembl_ids if str(e).startswith("ENSG")][:150]
    path = Vocabulary("once-150", genes, [stamp.symbols[stamp.index[e]] for e in genes]).write(tmp_path / "v.json")
    for i in range(2):
        write_simulated_slice(tmp_path / "in" / f"g{i}", genes=genes, seed=i, max_row=6, median_umis=400)
    _vocab_by_name.cache_clear()
    cfg = BuildConfig(vocab=str(path), min_genes=1)
    build_shards([tmp_path / "in"], tmp_path / "out", cfg)
    assert _vocab_by_name.cache_info().misses == 1
    assert cfg.vocabulary is _vocab_by_name(str(path))  # the same object everywhere in the build
