"""Embeddings never corrupt a corpus, every image mistake is one line (issue 16 items 1, 2, 6, 7, the
16-bit picture; issue 18: one embeddings writer recording the model).

The real commands in subprocesses (``stamp embed``, ``stamp pretrain --stage align``, ``spavis
validate``) on a corpus built by the real pipeline with ``--with-images`` from GENERATED slices,
with tiny untrained models (a gene encoder and an aligned StampModel) saved as model folders.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zarr

from paired_helpers import _list_in_manifest, make_paired_corpus

TIMEOUT = 300
RECORD_KEYS = {"stamp_model", "stamp_model_name", "stamp_model_revision", "stamp_model_license", "stamp_model_kind"}


def run(tool: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = {"stamp": ["-m", "stamp.cli"], "spavis": ["-c", "from spavis.cli import app; app()"]}[tool]
    full_env = {**os.environ, "COLUMNS": "250", "HF_HUB_OFFLINE": "1", **(env or {})}
    for key in ("STAMP_DEBUG", "SPAVIS_DEBUG"):
        full_env.pop(key, None)
    return subprocess.run([sys.executable, *cmd, *args], env=full_env, capture_output=True, text=True,
                          timeout=TIMEOUT)


def cli(tool: str, *args: str):
    """The same commands in this process (typer's runner): cheaper where no second process is the point
    (the lock is a flock on its own open file description: it holds against this process too)."""
    from typer.testing import CliRunner

    if tool == "stamp":
        from stamp.cli import app
    else:
        from spavis.cli import app
    res = CliRunner().invoke(app, list(args))
    return subprocess.CompletedProcess(args, res.exit_code, "", res.output)  # stdout and stderr, mixed


def one_line_error(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 1, (res.returncode, res.stdout[-2000:], res.stderr[-3000:])
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    lines = [ln.strip() for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith("warning")]
    text = " ".join(lines)
    assert text.startswith("error:"), res.stderr
    return text


def stores(corpus: Path) -> list[Path]:
    return sorted((corpus / "zarr").glob("*.zarr"))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(corpus built with --with-images, gene model folder, aligned model folder)."""
    from stamp.models.gene_encoder import create_model
    from stamp.models.aligned_model import create_stamp_model
    from stamp.tokenizer import GeneTokenizer
    from stamp.zoo.factory import create_vision_encoder

    root = tmp_path_factory.mktemp("robemb")
    corpus, _ = make_paired_corpus(root / "shards", slides=2, n_genes=60, max_row=4, seed=5)
    tok = GeneTokenizer.from_corpus(corpus, max_length=64)
    torch.manual_seed(0)
    gene = create_model("tiny", n_genes=60)
    gene.save_pretrained(root / "gene")
    tok.save_pretrained(root / "gene")
    torch.manual_seed(1)
    aligned = create_stamp_model(create_model("tiny", n_genes=60), create_vision_encoder("tiny", pretrained=False),
                                 embed_dim=16)
    aligned.save_pretrained(root / "aligned")
    tok.save_pretrained(root / "aligned")
    return corpus, root / "gene", root / "aligned"


def _copy(corpus: Path, dest: Path) -> Path:
    shutil.copytree(corpus, dest)
    return dest


def _check_stores(corpus: Path, width: int) -> None:
    """Every store reads back with anndata, no embedding row is all zeros, images/ intact."""
    from spavis.format.zarrstore import hidden_entries

    for store in stores(corpus):
        adata = ad.read_zarr(store)
        emb = np.asarray(adata.obsm["X_stamp"])
        assert emb.shape == (adata.n_obs, width)
        assert np.abs(emb).sum(axis=1).min() > 0, f"{store}: an all-zero embedding row"
        assert hidden_entries(store) == []
        patch = zarr.open_group(str(store / "images"), mode="r", zarr_format=2)["patch"]
        assert patch.shape == (adata.n_obs, 224, 224, 3)


# ------------------------------------------------------------------ 1. --zarr on a corpus with images
def test_embed_zarr_keeps_imaged_stores_readable_and_repairs_old_damage(built, tmp_path):
    from spavis.shards.validate import validate

    corpus, gene, _ = built
    data = _copy(corpus, tmp_path / "data")
    res = run("stamp", "embed", "--model", str(gene), "--data", str(data), "--out", str(tmp_path / "e.parquet"),
              "--zarr", "--device", "cpu", "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    _check_stores(data, 64)
    check = cli("spavis", "validate", str(data), "--full")
    assert check.returncode == 0 and "valid" in check.stdout + check.stderr, check.stderr[-2000:]

    # what the old `stamp embed --zarr` left: consolidated metadata listing images/ -> unreadable by anndata
    for store in stores(data):
        zarr.consolidate_metadata(str(store))
        with pytest.raises(TypeError, match="images"):
            ad.read_zarr(store)
    damaged = cli("spavis", "validate", str(data))
    assert damaged.returncode == 1 and "lists images/" in damaged.stderr
    again = cli("stamp", "embed", "--model", str(gene), "--data", str(data), "--out", str(tmp_path / "e.parquet"),
                "--zarr", "--device", "cpu", "--no-progress")
    assert again.returncode == 0, again.stderr[-3000:]
    _check_stores(data, 64)  # repaired
    assert validate(data).ok


# ------------------------------------------------------------------ 2. one writer at a time
def test_second_zarr_writer_is_refused_or_queued_and_nothing_is_lost(built, tmp_path):
    from spavis.shards.validate import validate
    from stamp.embed.writer import zarr_writer_lock

    corpus, gene, _ = built
    data = _copy(corpus, tmp_path / "data")
    argv = ["embed", "--model", str(gene), "--data", str(data), "--zarr", "--device", "cpu", "--no-progress"]
    with zarr_writer_lock(data / "zarr"):  # another writer holds the corpus
        refused = cli("stamp", *argv, "--out", str(tmp_path / "a.parquet"))
        text = one_line_error(refused)
        assert "another `stamp embed --zarr` is writing" in text and "--wait" in text
        late = cli("stamp", *argv, "--out", str(tmp_path / "a.parquet"), "--wait", "1")
        assert "still busy after 1 s" in one_line_error(late)
    assert not (tmp_path / "a.parquet").exists()
    for store in stores(data):
        assert not (store / "obsm" / "X_stamp").exists() and not (store / "obsm" / "X_stamp.staging").exists()

    # two writers at once, both told to wait: they take turns, both succeed, nothing half-written
    env = {**os.environ, "COLUMNS": "250", "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "stamp.cli", *argv, "--out", str(tmp_path / f"{k}.parquet"),
                               "--wait", "600"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k in ("p", "q")]
    for p in procs:
        _, err = p.communicate(timeout=TIMEOUT)
        assert p.returncode == 0, err[-3000:]
    _check_stores(data, 64)
    a = np.stack(pq.read_table(tmp_path / "p.parquet").column("embedding").to_numpy(zero_copy_only=False))
    b = np.stack(pq.read_table(tmp_path / "q.parquet").column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(a, b)
    report = validate(data)
    assert report.ok, report.errors
    for store in stores(data):
        assert sorted(n for n in os.listdir(store / "obsm") if not n.startswith(".")) == ["X_stamp", "spatial"]


def test_validate_notices_missing_chunks_and_all_zero_embeddings(built, tmp_path):
    from spavis.shards.validate import validate

    from stamp.embed.genes import embed_corpus

    corpus, gene, _ = built
    data = _copy(corpus, tmp_path / "data")
    embed_corpus(gene, data, tmp_path / "e.parquet", zarr=True, device="cpu", progress=False)
    first, second = stores(data)
    chunk = next(p for p in sorted((first / "obsm" / "X_stamp").iterdir()) if not p.name.startswith("."))
    saved = chunk.read_bytes()
    chunk.unlink()
    errors = validate(data, deep=False).errors
    assert any("chunk files missing" in e and "X_stamp" in e for e in errors), errors
    chunk.write_bytes(saved)
    arr = zarr.open_array(str(second / "obsm" / "X_stamp"), mode="r+")
    arr[3] = 0
    errors = validate(data).errors
    assert any("1 of" in e and "all zeros" in e for e in errors), errors


# ------------------------------------------------------------------ 6. a bad patch is one line naming shard + row
def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _spoil_patches(corpus: Path) -> tuple[Path, str, str]:
    """Row 2 of the first paired part: truncated PNG; row 5: a 100 x 100 picture. Listed in the manifest
    (as a rebuild would), so only decoding finds them. Returns (part, bad spot, small spot)."""
    part = sorted((corpus / "data" / "paired").glob("*.parquet"))[0]
    table = pq.read_table(part)
    patches = table.column("patch").to_pylist()
    patches[2] = {"bytes": patches[2]["bytes"][: len(patches[2]["bytes"]) // 2], "path": None}
    patches[5] = {"bytes": _png(np.full((100, 100, 3), 120, np.uint8)), "path": None}
    table = table.set_column(table.schema.get_field_index("patch"), table.schema.field("patch"),
                             pa.array(patches, table.schema.field("patch").type))
    pq.write_table(table, part)
    paired = sorted((corpus / "data" / "paired").glob("*.parquet"))
    _list_in_manifest(corpus, paired)
    spots = table.column("spot_id").to_pylist()
    return part, spots[2], spots[5]


def test_corrupt_or_wrong_size_patch_is_one_line_naming_shard_and_row(built, tmp_path):
    corpus, gene, aligned = built
    data = _copy(corpus, tmp_path / "data")
    part, bad, small = _spoil_patches(data)

    full = cli("spavis", "validate", str(data), "--full")
    assert full.returncode == 1, full.stderr[-3000:]
    assert f"{part} row 2 (spot_id {bad}) patch" in full.stderr and "not a readable PNG" in full.stderr
    assert f"{part} row 5 (spot_id {small}) patch: 100 x 100 picture" in full.stderr

    emb = run("stamp", "embed", "--model", str(aligned), "--data", str(data), "--modality", "image",
              "--out", str(tmp_path / "i.parquet"), "--device", "cpu", "--no-progress")
    text = one_line_error(emb)
    assert f"{part} row 2 (spot_id {bad}) patch: not a readable PNG" in text and "validate --full" in text
    assert not (tmp_path / "i.parquet").exists()

    align = run("stamp", "pretrain", "--stage", "align", "--init", str(gene), "--vision", "tiny", "--data", str(data),
                "--out", str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "64", "--grad-accum", "1",
                "--warmup-steps", "1", "--no-progress", "--device", "cpu")
    text = one_line_error(align)
    assert str(part) in text and ("row 2" in text or "row 5" in text) and "spot_id" in text


# ------------------------------------------------------------------ 7 + 16-bit: one image-decoding path
def test_embed_images_any_image_encoder_16bit_rescaled_huge_refused_and_provenance(built, tmp_path):
    from PIL import Image

    from stamp.embed.writer import read_model_record

    corpus, gene, aligned = built
    folder = tmp_path / "tiles"
    folder.mkdir()
    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    Image.fromarray(ramp).save(folder / "a16.png")  # 16-bit grayscale (PIL mode I;16)
    eight = (ramp.astype(np.float64) * (255.0 / 65535)).astype(np.uint8)
    Image.fromarray(np.repeat(eight[:, :, None], 3, axis=2)).save(folder / "b8.png")
    Image.fromarray(np.full((64, 64, 3), 255, np.uint8)).save(folder / "c_white.png")
    out = tmp_path / "tiles.parquet"
    res = run("stamp", "embed", "--model", str(aligned), "--images", str(folder), "--out", str(out),
              "--device", "cpu", "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "DecompressionBomb" not in res.stderr and "Traceback" not in res.stderr
    table = pq.read_table(out)
    assert table.column("image").to_pylist() == ["a16.png", "b8.png", "c_white.png"]
    emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(emb[0], emb[1], atol=1e-5)  # rescaled like the 8-bit picture...
    assert not np.allclose(emb[0], emb[2], atol=1e-3)  # ...not clipped to white
    record = read_model_record(out)
    assert RECORD_KEYS <= set(record) and record["stamp_model"] == str(aligned)
    assert record["stamp_model_kind"] == "aligned" and record["stamp_embedding"] == "image"

    # the same pixels through build-shards' reader (spavis.images) and the paired cells (decode_image)
    from spavis.format.corpus import decode_image
    from spavis.images import WindowReader, open_image

    src = open_image(folder / "a16.png")
    np.testing.assert_array_equal(WindowReader(src).read(0, 64, 0, 64), np.repeat(eight[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(decode_image((folder / "a16.png").read_bytes())[..., 0], eight)

    Image.new("L", (20000, 20000)).save(folder / "huge.png", compress_level=1)
    res = cli("stamp", "embed", "--model", str(aligned), "--images", str(folder), "--out", str(tmp_path / "h.parquet"),
              "--device", "cpu", "--no-progress")
    text = one_line_error(res)
    assert "huge.png" in text and "megapixels" in text and "tiles" in text and "DecompressionBomb" not in res.stderr
    assert not (tmp_path / "h.parquet").exists()
    (folder / "huge.png").unlink()

    res = cli("stamp", "embed", "--model", str(gene), "--images", str(folder), "--out", str(tmp_path / "g.parquet"),
              "--device", "cpu", "--no-progress")
    assert "a gene encoder has no image side" in one_line_error(res)


# ------------------------------------------------------------------ issue 18: one writer, every file records its model
def test_every_embeddings_output_records_name_revision_and_license(built, tmp_path):
    from stamp.embed.genes import embed_corpus
    from stamp.embed.multimodal import embed_paired_corpus
    from stamp.embed.writer import read_model_record

    corpus, gene, aligned = built
    data = _copy(corpus, tmp_path / "data")
    outs = {
        "gene": embed_corpus(gene, data, tmp_path / "g.parquet", zarr=True, device="cpu", progress=False),
        "aligned-gene": embed_paired_corpus(aligned, data, tmp_path / "ag.parquet", modality="gene", device="cpu"),
        "fused": embed_paired_corpus(aligned, data, tmp_path / "f.parquet", modality="fused", device="cpu"),
    }
    for name, path in outs.items():
        record = read_model_record(path)
        assert RECORD_KEYS <= set(record), (name, record)
        assert record["stamp_model_license"] and len(record["stamp_model_sha256"]) == 64, (name, record)
    assert read_model_record(outs["fused"])["stamp_model_kind"] == "aligned"
    width = {k: len(pq.read_table(p).column("embedding")[0].as_py()) for k, p in outs.items()}
    assert width == {"gene": 64, "aligned-gene": 16, "fused": 32}
    attrs = dict(zarr.open_group(str(stores(data)[0]), mode="r")["obsm"]["X_stamp"].attrs)
    assert {k: attrs[k] for k in RECORD_KEYS} == {k: read_model_record(outs["gene"])[k] for k in RECORD_KEYS}
    assert json.loads(json.dumps(attrs))  # plain JSON attributes
