"""`spavis build-shards` / `spavis validate` run as a user would (the installed console script).

Every bad input is derived from the REAL human heart fixture (or is the real mouse fixture)
and must give exit code 1, exactly one ``error:`` line naming the offending file or slice
and the fix, no traceback, and nothing left next to ``--out``. Expected values in the
positive duplicated-gene case come from h5py + numpy on the input, not from spavis.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from fakes.slices import H5_NAME, copy_slice, edit_matrix, empty_matrix, flip_byte, read_matrix, truncate

SPAVIS = Path(sys.executable).with_name("spavis")
HEART = "human_heart_v1_subsample"
# a message "says the fix" when it tells the user what to do next
FIX = re.compile(r"\b(check|(re-?)?download|compare|re-?export|fetch|use|pass|remove|drop|replace|make sure|"
                 r"rebuild|re-?run|choose|give|provide|fix|convert|point|keep|select|lower|add|"
                 r"deduplicate|rename|split)\b", re.I)


def spavis(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{SPAVIS.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run(["spavis", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=180)


def build(inputs: list[Path], out: Path) -> subprocess.CompletedProcess:
    return spavis("build-shards", *inputs, "--out", out, "--min-genes", "1", "--workers", "1", "--quiet",
                  cwd=out.parent)


def error_line(res: subprocess.CompletedProcess, *, one_line: bool = True) -> str:
    """The message of a cleanly failed command: exit 1, one `error:` line, a fix, no traceback.

    ``one_line=False`` allows a multi-line message after the single `error:` prefix
    (`spavis validate` lists its problems one per line).
    """
    both = res.stdout + res.stderr
    assert res.returncode == 1, both
    assert "Traceback" not in both, both
    lines = [ln for ln in res.stderr.splitlines() if "error" in ln.lower()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "error" not in res.stdout.lower(), res.stdout
    if one_line:
        msg = lines[0][len("error: "):]
    else:
        msg = res.stderr[res.stderr.index("error: ") + len("error: "):]
    print(msg)  # shown by pytest when a later assertion fails
    assert FIX.search(msg), f"no fix suggested: {msg}"
    return msg


@pytest.fixture
def dirs(tmp_path):
    """inputs/ for derived slices; run/ holds only --out, so anything else left there is a leak."""
    (tmp_path / "inputs").mkdir()
    (tmp_path / "run").mkdir()
    return tmp_path / "inputs", tmp_path / "run"


@pytest.fixture(scope="module")
def heart(real_data) -> Path:
    return real_data / "visium" / HEART


def assert_no_output(run: Path) -> None:
    left = sorted(p.name for p in run.iterdir())
    assert left == [], f"left behind after a failed build: {left}"


def bad_slice(heart: Path, inputs: Path, name: str) -> Path:
    return copy_slice(heart, inputs / name)


# ------------------------------------------------------------------ bad inputs


def test_truncated_h5(heart, dirs):
    inputs, run = dirs
    s = bad_slice(heart, inputs, "heart_truncated")
    truncate(s / H5_NAME, 0.5)
    msg = error_line(build([s], run / "corpus"))
    assert H5_NAME in msg and "heart_truncated" in msg
    assert re.search(r"truncated|corrupt", msg, re.I)
    assert_no_output(run)


def test_positions_only_for_unknown_barcodes(heart, dirs):
    inputs, run = dirs
    s = bad_slice(heart, inputs, "heart_wrong_positions")
    pos = s / "spatial" / "tissue_positions_list.csv"
    lines = pos.read_text().splitlines()
    matrix_barcodes = set(read_matrix(s / H5_NAME).barcodes)
    # a real positions file of another sample: same lattice, barcodes the matrix does not have
    foreign = ["TTTTTTTT" + "".join("ACGT"[(i >> 2 * k) & 3] for k in range(8)) + "-1" for i in range(len(lines))]
    cores = {b.split("-")[0] for b in matrix_barcodes}
    assert not {b.split("-")[0] for b in foreign} & cores and len(set(foreign)) == len(lines)
    pos.write_text("".join(f"{bc},{ln.split(',', 1)[1]}\n" for bc, ln in zip(foreign, lines)))
    msg = error_line(build([s], run / "corpus"))
    assert "tissue_positions_list.csv" in msg and "heart_wrong_positions" in msg
    assert_no_output(run)


def test_negative_counts(heart, dirs):
    inputs, run = dirs
    s = bad_slice(heart, inputs, "heart_negative")
    m = read_matrix(s / H5_NAME)
    data = m.data.copy()
    data[::9] *= -1  # 73 of 656 stored values negated
    edit_matrix(s / H5_NAME, data=data)
    msg = error_line(build([s], run / "corpus"))
    assert "heart_negative" in msg and re.search(r"negative", msg, re.I)
    assert_no_output(run)


def test_nan_counts(heart, dirs):
    inputs, run = dirs
    s = bad_slice(heart, inputs, "heart_nan")
    m = read_matrix(s / H5_NAME)
    data = m.data.astype(np.float32)
    data[[3, 100, 500]] = np.nan
    edit_matrix(s / H5_NAME, data=data, data_dtype=np.float32)
    msg = error_line(build([s], run / "corpus"))
    assert "heart_nan" in msg and re.search(r"\bNaN\b|not finite|non-finite", msg, re.I)
    assert_no_output(run)


def test_empty_matrix(heart, dirs):
    inputs, run = dirs
    s = bad_slice(heart, inputs, "heart_empty")
    empty_matrix(s / H5_NAME)
    assert read_matrix(s / H5_NAME).shape == (100, 0)
    msg = error_line(build([s], run / "corpus"))
    assert "heart_empty" in msg and re.search(r"empty|no spots|0 spots|no barcodes|0 barcodes", msg, re.I)
    assert_no_output(run)


def test_mouse_is_not_human(real_data, dirs):
    _, run = dirs
    mouse = real_data / "visium" / "mouse_brain_v1_subset"
    msg = error_line(build([mouse], run / "corpus"))
    assert "mouse_brain_v1_subset" in msg and re.search(r"not human", msg, re.I)
    assert_no_output(run)


def test_missing_path(dirs):
    inputs, run = dirs
    missing = inputs / "no_such_slice"
    msg = error_line(build([missing], run / "corpus"))
    assert "no_such_slice" in msg and re.search(r"does not exist|no such", msg, re.I)
    assert_no_output(run)


def test_corrupt_h5ad(heart, dirs):
    import anndata as ad
    import scipy.sparse as sp

    inputs, run = dirs
    m = read_matrix(heart / H5_NAME)
    X = sp.csc_matrix((m.data, m.indices, m.indptr), shape=m.shape).T.tocsr()
    a = ad.AnnData(X=X)
    a.obs_names, a.var_names = m.barcodes, m.ids
    path = inputs / "heart_corrupt.h5ad"
    a.write_h5ad(path)
    truncate(path, 0.6)
    msg = error_line(build([path], run / "corpus"))
    assert "heart_corrupt.h5ad" in msg and re.search(r"truncated|corrupt|not .*h5ad|cannot read", msg, re.I)
    assert_no_output(run)


def test_duplicated_barcodes(heart, dirs):
    inputs, run = dirs
    s = bad_slice(heart, inputs, "heart_dup_barcodes")
    barcodes = read_matrix(s / H5_NAME).barcodes
    barcodes[7] = barcodes[3]
    edit_matrix(s / H5_NAME, barcodes=barcodes)
    msg = error_line(build([s], run / "corpus"))
    assert "heart_dup_barcodes" in msg and re.search(r"duplicat", msg, re.I)
    assert barcodes[3] in msg or H5_NAME in msg
    assert_no_output(run)


# ------------------------------------------------ duplicated genes: summed, not an error


def _positions_in_tissue(path: Path) -> dict[str, bool]:
    """barcode -> in_tissue from a headerless Space Ranger tissue_positions_list.csv."""
    rows = (ln.split(",") for ln in path.read_text().splitlines() if ln)
    return {r[0]: r[1].strip() == "1" for r in rows}


@pytest.fixture(scope="module")
def dup_genes(heart, tmp_path_factory):
    """The heart slice with one out-of-vocabulary feature relabelled to an in-vocabulary gene's id."""
    from spavis.genes import load_vocabulary  # reference data only: the pinned stamp-v1 id list

    root = tmp_path_factory.mktemp("dup_genes")
    s = copy_slice(heart, root / "inputs" / "heart_dup_genes")
    m = read_matrix(s / H5_NAME)
    vocab_ids = set(load_vocabulary("stamp-v1").ensembl_ids)
    dense = m.dense()
    in_vocab = np.array([g in vocab_ids for g in m.ids])
    nz = dense > 0
    i = int(np.argmax(np.where(in_vocab, nz.sum(axis=0), -1)))  # the most detected vocabulary gene
    overlap = (nz & nz[:, [i]]).sum(axis=0)
    j = int(np.argmax(np.where(~in_vocab, overlap, -1)))  # a non-vocabulary feature sharing its spots
    assert in_vocab[i] and not in_vocab[j] and overlap[j] > 0
    ids, names = list(m.ids), list(m.names)
    ids[j], names[j] = ids[i], names[i]
    edit_matrix(s / H5_NAME, ids=ids, names=names)

    out = root / "run" / "corpus"
    out.parent.mkdir()
    res = build([s], out)
    assert res.returncode == 0, res.stdout + res.stderr
    return {"slice": s, "out": out, "gene": ids[i], "i": i, "j": j, "vocab_ids": vocab_ids,
            "n_in_vocab_before": int(in_vocab.sum())}


def test_duplicated_gene_columns_are_summed(dup_genes):
    s, out, gene = dup_genes["slice"], dup_genes["out"], dup_genes["gene"]
    m = read_matrix(s / H5_NAME)
    dense = m.dense()  # barcodes x features, straight from the edited file
    assert m.ids.count(gene) == 2
    genes = pq.read_table(out / "genes.parquet").to_pandas()
    vocab_index = {g: k for k, g in enumerate(genes["ensembl_id"])}
    # expected spots x vocabulary: every in-vocabulary feature added into its gene's column
    expected = np.zeros((dense.shape[0], len(genes)))
    for col, gid in enumerate(m.ids):
        if gid in vocab_index:
            expected[:, vocab_index[gid]] += dense[:, col]
    np.testing.assert_array_equal(expected[:, vocab_index[gene]],
                                  dense[:, dup_genes["i"]] + dense[:, dup_genes["j"]])
    tissue = _positions_in_tissue(s / "spatial" / "tissue_positions_list.csv")
    keep = np.array([tissue[b] for b in m.barcodes]) & ((expected > 0).sum(axis=1) >= 1)
    row_of = {b: r for r, b in enumerate(m.barcodes)}

    rows = pq.read_table(out / "data" / "expression").to_pylist()
    assert [r["barcode"] for r in rows] and {r["barcode"] for r in rows} == {b for b, k in zip(m.barcodes, keep) if k}
    g = vocab_index[gene]
    seen_summed = 0
    for r in rows:
        want = expected[row_of[r["barcode"]]]
        nzc = np.flatnonzero(want)
        assert r["gene_index"] == nzc.tolist()
        np.testing.assert_array_equal(np.asarray(r["counts"], dtype=np.float64), want[nzc].astype(np.float32))
        seen_summed += want[g] > dense[row_of[r["barcode"]], dup_genes["i"]]
    assert seen_summed > 0  # some kept spots really carry counts from both columns

    kept = expected[keep]
    row = genes.iloc[g]
    assert row["nnz"] == (kept[:, g] > 0).sum()
    assert row["nonzero_sum_raw"] == pytest.approx(kept[:, g].sum(), rel=1e-12)

    slide = pq.read_table(out / "slides.parquet").to_pylist()[0]
    n_in_vocab = sum(gid in dup_genes["vocab_ids"] for gid in m.ids)
    assert n_in_vocab == dup_genes["n_in_vocab_before"] + 1
    assert slide["mapping_n_features"] == len(m.ids)
    assert slide["mapping_in_vocab"] == n_in_vocab
    assert (slide["mapping_in_vocab"] + slide["mapping_not_in_vocab"] + slide["mapping_unknown"]
            + slide["mapping_ambiguous"]) == len(m.ids)
    report = json.loads((out / "manifest.json").read_text())["slides"][0]["mapping_report"]
    assert report["n_summed"] == 1 and report["n_vocab_genes"] == len({x for x in m.ids if x in vocab_index})


# ------------------------------------------------------------ validate on a tampered corpus


def test_validate_names_the_tampered_file(dup_genes, tmp_path):
    out = dup_genes["out"]
    ok = spavis("validate", out, cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr  # the untouched corpus is valid

    flipped = shutil.copytree(out, tmp_path / "flipped")
    part = sorted((flipped / "data" / "expression").glob("*.parquet"))[0]
    flip_byte(part)
    msg = error_line(spavis("validate", flipped, cwd=tmp_path), one_line=False)
    assert part.name in msg

    chunkless = shutil.copytree(out, tmp_path / "chunkless")
    store = next((chunkless / "zarr").glob("*.zarr"))
    chunk = next(p for p in sorted((store / "X" / "data").rglob("*"))
                 if p.is_file() and not p.name.startswith(".") and p.name != "zarr.json")
    chunk.unlink()
    msg = error_line(spavis("validate", chunkless, cwd=tmp_path), one_line=False)
    assert store.name in msg
