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


# ---------------------------------------------------------------------------- issue 24: weights, offline, zero sizes
# One subprocess runs every case below through the real CLI (tests/cli_cases.py: one torch import for all of
# them, the Hub unreachable and nothing cached); each test checks its item's cases.
def _with_weights(src: Path, dest: Path, convert) -> Path:
    """A copy of model folder ``src`` whose floating weights went through ``convert``."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest)
    state = load_file(str(src / "model.safetensors"))
    save_file({k: convert(v) if v.is_floating_point() else v for k, v in state.items()},
              str(dest / "model.safetensors"))
    return dest


def _vit_folder(dest: Path, *, depth: int = 1, convert=None, config_depth: int | None = None) -> Path:
    """A timm ViT in the Hub layout (config.json `architecture` + model.safetensors), tiny; ``convert``
    changes every floating tensor as it is saved."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=depth, num_classes=0)
    state = {k: (convert(v) if convert and v.is_floating_point() else v).contiguous()
             for k, v in net.state_dict().items()}
    dest.mkdir(parents=True)
    (dest / "config.json").write_text(json.dumps({
        "architecture": "vit_tiny_patch16_224", "num_features": 192, "pretrained_cfg": {"input_size": [3, 32, 32]},
        "model_args": {"img_size": 32, "depth": config_depth or depth, "num_classes": 0}}))
    save_file(state, str(dest / "model.safetensors"))
    return dest


@pytest.fixture(scope="module")
def zoo_cases(tmp_path_factory):
    """{case name: (Result, what the test needs)} for every issue-24 case, from one subprocess."""
    import numpy as np
    from PIL import Image

    from cli_cases import Case, run_cases
    from stamp.models.gene_encoder import create_gene_encoder
    from stamp.tokenizer import GeneTokenizer

    root = tmp_path_factory.mktemp("zoo-24")
    torch.manual_seed(0)
    gene = root / "gene"
    create_gene_encoder("tiny", n_genes=40).save_pretrained(gene)
    GeneTokenizer([f"ENSG{i:011d}" for i in range(40)], np.ones(40)).save_pretrained(gene)
    images, out = root / "images", root / "out"
    images.mkdir()
    out.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(images / f"{i}.png")
    overlay = root / "my-zoo.json"
    overlay.write_text(json.dumps({"models": {"mine": {
        "kind": "image", "library": "timm", "hub_id": "me/mine", "embed_dim": 192, "license": "mit",
        "commercial": True, "gated": False, "citation": "",
        "architecture": {"name": "vit_tiny_patch16_224", "kwargs": {"pretrained": True}}, "pooling": "head",
        "preprocessing": {"resize": 32, "crop": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}}}))
    need = {
        "gene-fp16": _with_weights(gene, root / "gene-fp16", lambda t: t.half()),
        "gene-int8": _with_weights(gene, root / "gene-int8", lambda t: (t * 10).to(torch.int8)),
        "gene-nan": _with_weights(gene, root / "gene-nan", lambda t: t.clone().fill_(float("nan"))),
        "vit-fp16": _vit_folder(root / "vit-fp16", convert=lambda t: t.half()),
        "vit-int8": _vit_folder(root / "vit-int8", convert=lambda t: (t * 10).to(torch.int8)),
        "zero-num_heads": copy_with_config(gene, root / "zero-heads", num_heads=0),
        "zero-hidden_size": copy_with_config(gene, root / "zero-hidden", hidden_size=0),
        "short": _vit_folder(root / "vit-short", depth=1, config_depth=2),  # the config asks for a second block
        "overlay": overlay, "out": out,
    }
    cases = {
        "gene-fp16": Case(["models", "load", need["gene-fp16"]]),
        "gene-int8": Case(["models", "load", need["gene-int8"]]),
        "gene-nan": Case(["models", "load", need["gene-nan"]]),
        "vit-fp16": Case(["embed", "--model", need["vit-fp16"], "--images", images, "--out", out / "fp16.parquet"]),
        "vit-int8": Case(["embed", "--model", need["vit-int8"], "--images", images, "--out", out / "int8.parquet"]),
        "zero-num_heads": Case(["models", "load", need["zero-num_heads"]]),
        "zero-hidden_size": Case(["models", "load", need["zero-hidden_size"]]),
        "short": Case(["models", "load", need["short"]]),
        "overlay": Case(["models", "load", "mine"], env={"STAMP_REGISTRY": str(overlay)}),
        "offline-uni": Case(["models", "load", "uni"]),
        "offline-embed": Case(["embed", "--model", "stamp-v1", "--images", images, "--out", out / "off.parquet"]),
    }
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(root / "hf")}
    results = run_cases(*cases.values(), env=env)
    return dict(zip(cases, results)), need


def _nothing_written(out: Path) -> None:
    assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_weight_dtypes_are_cast_or_refused_in_one_line(zoo_cases):
    """fp16 weights load (cast to the model's float32) and embed; int8 (quantized) weights and NaN weights are
    refused in one line naming the file, before any output is written."""
    res, need = zoo_cases
    assert res["gene-fp16"].code == 0, res["gene-fp16"].stderr
    assert json.loads(res["gene-fp16"].stdout)["kind"] == "gene"
    assert res["vit-fp16"].code == 0 and (need["out"] / "fp16.parquet").is_file(), res["vit-fp16"].stderr
    for name, word in (("gene-int8", "quantized"), ("vit-int8", "quantized"), ("gene-nan", "NaN")):
        text = res[name].one_line_error()
        assert str(need[name]) in text and word in text, text
    assert "int8" in res["gene-int8"].one_line_error()
    _nothing_written(need["out"] / "int8.parquet")


def test_unreachable_hub_with_nothing_cached_is_one_line_without_retries(zoo_cases):
    """Connection refused and nothing in the cache: one line at once, not five retries over ~25 s (each
    retry warning printed twice)."""
    res, need = zoo_cases
    for name, repo in (("offline-uni", "MahmoodLab/UNI"), ("offline-embed", "minghaofdu/STAMP")):
        text = res[name].one_line_error()
        assert repo in text and "cannot be fetched from http://127.0.0.1:9" in text and "--weights" in text
        assert "Retry" not in res[name].stderr and len(res[name].stderr.splitlines()) <= 2
    _nothing_written(need["out"] / "off.parquet")


def test_zero_sizes_in_a_config_are_refused_in_one_line(zoo_cases):
    res, need = zoo_cases
    for key in ("num_heads", "hidden_size"):
        text = res[f"zero-{key}"].one_line_error()
        assert str(need[f"zero-{key}"] / "config.json") in text and f"{key} = 0 is outside 1.." in text


def test_missing_tensors_counted_and_overlay_checked_before_any_download(zoo_cases):
    """All missing tensors are counted (not "1 tensor(s)"); an overlay entry passing `pretrained` to timm is
    refused when the catalogue is read, naming the overlay file and the entry, before weights are looked for."""
    import timm

    res, need = zoo_cases
    n_missing = len([k for k in timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=0)
                     .state_dict() if k.startswith("blocks.1.")])
    text = res["short"].one_line_error()
    assert n_missing > 1 and f"{n_missing} tensor(s) of the architecture are not in the weights" in text
    text = res["overlay"].one_line_error()
    assert str(need["overlay"]) in text and "'mine'" in text and "'pretrained' is not allowed" in text
    assert "cannot be fetched" not in text  # refused before any weights were looked for


def test_save_pretrained_follows_the_umask(tmp_path):
    """model.safetensors gets the umask's mode like every other output (safetensors' writer left 0600)."""
    import stat

    from stamp.models.gene_encoder import create_gene_encoder

    old = os.umask(0o022)
    try:
        create_gene_encoder("tiny", n_genes=20).save_pretrained(tmp_path / "m")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m" / "model.safetensors").stat().st_mode) == 0o644
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["README.md", "config.json", "model.safetensors"]
