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
