"""The one downloader against a loopback server with injected faults.

After every fault the destination holds either the verified file or nothing, and the
error names the accession, the URL and the fix.
"""
from __future__ import annotations

import errno
import hashlib
import os
import threading
import time

import pytest
import requests

from fakes.http import Fault, FileServer
from spavis.errors import FetchError
from spavis.sources import download
from spavis.sources.download import RetryPolicy, fetch_file

FAST = RetryPolicy(attempts=4, backoff=0.01, max_backoff=0.05, max_wait=0.5, timeout=5)
DATA = os.urandom(3 * 1024 * 1024 + 123)  # > 3 chunks so drops land mid-file
SHA = hashlib.sha256(DATA).hexdigest()
MD5 = hashlib.md5(DATA).hexdigest()


@pytest.fixture
def srv():
    with FileServer() as s:
        s.add("/geo/x.h5", DATA)
        yield s


def _only_verified(dest):
    """The cache holds the verified file or nothing under the final name; no temp leftovers."""
    if dest.exists():
        assert hashlib.sha256(dest.read_bytes()).hexdigest() == SHA
    leftovers = [p.name for p in dest.parent.iterdir() if p.name not in (dest.name, dest.name + ".part")]
    assert leftovers == []


def test_plain_download_records_sha_and_md5(srv, tmp_path):
    dest = tmp_path / "x.h5"
    rec = fetch_file(srv.url + "/geo/x.h5", dest, md5=MD5, policy=FAST)
    assert rec.sha256 == SHA and rec.md5 == MD5 and rec.size == len(DATA) and not rec.skipped
    assert dest.read_bytes() == DATA
    assert not (tmp_path / "x.h5.part").exists()


def test_drop_mid_file_resumes_with_range(srv, tmp_path):
    srv.inject("/geo/x.h5", Fault.drop(after=1_500_000))
    dest = tmp_path / "x.h5"
    rec = fetch_file(srv.url + "/geo/x.h5", dest, sha256=SHA, policy=FAST)
    assert rec.sha256 == SHA
    gets = srv.gets("/geo/x.h5")
    assert len(gets) == 2 and gets[0].range is None
    start = int(gets[1].range.split("=")[1].rstrip("-"))
    assert 0 < start <= 1_500_000  # resumed, did not start over
    _only_verified(dest)


def test_503_then_success_honours_retry_after(srv, tmp_path):
    srv.inject("/geo/x.h5", Fault.http(503, retry_after="0.3"))
    t0 = time.monotonic()
    fetch_file(srv.url + "/geo/x.h5", tmp_path / "x.h5", policy=FAST)
    assert time.monotonic() - t0 >= 0.3
    assert len(srv.gets("/geo/x.h5")) == 2


def test_429_retry_after_is_bounded_by_max_wait(srv, tmp_path, monkeypatch):
    srv.inject("/geo/x.h5", Fault.http(429, retry_after="3600"))
    waits: list[float] = []  # the waits asked for (not wall time: that depends on the machine's load)
    real_sleep = time.sleep
    monkeypatch.setattr(time, "sleep", lambda s: (waits.append(s), real_sleep(min(s, 0.5)))[1])
    fetch_file(srv.url + "/geo/x.h5", tmp_path / "x.h5", policy=FAST)
    assert waits and max(waits) <= 0.5  # capped by max_wait=0.5, not an hour


def test_persistent_5xx_gives_up_with_clear_message(srv, tmp_path):
    srv.inject("/geo/x.h5", *[Fault.http(502)] * 10)
    dest = tmp_path / "x.h5"
    with pytest.raises(FetchError, match=r"GSM1: .*x\.h5 failed after 4 attempts \(HTTP 502\)"):
        fetch_file(srv.url + "/geo/x.h5", dest, policy=FAST, label="GSM1")
    assert not dest.exists()
    _only_verified(dest)


def test_truncated_body_is_detected_by_expected_size(srv, tmp_path):
    srv.inject("/geo/x.h5", Fault.truncate(1000), Fault.truncate(1000))
    dest = tmp_path / "x.h5"
    with pytest.raises(FetchError, match="mismatch.*expected %d.*removed" % len(DATA)):
        fetch_file(srv.url + "/geo/x.h5", dest, size=len(DATA), policy=FAST)
    assert not dest.exists() and not (tmp_path / "x.h5.part").exists()


def test_truncated_once_then_good_recovers(srv, tmp_path):
    srv.inject("/geo/x.h5", Fault.truncate(1000))
    dest = tmp_path / "x.h5"
    fetch_file(srv.url + "/geo/x.h5", dest, sha256=SHA, policy=FAST)
    _only_verified(dest)
    assert dest.exists()


def test_wrong_content_fails_md5_and_leaves_nothing(srv, tmp_path):
    srv.inject("/geo/x.h5", Fault.corrupt(), Fault.corrupt())
    dest = tmp_path / "x.h5"
    with pytest.raises(FetchError, match="md5 .* expected %s" % MD5):
        fetch_file(srv.url + "/geo/x.h5", dest, md5=MD5, policy=FAST)
    assert list(tmp_path.iterdir()) == []


def test_404_names_accession_and_url(srv, tmp_path):
    url = srv.url + "/geo/missing.h5"
    with pytest.raises(FetchError, match=r"GSM42: .*missing\.h5 was not found \(HTTP 404\)"):
        fetch_file(url, tmp_path / "m.h5", policy=FAST, label="GSM42")
    assert list(tmp_path.iterdir()) == []
    assert len(srv.gets("/geo/missing.h5")) == 1  # no pointless retries


@pytest.mark.parametrize("status", [401, 403])
def test_forbidden_says_gated(srv, tmp_path, status):
    srv.inject("/geo/x.h5", Fault.http(status))
    with pytest.raises(FetchError, match=f"forbidden \\(HTTP {status}\\).*gated"):
        fetch_file(srv.url + "/geo/x.h5", tmp_path / "x.h5", policy=FAST)
    assert list(tmp_path.iterdir()) == []


def test_resume_from_part_left_by_earlier_run(srv, tmp_path):
    dest = tmp_path / "x.h5"
    (tmp_path / "x.h5.part").write_bytes(DATA[:2_000_000])
    fetch_file(srv.url + "/geo/x.h5", dest, sha256=SHA, policy=FAST)
    assert srv.gets("/geo/x.h5")[0].range == "bytes=2000000-"
    _only_verified(dest)


def test_server_ignoring_range_restarts_cleanly(srv, tmp_path):
    dest = tmp_path / "x.h5"
    (tmp_path / "x.h5.part").write_bytes(b"garbage" * 1000)
    srv.inject("/geo/x.h5", Fault.ignore_range())
    fetch_file(srv.url + "/geo/x.h5", dest, sha256=SHA, policy=FAST)
    assert len(srv.gets("/geo/x.h5")) == 1
    _only_verified(dest)


def test_stale_part_larger_than_file_restarts(srv, tmp_path):
    dest = tmp_path / "x.h5"
    (tmp_path / "x.h5.part").write_bytes(b"\0" * (len(DATA) + 10))
    fetch_file(srv.url + "/geo/x.h5", dest, sha256=SHA, policy=FAST)
    _only_verified(dest)


def test_rerun_skips_verified_file_without_downloading(srv, tmp_path):
    dest = tmp_path / "x.h5"
    rec = fetch_file(srv.url + "/geo/x.h5", dest, policy=FAST)
    n = len(srv.log)
    again = fetch_file(srv.url + "/geo/x.h5", dest, size=rec.size, sha256=rec.sha256, policy=FAST)
    assert again.skipped and len(srv.log) == n  # no request at all
    # Without recorded metadata a HEAD (not a GET) confirms the size.
    again = fetch_file(srv.url + "/geo/x.h5", dest, policy=FAST)
    assert again.skipped and again.sha256 == SHA
    assert [r.method for r in srv.log[n:]] == ["HEAD"]


def test_rerun_redownloads_a_damaged_file(srv, tmp_path):
    dest = tmp_path / "x.h5"
    fetch_file(srv.url + "/geo/x.h5", dest, policy=FAST)
    dest.write_bytes(b"oops")
    rec = fetch_file(srv.url + "/geo/x.h5", dest, size=len(DATA), sha256=SHA, policy=FAST)
    assert not rec.skipped and dest.read_bytes() == DATA


def test_connection_refused_is_retried_then_reported(tmp_path):
    with FileServer() as s:
        url = s.url + "/x"
    with pytest.raises(FetchError, match="connection error"):
        fetch_file(url, tmp_path / "x", policy=FAST)


def test_full_disk_reports_path_and_free_space(srv, tmp_path, monkeypatch):
    real_open = open

    class Full:
        def __init__(self, fh):
            self.fh = fh

        def write(self, b):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.fh.close()

    def fake_open(path, mode="r", *a, **k):
        fh = real_open(path, mode, *a, **k)
        return Full(fh) if str(path).endswith(".part") and "b" in mode and "r" not in mode else fh

    monkeypatch.setattr(download, "open", fake_open, raising=False)
    dest = tmp_path / "x.h5"
    with pytest.raises(FetchError, match=r"x\.h5\.part: the disk is full .*GB free.*SPAVIS_CACHE"):
        fetch_file(srv.url + "/geo/x.h5", dest, policy=FAST)
    assert list(tmp_path.iterdir()) == []


def test_download_many_is_concurrent_and_ordered(srv, tmp_path):
    for i in range(6):
        srv.add(f"/f/{i}.bin", DATA[i * 1000:(i + 1) * 1000 + 5000])
    jobs = [download.Job(url=f"{srv.url}/f/{i}.bin", dest=tmp_path / f"{i}.bin") for i in range(6)]
    seen = set()
    orig = download.fetch_file

    def spy(*a, **k):
        seen.add(threading.current_thread().name)
        return orig(*a, **k)

    download.fetch_file = spy
    try:
        recs = download.download_many(jobs, workers=3, policy=FAST)
    finally:
        download.fetch_file = orig
    assert [r.path.name for r in recs] == [f"{i}.bin" for i in range(6)]
    assert all(r.path.read_bytes() == requests.get(j.url).content for r, j in zip(recs, jobs))
    assert len(seen) > 1


def test_download_many_reports_first_error_and_keeps_good_files(srv, tmp_path):
    jobs = [download.Job(url=srv.url + "/geo/x.h5", dest=tmp_path / "x.h5"),
            download.Job(url=srv.url + "/geo/nope", dest=tmp_path / "nope", label="GSM9")]
    with pytest.raises(FetchError, match="GSM9: .*nope was not found"):
        download.download_many(jobs, workers=2, policy=FAST)
    assert (tmp_path / "x.h5").read_bytes() == DATA
    assert not (tmp_path / "nope").exists()
