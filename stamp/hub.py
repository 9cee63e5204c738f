"""Publish a trained run to the Hugging Face Hub, with a generated model card.

A run's ``RUN/model/`` folder is the unit of publication: ``config.json`` +
``model.safetensors`` (from ``PyTorchModelHubMixin``), the tokenizer files written by
``GeneTokenizer.save`` and ``README.md`` (the card built here from ``RUN/run.json``).
Tokens are taken from the usual ``huggingface_hub`` places (``HF_TOKEN``, ``hf auth login``)
or passed in; they are never printed or written anywhere.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from spavis.format.io import atomic_write_text
from stamp.constants import RUN_INFO
from stamp.errors import PublishError

CARD_NAME = "README.md"


def card_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def card_rows(values: dict, empty: str = "") -> str:
    """``| key | value |`` Markdown table rows of a model card (floats to 4 significant digits)."""
    return "\n".join(f"| {k} | {card_value(v)} |" for k, v in values.items()) or empty


def _corpus_revision(data: dict) -> str:
    """The Hub corpus commit the model was trained on (a line of the card), if it came from the Hub."""
    if not data.get("hub_id") or not data.get("hub_revision"):
        return ""
    rev = data["hub_revision"]
    return (f"\n- corpus revision: [`{data['hub_id']}@{rev}`](https://huggingface.co/datasets/{data['hub_id']}/tree/{rev})"
            f" (`datasets.load_dataset(\"{data['hub_id']}\", revision=\"{rev}\")`)")


def model_card(info: dict, config: dict) -> str:
    """Markdown model card (HF YAML header + sections) from run info and the model config."""
    data = info.get("data", {})
    train = info.get("train", {})
    metrics = info.get("final_metrics", {})
    licenses = sorted({str(x) for x in data.get("licenses", []) if x})
    license_id = info.get("license", "other")
    header = [
        "---",
        "library_name: stamp",
        f"license: {license_id}",
        "tags:",
        "- spatial-transcriptomics",
        "- visium",
        "- stamp",
        "- gene-encoder",
        "- model_hub_mixin",
        "- pytorch_model_hub_mixin",
    ]
    if data.get("hub_id"):
        header += ["datasets:", f"- {data['hub_id']}"]
    header.append("---")
    cfg_rows, train_rows, metric_rows = card_rows(config), card_rows(train), card_rows(metrics, "| (none) | |")
    fraction = data.get("generated_fraction", 1.0 if data.get("generated") else 0.0) or 0.0
    if fraction >= 1.0:
        generated = " **The training data were generated (spavis.simulate), not measured.**"
    elif fraction > 0.0:
        generated = (f" **{fraction:.1%} of the training spots were generated (spavis.simulate), not measured;**"
                     " the rest are measurements.")
    else:
        generated = ""
    body = f"""
# STAMP gene encoder ({info.get('stage', '?')} stage)

A spatially-aware gene encoder for 10x Visium spots, trained with the `stamp` package
(IGR{' + CGR' if info.get('stage') == 'spatial' else ''} objectives, see the STAMP paper,
arXiv:2602.13944). Input: a spot's genes ranked by expression relative to each gene's
non-zero mean (the bundled tokenizer files); output: one embedding per spot (mean of the
last layer over non-pad positions).

## Usage

```python
import scipy.sparse as sp
import torch
from stamp import GeneTokenizer, StampGeneEncoder
from stamp.tokenizer import to_model_input_ids
tokenizer = GeneTokenizer.from_pretrained("REPO_ID")
model = StampGeneEncoder.from_pretrained("REPO_ID").eval()
counts = sp.random(4, tokenizer.n_genes, density=0.05, format="csr", random_state=0) * 10  # spots x genes, raw counts
input_ids = to_model_input_ids(tokenizer.encode_csr(counts), tokenizer.pad_value, model.config.context_length)
embeddings = model.embed(torch.from_numpy(input_ids))  # (4, hidden_size)
```

or `stamp embed --model REPO_ID --data SHARD_DIR --out embeddings.parquet`.

## Training data

- corpus: `{data.get('source', '?')}` ({card_value(data.get('n_spots', '?'))} spots,
  {card_value(data.get('n_slides', '?'))} slides, {card_value(data.get('n_genes', '?'))} genes){generated}{_corpus_revision(data)}
- data licenses: {', '.join(licenses) if licenses else 'see the corpus card'}

## Training

- stage: {info.get('stage', '?')}; optimizer steps: {info.get('steps', '?')};
  spots seen: {card_value(info.get('spots_seen', '?'))}; initialised from: {info.get('init') or 'random'}

| setting | value |
|---|---|
{train_rows}

## Metrics (last logged step)

| metric | value |
|---|---|
{metric_rows}

## Model config

| field | value |
|---|---|
{cfg_rows}

## Intended use and limitations

Research use: spot embeddings for clustering, domain annotation, retrieval and as the gene
side of image-gene alignment. Not for clinical decisions. Trained on human Visium data in
the corpus above only; other technologies, species or gene panels need re-tokenization
and may transfer poorly. Embeddings inherit the biases of the corpus composition (organs,
conditions, labs).

## License

Weights: `{license_id}`. They are derived from the training data, whose licenses are
listed above; check them before redistribution. Code: BSD-3-Clause (`stamp`).
"""
    return "\n".join(header) + "\n" + body.lstrip("\n")


def write_model_card(model_dir: str | Path, info: dict, render: Callable[[dict, dict], str] = model_card) -> Path:
    """Write ``model_dir/README.md`` from run info and ``model_dir/config.json`` (``render``: the card's
    text from both; the gene encoder's :func:`model_card` unless given)."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    path = model_dir / CARD_NAME
    atomic_write_text(path, render(info, config))
    return path


def looks_like_repo_id(text: str) -> bool:
    """``ORG/NAME`` with Hub-legal characters (and not an existing local path)."""
    import re

    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}", text)) and not Path(text).exists()


def snapshot(repo_id: str, *, revision: str | None = None, token: str | None = None,
             cache_dir: str | os.PathLike | None = None, allow_patterns: list[str] | None = None) -> Path:
    """A local snapshot of a Hub model repo, or :class:`ModelNotFoundError` at once.

    One metadata request (``snapshot_download``; no retry loop, unlike per-file downloads
    that retry for ~30 s when the network is down); ``HF_HUB_OFFLINE=1`` uses the cache only.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from stamp.errors import ModelNotFoundError

    if not looks_like_repo_id(str(repo_id)):
        raise ModelNotFoundError(
            f"{repo_id!r} is neither a local model folder nor a Hub repo id (ORG/NAME); "
            "check the path (a run folder, its model/ folder) or the repo id"
        )
    try:
        return Path(snapshot_download(str(repo_id), repo_type="model", revision=revision, token=token,
                                      cache_dir=cache_dir, allow_patterns=allow_patterns, etag_timeout=5))
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise ModelNotFoundError(
            f"{repo_id} is not a local folder and the Hub has no model repo of that name you can read "
            f"({type(exc).__name__}); check the id, or log in (`hf auth login`) for a private repo"
        ) from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"{repo_id} has no revision {revision!r} on the Hub; check --revision") from None
    except LocalEntryNotFoundError as exc:
        cause = exc.__cause__ or exc.__context__
        reason = "offline mode (HF_HUB_OFFLINE=1) and not in the cache" if constants.HF_HUB_OFFLINE else (
            f"{type(cause).__name__}: {cause}" if cause else "the Hub cannot be reached")
        raise ModelNotFoundError(
            f"{repo_id} is not a local folder and cannot be fetched from {constants.ENDPOINT} ({reason}); "
            "pass a local model folder, or check the network / HF_ENDPOINT"
        ) from None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        raise ModelNotFoundError(f"{repo_id}: the Hub answered HTTP {status}; check the id and your token") from None


def resolve_model_source(model: str | os.PathLike) -> Path:
    """The local folder holding a model: ``RUN`` -> ``RUN/model``, a model folder, a registry name
    (``stamp-v1``: converted once into the cache, see stamp.registry), or a Hub snapshot."""
    path = Path(model)
    if path.is_dir():
        return resolve_model_dir(path)
    from stamp.registry import is_pretrained, resolve_pretrained

    if is_pretrained(str(model)):
        return resolve_pretrained(str(model))
    return snapshot(str(model))


def resolve_model_dir(run_or_model: str | Path) -> Path:
    """``RUN`` -> ``RUN/model``; a folder that already holds ``model.safetensors`` is itself."""
    path = Path(run_or_model)
    for candidate in (path / "model", path):
        if (candidate / "model.safetensors").is_file() and (candidate / "config.json").is_file():
            return candidate
    raise PublishError(
        f"{path}: no model folder (config.json + model.safetensors); run `stamp pretrain ... --out {path}` "
        "to completion first, or pass the model folder itself"
    )


def _model_files(model_dir: Path) -> list[Path]:
    """The files a model folder publishes (top level, no hidden temp files)."""
    return [p for p in sorted(model_dir.iterdir()) if p.is_file() and not p.name.startswith(".")]


EVAL_HEADING = "## Evaluation"


def evaluation_section(results: Any = ()) -> str:
    """``## Evaluation`` of a model card from ``stamp evaluate`` outputs (folders or results.csv files):
    mean +- sd over folds per task, method and model (baselines included, best in bold)."""
    import pandas as pd

    from stamp.evaluate.results import markdown

    frames = []
    for item in results or ():
        path = Path(item)
        csv = path / "results.csv" if path.is_dir() else path
        if not csv.is_file():
            raise PublishError(f"{path}: no results.csv; pass the --out folder of `stamp evaluate`")
        frames.append(pd.read_csv(csv))
    if not frames:
        return ""
    text = markdown(pd.concat(frames, ignore_index=True), title="Evaluation",
                    notes=["`stamp evaluate` on the corpora named in its results; folds and baselines as listed"])
    return "\n".join(("#" + line) if line.startswith("#") else line for line in text.splitlines()).rstrip() + "\n"


def finalize_card(card: str, load_id: str, evaluation: Any = ()) -> str:
    """The card as published: ``REPO_ID`` -> where it loads from; an ``## Evaluation`` section from
    ``stamp evaluate`` results replaces any existing one (placed before the limitations section)."""
    card = card.replace("REPO_ID", load_id)
    section = evaluation_section(evaluation)
    if not section:
        return card
    lines = card.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.strip() == EVAL_HEADING), None)
    if start is not None:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        del lines[start:end]
    else:
        start = next((i for i, line in enumerate(lines) if line.startswith("## Intended use")), len(lines))
    lines.insert(start, section + "\n")
    return "".join(lines)


def export_model(run_or_model: str | Path, dest: str | Path, *, overwrite: bool = False,
                 evaluation: Any = ()) -> Path:
    """Publish to a local folder: the exact file set ``publish`` uploads, copied atomically.

    The folder loads with ``StampGeneEncoder.from_pretrained(dest)`` and
    ``GeneTokenizer.from_pretrained(dest)``, and can be uploaded later as is. The card's snippet
    loads ``dest``; ``evaluation``: ``stamp evaluate`` output folders whose results go into the card.
    """
    import shutil

    from spavis.format.io import atomic_dir

    model_dir = resolve_model_dir(run_or_model)
    if not (model_dir / CARD_NAME).is_file():
        raise PublishError(f"{model_dir}: no {CARD_NAME} model card; re-run pretraining to regenerate it")
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise PublishError(f"{dest} already exists; choose another folder or pass --overwrite")
    if dest.exists() and not dest.is_dir():
        raise PublishError(f"{dest} is a file, not a folder; choose a folder path for --local-dir")
    if dest.resolve() == model_dir.resolve() or dest.resolve() in model_dir.resolve().parents:
        raise PublishError(f"{dest} holds the run being published ({model_dir}); choose a folder outside it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    card = finalize_card((model_dir / CARD_NAME).read_text(), str(dest), evaluation)
    with atomic_dir(dest) as staging:  # hidden sibling, umask modes, swapped in when complete
        for item in _model_files(model_dir):
            if item.name != CARD_NAME:
                shutil.copyfile(item, staging / item.name)
        (staging / CARD_NAME).write_text(card)
    return dest


def publish(
    run_or_model: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload STAMP gene encoder",
    evaluation: Any = (),
) -> str:
    """Create ``repo_id`` if needed and upload the model folder in one commit; returns the commit URL.

    The model card's usage snippet names the repo (``REPO_ID`` in the run's card becomes ``repo_id``);
    ``evaluation``: ``stamp evaluate`` output folders whose results go into the card.
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    model_dir = resolve_model_dir(run_or_model)
    card_path = model_dir / CARD_NAME
    if not card_path.is_file():
        raise PublishError(f"{model_dir}: no {CARD_NAME} model card; re-run pretraining to regenerate it")
    card = finalize_card(card_path.read_text(), repo_id, evaluation)
    operations = [CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p))
                  for p in _model_files(model_dir) if p.name != CARD_NAME]
    operations.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=card.encode()))
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.create_commit(repo_id, operations, repo_type="model", revision=revision,
                                 commit_message=commit_message)
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        raise PublishError(
            f"uploading {model_dir} to {repo_id} failed (HTTP {status}); check the repo id and that your "
            "token (HF_TOKEN or `hf auth login`) has write access"
        ) from None
    except Exception as exc:  # connection refused, DNS, timeouts: the client raises many types
        raise PublishError(
            f"uploading {model_dir} to {repo_id} failed ({type(exc).__name__}: {exc}); check your network "
            "and HF_ENDPOINT"
        ) from None
    return str(getattr(info, "commit_url", info))
