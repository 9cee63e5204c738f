"""The shard format as a standalone contract: import isolation, spavis.format.io, the size check
on open, the public per-file iterator, the one Space Ranger table, µm/px and the public API."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest

from spavis.errors import CorpusError, SpavisError, SpavisWarning, describe_os_error
from spavis.format import io as fio
from spavis.format import schema as S


def _python(code: str, *, umask: int | None = None) -> str:
    pre = f"import os; os.umask({umask:#o}); " if umask is not None else ""
    out = subprocess.run([sys.executable, "-c", pre + code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


# ----------------------------------------------------------------------------- isolation


def test_reading_the_format_loads_neither_fetch_nor_build():
    code = ("import spavis.corpus, spavis.format, sys; from spavis.format import open_corpus; "
            "print(sorted(m for m in sys.modules if m.startswith(('spavis.sources', 'spavis.shards', 'spavis.readers'))))")
    assert _python(code) == "[]"


def test_shared_modules_stay_light():
    """What both packages share (Hub reader, CLI kit, progress bars, manifest check) lives in spavis.format,
    which stamp may import; importing it loads neither fetch, build nor stamp, torch or huggingface_hub."""
    code = ("import sys, spavis.format.hub, spavis.format.console, spavis.format.progress, spavis.format.integrity; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'huggingface_hub', 'stamp') "
            "or m.startswith(('spavis.sources', 'spavis.shards', 'spavis.readers', 'spavis.genes'))))")
    assert _python(code) == "[]"


def test_io_module_is_standard_library_only():
    code = ("import spavis.format.io, sys; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pyarrow', 'scipy', 'numpy', 'pandas')))")
    assert _python(code) == "[]"


def _imports(module: str) -> set[str]:
    """Every spavis module a module's source imports (top level or inside functions)."""
    import ast
    import importlib.util

    tree = ast.parse(Path(importlib.util.find_spec(module).origin).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n.startswith("spavis")}


@pytest.mark.parametrize("a, b", [("spavis.genes.vocab", "spavis.genes.build_table"),
                                  ("spavis.sources.download", "spavis.sources.parallel")])
def test_former_import_cycles_are_broken(a, b):
    assert not (b in _imports(a) and a in _imports(b))


def test_public_api_lists_what_users_call():
    import spavis
    import stamp

    for name in ("read_slice", "build_shards", "open_corpus", "Corpus", "fetch", "validate"):
        assert name in spavis.__all__ and name in dir(spavis)
    for name in ("GeneTokenizer", "StampGeneEncoder", "create_model", "pretrain", "embed_corpus", "StampModel"):
        assert name in stamp.__all__ and name in dir(stamp)
    assert callable(spavis.open_corpus) and spavis.Corpus.__name__ == "Corpus"
    with pytest.raises(AttributeError):
        spavis.not_a_name  # noqa: B018


def test_every_spavis_error_class_lives_in_errors():
    import spavis.errors as E
    from spavis.format.corpus import CorpusError as C1
    from spavis.genes.vocab import VocabularyError
    from spavis.manifests import ManifestError
    from spavis.sources.archive import UnsafeArchiveError

    assert C1 is E.CorpusError and VocabularyError is E.VocabularyError
    assert ManifestError is E.ManifestError and UnsafeArchiveError is E.UnsafeArchiveError
    for name in E.__all__:
        obj = getattr(E, name)
        if isinstance(obj, type) and issubclass(obj, Exception) and not issubclass(obj, Warning):
            assert issubclass(obj, SpavisError), name


# ----------------------------------------------------------------------------- io


@pytest.mark.parametrize("umask", [0o002, 0o022, 0o077])
def test_atomic_writes_follow_the_umask(tmp_path, umask):
    code = (f"from spavis.format import io; io.atomic_write_json({str(tmp_path / 'a.json')!r}, {{'x': 1}}); "
            f"d = io.make_temp_dir({str(tmp_path / 'pub')!r}); io.atomic_write_text(d / 't.txt', 'hi'); "
            f"io.publish_dir(d, {str(tmp_path / 'pub')!r}); print(io.current_umask())")
    assert int(_python(code, umask=umask)) == umask
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "pub").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "pub" / "t.txt").stat().st_mode) == 0o666 & ~umask
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}


def test_apply_umask_repairs_tempfile_modes(tmp_path):
    fd, name = tempfile.mkstemp(dir=tmp_path)
    os.close(fd)
    d = tempfile.mkdtemp(dir=tmp_path)
    assert stat.S_IMODE(os.stat(name).st_mode) == 0o600
    fio.apply_umask(name)
    fio.apply_umask(d)
    assert stat.S_IMODE(os.stat(name).st_mode) == fio.file_mode()
    assert stat.S_IMODE(os.stat(d).st_mode) == fio.dir_mode()


def test_failed_atomic_write_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "f.txt"
    fio.atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with fio.atomic_open(target, "w") as fh:
            fh.write("half")
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_failed_staged_folder_leaves_nothing_and_publish_replaces(tmp_path):
    final = tmp_path / "out"
    with fio.atomic_dir(final) as d:
        (d / "a").write_text("1")
    with pytest.raises(ValueError):
        with fio.atomic_dir(final) as d:
            (d / "b").write_text("2")
            raise ValueError
    assert sorted(p.name for p in final.iterdir()) == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with fio.atomic_dir(final) as d:
        (d / "c").write_text("3")
    assert sorted(p.name for p in final.iterdir()) == ["c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_hashes(tmp_path):
    data = os.urandom(3 << 20)
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "x.bin").write_bytes(data)
    (tmp_path / "t" / ".zmetadata").write_text("{}")
    assert fio.sha256_file(tmp_path / "t" / "x.bin") == hashlib.sha256(data).hexdigest()
    md5, sha = fio.hash_file(tmp_path / "t" / "x.bin", hashlib.md5(), hashlib.sha256())
    assert md5 == hashlib.md5(data).hexdigest() and sha == hashlib.sha256(data).hexdigest()
    all_files, n_all = fio.tree_sha256(tmp_path / "t")
    built, n_built = fio.tree_sha256(tmp_path / "t", include=S.zarr_build_file)
    assert (n_all, n_built) == (2, 1) and all_files != built
    line = f"x.bin\t{hashlib.sha256(data).hexdigest()}\n"
    assert built == hashlib.sha256(line.encode()).hexdigest()


def test_describe_os_error_wording():
    full = OSError(errno.ENOSPC, "No space left on device", "/data/out/x.parquet")
    assert describe_os_error(full) == ("/data/out/x.parquet: no space left on the device; free some space or "
                                       "choose another location (output folder, --work-dir, $SPAVIS_CACHE, $TMPDIR).")
    denied = PermissionError(errno.EACCES, "Permission denied", "/ro")
    assert describe_os_error(denied, action="write").startswith("/ro: permission denied;")
    # pyarrow-style: the errno only in the text, wrapped in another exception
    try:
        try:
            raise OSError("Error writing bytes to file. Detail: [errno 122] Disk quota exceeded")
        except OSError as inner:
            raise RuntimeError("write failed") from inner
    except RuntimeError as outer:
        assert "disk quota exceeded" in describe_os_error(outer)
    assert describe_os_error(ValueError("not an OS problem")) is None


# ----------------------------------------------------------------------------- geometry


def test_pixel_scale_methods():
    from spavis.neighbors import lattice_to_um, pixel_scale

    rows, cols = np.meshgrid(np.arange(6), np.arange(0, 24, 2))
    cols = cols + (rows % 2)  # Visium odd rows are shifted by one column
    ar, ac = rows.ravel(), cols.ravel()
    um = lattice_to_um(ar, ac)
    true = 0.5  # µm per pixel
    px = um / true
    pr, pc = px[:, 1], px[:, 0]
    assert pixel_scale(pr, pc, ar, ac, S.SPACERANGER_SPOT_DIAMETER_UM / true) == pytest.approx((true, "scalefactors"))
    got, how = pixel_scale(pr, pc, ar, ac, None)
    assert how == "lattice" and got == pytest.approx(true, rel=1e-6)
    got, how = pixel_scale(pr, pc, None, None, float("nan"))
    assert how == "spot-spacing" and got == pytest.approx(true, rel=1e-6)
    assert pixel_scale(None, None, ar, ac, 90.0) == (None, None)


def test_qc_flags_counts_float32_cannot_hold(tmp_path):
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    from spavis.qc import apply_qc

    X = sp.csr_matrix(np.array([[2.0**24 + 2, 3.0], [1.0, 5.0]], np.float32))
    a = ad.AnnData(X=X, obs=pd.DataFrame({"in_tissue": [True, True]}, index=["a", "b"]))
    with pytest.warns(SpavisWarning, match="2\\^24"):
        res = apply_qc(a, X, min_genes=1, slice_name="s")
    assert res.counts_exceed_float32 and res.max_count >= 2**24
    small = apply_qc(a, sp.csr_matrix(np.ones((2, 2), np.float32)), min_genes=1, slice_name="s")
    assert not small.counts_exceed_float32 and small.max_count == 1.0


def test_qc_says_when_no_spot_is_in_tissue():
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    from spavis.qc import apply_qc

    X = sp.csr_matrix(np.ones((3, 4), np.float32))
    a = ad.AnnData(X=X, obs=pd.DataFrame({"in_tissue": [False] * 3}, index=list("abc")))
    res = apply_qc(a, X, min_genes=1, slice_name="s")
    assert res.n_spots_kept == 0
    assert any("no spot is marked in tissue" in w for w in res.warnings)
    assert not any("--min-genes" in w for w in res.warnings)


# ----------------------------------------------------------------------------- Space Ranger table


def test_one_space_ranger_table_drives_readers_and_fetch():
    from spavis import spaceranger as SR
    from spavis.readers._find import classify
    from spavis.sources.visium import role_of

    visium_role = {"h5": "h5", "mtx": "matrix", "barcodes": "barcodes", "features": "features",
                   "positions": "positions", "scalefactors": "scalefactors", "lowres": "lowres", "hires": "hires"}
    for role, names in SR.FILES.items():
        for name in names:
            prefixed = f"GSM1_A1_{name}.gz"
            if role != "hires":
                assert classify(Path(prefixed)).kind == role
            if name.endswith(".jpg") or name in (SR.LEGACY_MATRIX_H5,):
                continue
            expected = "h5_raw" if name == SR.RAW_MATRIX_H5 else visium_role[role]
            assert role_of(prefixed) == expected, name


# ----------------------------------------------------------------------------- corpus contract


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    from spavis.shards import build_shards
    from spavis.simulate import write_simulated_slice

    root = tmp_path_factory.mktemp("fmt")
    for i in range(2):
        write_simulated_slice(root / "in" / f"s{i}", slide_id=f"s{i}", seed=i, max_row=8, median_umis=800)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SpavisWarning)
        return build_shards([root / "in"], root / "corpus", min_genes=10, max_spots_per_shard=300)


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "c"
    shutil.copytree(src, dst)
    return dst


def test_slides_record_um_per_px_once(small_corpus):
    from spavis.format import open_corpus

    slides = open_corpus(small_corpus).slides
    for name in ("um_per_px", "um_per_px_method", "max_count", "counts_exceed_float32", "warnings"):
        assert name in slides.columns
    sf = json.loads((small_corpus.parent / "in" / "s0" / "spatial" / S_SCALEFACTORS()).read_text())
    row = slides.set_index("slide_id").loc["s0"]
    assert row["um_per_px_method"] == "scalefactors"
    assert row["um_per_px"] == pytest.approx(S.SPACERANGER_SPOT_DIAMETER_UM / sf["spot_diameter_fullres"])
    assert not row["counts_exceed_float32"] and row["max_count"] > 0


def S_SCALEFACTORS() -> str:
    from spavis.spaceranger import SCALEFACTORS

    return SCALEFACTORS


def test_open_checks_listed_files(small_corpus, tmp_path):
    from spavis.format import open_corpus

    c = _copy(small_corpus, tmp_path)
    corpus = open_corpus(c)
    shards = corpus.expression_files
    assert len(shards) == 2
    Path(shards[1]).unlink()
    with pytest.raises(CorpusError, match=r"part-00001\.parquet: listed in manifest\.json but missing"):
        open_corpus(c).expression_files
    (c / S.SLIDES_FILE).write_bytes((c / S.SLIDES_FILE).read_bytes() + b"x")
    with pytest.raises(CorpusError, match=r"slides\.parquet: \d+ bytes, manifest\.json says"):
        open_corpus(c)


def test_stray_shard_is_one_error(small_corpus, tmp_path):
    from spavis.format import open_corpus

    c = _copy(small_corpus, tmp_path)
    shutil.copy(c / S.EXPRESSION_DIR / "part-00000.parquet", c / S.EXPRESSION_DIR / "part-00009.parquet")
    with pytest.raises(CorpusError, match=r"part-00009\.parquet: not listed in manifest\.json"):
        open_corpus(c).expression_files


def test_corrupt_shard_of_the_right_size_is_one_error(small_corpus, tmp_path):
    from spavis.format import iter_file_slides, open_corpus
    from spavis.shards.validate import validate

    c = _copy(small_corpus, tmp_path)
    shard = c / S.EXPRESSION_DIR / "part-00000.parquet"
    raw = bytearray(shard.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 2048] = bytes(2048)
    shard.write_bytes(bytes(raw))
    corpus = open_corpus(c)  # same size: the cheap check passes, reading fails cleanly
    with pytest.raises(CorpusError, match=r"part-00000\.parquet: not a readable Parquet file"):
        for _ in corpus.iter_slides():
            pass
    with pytest.raises(CorpusError):
        list(iter_file_slides(shard))
    report = validate(c)
    assert not report.ok and any("part-00000.parquet" in e for e in report.errors)


def test_iter_file_slides_is_public_and_matches_iter_slides(small_corpus):
    from spavis.format import iter_file_slides, open_corpus

    corpus = open_corpus(small_corpus)
    per_file = [t for f in corpus.expression_files for t in iter_file_slides(f, columns=["spot_index"])]
    whole = list(corpus.iter_slides(columns=["spot_index"]))
    assert [t.num_rows for t in per_file] == [t.num_rows for t in whole]
    assert {t.column("slide_id")[0].as_py() for t in per_file} == {"s0", "s1"}
    only = list(iter_file_slides(corpus.expression_files[0], slide_ids=["s1"]))
    assert all(t.column("slide_id")[0].as_py() == "s1" for t in only)


def test_layering_stamp_reads_spavis_only_through_format_and_errors():
    """stamp may import spavis.format(.*) and spavis.errors only; spavis never imports stamp."""
    import ast

    root = Path(__file__).resolve().parents[1]
    bad = []
    for pkg, allowed in (("stamp", ("spavis.format", "spavis.errors")), ("spavis", ())):
        for path in sorted((root / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level
                         else [])
                for name in names:
                    other = "spavis" if pkg == "stamp" else "stamp"
                    if (name == other or name.startswith(other + ".")) and not name.startswith(allowed or ("\0",)):
                        bad.append(f"{path.relative_to(root)}: imports {name}")
    assert bad == []
