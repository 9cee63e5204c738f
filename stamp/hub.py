"""Publish a trained run to the Hugging Face Hub, with a generated model card.

A run's ``RUN/model/`` folder is the unit of publication: ``config.json`` +
``model.safetensors`` (from ``PyTorchModelHubMixin``), the tokenizer files written by
``GeneTokenizer.save`` and ``README.md`` (the card built here from ``RUN/run.json``).
Tokens are taken from the usual ``huggingface_hub`` places (``HF_TOKEN``, ``hf auth login``)
or passed in; they are never printed or written anywhere.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from stamp.cards import CARD_NAME
from stamp.errors import PublishError
from stamp.locations import resolve_model_dir


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

    from spavis.format.hub import check_repo_id

    check_repo_id(repo_id, cls=PublishError, kind="repo")
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
