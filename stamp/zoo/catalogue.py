"""The zoo's catalogue: every named encoder as data (``stamp/zoo/pretrained.json``), no torch, no Hub.

Layering (open_clip style; ``tests/test_layering_stamp.py`` keeps it):

    catalogue (this module: JSON + dataclasses)
        <- model classes (stamp.models.gene_encoder, stamp.models.vision, stamp.models.aligned_model, stamp.models.foundation: know no names)
        <- factory (stamp.zoo.factory: resolve -> create -> load; the only place mapping a name to a model)
        <- convert / publish (stamp.zoo.convert, stamp.hub) and the commands

An entry names the Hub repo, the library and architecture (a timm model name + keyword
arguments, a transformers class + config, this project's own ``stamp`` layout, or one of the
gene models with their own file layout: ``scgpt``, ``nicheformer``, ``geneformer``), the
embedding width and pooling, the preprocessing, the parameter count, the licence, whether
commercial use is allowed, whether the repo is gated, and the citation; ``sources`` and
``notes`` say where a value comes from and where the model's card is ambiguous.

``$STAMP_REGISTRY`` names a user overlay file of the same form (``{"models": {NAME: ENTRY}}``)
whose entries add to or replace the shipped ones; each of its mistakes is one line naming the
overlay file and the entry.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from stamp.constants import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS
from stamp.hub_access import PretrainedError

REGISTRY_FILE = "pretrained.json"
EXTRA_REGISTRY_ENV = "STAMP_REGISTRY"
KINDS = ("image", "gene", "aligned")
GENE_LIBRARIES = ("scgpt", "nicheformer", "geneformer")  # gene encoders read from the authors' own files
LIBRARIES = ("stamp", "timm", "transformers", "open_clip", "conch") + GENE_LIBRARIES
FORMATS = ("stamp", "stamp-released")
COMPONENTS = ("full", "gene")
POOLINGS = {
    "timm": ("head", "cls", "cls+mean", "mean", "layer3-avg"),
    "transformers": ("cls", "pooler", "mean", "cls+mean", "image_embeds"),
    "stamp": (None,),
    "scgpt": ("cls",),
    "nicheformer": ("mean",),
    "geneformer": ("cls", "mean"),
    # open_clip: encode_image(normalize=False); conch: the contrastive query before / after proj_contrast
    "open_clip": ("encode_image",),
    "conch": ("contrast", "projected"),
}
# Table 1's marks: the modalities a model saw in pretraining (vision, language, genes)
MODALITY_MARKS = ("V", "L", "G")
TRANSFORMERS_CLASSES = ("ViTModel", "Dinov2Model", "CLIPVisionModel", "CLIPVisionModelWithProjection", "AutoModel")
COMMON_REQUIRED = ("kind", "library", "hub_id", "embed_dim", "license", "commercial", "gated", "citation")
REQUIRED = {
    "timm": COMMON_REQUIRED + ("architecture", "pooling", "preprocessing"),
    "transformers": COMMON_REQUIRED + ("architecture", "pooling", "preprocessing"),
    "open_clip": COMMON_REQUIRED + ("architecture", "pooling", "preprocessing"),
    "conch": COMMON_REQUIRED + ("architecture", "pooling", "preprocessing"),
    "stamp": COMMON_REQUIRED + ("file", "format", "component", "gene_config", "tokenizer", "terms_url"),
}
# the gene models' entries: sizes (architecture), the roles of the authors' files (layout), their input rules
REQUIRED.update({lib: COMMON_REQUIRED + ("architecture", "pooling", "layout", "tokenizer") for lib in GENE_LIBRARIES})
LAYOUT_ROLES = {
    "scgpt": ("weights", "args", "vocab"),  # + gene_stats (scGPT-spatial)
    "nicheformer": ("weights", "config"),
    "geneformer": ("model", "tokens", "medians"),  # + mapping
}


@dataclass(frozen=True)
class ModelEntry:
    """One named encoder of the catalogue (see the module docstring for the fields' meaning)."""

    name: str
    kind: str
    library: str
    hub_id: str | None
    embed_dim: int
    license: str
    commercial: bool | None
    gated: bool
    citation: str
    architecture: dict = field(default_factory=dict)
    pooling: str | None = None
    preprocessing: dict | None = None
    parameters: int | None = None
    card_parameters: int | None = None
    files: tuple = ("model.safetensors", "pytorch_model.bin")
    description: str = ""
    license_name: str | None = None
    license_note: str = ""
    terms_url: str = ""
    paper: str | None = None
    code: str | None = None
    notes: str = ""
    sources: dict = field(default_factory=dict)
    # this project's own layout (library "stamp"): the released STAMP checkpoints
    file: str | None = None
    format: str | None = None
    component: str | None = None
    gene_config: dict = field(default_factory=dict)
    vision_config: dict | None = None
    tokenizer: dict = field(default_factory=dict)
    image: dict | None = None
    datasets: tuple = ()
    training: str = ""
    gene_entry: str | None = None
    full_entry: str | None = None
    # the gene models (libraries scgpt, nicheformer, geneformer): file roles -> paths in the repo or
    # --weights folder; the release's sha256 of files (checked on Hub downloads); where the weights are
    # when they are not on the Hub (then hub_id is null and --weights is needed)
    layout: dict = field(default_factory=dict)
    checksums: dict = field(default_factory=dict)
    download_url: str | None = None
    modalities: tuple = ()  # pretraining modalities, Table 1's marks (MODALITY_MARKS)
    gene_input: dict | None = None  # the gene side of a foreign aligned model (open_clip: gene sentences)
    origin: str = ""  # which file defined it (the shipped catalogue or the overlay)
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, name: str, data: Any, origin: str) -> "ModelEntry":
        """Validate one entry; every mistake is one :class:`PretrainedError` line naming ``origin``."""
        where = f"{origin}: entry {name!r}"
        if not isinstance(data, dict):
            raise PretrainedError(f"{where} is a JSON {type(data).__name__}, not an object")
        library = data.get("library", "stamp" if "format" in data else None)
        if library not in LIBRARIES:
            raise PretrainedError(f"{where}: library {library!r} must be one of {', '.join(LIBRARIES)}")
        missing = [k for k in REQUIRED[library] if k not in data and not (k == "library")]
        if missing:
            raise PretrainedError(f"{where} lacks {', '.join(missing)}; every {library} entry needs "
                                  f"{', '.join(REQUIRED[library])}")
        kind = data["kind"]
        if kind not in KINDS:
            raise PretrainedError(f"{where}: kind {kind!r} must be one of {', '.join(KINDS)}")
        if not isinstance(data["embed_dim"], int) or isinstance(data["embed_dim"], bool) or not 0 < data["embed_dim"] <= 65536:
            raise PretrainedError(f"{where}: embed_dim {data['embed_dim']!r} must be a whole number in 1..65536")
        if not isinstance(data["gated"], bool) or data["commercial"] not in (True, False, None):
            raise PretrainedError(f"{where}: gated must be true/false and commercial true/false/null")
        no_hub = data["hub_id"] is None and library in GENE_LIBRARIES and isinstance(data.get("download_url"), str)
        if not no_hub and (not isinstance(data["hub_id"], str) or data["hub_id"].count("/") != 1):
            raise PretrainedError(f"{where}: hub_id {data['hub_id']!r} must be a Hub repo id ORG/NAME (null only with "
                                  "a download_url)")
        if library in GENE_LIBRARIES:
            _check_gene_entry(data, library, where)
        elif library == "stamp":
            if data["format"] not in FORMATS or data["component"] not in COMPONENTS:
                raise PretrainedError(f"{where}: format {data['format']!r} / component {data['component']!r}; "
                                      f"formats {FORMATS}, components {COMPONENTS}")
        elif library in ("open_clip", "conch"):
            _check_foreign_architecture(data, library, where)
        else:
            arch = data["architecture"]
            key = "name" if library == "timm" else "class"
            if not isinstance(arch, dict) or not isinstance(arch.get(key), str):
                raise PretrainedError(f"{where}: architecture must be an object with a {key!r} string")
            if library == "transformers" and arch["class"] not in TRANSFORMERS_CLASSES:
                raise PretrainedError(f"{where}: architecture class {arch['class']!r} must be one of "
                                      f"{', '.join(TRANSFORMERS_CLASSES)}")
            if not isinstance(arch.get("kwargs", {}), dict):
                raise PretrainedError(f"{where}: architecture.kwargs must be an object")
            if library == "timm":  # before any download: a key such as "pretrained" is refused here, naming the entry
                from stamp.safety import check_timm_kwargs

                try:
                    check_timm_kwargs(arch.get("kwargs", {}), where, resolve=False)
                except Exception as exc:
                    raise PretrainedError(str(exc)) from None
            if data["pooling"] not in POOLINGS[library]:
                raise PretrainedError(f"{where}: pooling {data['pooling']!r} must be one of "
                                      f"{', '.join(POOLINGS[library])}")
            _check_preprocessing(data["preprocessing"], where)
        from stamp.safety import check_config_sizes

        try:
            check_config_sizes({k: data.get(k) for k in ("architecture", "gene_config", "vision_config")}, where)
        except Exception as exc:
            raise PretrainedError(str(exc)) from None
        known = {f for f in cls.__dataclass_fields__ if f not in ("name", "extra", "origin")}
        kw = {k: v for k, v in data.items() if k in known}
        kw["library"] = library
        for key in ("datasets", "files", "modalities"):
            if key in kw:
                kw[key] = tuple(kw[key] or ())
        bad = [m for m in kw.get("modalities", ()) if m not in MODALITY_MARKS]
        if bad:
            raise PretrainedError(f"{where}: modalities {bad} must be among {', '.join(MODALITY_MARKS)}")
        return cls(name=name, origin=origin, extra={k: v for k, v in data.items() if k not in known}, **kw)

    @property
    def page(self) -> str:
        """Where a user reads the terms (the model's Hub page unless the entry names another)."""
        if self.terms_url or not self.hub_id:
            return self.terms_url or self.download_url or self.code or ""
        return f"https://huggingface.co/{self.hub_id}"

    @property
    def marks(self) -> str:
        """Table 1's modality marks ("V+L", ...): the entry's ``modalities``, else what its kind implies."""
        found = self.modalities or {"image": ("V",), "gene": ("G",), "aligned": ("V", "G")}[self.kind]
        return "+".join(m for m in MODALITY_MARKS if m in found)

    def row(self) -> dict[str, Any]:
        """The columns ``stamp models`` prints (``cached`` filled in by the factory)."""
        return {"name": self.name, "kind": self.kind, "dim": self.embed_dim,
                "parameters": self.parameters, "license": self.license_name or self.license,
                "commercial": {True: "yes", False: "no", None: "?"}[self.commercial],
                "gated": "yes" if self.gated else "no", "hub_id": self.hub_id or "(not on the Hub: --weights)",
                "library": self.library}


def _check_gene_entry(data: dict, library: str, where: str) -> None:
    """A gene model's entry: sizes, file roles, input rules and pooling, each a one-line mistake."""
    for key in ("architecture", "layout", "tokenizer"):
        if not isinstance(data[key], dict):
            raise PretrainedError(f"{where}: {key} must be an object")
    missing = [r for r in LAYOUT_ROLES[library] if not isinstance(data["layout"].get(r), str)]
    if missing:
        raise PretrainedError(f"{where}: layout lacks {', '.join(missing)} (file paths in the repo); a {library} "
                              f"entry names {', '.join(LAYOUT_ROLES[library])}")
    if any(not isinstance(v, str) or ".." in v.split("/") or v.startswith("/") for v in data["layout"].values()):
        raise PretrainedError(f"{where}: layout paths must be relative paths inside the repo")
    checksums = data.get("checksums", {})
    if not isinstance(checksums, dict) or any(not isinstance(v, str) or len(v) != 64 for v in checksums.values()):
        raise PretrainedError(f"{where}: checksums must map file paths to sha256 hex digests")
    if data["pooling"] not in POOLINGS[library]:
        raise PretrainedError(f"{where}: pooling {data['pooling']!r} must be one of {', '.join(POOLINGS[library])}")


def _check_foreign_architecture(data: dict, library: str, where: str) -> None:
    """open_clip entries carry open_clip's ``model_cfg``; conch entries the authors' model config."""
    arch = data["architecture"]
    key = "model_cfg" if library == "open_clip" else "config"
    if not isinstance(arch, dict) or not isinstance(arch.get(key), dict):
        raise PretrainedError(f"{where}: architecture must be an object with a {key!r} object")
    if data["pooling"] not in POOLINGS[library]:
        raise PretrainedError(f"{where}: pooling {data['pooling']!r} must be one of {', '.join(POOLINGS[library])}")
    for name in ("unused", "prefix"):
        if name in arch and not (isinstance(arch[name], list) if name == "unused" else isinstance(arch[name], str)):
            raise PretrainedError(f"{where}: architecture.{name} must be a {'list' if name == 'unused' else 'string'}")
    _check_preprocessing(data["preprocessing"], where)


def _check_preprocessing(pre: Any, where: str) -> None:
    if not isinstance(pre, dict):
        raise PretrainedError(f"{where}: preprocessing must be an object (resize, crop, interpolation, mean, std)")
    for key in ("resize", "crop"):
        if not isinstance(pre.get(key), int) or not 1 <= pre[key] <= 8192:
            raise PretrainedError(f"{where}: preprocessing.{key} must be a whole number of pixels in 1..8192")
    if pre.get("interpolation", "bilinear") not in INTERPOLATIONS:
        raise PretrainedError(f"{where}: preprocessing.interpolation must be one of {', '.join(INTERPOLATIONS)}")
    for key in ("mean", "std"):
        vals = pre.get(key)
        if not isinstance(vals, list) or len(vals) != 3 or not all(isinstance(v, (int, float)) for v in vals):
            raise PretrainedError(f"{where}: preprocessing.{key} must be 3 numbers (RGB)")
    if any(v <= 0 for v in pre["std"]):
        raise PretrainedError(f"{where}: preprocessing.std values must be positive")


def _read(path: str | os.PathLike | None, text: str | None, origin: str) -> dict:
    try:
        raw = json.loads(text if text is not None else Path(path).expanduser().read_text())
    except OSError as exc:
        raise PretrainedError(f"{origin}: cannot be read ({exc.strerror or exc}); fix or unset "
                              f"${EXTRA_REGISTRY_ENV}") from None
    except ValueError as exc:
        raise PretrainedError(f"{origin}: not valid JSON ({exc}); fix it") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("models"), dict):
        raise PretrainedError(f"{origin}: not a catalogue file: expected {{\"models\": {{NAME: ENTRY, ...}}}}")
    return raw["models"]


@lru_cache(maxsize=4)
def _load(extra: str | None) -> dict[str, ModelEntry]:
    shipped = f"stamp/zoo/{REGISTRY_FILE}"
    entries = {name: ModelEntry.from_dict(name, data, shipped)
               for name, data in _read(None, (resources.files("stamp.zoo") / REGISTRY_FILE).read_text(), shipped).items()}
    if extra:
        origin = f"{extra} (${EXTRA_REGISTRY_ENV})"
        for name, data in _read(extra, None, origin).items():
            entries[name] = ModelEntry.from_dict(name, data, origin)
    for name, entry in entries.items():  # {"base": "uni", ...}: the image entry's ViT, described once
        if isinstance(entry.vision_config, dict) and "base" in entry.vision_config:
            overrides = {k: v for k, v in entry.vision_config.items() if k != "base"}
            where = f"{entry.origin}: entry {name!r}: vision_config"
            entries[name] = replace(entry, vision_config=_vision_data(entries, entry.vision_config["base"], where,
                                                                      overrides))
    return entries


def _vision_data(entries: dict[str, ModelEntry], name: str, where: str, overrides: dict | None = None) -> dict:
    """The STAMP vision tower's config (``VisionConfig`` fields) on the ViT of image entry ``name``.

    Why here: UNI (and any timm ViT of the catalogue) is described once, by its entry; the vision
    tower of ``stamp pretrain --stage align --vision uni`` and the released model's (``stamp-v1``:
    ``{"base": "uni", ...}``) are read off it. The region cells pool the token grid to 3 x 3
    (UNI: 14 tokens, window 6, stride 4, as released).
    """
    import re

    entry = entries.get(name)
    if entry is None or entry.library != "timm" or entry.kind != "image":
        raise PretrainedError(f"{where}: {name!r} is not a timm image encoder of the catalogue; the vision tower "
                              f"builds on one of {', '.join(n for n, e in entries.items() if e.library == 'timm')}")
    kwargs = dict(entry.architecture.get("kwargs", {}))
    arch = entry.architecture["name"]
    if entry.pooling != "head" or kwargs.get("global_pool") == "":
        raise PretrainedError(f"{where}: {name} pools {entry.pooling!r}, not with timm's head; the vision tower "
                              "needs a ViT whose head pools (CLS token or average), such as uni")
    pre = entry.preprocessing or {}
    size = int(kwargs.pop("img_size", pre.get("crop", 224)))
    found = re.search(r"patch(\d+)", arch)
    patch = int(kwargs.pop("patch_size", None) or (found.group(1) if found else 16))
    init = kwargs.pop("init_values", None)
    dynamic = bool(kwargs.pop("dynamic_img_size", True))
    kwargs.pop("num_classes", None)  # the tower has no classifier
    grid = size // patch
    stride = max(1, grid // 3)
    data = {"name": name, "arch": arch, "img_size": size, "patch_size": patch, "init_values": init,
            "dynamic_img_size": dynamic, "model_kwargs": kwargs, "weights": name, "region_grid": 3,
            "csp_window": grid - 2 * stride, "csp_stride": stride, "mean": list(pre.get("mean", IMAGENET_MEAN)),
            "std": list(pre.get("std", IMAGENET_STD))}
    return {**data, **(overrides or {})}


def vision_config_data(name: str) -> dict:
    """The STAMP vision tower (``VisionConfig`` fields, weights = the entry's) on image entry ``name``'s ViT."""
    return _vision_data(catalogue(), name, f"--vision {name}")


def catalogue() -> dict[str, ModelEntry]:
    """Every entry: the shipped catalogue, then the ``$STAMP_REGISTRY`` overlay (re-read when it changes)."""
    extra = os.environ.get(EXTRA_REGISTRY_ENV) or None
    if extra:
        try:
            stat = Path(extra).expanduser().stat()
            return _load_stamped(extra, stat.st_mtime_ns, stat.st_size)
        except OSError:
            pass
    return _load(extra)


@lru_cache(maxsize=8)
def _load_stamped(extra: str, _mtime: int, _size: int) -> dict[str, ModelEntry]:
    return _load.__wrapped__(extra)


def list_pretrained(kind: str | None = None) -> list[str]:
    """Names of the catalogue's entries (``kind``: only image / gene / aligned ones)."""
    return sorted(n for n, e in catalogue().items() if kind is None or e.kind == kind
                  or (kind in ("image", "gene") and e.kind == "aligned"))


def is_pretrained(name: Any) -> bool:
    return isinstance(name, str) and name in catalogue()


def get_pretrained(name: str) -> ModelEntry:
    """The entry ``name``; an error listing the known names otherwise."""
    try:
        return catalogue()[name]
    except KeyError:
        raise PretrainedError(f"unknown model {name!r}; known: {', '.join(list_pretrained())} "
                              "(or pass a Hub repo id ORG/NAME or a local model folder)") from None


def catalogue_notes() -> dict[str, str]:
    """Models deliberately left out, and why (CONCH, Nicheformer)."""
    return json.loads((resources.files("stamp.zoo") / REGISTRY_FILE).read_text()).get("notes", {})


def vocabulary(name: str) -> tuple[list[str], list[str]]:
    """(Ensembl ids, symbols) of a named gene vocabulary, read from spavis's package data (a JSON file)."""
    try:
        text = (resources.files("spavis") / "data" / "vocab" / f"{name}.json").read_text()
    except (FileNotFoundError, ModuleNotFoundError):
        raise PretrainedError(f"gene vocabulary {name!r} is not shipped with this installation") from None
    genes = json.loads(text)["genes"]
    if [g["index"] for g in genes] != list(range(len(genes))):
        raise PretrainedError(f"gene vocabulary {name!r}: indices are not 0..n-1")
    return [g["ensembl_id"] for g in genes], [g.get("symbol", "") for g in genes]


# the old name of the entry class
PretrainedEntry = ModelEntry

__all__ = ["ModelEntry", "PretrainedEntry", "PretrainedError", "catalogue", "list_pretrained", "is_pretrained",
           "get_pretrained", "catalogue_notes", "vocabulary", "vision_config_data", "REGISTRY_FILE",
           "EXTRA_REGISTRY_ENV", "KINDS", "LIBRARIES", "GENE_LIBRARIES"]
