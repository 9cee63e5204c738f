"""safe_extract refuses every classic tar attack before writing anything."""
from __future__ import annotations

import io
import tarfile

import pytest

from spavis.errors import FetchError
from spavis.sources.archive import UnsafeArchiveError, list_members, safe_extract


def _tar(path, members):
    with tarfile.open(path, "w") as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name, data=b"x"):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _special(name, kind, link=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info, None


def test_extracts_only_requested_members(tmp_path):
    tar = _tar(tmp_path / "a.tar", [_file("GSM1_a.h5", b"one"), _file("GSM2_b.h5", b"two"),
                                    _file("sub/GSM1_c.csv.gz", b"three")])
    out = safe_extract(tar, tmp_path / "out", members=["GSM1_a.h5", "sub/GSM1_c.csv.gz"], flatten=True)
    assert sorted(p.name for p in out) == ["GSM1_a.h5", "GSM1_c.csv.gz"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["GSM1_a.h5", "GSM1_c.csv.gz"]
    assert (tmp_path / "out" / "GSM1_c.csv.gz").read_bytes() == b"three"
    assert list_members(tar) == ["GSM1_a.h5", "GSM2_b.h5", "sub/GSM1_c.csv.gz"]


@pytest.mark.parametrize("member, pattern", [
    (_file("/etc/evil"), "absolute path"),
    (_file("../evil"), r"outside the folder"),
    (_file("a/../../evil"), r"outside the folder"),
    (_special("link", tarfile.SYMTYPE, "/etc/passwd"), "is a link"),
    (_special("hard", tarfile.LNKTYPE, "GSM1_a.h5"), "is a link"),
    (_special("dev", tarfile.CHRTYPE), "device"),
    (_special("fifo", tarfile.FIFOTYPE), "device"),
])
def test_attacks_are_refused_and_nothing_is_written(tmp_path, member, pattern):
    tar = _tar(tmp_path / "a.tar", [_file("GSM1_a.h5"), member])
    with pytest.raises(UnsafeArchiveError, match=pattern):
        safe_extract(tar, tmp_path / "out")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    assert not (tmp_path / "evil").exists()


def test_size_cap(tmp_path):
    tar = _tar(tmp_path / "a.tar", [_file("big", b"0" * 5000), _file("small", b"1")])
    with pytest.raises(UnsafeArchiveError, match="over the 4096-byte cap"):
        safe_extract(tar, tmp_path / "out", max_bytes=4096)
    assert safe_extract(tar, tmp_path / "out", members=["small"], max_bytes=4096)[0].read_bytes() == b"1"


def test_missing_member_and_corrupt_archive(tmp_path):
    tar = _tar(tmp_path / "a.tar", [_file("GSM1_a.h5")])
    with pytest.raises(FetchError, match="missing member"):
        safe_extract(tar, tmp_path / "out", members=["nope"])
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(FetchError, match="not a readable tar"):
        safe_extract(bad, tmp_path / "out")


def _zip(path, entries):
    """entries: (name, data, unix mode or None)."""
    import zipfile

    with zipfile.ZipFile(path, "w") as zf:
        for name, data, mode in entries:
            info = zipfile.ZipInfo(name, (1980, 1, 1, 0, 0, 0))
            if mode is not None:
                info.external_attr = mode << 16
            zf.writestr(info, data)
    return path


def test_zip_extracts_selected_members_to_mapped_paths(tmp_path):
    z = _zip(tmp_path / "a.zip", [("outs/spatial/tissue_positions.csv", b"pos", None),
                                  ("outs/spatial/aligned_fiducials.jpg", b"jpg", 0o100644),
                                  ("outs/", b"", 0o040755)])
    assert list_members(z) == ["outs/spatial/tissue_positions.csv", "outs/spatial/aligned_fiducials.jpg"]
    out = safe_extract(z, tmp_path / "out", members={"outs/spatial/tissue_positions.csv": "spatial/tissue_positions.csv"})
    assert [p.relative_to(tmp_path / "out").as_posix() for p in out] == ["spatial/tissue_positions.csv"]
    assert out[0].read_bytes() == b"pos"


@pytest.mark.parametrize("name, mode, pattern", [
    ("/etc/evil", None, "absolute path"),
    ("../evil", None, "outside the folder"),
    ("a/../../evil", None, "outside the folder"),
    ("link", 0o120777, "is a link"),
    ("fifo", 0o010644, "device"),
])
def test_zip_attacks_are_refused_and_nothing_is_written(tmp_path, name, mode, pattern):
    z = _zip(tmp_path / "a.zip", [("GSM1_a.h5", b"x", None), (name, b"/etc/passwd", mode)])
    with pytest.raises(UnsafeArchiveError, match=pattern):
        safe_extract(z, tmp_path / "out")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    assert not (tmp_path / "evil").exists()


def test_zip_size_cap_and_lying_header(tmp_path):
    z = _zip(tmp_path / "a.zip", [("big", b"0" * 5000, None), ("small", b"1", None)])
    with pytest.raises(UnsafeArchiveError, match="over the 4096-byte cap"):
        safe_extract(z, tmp_path / "out", max_bytes=4096)
    # A mapped target may not escape either.
    with pytest.raises(UnsafeArchiveError, match="outside the folder"):
        safe_extract(z, tmp_path / "out", members={"small": "../small"})


def test_tar_gz_is_read_like_tar(tmp_path):
    tar = tmp_path / "a.tar.gz"
    with tarfile.open(tar, "w:gz") as tf:
        info, data = _file("spatial/scalefactors_json.json", b"{}")
        tf.addfile(info, io.BytesIO(data))
    assert safe_extract(tar, tmp_path / "out", flatten=True)[0].read_bytes() == b"{}"
