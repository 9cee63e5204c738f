"""The loopback Hub fake answers the REAL huggingface_hub and datasets clients."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap

import pytest
import requests

from fakes.hub import WRITE_TOKEN, FakeHub, hub_url_for


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with FakeHub(tmp_path / "hub", page_size=3) as h:
        h.activate(monkeypatch, cache_dir=tmp_path / "hfhome")
        yield h


BIG = bytes(range(256)) * 40  # binary -> LFS


def _seed(hub: FakeHub) -> str:
    hub.create_repo("org/data", repo_type="dataset")
    return hub.add_files("org/data", {"README.md": "---\nlicense: mit\n---\n# data\n", "st/A.h5ad": BIG,
                                      "metadata/A.json": json.dumps({"id": "A"}), "st/B.h5ad": BIG[::-1],
                                      "metadata/B.json": "{}"}, repo_type="dataset")


def test_hf_hub_download_records_commit_and_lfs_etag(hub, tmp_path):
    from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url

    sha = _seed(hub)
    path = hf_hub_download("org/data", "st/A.h5ad", repo_type="dataset", endpoint=hub.url,
                           cache_dir=tmp_path / "c")
    assert open(path, "rb").read() == BIG
    assert f"snapshots/{sha}/st/A.h5ad" in path
    meta = get_hf_file_metadata(hf_hub_url("org/data", "st/A.h5ad", repo_type="dataset", endpoint=hub.url))
    assert meta.etag == hashlib.sha256(BIG).hexdigest() and meta.size == len(BIG) and meta.commit_hash == sha
    info = HfApi(endpoint=hub.url).dataset_info("org/data", files_metadata=True)
    assert info.sha == sha and info.card_data["license"] == "mit"
    lfs = {s.rfilename: s.lfs for s in info.siblings}
    assert lfs["st/A.h5ad"].sha256 == hashlib.sha256(BIG).hexdigest() and lfs["metadata/A.json"] is None


def test_range_request_and_missing_entry(hub):
    _seed(hub)
    url = hub_url_for("org/data", "st/A.h5ad", endpoint=hub.url)
    r = requests.get(url, headers={"Range": "bytes=100-"}, timeout=5)
    assert r.status_code == 206 and r.content == BIG[100:]
    assert r.headers["Content-Range"] == f"bytes 100-{len(BIG) - 1}/{len(BIG)}"
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

    with pytest.raises(EntryNotFoundError):
        hf_hub_download("org/data", "st/NOPE.h5ad", repo_type="dataset", endpoint=hub.url)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/none", "x", repo_type="dataset", endpoint=hub.url)


def test_tree_pagination_paths_info_and_snapshot(hub, tmp_path):
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.hf_api import RepoFile, RepoFolder

    _seed(hub)
    api = HfApi(endpoint=hub.url)
    entries = list(api.list_repo_tree("org/data", repo_type="dataset", recursive=True))
    files = sorted(e.path for e in entries if isinstance(e, RepoFile))
    assert files == sorted(hub.list_files("org/data", "dataset"))  # 6 files + 2 dirs over 3-entry pages
    assert any(len(q) > 1 and "cursor=" in q[1] for q in hub.requests)
    top = list(api.list_repo_tree("org/data", "st", repo_type="dataset", expand=True))
    assert [e.path for e in top] == ["st/A.h5ad", "st/B.h5ad"] and top[0].last_commit is not None
    info = api.get_paths_info("org/data", ["st", "metadata/A.json", "nope"], repo_type="dataset")
    assert isinstance(info[0], RepoFolder) and isinstance(info[1], RepoFile) and len(info) == 2
    snap = snapshot_download("org/data", repo_type="dataset", allow_patterns=["metadata/*"], endpoint=hub.url,
                             local_dir=tmp_path / "snap")
    got = sorted(p.relative_to(snap).as_posix() for p in (tmp_path / "snap").rglob("*.json")
                 if ".cache" not in p.parts)
    assert got == ["metadata/A.json", "metadata/B.json"]


def test_gated_repo_401_403_then_granted(hub, tmp_path):
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import GatedRepoError

    _seed(hub)
    hub.create_repo("org/data", repo_type="dataset", gated=True)
    assert HfApi(endpoint=hub.url).dataset_info("org/data").gated == "manual"  # metadata stays public
    with pytest.raises(GatedRepoError) as e401:
        hf_hub_download("org/data", "st/A.h5ad", repo_type="dataset", endpoint=hub.url, token=False)
    assert e401.value.response.status_code == 401
    with pytest.raises(GatedRepoError) as e403:
        hf_hub_download("org/data", "st/A.h5ad", repo_type="dataset", endpoint=hub.url, token="hf_other")
    assert e403.value.response.status_code == 403
    hub.grant("org/data", "hf_ok")
    path = hf_hub_download("org/data", "st/A.h5ad", repo_type="dataset", endpoint=hub.url, token="hf_ok",
                           cache_dir=tmp_path / "c")
    assert open(path, "rb").read() == BIG


def test_upload_folder_regular_and_lfs(hub, tmp_path):
    from huggingface_hub import HfApi

    folder = tmp_path / "up"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("hello")
    (folder / "sub" / "w.safetensors").write_bytes(BIG)
    api = HfApi(endpoint=hub.url, token=WRITE_TOKEN)
    url = api.create_repo("me/model")
    assert url.repo_id == "me/model"
    info = api.upload_folder(repo_id="me/model", folder_path=folder, commit_message="upload")
    assert info.oid == hub.head("me/model")
    assert hub.read_file("me/model", "sub/w.safetensors") == BIG
    assert hub.read_file("me/model", "notes.txt") == b"hello"
    assert any("/info/lfs/objects/batch" in p for _, p in hub.requests)  # went through LFS
    api.upload_file(path_or_fileobj=b"v2", path_in_repo="notes.txt", repo_id="me/model")
    assert hub.read_file("me/model", "notes.txt") == b"v2"
    with pytest.raises(Exception):
        HfApi(endpoint=hub.url, token=False).create_repo("me/other")  # writes need a token


def test_pytorch_mixin_push_and_from_pretrained(hub, tmp_path):
    torch = pytest.importorskip("torch")
    from huggingface_hub import PyTorchModelHubMixin

    class Tiny(torch.nn.Module, PyTorchModelHubMixin):
        def __init__(self, width: int = 3):
            super().__init__()
            self.lin = torch.nn.Linear(width, 2)

    torch.manual_seed(0)
    model = Tiny(width=4)
    model.push_to_hub("me/tiny", token=WRITE_TOKEN)
    loaded = Tiny.from_pretrained("me/tiny", cache_dir=tmp_path / "c")
    assert loaded.lin.in_features == 4
    assert torch.equal(loaded.lin.weight, model.lin.weight)


def test_datasets_push_to_hub_and_load_dataset(hub, tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"x": list(range(10)), "y": [str(i) for i in range(10)]})
    ds.push_to_hub("me/table", token=WRITE_TOKEN)
    assert any(p.endswith(".parquet") for p in hub.list_files("me/table", "dataset"))
    loaded = datasets.load_dataset("me/table", split="train", cache_dir=str(tmp_path / "dsc"))
    assert loaded["x"] == list(range(10))
    streamed = datasets.load_dataset("me/table", split="train", streaming=True)
    assert [r["y"] for r in streamed] == [str(i) for i in range(10)]


def test_fault_injection_503_then_truncated_body(hub):
    _seed(hub)
    url = hub_url_for("org/data", "st/A.h5ad", endpoint=hub.url)
    hub.add_fault("st/A.h5ad", "status", status=503, retry_after=1)
    r = requests.get(url, timeout=5)
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"
    hub.add_fault("st/A.h5ad", "truncate")
    with pytest.raises(requests.exceptions.RequestException):
        requests.get(url, timeout=5).content  # fewer bytes than Content-Length
    assert requests.get(url, timeout=5).content == BIG


def test_fresh_interpreter_via_env(tmp_path):
    """The documented subprocess pattern: HF_ENDPOINT set before huggingface_hub is imported."""
    with FakeHub(tmp_path / "hub") as hub:
        _seed(hub)
        code = textwrap.dedent("""
            from huggingface_hub import hf_hub_download
            p = hf_hub_download("org/data", "metadata/A.json", repo_type="dataset")
            print(open(p).read())
        """)
        out = subprocess.run([sys.executable, "-c", code], env=hub.env(tmp_path), capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {"id": "A"}
