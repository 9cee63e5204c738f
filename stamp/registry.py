"""The model zoo: named checkpoints (``stamp/pretrained.json``) and one resolver for every loader.

Like open_clip's ``pretrained.py``, the entries are data, not code: each names a Hub repo and
file, the file's format (``stamp`` = this project's layout, loadable as is; ``stamp-released``
= the authors' ``pytorch_model.bin``, converted on first use by :mod:`stamp.convert`), the
architecture configs, the tokenizer rules, the license and the citation.

:func:`resolve_pretrained` turns a registry name, a Hub repo id or a local folder into a local
folder in this project's layout. Released files are converted once into
``<HF_HUB_CACHE>/../stamp/converted/<repo>/<commit>/<name>/`` (or ``$STAMP_CACHE``), keyed by
the Hub commit, so later loads read the converted safetensors and a new upstream revision is
converted again. ``$STAMP_REGISTRY`` names an extra registry file (same form) whose entries add
to or replace the shipped ones. Gated or missing repos raise one :class:`PretrainedError` line naming the
terms page and ``hf auth login``.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from stamp.errors import StampError

logger = logging.getLogger(__name__)

REGISTRY_FILE = "pretrained.json"
FORMATS = ("stamp", "stamp-released")
COMPONENTS = ("full", "gene")
EXTRA_REGISTRY_ENV = "STAMP_REGISTRY"
CONVERTED_MARKER = "conversion.json"  # written last by stamp.convert: a folder without it is incomplete


class PretrainedError(StampError):
    """A model name / repo / folder cannot be resolved, is gated, or its registry entry is broken."""


@dataclass(frozen=True)
class PretrainedEntry:
    """One named checkpoint of ``stamp/pretrained.json``."""

    name: str
    hub_id: str
    file: str
    format: str
    component: str
    gene_config: dict
    vision_config: dict | None
    embed_dim: int
    tokenizer: dict
    image: dict | None
    license: str
    terms_url: str
    gated: bool
    citation: str
    description: str = ""
    license_name: str | None = None
    license_note: str = ""
    paper: str | None = None
    code: str | None = None
    datasets: tuple = ()
    training: str = ""
    gene_entry: str | None = None
    full_entry: str | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, name: str, data: dict) -> "PretrainedEntry":
        known = {f for f in cls.__dataclass_fields__ if f not in ("name", "extra")}
        missing = sorted({"hub_id", "file", "format", "component", "gene_config", "license", "terms_url",
                          "gated", "citation", "tokenizer", "embed_dim"} - set(data))
        if missing:
            raise PretrainedError(f"stamp/{REGISTRY_FILE}: entry {name!r} lacks {missing}")
        if data["format"] not in FORMATS or data["component"] not in COMPONENTS:
            raise PretrainedError(f"stamp/{REGISTRY_FILE}: entry {name!r} has format {data['format']!r} / component "
                                  f"{data['component']!r}; formats {FORMATS}, components {COMPONENTS}")
        kw = {k: v for k, v in data.items() if k in known}
        kw["datasets"] = tuple(kw.get("datasets") or ())
        kw.setdefault("vision_config", None)
        kw.setdefault("image", None)
        return cls(name=name, extra={k: v for k, v in data.items() if k not in known}, **kw)

    def row(self) -> dict[str, Any]:
        """The columns ``stamp models`` prints."""
        converted = (converted_cache_root() / self.hub_id.replace("/", "--")).glob(f"*/{self.name}/{CONVERTED_MARKER}")
        return {"name": self.name, "component": self.component, "hub_id": self.hub_id, "file": self.file,
                "format": self.format, "license": self.license_name or self.license,
                "gated": "yes" if self.gated else "no",
                "converted": "yes" if self.format == "stamp" or any(converted) else "no"}


def _registry() -> dict[str, PretrainedEntry]:
    return _load(os.environ.get(EXTRA_REGISTRY_ENV) or None)


@lru_cache(maxsize=4)
def _load(extra: str | None) -> dict[str, PretrainedEntry]:
    """The shipped entries, then those of ``$STAMP_REGISTRY`` (a JSON file of the same form), which
    add names or replace shipped ones (a mirror, a private fork of a release)."""
    data = json.loads((resources.files("stamp") / REGISTRY_FILE).read_text())["models"]
    if extra:
        try:
            data = {**data, **json.loads(Path(extra).expanduser().read_text())["models"]}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PretrainedError(f"{extra} (${EXTRA_REGISTRY_ENV}): not a registry file with a 'models' "
                                  f"object ({type(exc).__name__}: {exc}); fix or unset it") from None
    return {name: PretrainedEntry.from_dict(name, entry) for name, entry in data.items()}


def list_pretrained() -> list[str]:
    """Names of the registry's checkpoints (``stamp-v1``, ``stamp-v1-gene`` ...)."""
    return sorted(_registry())


def is_pretrained(name: Any) -> bool:
    return isinstance(name, str) and name in _registry()


def get_pretrained(name: str) -> PretrainedEntry:
    """The registry entry ``name``; an error listing the known names otherwise."""
    try:
        return _registry()[name]
    except KeyError:
        raise PretrainedError(f"unknown pretrained model {name!r}; known: {', '.join(list_pretrained())} "
                              "(or pass a Hub repo id ORG/NAME or a local model folder)") from None


def converted_cache_root() -> Path:
    """Where converted releases live: ``$STAMP_CACHE`` or ``stamp/converted`` beside the Hub cache."""
    if os.environ.get("STAMP_CACHE"):
        return Path(os.environ["STAMP_CACHE"]).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser().parent / "stamp" / "converted"


def hub_error(repo_id: str, exc: BaseException, terms_url: str | None = None) -> PretrainedError:
    """One clear line for a Hub failure: gated (terms page + ``hf auth login``), missing, or network."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError,
                                        LocalEntryNotFoundError, RepositoryNotFoundError)

    page = terms_url or f"{constants.ENDPOINT.rstrip('/')}/{repo_id}"
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, GatedRepoError) or status == 403:
        return PretrainedError(f"{repo_id} is gated: accept its terms at {page}, then log in with `hf auth login` "
                               "(or set HF_TOKEN) with that account")
    if isinstance(exc, RepositoryNotFoundError) or status == 401:
        return PretrainedError(f"{repo_id}: repository not found or not accessible; check the id, and if it is "
                               f"gated or private accept its terms at {page} and log in with `hf auth login`")
    if isinstance(exc, EntryNotFoundError):
        return PretrainedError(f"{repo_id}: the repo does not hold the expected file{_repo_files_hint(repo_id)}; "
                               f"point a ${EXTRA_REGISTRY_ENV} entry's 'file' at the right one")
    if isinstance(exc, LocalEntryNotFoundError):
        return PretrainedError(f"{repo_id}: not in the local cache and the Hub is unreachable; connect or set "
                               "HF_ENDPOINT, or pass a local folder")
    if isinstance(exc, HfHubHTTPError):
        return PretrainedError(f"{repo_id}: the Hub answered HTTP {status}; retry later or check HF_ENDPOINT")
    return PretrainedError(f"{repo_id}: download failed ({type(exc).__name__}: {exc})")


def _repo_files_hint(repo_id: str) -> str:
    """`` (it holds: a.bin, b.ckpt)`` - the repo's checkpoint-like files, when they can be listed."""
    try:
        from huggingface_hub import HfApi

        files = [f for f in HfApi().list_repo_files(repo_id)
                 if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".safetensors"))]
    except Exception:  # listing is a courtesy: any failure just drops the hint
        return ""
    return f" (it holds: {', '.join(files[:8])})" if files else " (it holds no checkpoint file)"


def _download(repo_id: str, filename: str | None, *, revision: str | None, token: str | None,
              cache_dir: str | os.PathLike | None, terms_url: str | None = None,
              allow_patterns: list[str] | None = None) -> Path:
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        if filename is not None:
            return Path(hf_hub_download(repo_id, filename, revision=revision, token=token, cache_dir=cache_dir))
        return Path(snapshot_download(repo_id, revision=revision, token=token, cache_dir=cache_dir,
                                      allow_patterns=allow_patterns))
    except Exception as exc:  # the client raises many types (HTTP, connection, validation)
        raise hub_error(repo_id, exc, terms_url) from None


def _looks_like_repo_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and not Path(text).exists()


def resolve_pretrained(
    name_or_path: str | os.PathLike,
    *,
    component: str | None = None,
    revision: str | None = None,
    token: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """A local folder in this project's layout for a registry name, a Hub repo id or a folder.

    ``component="gene"`` picks the gene encoder of a full-model entry (``stamp-v1`` ->
    ``stamp-v1-gene``). Converted folders in the cache never hold the user's means file
    (it is not redistributable): pass it to :func:`load_tokenizer` / ``stamp embed --means``.
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return path / "model" if (path / "model" / "config.json").is_file() else path
    if is_pretrained(text):
        entry = get_pretrained(text)
        if component == "gene" and entry.component == "full" and entry.gene_entry:
            entry = get_pretrained(entry.gene_entry)
        if entry.format == "stamp":
            return _download(entry.hub_id, None, revision=revision, token=token, cache_dir=cache_dir,
                             terms_url=entry.terms_url)
        return _converted(entry, revision=revision, token=token, cache_dir=cache_dir)
    if _looks_like_repo_id(text):
        return _download(text, None, revision=revision, token=token, cache_dir=cache_dir)
    raise PretrainedError(f"{text!r} is neither a registry name ({', '.join(list_pretrained())}), a Hub repo id "
                          "(ORG/NAME) nor a local model folder")


def _converted(entry: PretrainedEntry, *, revision: str | None, token: str | None,
               cache_dir: str | os.PathLike | None) -> Path:
    """Download the released file once and convert it once per Hub commit (atomic, race-safe)."""
    from stamp.convert import convert_released

    src = _download(entry.hub_id, entry.file, revision=revision, token=token, cache_dir=cache_dir,
                    terms_url=entry.terms_url)
    commit = src.parent.name  # hf cache: .../snapshots/<commit>/<file>
    out = converted_cache_root() / entry.hub_id.replace("/", "--") / commit / entry.name
    if (out / CONVERTED_MARKER).is_file():
        return out
    from filelock import FileLock  # huggingface_hub's own dependency

    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):  # one conversion at a time; the others then find it done
        if not (out / CONVERTED_MARKER).is_file():
            logger.info("converting %s (%s) once into %s", entry.name, entry.hub_id, out)
            convert_released(src, out, name=entry.name, overwrite=True, source_id=f"{entry.hub_id}@{commit}")
    return out


MEANS_REQUIRED_KEY = "means_required"


def _vocabulary(name: str) -> tuple[list[str], list[str]]:
    """(Ensembl ids, symbols) of a named gene vocabulary, read from spavis's package data (a JSON file).

    Read as data only (no spavis module is imported): the vocabulary is what both packages share.
    """
    try:
        text = (resources.files("spavis") / "data" / "vocab" / f"{name}.json").read_text()
    except (FileNotFoundError, ModuleNotFoundError):
        raise PretrainedError(f"gene vocabulary {name!r} is not shipped with this installation") from None
    genes = json.loads(text)["genes"]
    if [g["index"] for g in genes] != list(range(len(genes))):
        raise PretrainedError(f"gene vocabulary {name!r}: indices are not 0..n-1")
    return [g["ensembl_id"] for g in genes], [g.get("symbol", "") for g in genes]


def write_tokenizer_files(folder: str | os.PathLike, entry: PretrainedEntry,
                          means: str | os.PathLike | None = None) -> None:
    """Tokenizer files of a converted entry: vocab.json + tokenizer_config.json (+ the means when given).

    The released means cannot be redistributed, so without ``means`` the folder records
    ``means_required`` and :func:`load_tokenizer` asks the user for the file.
    """
    from stamp.tokenizer import CONFIG_FILE, MEANS_FILE, GeneTokenizer, load_means_file

    folder = Path(folder)
    spec = entry.tokenizer
    gene_ids, symbols = _vocabulary(spec["vocabulary"])
    if means is not None:
        values, source = load_means_file(means, len(gene_ids)), f"file:{Path(means).name}"
    else:
        import numpy as np

        values, source = np.ones(len(gene_ids)), "user-supplied (released means file, not redistributed)"
    tok = GeneTokenizer(gene_ids, values, symbols=symbols, mode=spec["mode"], max_length=spec.get("max_length"),
                        mean_source=source)
    tok.save_pretrained(folder)
    if means is None:
        (folder / MEANS_FILE).unlink()
        cfg = json.loads((folder / CONFIG_FILE).read_text())
        cfg[MEANS_REQUIRED_KEY] = spec.get("means", True)
        (folder / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")


def load_tokenizer(model: str | os.PathLike, means: str | os.PathLike | None = None):
    """The GeneTokenizer of a model (registry name, Hub repo id or folder); ``means`` (a means file)
    replaces / supplies its means (converted releases ship none: the released file is not redistributable)."""
    from stamp.tokenizer import CONFIG_FILE, MEANS_FILE, VOCAB_FILE, GeneTokenizer, load_means_file

    folder = Path(model).expanduser()
    if not folder.is_dir():
        folder = resolve_pretrained(model)
    if means is None:
        cfg_path = folder / CONFIG_FILE
        if cfg_path.is_file() and not (folder / MEANS_FILE).is_file():
            required = json.loads(cfg_path.read_text()).get(MEANS_REQUIRED_KEY)
            if required:
                raise PretrainedError(
                    f"{folder}: this model's tokenizer needs the released gene means, which cannot be "
                    f"redistributed; pass --means FILE (means=...): {required}")
        return GeneTokenizer.from_pretrained(folder)
    missing = [n for n in (VOCAB_FILE, CONFIG_FILE) if not (folder / n).is_file()]
    if missing:
        raise PretrainedError(f"{folder} lacks {', '.join(missing)}; it is not a stamp model folder")
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    vocab = json.loads((folder / VOCAB_FILE).read_text())
    gene_ids = [g for g, i in sorted(vocab.items(), key=lambda kv: kv[1]) if i >= cfg.get("n_reserved", 30)]
    return GeneTokenizer(gene_ids, load_means_file(means, len(gene_ids)), mode=cfg.get("mode", "native"),
                         max_length=cfg.get("max_length"), mean_source=f"file:{Path(means).name}")


def registry_path(name_or_path: Any, *, component: str | None = None, **hub_kwargs: Any) -> Any:
    """For ``from_pretrained`` hooks: a registry name becomes its local (converted) folder; anything
    else (Hub repo id, folder) is returned unchanged for PyTorchModelHubMixin to handle."""
    if not is_pretrained(name_or_path) or Path(str(name_or_path)).is_dir():
        return name_or_path
    keep = {k: hub_kwargs.get(k) for k in ("revision", "token", "cache_dir")}
    return str(resolve_pretrained(name_or_path, component=component, **keep))


def create_model(name_or_path: Any, **overrides: Any):
    """One factory for the zoo: registry name, Hub repo id or folder -> the right class with weights;
    a gene preset (``base``, ``tiny``) or config file -> a fresh :class:`StampGeneEncoder`."""
    from stamp.model import StampGeneEncoder
    from stamp.model import create_model as create_gene_model

    text = str(name_or_path)
    if is_pretrained(text):
        if get_pretrained(text).component == "full":
            from stamp.multimodal import StampModel

            return StampModel.from_pretrained(text)
        return StampGeneEncoder.from_pretrained(text)
    path = Path(text).expanduser()
    folder = None
    if path.is_dir():
        folder = resolve_pretrained(path)
    elif _looks_like_repo_id(text):
        folder = resolve_pretrained(text, revision=overrides.pop("revision", None), token=overrides.pop("token", None))
    if folder is not None and (folder / "config.json").is_file():
        config = json.loads((folder / "config.json").read_text())
        if "gene" in config and "vision" in config:
            from stamp.multimodal import StampModel

            return StampModel.from_pretrained(str(folder))
        return StampGeneEncoder.from_pretrained(str(folder))
    return create_gene_model(name_or_path, **overrides)


__all__ = ["PretrainedEntry", "PretrainedError", "list_pretrained", "get_pretrained", "is_pretrained",
           "resolve_pretrained", "converted_cache_root", "hub_error", "write_tokenizer_files", "load_tokenizer",
           "registry_path", "create_model",
           "REGISTRY_FILE"]
