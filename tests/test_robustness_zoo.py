"""Hostile or careless model sources through the real CLI (issue 16, items 3 and 8 and the smaller
zoo items): every case is one `error:` line naming the file and the fix, refused BEFORE anything is
allocated (the absurd sizes would take minutes and terabytes otherwise), no traceback.

The command is `stamp models load SOURCE` (a thin wrapper over `stamp.load`, the path every
embedding command takes).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TIMEOUT = 120


def stamp(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1", **(env or {})}
    for key in ("STAMP_DEBUG", "SPAVIS_DEBUG"):
        full_env.pop(key, None)
    return subprocess.run([sys.executable, "-m", "stamp.cli", *args], env=full_env, capture_output=True, text=True,
                          timeout=TIMEOUT)


def one_line_error(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 1, (res.returncode, res.stdout[-2000:], res.stderr[-3000:])
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith("warning")]
    text = " ".join(ln.strip() for ln in lines)
    assert text.startswith("error:"), res.stderr
    return text


def cli(*args: str) -> str:
    """The same CLI in-process (typer's runner): for the variants of a case already run as a subprocess."""
    from typer.testing import CliRunner

    from stamp.cli import app

    res = CliRunner().invoke(app, list(args))
    assert res.exit_code == 1, res.output[-2000:]
    assert "Traceback" not in res.output
    lines = [ln.strip() for ln in res.output.splitlines() if ln.strip() and not ln.startswith("warning")]
    assert lines and lines[0].startswith("error:"), res.output
    return " ".join(lines)


@pytest.fixture(scope="module")
def gene_folder(tmp_path_factory) -> Path:
    """A small saved gene encoder (config.json + model.safetensors), no tokenizer needed for these cases."""
    from stamp.models.gene_encoder import create_gene_encoder

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("zoo-rob") / "model"
    create_gene_encoder("tiny", n_genes=50).save_pretrained(folder)
    return folder


def copy_with_config(src: Path, dest: Path, **changes) -> Path:
    dest.mkdir(parents=True)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (dest / "config.json").write_text(json.dumps(cfg))
    (dest / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    return dest


@pytest.mark.parametrize("key,value", [("num_layers", 10**7), ("hidden_size", 10**9), ("context_length", 10**12),
                                       ("n_genes", 10**10)])
def test_absurd_config_sizes_are_refused_before_allocation(gene_folder, tmp_path, key, value):
    folder = copy_with_config(gene_folder, tmp_path / "m", **{key: value})
    text = one_line_error(stamp("models", "load", str(folder))) if key == "num_layers" else cli(
        "models", "load", str(folder))
    assert str(folder / "config.json") in text and key in text and "outside" in text


def test_absurd_embed_dim_of_an_aligned_model_is_refused(tmp_path):
    folder = tmp_path / "aligned"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"gene": {"hidden_size": 64}, "vision": {"name": "tiny"},
                                                    "embed_dim": 10**9}))
    (folder / "model.safetensors").write_bytes(b"\0" * 16)
    text = cli("models", "load", str(folder))
    assert "embed_dim" in text and "outside" in text


def test_plausible_sizes_that_do_not_fit_the_weights_are_refused_from_the_header(gene_folder, tmp_path):
    folder = copy_with_config(gene_folder, tmp_path / "m", hidden_size=4096, num_heads=16)
    text = one_line_error(stamp("models", "load", str(folder)))
    assert "does not match the weights" in text and str(folder) in text


def test_config_that_is_not_json(gene_folder, tmp_path):
    folder = copy_with_config(gene_folder, tmp_path / "m")
    (folder / "config.json").write_text("{not json")
    text = one_line_error(stamp("models", "load", str(folder)))
    assert "config.json: not valid JSON" in text


def test_pickle_named_model_safetensors(gene_folder, tmp_path):
    folder = copy_with_config(gene_folder, tmp_path / "m")
    from safetensors.torch import load_file

    torch.save(load_file(str(gene_folder / "model.safetensors")), folder / "model.safetensors")
    text = one_line_error(stamp("models", "load", str(folder)))
    assert "model.safetensors" in text and "PyTorch zip checkpoint" in text and "not safetensors" in text


def test_folder_without_weights(gene_folder, tmp_path):
    folder = copy_with_config(gene_folder, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    text = one_line_error(stamp("models", "load", str(folder)))
    assert "no model.safetensors" in text


@pytest.mark.parametrize("repo_id", ["org/..", "org/a..b", "org/a--b", "org/bad name"])
def test_invalid_repo_ids_are_one_line(repo_id):
    text = one_line_error(stamp("models", "load", repo_id)) if repo_id == "org/.." else cli("models", "load", repo_id)
    assert repr(repo_id) in text and "not a valid Hub repo id" in text


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_checkpoint_with_code_says_it_holds_code(tmp_path):
    path = tmp_path / "uni.bin"
    torch.save({"weight": torch.zeros(2), "x": _Payload()}, path)
    text = one_line_error(stamp("models", "load", "uni", "--weights", str(path)))
    assert "holds Python code" in text and "NOT loaded" in text and "corrupt" not in text


def test_hub_repo_without_model_safetensors(tmp_path, gene_folder):
    from tests.fakes.hub import FakeHub

    with FakeHub(tmp_path / "hub") as hub:
        hub.create_repo("org/incomplete")
        hub.add_files("org/incomplete", {"config.json": (gene_folder / "config.json").read_text()})
        env = {**hub.env(tmp_path), "HF_HUB_OFFLINE": "0"}
        text = one_line_error(stamp("models", "load", "org/incomplete", env=env))
    assert "no model.safetensors" in text


def test_gated_catalogue_entry_names_the_terms_page_and_login(tmp_path):
    from tests.fakes.hub import FakeHub

    with FakeHub(tmp_path / "hub") as hub:
        hub.create_repo("MahmoodLab/UNI", gated=True)
        hub.add_files("MahmoodLab/UNI", {"README.md": "# UNI\n", "pytorch_model.bin": b"\0" * 64})
        env = {**hub.env(tmp_path), "HF_HUB_OFFLINE": "0"}
        text = one_line_error(stamp("models", "load", "uni", env=env))
    assert "gated" in text and "MahmoodLab/UNI" in text and "hf auth login" in text


def test_offline_catalogue_entry_is_one_line(tmp_path):
    text = one_line_error(stamp("models", "load", "virchow2", env={"HF_HOME": str(tmp_path / "hf")}))
    assert "paige-ai/Virchow2" in text and "HF_HUB_OFFLINE" in text and "--weights" in text


def test_vision_model_kwargs_only_known_keys(tmp_path):
    from stamp.errors import ModelConfigError
    from stamp.models.vision import load_vision_config

    base = json.loads((Path(__file__).resolve().parents[1] / "stamp" / "configs" / "vision-tiny.json").read_text())
    for bad, expect in (({"pretrained": True}, "'pretrained' is not allowed"),
                        ({"checkpoint_path": "/etc/passwd"}, "'checkpoint_path' is not allowed"),
                        ({"mlp_layer": "os.system"}, "not a layer stamp knows")):
        path = tmp_path / "v.json"
        path.write_text(json.dumps({**base, "model_kwargs": bad}))
        with pytest.raises(ModelConfigError, match=expect) as err:
            load_vision_config(path)
        assert "\n" not in str(err.value)


def test_incomplete_overlay_entry_names_the_overlay_file(tmp_path):
    overlay = tmp_path / "my-zoo.json"
    overlay.write_text(json.dumps({"models": {"mine": {"kind": "image", "library": "timm", "hub_id": "me/mine"}}}))
    text = one_line_error(stamp("models", env={"STAMP_REGISTRY": str(overlay)}))
    assert str(overlay) in text and "'mine'" in text and "lacks" in text and "stamp/zoo/pretrained.json" not in text


def test_models_table_json_and_kind(tmp_path):
    res = stamp("models", "--json", "--kind", "image", env={"HF_HOME": str(tmp_path / "hf")})
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    names = {r["name"] for r in rows}
    assert {"uni", "virchow2", "resnet50-imagenet", "stamp-v1"} <= names and "stamp-v1-gene" not in names
    uni = next(r for r in rows if r["name"] == "uni")
    assert (uni["dim"], uni["gated"], uni["commercial"], uni["cached"]) == (1024, "yes", "no", "no")
    res = stamp("models", env={"HF_HOME": str(tmp_path / "hf")})
    assert res.returncode == 0 and "prov-gigapath" in res.stdout and "conch" in res.stdout  # in the zoo (issue 28)


def test_publish_to_an_invalid_repo_id_says_the_id_is_invalid(gene_folder):
    from stamp.errors import PublishError
    from stamp.hub import publish

    with pytest.raises(PublishError, match=r"'org/bad\.\.name' is not a valid Hub repo id") as err:
        publish(gene_folder, "org/bad..name", token="hf_x")
    assert "network" not in str(err.value)
