"""`stamp tokenize` through a typer app, on hand-written shards (see test_batching)."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

from stamp.cli.tokenize import register, tokenize_corpus
from stamp.tokenizer import GeneTokenizer
from test_batching import lattice_slide, write_hand_corpus


def make_app() -> typer.Typer:
    try:  # the real `stamp` app once stamp/cli.py registers the command
        from stamp.cli import app

        if any(c.name == "tokenize" for c in app.registered_commands):
            return app
    except ImportError:
        pass
    app = typer.Typer()
    register(app)

    @app.command("noop")
    def _noop() -> None:  # a second command keeps typer in multi-command mode
        pass

    return app


def test_cli_tokenize_writes_parquet_and_is_atomic(tmp_path):
    rng = np.random.default_rng(7)
    data = write_hand_corpus(tmp_path / "shards", [[lattice_slide("S1", 6, 12, rng)],
                                                   [lattice_slide("S2", 6, 10, rng, pixels=False)]])
    out = tmp_path / "tok" / "tokens.parquet"
    runner = CliRunner()
    app = make_app()
    res = runner.invoke(app, ["tokenize", "--data", str(data), "--out", str(out), "--max-length", "32"])
    assert res.exit_code == 0, res.output
    table = pq.read_table(out)
    assert table.schema.field("input_ids").type.value_type.bit_width == 32
    from spavis.corpus import open_corpus

    corpus = open_corpus(data)
    tok = GeneTokenizer.from_corpus(corpus, max_length=32)
    expected_ids = np.concatenate([tok.encode_table(t) for t in corpus.iter_slides()])
    expected_spots = [s for t in corpus.iter_slides() for s in t.column("spot_id").to_pylist()]
    assert table.column("spot_id").to_pylist() == expected_spots
    np.testing.assert_array_equal(np.array(table.column("input_ids").to_pylist()), expected_ids)
    config = json.loads(table.schema.metadata[b"stamp.tokenizer"])
    assert config["max_length"] == 32 and config["mode"] == "native"
    assert "2 spots had no vocabulary gene" in " ".join(res.output.split())  # spot 3 of each slide

    # stamp-v1 with a released-style means file
    means = tmp_path / "means.npy"
    np.save(means, np.linspace(0.2, 7.7, len(corpus.genes)))
    out_v1 = tmp_path / "v1.parquet"
    res = runner.invoke(app, ["tokenize", "--data", str(data), "--out", str(out_v1), "--compat", "stamp-v1",
                              "--means", str(means)])
    assert res.exit_code == 0, res.output
    v1 = np.array(pq.read_table(out_v1).column("input_ids").to_pylist())
    ref = GeneTokenizer.from_genes(corpus.genes, mode="stamp-v1", means=means)
    assert v1.shape[1] == 4096
    np.testing.assert_array_equal(v1, np.concatenate([ref.encode_table(t) for t in corpus.iter_slides()]))

    # a wrong-length means file: clear error, no output, no temp files left behind
    np.save(means, np.ones(5))
    bad = tmp_path / "bad" / "x.parquet"
    res = runner.invoke(app, ["tokenize", "--data", str(data), "--out", str(bad), "--compat", "stamp-v1",
                              "--means", str(means)])
    assert res.exit_code == 1 and "5 values but the vocabulary has" in res.output
    assert not bad.exists()

    # a failure half-way (second shard corrupt): the earlier output stays, no partial file appears
    (data / "data" / "expression" / "part-00001.parquet").write_bytes(b"PAR1 not parquet")
    with pytest.raises(Exception):
        tokenize_corpus(data, out, max_length=32, progress=False)
    assert pq.read_table(out).num_rows == len(expected_spots)
    assert sorted(p.name for p in out.parent.iterdir()) == ["tokens.parquet"]


def test_cli_tokenize_corpus_errors_are_one_line(tmp_path):
    """Errors of spavis.corpus (read through stamp's own CLI helper) print as one line, exit 1."""
    out = tmp_path / "t.parquet"
    res = CliRunner().invoke(make_app(), ["tokenize", "--data", str(tmp_path / "missing"), "--out", str(out)])
    assert res.exit_code == 1, res.output
    assert res.output.startswith("error:") and "not a Hub dataset id" in res.output
    assert "Traceback" not in res.output and not out.exists()
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(make_app(), ["tokenize", "--data", str(tmp_path / "empty"), "--out", str(out)])
    assert res.exit_code == 1 and "not a spavis corpus" in res.output
