"""Names -> local files: a catalogue name, run folder, model folder or Hub repo id becomes a folder.

* :func:`resolve_pretrained` / :func:`resolve_model_source`: the folder of a stamp model (released
  checkpoints are downloaded once and converted once per Hub commit, race-safe);
* the released gene means, which cannot be redistributed, are registered once
  (:func:`set_means`, ``stamp models set-means``) and found again by :func:`load_tokenizer`;
* :func:`weights_sha256`: the one hash of a weights file for provenance records;
* :func:`model_table`: the rows of ``stamp models`` (cached? means set?).

Model classes never come here; :mod:`stamp.zoo.factory` does.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from stamp.errors import PretrainedError
from stamp.hub_access import check_repo_id, download_file, is_repo_id, snapshot
from stamp.tokenizer.io import MEANS_KEY, MEANS_REQUIRED_KEY
from stamp.zoo.catalogue import ModelEntry, get_pretrained, is_pretrained, list_pretrained
from stamp.locations import CONVERTED_MARKER, converted_cache_root, means_root, model_folder_of

logger = logging.getLogger(__name__)


def resolve_pretrained(name_or_path: str | os.PathLike, *, component: str | None = None,
                       revision: str | None = None, token: str | None = None,
                       cache_dir: str | os.PathLike | None = None) -> Path:
    """A local folder in this project's layout for a catalogue name of library ``stamp``, a Hub repo
    id or a folder (``component="gene"``: the gene encoder of a full entry, ``stamp-v1`` -> ``stamp-v1-gene``)."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return model_folder_of(path)
    if is_pretrained(text):
        entry = get_pretrained(text)
        if entry.library != "stamp":
            raise PretrainedError(f"{text} is a {entry.library} {entry.kind} encoder, not a stamp model folder; "
                                  f"load it with stamp.load({text!r}) / --model {text}")
        if component == "gene" and entry.component == "full" and entry.gene_entry:
            entry = get_pretrained(entry.gene_entry)
        if entry.format == "stamp":
            return snapshot(entry.hub_id, revision=revision, token=token, cache_dir=cache_dir, terms_url=entry.page)
        return _converted(entry, revision=revision, token=token, cache_dir=cache_dir)
    if is_repo_id(text):
        return snapshot(text, revision=revision, token=token, cache_dir=cache_dir)
    check_repo_id(text)  # raises the reason (bad characters, '..', not ORG/NAME)
    raise PretrainedError(f"{text!r} is neither a catalogue name ({', '.join(list_pretrained())}), a Hub repo id "
                          "(ORG/NAME) nor a local model folder")


def resolve_model_source(model: str | os.PathLike) -> Path:
    """The local folder holding a stamp model: ``RUN`` -> ``RUN/model``, a model folder, a catalogue
    name (``stamp-v1``: converted once into the cache) or a Hub snapshot."""
    path = Path(model).expanduser()
    if path.is_dir():
        from stamp.locations import resolve_model_dir

        return resolve_model_dir(path)
    return resolve_pretrained(str(model))


def _converted(entry: ModelEntry, *, revision: str | None, token: str | None,
               cache_dir: str | os.PathLike | None) -> Path:
    """Download the released file once and convert it once per Hub commit (atomic, race-safe)."""
    from stamp.zoo.convert import convert_released

    src = download_file(entry.hub_id, entry.file, revision=revision, token=token, cache_dir=cache_dir,
                        terms_url=entry.page)
    commit = src.parent.name  # hf cache: .../snapshots/<commit>/<file>
    out = converted_cache_root() / entry.hub_id.replace("/", "--") / commit / entry.name
    if (out / CONVERTED_MARKER).is_file():
        return out
    from filelock import FileLock  # huggingface_hub's own dependency

    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):  # one conversion at a time; the others then find it done
        if not (out / CONVERTED_MARKER).is_file():
            logger.info("converting %s (%s) once into %s", entry.name, entry.hub_id, out)
            convert_released(src, out, name=entry, overwrite=True, source_id=f"{entry.hub_id}@{commit}")
    return out


# ============================================================================ means, remembered once
def means_key(entry: ModelEntry) -> str:
    """Which registered means file an entry uses (``stamp-v1-gene`` shares ``stamp-v1``'s)."""
    return entry.full_entry or entry.name


def uses_means(entry: ModelEntry) -> bool:
    """Whether an entry's tokenizer divides by a per-gene means file the user supplies once (the released
    STAMP means, Nicheformer's technology means): its ``tokenizer`` names a ``vocabulary`` and ``means``."""
    return bool(entry.tokenizer) and "vocabulary" in entry.tokenizer and "means" in entry.tokenizer


def registered_means(key: str) -> Path | None:
    path = means_root() / f"{key}.npy"
    return path if path.is_file() else None


def set_means(name: str, file: str | os.PathLike) -> Path:
    """Check the released means file against the entry's vocabulary and keep a copy in the user's
    cache, so ``stamp.load(name)`` / ``--model name`` need no ``--means`` again. Returns the copy."""
    import numpy as np

    from spavis.format.io import atomic_open
    from stamp.zoo.catalogue import vocabulary
    from stamp.tokenizer import load_means_file

    entry = get_pretrained(name)
    if not uses_means(entry):
        raise PretrainedError(f"{name} is a {entry.library} {entry.kind} encoder: it uses no gene means file")
    gene_ids, _ = vocabulary(entry.tokenizer["vocabulary"])
    values = load_means_file(file, len(gene_ids))
    out = means_root() / f"{means_key(entry)}.npy"
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(out, "wb") as f:
        np.save(f, np.asarray(values, dtype=np.float64))
    return out


def _folder_means_key(folder: Path, cfg: dict) -> str | None:
    if cfg.get(MEANS_KEY):
        return str(cfg[MEANS_KEY])
    weights = folder / "model.safetensors"
    if weights.is_file():  # converted before means_key existed: the weights' metadata names the entry
        try:
            from safetensors import safe_open

            with safe_open(str(weights), framework="np") as f:
                name = (f.metadata() or {}).get("stamp_registry_name")
        except Exception:  # unreadable metadata: no key, the usual "pass --means" message follows
            return None
        if name and is_pretrained(name):
            return means_key(get_pretrained(name))
    return None


def load_tokenizer(model: str | os.PathLike, means: str | os.PathLike | None = None):
    """The GeneTokenizer of a model (catalogue name, Hub repo id or folder); ``means`` replaces /
    supplies its means. Converted releases ship none: the file registered once with
    :func:`set_means` is used, else one line asks for it."""
    from stamp.tokenizer import CONFIG_FILE, MEANS_FILE, VOCAB_FILE, GeneTokenizer, load_means_file

    folder = Path(model).expanduser()
    if not folder.is_dir():
        folder = resolve_pretrained(model)
    cfg_path = folder / CONFIG_FILE
    if means is None:
        if cfg_path.is_file() and not (folder / MEANS_FILE).is_file():
            cfg = json.loads(cfg_path.read_text())
            required = cfg.get(MEANS_REQUIRED_KEY)
            if required:
                key = _folder_means_key(folder, cfg)
                means = registered_means(key) if key else None
                if means is None:
                    hint = f"`stamp models set-means {key} FILE` once, or " if key else ""
                    raise PretrainedError(
                        f"{folder}: this model's tokenizer needs the released gene means, which cannot be "
                        f"redistributed; run {hint}pass --means FILE (means=...): {required}")
        if means is None:
            return GeneTokenizer.from_pretrained(folder)
    missing = [n for n in (VOCAB_FILE, CONFIG_FILE) if not (folder / n).is_file()]
    if missing:
        raise PretrainedError(f"{folder} lacks {', '.join(missing)}; it is not a stamp model folder")
    cfg = json.loads(cfg_path.read_text())
    vocab = json.loads((folder / VOCAB_FILE).read_text())
    gene_ids = [g for g, i in sorted(vocab.items(), key=lambda kv: kv[1]) if i >= cfg.get("n_reserved", 30)]
    return GeneTokenizer(gene_ids, load_means_file(means, len(gene_ids)), mode=cfg.get("mode", "native"),
                         max_length=cfg.get("max_length"), mean_source=f"file:{Path(means).name}")


def converted_from_file(entry: ModelEntry, file: Path) -> Path:
    """A released checkpoint downloaded by hand (``weights=``): converted once, keyed by its sha256."""
    from stamp.zoo.convert import convert_released

    if file.is_dir():
        file = file / (entry.file or "pytorch_model.bin")
    if not file.is_file():
        raise PretrainedError(f"{file}: no such file; download {entry.file} from {entry.page} and pass its path")
    sha = weights_sha256(file) or "unknown"
    out = converted_cache_root() / "local" / sha[:16] / entry.name
    if not (out / CONVERTED_MARKER).is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        convert_released(file, out, name=entry, overwrite=True, source_id=f"file:{file.name}")
    return out


def weights_sha256(path: Path) -> str | None:
    """sha256 of a weights file (None when it cannot be read): the provenance every output records."""
    from spavis.format.io import sha256_file

    try:
        return sha256_file(path)
    except OSError:
        return None


# ============================================================================ the table
def is_cached(entry: ModelEntry) -> bool:
    """Weights already on this machine (Hub cache or converted release)."""
    if entry.library == "stamp":
        root = converted_cache_root() / entry.hub_id.replace("/", "--")
        return any(root.glob(f"*/{entry.name}/{CONVERTED_MARKER}"))
    if not entry.hub_id:
        return False
    files = entry.files
    if entry.layout:  # the gene models: their weights file (a Geneformer model folder: its weights)
        rel = entry.layout.get("weights") or entry.layout.get("model", "")
        files = (rel,) if "weights" in entry.layout else tuple(f"{rel}/{f}" for f in entry.files)
    try:
        from huggingface_hub import try_to_load_from_cache

        return any(isinstance(try_to_load_from_cache(entry.hub_id, f), str) for f in files)
    except Exception:  # a cache it cannot read: say "no"
        return False


def model_table(kind: str | None = None) -> list[dict[str, Any]]:
    """Rows of ``stamp models``: name, kind, dim, parameters, licence, commercial, gated, cached."""
    rows = []
    for name in list_pretrained(kind):
        entry = get_pretrained(name)
        row = entry.row()
        row["cached"] = "yes" if is_cached(entry) else "no"
        if uses_means(entry):
            row["means"] = "set" if registered_means(means_key(entry)) else "needed"
        rows.append(row)
    return rows


__all__ = ["resolve_pretrained", "resolve_model_source", "converted_from_file", "load_tokenizer", "set_means",
           "registered_means", "means_key", "uses_means", "weights_sha256", "model_table", "is_cached", "CONVERTED_MARKER",
           "MEANS_REQUIRED_KEY", "MEANS_KEY"]
