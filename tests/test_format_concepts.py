"""Concepts that cross from spavis to stamp, each defined once in spavis.format: the vocabulary
fingerprint (and the one equality check), coordinates in µm from the recorded scale, CONDITIONS."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from spavis.errors import VocabularyError
from spavis.format.coordinates import lattice_to_um, slide_scales, spot_coordinates_um
from spavis.format.vocabulary import (CONDITIONS, corpus_vocabulary_fingerprint, recorded_fingerprint,
                                      require_same_vocabulary, vocabulary_difference, vocabulary_fingerprint)

IDS = [f"ENSG{i:011d}" for i in range(20)]


def test_fingerprint_is_the_tokenizer_vocab_sha256_and_ignores_names_and_symbols():
    from spavis.genes.vocab import Vocabulary
    from stamp.tokenizer import GeneTokenizer, vocabulary_sha256

    fp = vocabulary_fingerprint(IDS)
    assert fp == vocabulary_sha256(IDS)  # every tokenizer_config.json written so far stays valid
    tok = GeneTokenizer(IDS, np.ones(len(IDS)))
    assert tok.vocab_sha256 == fp and recorded_fingerprint(tok.config()) == fp
    assert recorded_fingerprint({"vocabulary_fingerprint": fp}) == fp and recorded_fingerprint({}) is None
    a = Vocabulary("a", IDS, [f"G{i}" for i in range(20)], version="1")
    b = Vocabulary("b", IDS, version="2")
    assert a.fingerprint == b.fingerprint == fp and a.checksum != b.checksum  # checksum: the vocab.json file
    swapped = [IDS[1], IDS[0], *IDS[2:]]
    assert vocabulary_fingerprint(swapped) != fp


def test_one_equality_check_by_identity_names_the_first_difference():
    swapped = [IDS[1], IDS[0], *IDS[2:]]
    assert vocabulary_difference(IDS, list(IDS)) is None
    diff = vocabulary_difference(IDS, swapped)
    assert diff.startswith("20 genes, sha256 ") and "first difference at gene 0" in diff
    with pytest.raises(VocabularyError) as err:
        require_same_vocabulary(IDS, swapped, a_name="model M", b_name="corpus C", fix="rebuild with --vocab")
    text = str(err.value)
    assert text.startswith("the vocabulary of model M (20 genes, sha256 ") and "corpus C (20 genes" in text
    assert text.endswith("; rebuild with --vocab") and "\n" not in text
    with pytest.raises(KeyError, match="gene 20: - vs X"):
        require_same_vocabulary(IDS, [*IDS, "X"], a_name="a", b_name="b", fix="f", error=KeyError)
    genes = pd.DataFrame({"ensembl_id": IDS})  # a genes table works as well as a list
    require_same_vocabulary(genes, IDS, a_name="a", b_name="b", fix="f")


def test_corpus_fingerprint_from_the_manifest_or_genes_parquet(tmp_path):
    from spavis.format import open_corpus
    from stamp_helpers import make_corpus

    root, _ = make_corpus(tmp_path / "c", slides=1, n_genes=60, max_row=6)
    corpus = open_corpus(root)
    ids = corpus.genes["ensembl_id"].astype(str).tolist()
    assert corpus_vocabulary_fingerprint(corpus) == vocabulary_fingerprint(ids)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["vocabulary"]["fingerprint"] = "f" * 64  # a recorded value is what the corpus declares
    (root / "manifest.json").write_text(json.dumps(manifest))
    assert corpus_vocabulary_fingerprint(open_corpus(root)) == "f" * 64


def test_coordinates_in_um_come_from_the_recorded_scale_never_re_derived():
    pr, pc = np.array([10.0, 20.0, 30.0]), np.array([5.0, 5.0, 7.0])
    ar, ac = np.array([0, 1, 2]), np.array([0, 1, 0])
    xy = spot_coordinates_um(um_per_px=0.5, pxl_row=pr, pxl_col=pc, array_row=ar, array_col=ac)
    np.testing.assert_allclose(xy, np.column_stack([pc, pr]) * 0.5)
    # no recorded scale: the lattice of the recorded array positions, not an estimate from the pixels
    for missing in (None, float("nan"), 0.0, -1.0):
        np.testing.assert_allclose(spot_coordinates_um(um_per_px=missing, pxl_row=pr, pxl_col=pc, array_row=ar,
                                                       array_col=ac), lattice_to_um(ar, ac))
    np.testing.assert_allclose(lattice_to_um([0, 1], [0, 1]), [[0, 0], [50, 50 * np.sqrt(3)]])
    assert spot_coordinates_um(um_per_px=None, pxl_row=pr, pxl_col=pc) is None
    assert spot_coordinates_um(um_per_px=0.5, pxl_row=[1.0, np.nan], pxl_col=[1.0, 2.0]) is None
    slides = pd.DataFrame({"slide_id": ["a", "b"], "um_per_px": [0.25, None]})
    assert slide_scales(slides) == {"a": 0.25} and slide_scales(slides.drop(columns="um_per_px")) == {}


def test_conditions_are_defined_once():
    import spavis.format.schema as S
    import spavis.manifests
    import spavis.shards.prepare
    import spavis.sources.sidecar

    assert CONDITIONS == ("cancer", "diseased", "healthy", "treated", "unknown")
    for module in (S, spavis.manifests, spavis.shards.prepare, spavis.sources.sidecar):
        assert module.CONDITIONS is CONDITIONS, module.__name__


def test_tokenize_corpus_is_library_code_with_a_thin_cli():
    import stamp.cli.tokenize as cli
    from stamp.training import tokenize_corpus
    from stamp.training.tokenize import tokenize_corpus as lib

    assert tokenize_corpus is lib and cli.tokenize_corpus is lib and lib.__module__ == "stamp.training.tokenize"
