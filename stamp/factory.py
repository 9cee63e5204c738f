"""``stamp.load``: the ONE place that maps a name to a model (resolve -> create -> load).

* **resolve**: a catalogue name (``uni``, ``virchow2``, ``stamp-v1`` ...; ``stamp models``), a
  run folder (``RUN`` -> ``RUN/model``), a model folder, or a Hub repo id; ``weights=`` a file or
  a folder downloaded by hand (gated or offline use).
* **create**: the architecture is built on the ``meta`` device first (no memory), after the
  config's sizes were checked (:mod:`stamp.safety`); its tensor shapes are compared with the
  weights file's header before anything is allocated.
* **load**: weights read strictly (every tensor present, none left over) from
  ``model.safetensors`` (``pytorch_model.bin`` only through ``torch.load(weights_only=True)``),
  wrapped in an :class:`stamp.encoder.Encoder` with the entry's own preprocessing and pooling
  and its provenance (name, Hub id, revision, licence).

Model classes (stamp.gene_encoder, stamp.aligned_model, stamp.vision, stamp.foundation) know no names;
``StampGeneEncoder.from_pretrained("stamp-v1")`` still works through one lazy hook
(:func:`model_source_for_class`), the only import from a model class up to this module.

The released STAMP means file is given once (:func:`set_means`, ``stamp models set-means``
or ``stamp convert --means``) and found again by :func:`load_tokenizer` for every command.
"""
from __future__ import annotations

import json
import logging
import os

import numpy as np
from pathlib import Path
from typing import Any

from stamp.catalogue import ModelEntry, PretrainedError, get_pretrained, is_pretrained, list_pretrained
from stamp.encoder import Encoder, Provenance
from stamp.errors import ModelConfigError
from stamp.hub_access import check_repo_id, download_file, first_file, is_repo_id, snapshot
from stamp.locations import CONVERTED_MARKER, converted_cache_root, means_root, model_folder_of
from stamp.tokenizer.io import MEANS_KEY, MEANS_REQUIRED_KEY

logger = logging.getLogger(__name__)



# ============================================================================ resolve
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
    from stamp.convert import convert_released

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


def model_source_for_class(name_or_path: Any, *, component: str | None = None, **hub_kwargs: Any) -> str:
    """For model classes' ``from_pretrained``: a catalogue name or Hub repo id becomes a local folder
    (``RUN`` -> ``RUN/model``); the class never sees a name."""
    text = str(name_or_path)
    keep = {k: hub_kwargs.get(k) for k in ("revision", "token", "cache_dir")}
    if Path(text).expanduser().is_dir():
        return str(model_folder_of(text))
    return str(resolve_pretrained(text, component=component, **keep))


# the old name of the hook (stamp.registry.registry_path)
def registry_path(name_or_path: Any, *, component: str | None = None, **hub_kwargs: Any) -> Any:
    if not is_pretrained(name_or_path) or Path(str(name_or_path)).is_dir():
        return name_or_path
    return model_source_for_class(name_or_path, component=component, **hub_kwargs)


# ============================================================================ means, remembered once
def means_key(entry: ModelEntry) -> str:
    """Which registered means file an entry uses (``stamp-v1-gene`` shares ``stamp-v1``'s)."""
    return entry.full_entry or entry.name


def registered_means(key: str) -> Path | None:
    path = means_root() / f"{key}.npy"
    return path if path.is_file() else None


def set_means(name: str, file: str | os.PathLike) -> Path:
    """Check the released means file against the entry's vocabulary and keep a copy in the user's
    cache, so ``stamp.load(name)`` / ``--model name`` need no ``--means`` again. Returns the copy."""
    import numpy as np

    from spavis.format.io import atomic_open
    from stamp.catalogue import vocabulary
    from stamp.tokenizer import load_means_file

    entry = get_pretrained(name)
    if entry.library != "stamp" or not entry.tokenizer:
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


# ============================================================================ create (meta) + load
def _timm_trunk(arch: str, kwargs: dict, where: str, *, meta: bool):
    import timm
    import torch

    try:
        if meta:
            with torch.device("meta"):
                try:
                    return timm.create_model(arch, pretrained=False, weight_init="skip", **kwargs)
                except TypeError:
                    return timm.create_model(arch, pretrained=False, **kwargs)
        return timm.create_model(arch, pretrained=False, **kwargs)
    except (RuntimeError, TypeError, ValueError, KeyError, AssertionError) as exc:
        raise ModelConfigError(f"{where}: timm cannot build {arch!r} with {sorted(kwargs)} "
                               f"({type(exc).__name__}: {str(exc)[:160]})") from None


def timm_arguments(entry: ModelEntry, repo_config: dict | None, where: str) -> tuple[str, dict]:
    """(timm architecture, checked kwargs): the entry's, updated by the repo's timm ``config.json``."""
    from stamp.safety import check_timm_kwargs

    arch = entry.architecture["name"]
    kwargs = dict(entry.architecture.get("kwargs", {}))
    if repo_config:
        theirs = repo_config.get("architecture")
        if theirs and theirs != arch:
            raise ModelConfigError(f"{where}: the repo's config.json builds {theirs!r}, the catalogue entry "
                                   f"{entry.name!r} expects {arch!r}; check the entry's hub_id or pass --weights")
        model_args = repo_config.get("model_args") or {}
        if not isinstance(model_args, dict):
            raise ModelConfigError(f"{where}: model_args must be an object")
        kwargs.update(model_args)
        if "num_classes" in repo_config and "num_classes" not in model_args:
            kwargs["num_classes"] = repo_config["num_classes"]
    return arch, check_timm_kwargs(kwargs, where)


def build_image_encoder(entry: ModelEntry, repo_config: dict | None = None, *, meta: bool = True,
                        where: str | None = None):
    """The entry's architecture as a :class:`stamp.foundation` module (on ``meta`` unless told)."""
    import torch

    from stamp.foundation import HFImageEncoder, TimmImageEncoder
    from stamp.safety import check_parameter_count

    where = where or entry.name
    if entry.library == "timm":
        arch, kwargs = timm_arguments(entry, repo_config, where)
        module = TimmImageEncoder(_timm_trunk(arch, kwargs, where, meta=meta), entry.pooling or "head")
    elif entry.library == "transformers":
        config = _hf_config(entry, repo_config, where)
        cls = _hf_class(entry)
        kw = dict(entry.architecture.get("kwargs", {}))
        try:
            if meta:
                with torch.device("meta"):
                    model = cls(config, **kw)
            else:
                model = cls(config, **kw)
        except (TypeError, ValueError) as exc:
            raise ModelConfigError(f"{where}: transformers cannot build {cls.__name__} ({exc})") from None
        module = HFImageEncoder(model, entry.pooling or "cls")
    else:
        raise ModelConfigError(f"{where}: library {entry.library!r} has no image-encoder builder")
    check_parameter_count(sum(p.numel() for p in module.parameters()), where)
    return module


def _hf_class(entry: ModelEntry):
    import transformers

    name = entry.architecture["class"]
    return transformers.AutoModel if name == "AutoModel" else getattr(transformers, name)


def _hf_config(entry: ModelEntry, repo_config: dict | None, where: str):
    """A transformers config from the repo's config.json (sizes checked), else the entry's own."""
    import transformers

    data = dict(repo_config) if repo_config else dict(entry.architecture.get("config", {}))
    cls = _hf_class(entry)
    config_cls = getattr(cls, "config_class", None)
    if data.get("model_type") == "clip" and "vision_config" in data:  # a full CLIP repo: its image tower
        data = dict(data["vision_config"], model_type="clip_vision_model")
    try:
        if config_cls is None:
            return transformers.AutoConfig.for_model(**data)
        data = {k: v for k, v in data.items() if k not in ("architectures", "transformers_version", "_name_or_path")}
        return config_cls.from_dict(data)
    except (TypeError, ValueError, KeyError) as exc:
        raise ModelConfigError(f"{where}: config.json does not describe a {entry.architecture['class']} "
                               f"({type(exc).__name__}: {str(exc)[:160]})") from None


def _read_state(path: Path) -> dict:
    """A weights file's tensors: safetensors, or a weights-only torch pickle (code is refused)."""
    from stamp.safety import load_torch_weights

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = load_torch_weights(path)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ModelConfigError(f"{path}: holds a {type(state).__name__}, not a state dict (name -> tensor)")
    return state


def _header_shapes(path: Path) -> tuple[dict[str, tuple[int, ...]], dict | None]:
    """(shapes, the tensors when they had to be read) - safetensors headers are read without tensors."""
    from stamp.safety import safetensors_shapes

    if path.suffix == ".safetensors":
        return safetensors_shapes(path), None
    state = _read_state(path)
    return {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}, state


def _match_keys(expected: dict, found: dict, prefixes: tuple[str, ...]) -> dict[str, str]:
    """Model key -> file key, allowing the file to carry one of ``prefixes`` (e.g. ``vit.``)."""
    out = {}
    for key in expected:
        for prefix in ("",) + prefixes:
            if prefix + key in found:
                out[key] = prefix + key
                break
    return out


def load_image_weights(module, entry: ModelEntry, weights: Path, where: str, repo_config: dict | None = None):
    """Check ``weights`` against the meta-built ``module`` (header only), then load strictly."""
    import torch

    from stamp.safety import check_shapes, meta_shapes

    target = module.trunk if hasattr(module, "trunk") else module.model
    expected = meta_shapes(target)
    shapes, state = _header_shapes(weights)
    prefixes: tuple[str, ...] = ()
    if entry.library == "transformers":
        base = getattr(target, "base_model_prefix", "")
        prefixes = tuple(p for p in (f"{base}.", "model.", "module.") if p != ".")
    keys = _match_keys(expected, shapes, prefixes)
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = [k for k in expected if k not in keys and k not in optional]
    if missing:
        check_shapes({k: expected[k] for k in missing[:1]}, {}, f"{where} ({weights.name})")
    check_shapes({k: expected[k] for k in keys}, {k: shapes[v] for k, v in keys.items()},
                 f"{where} ({weights.name})", ignore_unexpected=True)
    extra = set(shapes) - set(keys.values())
    allowed_extra = entry.pooling == "layer3-avg" or entry.library == "transformers"
    if extra and not allowed_extra:
        check_shapes({}, {k: shapes[k] for k in extra}, f"{where} ({weights.name})")
    if state is None:
        state = _read_state(weights)
    sd = {k: state[v] for k, v in keys.items()}
    target.load_state_dict(sd, strict=False, assign=True)
    leftover = [n for n, t in list(target.named_parameters()) + list(target.named_buffers()) if t.is_meta]
    if leftover:  # non-persistent buffers (position ids ...): build for real and load again
        real = build_image_encoder(entry, repo_config, meta=False, where=where)
        rtarget = real.trunk if hasattr(real, "trunk") else real.model
        result = rtarget.load_state_dict(sd, strict=False)
        if [k for k in result.missing_keys if k not in optional]:
            raise ModelConfigError(f"{where}: tensors missing from the weights: {result.missing_keys[:3]}")
        module = real
    return module.eval()



def load_transformers_weights(module, entry: ModelEntry, weights: Path, where: str):
    """transformers' own ``from_pretrained`` on the weights' folder (it knows its checkpoint key
    renames), after the checks it lacks: the folder's config (sizes already bounded) must not ask for
    more parameters than the weights hold, and no tensor of the architecture may stay missing."""
    from stamp.foundation import HFImageEncoder

    folder = weights.parent
    if not (folder / "config.json").is_file():
        raise PretrainedError(f"{weights}: a transformers model needs its config.json beside the weights; pass "
                              "the folder downloaded from " + entry.page)
    shapes, _ = _header_shapes(weights)
    held = sum(int(np.prod(s)) for s in shapes.values())
    wanted = sum(p.numel() for p in module.parameters())
    if wanted > held:
        raise ModelConfigError(f"{where}: config.json asks for {wanted:,} parameters but {weights.name} holds "
                               f"{held:,}; the config.json does not match the weights")
    import transformers

    cls = _hf_class(entry)
    kw = dict(entry.architecture.get("kwargs", {}))
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # unexpected keys (a CLIP text tower) are reported below
    try:
        model, info = cls.from_pretrained(str(folder), output_loading_info=True,
                                          use_safetensors=weights.suffix == ".safetensors", **kw)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelConfigError(f"{where}: transformers cannot load {weights.name} "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
    if missing or info.get("mismatched_keys"):
        raise ModelConfigError(f"{where}: {len(missing)} tensor(s) of {entry.architecture['class']} missing from "
                               f"{weights.name} (first: {(missing or info['mismatched_keys'])[0]}); wrong weights "
                               "for this entry")
    return HFImageEncoder(model, entry.pooling or "cls").eval()


def _weights_source(entry: ModelEntry, weights: str | os.PathLike | None, revision: str | None,
                    token: str | None) -> tuple[Path, dict | None, str | None, str]:
    """(weights file, repo config.json dict or None, Hub revision, where) for an image entry."""
    from stamp.safety import read_json_config

    if weights is not None:
        path = Path(weights).expanduser()
        if path.is_dir():
            files = [path / f for f in entry.files if (path / f).is_file()]
            if not files:
                raise PretrainedError(f"{path}: holds none of {', '.join(entry.files)}; pass the weights file itself "
                                      "or the folder downloaded from " + entry.page)
            cfg = read_json_config(path / "config.json") if (path / "config.json").is_file() else None
            return files[0], cfg, None, str(path)
        if not path.is_file():
            raise PretrainedError(f"{path}: no such weights file; download it from {entry.page} (after accepting "
                                  "its terms) and pass its path")
        return path, None, None, str(path)
    wfile = first_file(entry.hub_id, list(entry.files), revision=revision, token=token, terms_url=entry.page)
    cfg = None
    cfg_path = wfile.parent / "config.json"
    if not cfg_path.is_file():
        try:
            cfg_path = download_file(entry.hub_id, "config.json", revision=wfile.parent.name, token=token,
                                     terms_url=entry.page)
        except PretrainedError:
            cfg_path = None
    if cfg_path is not None and cfg_path.is_file():
        cfg = read_json_config(cfg_path)
    return wfile, cfg, wfile.parent.name, entry.hub_id


def _sha256(path: Path) -> str | None:
    from spavis.format.io import sha256_file

    try:
        return sha256_file(path)
    except OSError:
        return None


def load_image_entry(entry: ModelEntry, *, weights: str | os.PathLike | None = None, revision: str | None = None,
                     token: str | None = None, source: str | None = None) -> Encoder:
    """A timm / transformers catalogue entry as an :class:`Encoder` (CPU, eval mode)."""
    from stamp.foundation import ImagePreprocess

    wfile, cfg, rev, where = _weights_source(entry, weights, revision, token)
    module = build_image_encoder(entry, cfg, meta=True, where=where)
    if entry.library == "transformers":
        module = load_transformers_weights(module, entry, wfile, where)
    else:
        module = load_image_weights(module, entry, wfile, where, cfg)
    pre = dict(entry.preprocessing or {})
    transform = ImagePreprocess(**pre)
    prov = Provenance(name=entry.name, source=source or entry.name, hub_id=entry.hub_id,
                      revision=rev, license=entry.license_name or entry.license, commercial=entry.commercial,
                      weights_sha256=_sha256(wfile), extra={"library": entry.library, "pooling": entry.pooling})
    dim = entry.embed_dim
    if entry.extra.get("generic") and hasattr(module, "trunk"):  # no catalogue entry: the trunk says its width
        dim = int(getattr(module.trunk, "num_features", dim))
    return Encoder(module, kind="image", embed_dim=dim, provenance=prov, transform=transform,
                   image_fn=lambda px: module(px.to(next(module.parameters()).device)),
                   input_size=int(pre.get("crop", 224)))


def _load_stamp_folder(folder: Path, *, name: str, source: str, means: Any, kind: str | None,
                       entry: ModelEntry | None = None) -> Encoder:
    """This project's own layout (aligned StampModel or gene encoder) as an :class:`Encoder`."""
    from stamp.safety import read_json_config

    cfg = read_json_config(folder / "config.json")
    cfg = cfg.get("config", cfg) if isinstance(cfg.get("config"), dict) else cfg
    prov = Provenance(name=name, source=source, hub_id=entry.hub_id if entry else None,
                      license=(entry.license_name or entry.license) if entry else "unknown",
                      commercial=entry.commercial if entry else None,
                      weights_sha256=_sha256(folder / "model.safetensors"))
    has_tok = (folder / "tokenizer_config.json").is_file()
    if isinstance(cfg.get("vision"), dict) and isinstance(cfg.get("gene"), dict):
        from stamp.aligned_model import StampModel

        net = StampModel.from_pretrained(str(folder))
        tokenizer = load_tokenizer(folder, means) if kind != "image" and has_tok else None
        return Encoder(net, kind="aligned", embed_dim=net.config.embed_dim, provenance=prov,
                       transform=net.image_transform, tokenizer=tokenizer,
                       image_fn=lambda px: net.encode_image(px.to(net.device)),
                       gene_fn=lambda ids: net.encode_gene(ids.to(net.device)),
                       input_size=net.config.vision.img_size).eval()
    if kind == "image":
        raise PretrainedError(f"{source}: a gene encoder has no image side; pick an image or aligned model")
    from stamp.gene_encoder import StampGeneEncoder

    net = StampGeneEncoder.from_pretrained(str(folder))
    tokenizer = load_tokenizer(folder, means)
    if net.config.vocab_size != tokenizer.vocab_size:
        raise PretrainedError(f"{source}: the encoder has {net.config.n_genes} genes but the tokenizer files "
                              f"{tokenizer.n_genes}; the folder mixes two models")
    return Encoder(net, kind="gene", embed_dim=net.config.hidden_size, provenance=prov, tokenizer=tokenizer,
                   gene_fn=lambda ids: net.embed(ids.to(net.device))).eval()


def _generic_folder_entry(folder: Path, cfg: dict, source: str) -> ModelEntry | None:
    """A folder / repo in timm or transformers layout without a catalogue entry: a plain entry for it."""
    base = dict(kind="image", hub_id=source if is_repo_id(source) else "local/folder", license="unknown",
                commercial=None, gated=False, citation="")
    if "architecture" in cfg:  # timm's hub layout
        pc = cfg.get("pretrained_cfg") or {}
        size = (pc.get("input_size") or [3, 224, 224])[-1]
        pre = {"resize": int(size), "crop": int(size), "interpolation": pc.get("interpolation", "bicubic"),
               "mean": list(pc.get("mean", (0.485, 0.456, 0.406))), "std": list(pc.get("std", (0.229, 0.224, 0.225)))}
        data = dict(base, library="timm", architecture={"name": cfg["architecture"], "kwargs": {}},
                    pooling="head", preprocessing=pre, embed_dim=int(cfg.get("num_features") or 1), generic=True)
        return ModelEntry.from_dict(source, data, str(folder / "config.json"))
    return None


def load(name_or_path: str | os.PathLike, *, device: Any = None, means: str | os.PathLike | None = None,
         kind: str | None = None, weights: str | os.PathLike | None = None, revision: str | None = None,
         token: str | None = None) -> Encoder:
    """Load any encoder of the zoo in eval mode.

    ``name_or_path``: a catalogue name (``stamp models``), run / model folder or Hub repo id.
    ``means``: the released gene-means file for models that ship none (remembered ones are found
    without it); ``kind``: ``"image"`` / ``"gene"`` to take one side of an aligned model;
    ``weights``: a weights file or folder downloaded by hand (gated or offline use).
    """
    import torch

    if kind not in (None, "image", "gene", "aligned"):
        raise ModelConfigError(f"kind {kind!r} must be image, gene or aligned")
    if isinstance(name_or_path, Encoder):  # already loaded (e.g. with --weights): every command accepts one
        return name_or_path.to(device).eval() if device else name_or_path.eval()
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = str(name_or_path)
    path = Path(text).expanduser()
    if is_pretrained(text) and not path.is_dir():
        entry = get_pretrained(text)
        if kind == "gene" and entry.kind == "image":
            raise PretrainedError(f"{text} is an image encoder; pick a gene or aligned model")
        if kind == "image" and entry.kind == "gene":
            raise PretrainedError(f"{text} is a gene encoder; pick an image or aligned model")
        if entry.library in ("timm", "transformers"):
            enc = load_image_entry(entry, weights=weights, revision=revision, token=token, source=text)
        else:
            if weights is not None:
                from stamp.convert import convert_released  # noqa: F401  (hand-downloaded release: convert it)

                folder = _converted_from_file(entry, Path(weights).expanduser())
            else:
                folder = resolve_pretrained(text, component="gene" if kind == "gene" else None, revision=revision,
                                            token=token)
            enc = _load_stamp_folder(folder, name=entry.name, source=text, means=means, kind=kind, entry=entry)
        return enc.to(dev).eval()
    if path.is_dir():
        folder = model_folder_of(path)
    else:
        check_repo_id(text)
        folder = snapshot(text, revision=revision, token=token)
    if not (folder / "config.json").is_file():
        raise PretrainedError(f"{folder}: no config.json; pass a run folder, its model/ folder, a catalogue name "
                              "(`stamp models`) or a Hub repo of one")
    from stamp.safety import read_json_config

    cfg = read_json_config(folder / "config.json")
    generic = _generic_folder_entry(folder, cfg, text)
    if generic is not None:
        enc = load_image_entry(generic, weights=folder, source=text)
    else:
        enc = _load_stamp_folder(folder, name=text, source=text, means=means, kind=kind)
    return enc.to(dev).eval()


def _converted_from_file(entry: ModelEntry, file: Path) -> Path:
    """A released checkpoint downloaded by hand (``weights=``): converted once, keyed by its sha256."""
    from stamp.convert import convert_released

    if file.is_dir():
        file = file / (entry.file or "pytorch_model.bin")
    if not file.is_file():
        raise PretrainedError(f"{file}: no such file; download {entry.file} from {entry.page} and pass its path")
    sha = _sha256(file) or "unknown"
    out = converted_cache_root() / "local" / sha[:16] / entry.name
    if not (out / CONVERTED_MARKER).is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        convert_released(file, out, name=entry, overwrite=True, source_id=f"file:{file.name}")
    return out


def create_pretrained_model(name_or_path: Any, **overrides: Any):
    """A catalogue name, Hub repo id or folder of this project's layout -> the right class with weights;
    a gene preset (``base``, ``tiny``) or config file -> a fresh :class:`StampGeneEncoder`
    (``stamp.create_model``; not to be confused with :func:`stamp.gene_encoder.create_gene_encoder`)."""
    from stamp.gene_encoder import StampGeneEncoder, create_gene_encoder

    text = str(name_or_path)
    if is_pretrained(text):
        entry = get_pretrained(text)
        if entry.library != "stamp":
            return load(text).module
        if entry.component == "full":
            from stamp.aligned_model import StampModel

            return StampModel.from_pretrained(text)
        return StampGeneEncoder.from_pretrained(text)
    path = Path(text).expanduser()
    folder = None
    if path.is_dir():
        folder = model_folder_of(path)
    elif is_repo_id(text):
        folder = resolve_pretrained(text, revision=overrides.pop("revision", None), token=overrides.pop("token", None))
    if folder is not None and (folder / "config.json").is_file():
        from stamp.safety import read_json_config

        config = read_json_config(folder / "config.json")
        if "gene" in config and "vision" in config:
            from stamp.aligned_model import StampModel

            return StampModel.from_pretrained(str(folder))
        return StampGeneEncoder.from_pretrained(str(folder))
    return create_gene_encoder(name_or_path, **overrides)


create_model = create_pretrained_model  # ``stamp.create_model`` (public name kept)


# ============================================================================ the table
def is_cached(entry: ModelEntry) -> bool:
    """Weights already on this machine (Hub cache or converted release)."""
    if entry.library == "stamp":
        root = converted_cache_root() / entry.hub_id.replace("/", "--")
        return any(root.glob(f"*/{entry.name}/{CONVERTED_MARKER}"))
    try:
        from huggingface_hub import try_to_load_from_cache

        return any(isinstance(try_to_load_from_cache(entry.hub_id, f), str) for f in entry.files)
    except Exception:  # a cache it cannot read: say "no"
        return False


def model_table(kind: str | None = None) -> list[dict[str, Any]]:
    """Rows of ``stamp models``: name, kind, dim, parameters, licence, commercial, gated, cached."""
    rows = []
    for name in list_pretrained(kind):
        entry = get_pretrained(name)
        row = entry.row()
        row["cached"] = "yes" if is_cached(entry) else "no"
        if entry.library == "stamp" and entry.tokenizer:
            row["means"] = "set" if registered_means(means_key(entry)) else "needed"
        rows.append(row)
    return rows


__all__ = ["load", "resolve_pretrained", "resolve_model_source", "model_source_for_class", "registry_path",
           "load_tokenizer", "set_means", "registered_means", "means_key", "create_pretrained_model",
           "create_model", "build_image_encoder", "load_image_entry", "model_table", "is_cached",
           "CONVERTED_MARKER", "MEANS_REQUIRED_KEY", "MEANS_KEY"]
