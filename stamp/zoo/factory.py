"""``stamp.load``: the ONE place that maps a name to a model (resolve -> create -> load).

* **resolve**: a catalogue name (``uni``, ``virchow2``, ``stamp-v1`` ...; ``stamp models``), a
  run folder (``RUN`` -> ``RUN/model``), a model folder, or a Hub repo id; ``weights=`` a file or
  a folder downloaded by hand (gated or offline use).
* **create**: the architecture is built on the ``meta`` device first (no memory), after the
  config's sizes were checked (:mod:`stamp.safety`); its tensor shapes are compared with the
  weights file's header before anything is allocated.
* **load**: weights read strictly (every tensor present, none left over) from
  ``model.safetensors`` (``pytorch_model.bin`` only through ``torch.load(weights_only=True)``),
  wrapped in an :class:`stamp.zoo.encoder.Encoder` with the entry's own preprocessing and pooling
  and its provenance (name, Hub id, revision, licence).

Names become folders in :mod:`stamp.zoo.resolve`; model classes (:mod:`stamp.models`) know no
names: :func:`create_pretrained_model` (``stamp.create_model("stamp-v1")``) gives the model class
of a name with its weights.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from stamp.constants import IMAGENET_MEAN, IMAGENET_STD
from stamp.errors import ModelConfigError, PretrainedError
from stamp.hub_access import check_repo_id, download_file, first_file, is_repo_id, snapshot
from stamp.zoo.catalogue import ModelEntry, get_pretrained, is_pretrained
from stamp.zoo.encoder import Encoder, Provenance
from stamp.locations import model_folder_of
from stamp.zoo.resolve import converted_from_file, load_tokenizer, resolve_pretrained, weights_sha256

logger = logging.getLogger(__name__)


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
    """The entry's architecture as a :class:`stamp.models.foundation` module (on ``meta`` unless told)."""
    import torch

    from stamp.models.foundation import HFImageEncoder, TimmImageEncoder
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


def _header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, Any], dict | None]:
    """(shapes, dtypes, the tensors when they had to be read) - safetensors headers are read without tensors."""
    from stamp.safety import safetensors_layout

    if path.suffix == ".safetensors":
        layout = safetensors_layout(path)
        return {k: s for k, (s, _) in layout.items()}, {k: d for k, (_, d) in layout.items()}, None
    state = {k: v for k, v in _read_state(path).items() if hasattr(v, "shape")}
    return {k: tuple(v.shape) for k, v in state.items()}, {k: v.dtype for k, v in state.items()}, state


def _match_keys(expected: dict, found: dict, prefixes: tuple[str, ...]) -> dict[str, str]:
    """Model key -> file key, allowing the file to carry one of ``prefixes`` (e.g. ``vit.``)."""
    out = {}
    for key in expected:
        for prefix in ("",) + prefixes:
            if prefix + key in found:
                out[key] = prefix + key
                break
    return out


def weights_for(target, weights: Path, where: str, *, prefixes: tuple[str, ...] = (),
                allow_extra: bool = False) -> dict:
    """THE check of a weights file against a module (built on ``meta`` or for real), header first, then
    the state to load into it: every tensor present (all missing ones counted) with its shape, no
    tensor left over (unless ``allow_extra``), integer weights for a float model refused, other
    floating dtypes cast to the module's, NaN / infinite weights refused (:func:`stamp.safety.fit_state`).
    ``prefixes``: a file key may carry one of them (``module.``, ``vit.``)."""
    from stamp.safety import check_dtypes, check_shapes, fit_state

    expected = target.state_dict()
    shapes, dtypes, state = _header(weights)
    keys = _match_keys(expected, shapes, prefixes)
    label = f"{where} ({weights.name})"
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = [k for k in expected if k not in keys and k not in optional]
    if missing:
        check_shapes({k: tuple(expected[k].shape) for k in missing}, {}, label)
    check_shapes({k: tuple(expected[k].shape) for k in keys}, {k: shapes[v] for k, v in keys.items()}, label,
                 ignore_unexpected=True)
    check_dtypes({k: expected[k].dtype for k in keys}, {k: dtypes[v] for k, v in keys.items()}, label)
    extra = set(shapes) - set(keys.values())
    if extra and not allow_extra:
        check_shapes({}, {k: shapes[k] for k in extra}, label)
    if state is None:
        state = _read_state(weights)
    return fit_state({k: state[v] for k, v in keys.items()}, expected, label)


def load_image_weights(module, entry: ModelEntry, weights: Path, where: str, repo_config: dict | None = None):
    """Check ``weights`` against the meta-built ``module`` (:func:`weights_for`), then load strictly."""
    target = module.trunk if hasattr(module, "trunk") else module.model
    prefixes: tuple[str, ...] = ()
    if entry.library == "transformers":
        base = getattr(target, "base_model_prefix", "")
        prefixes = tuple(p for p in (f"{base}.", "model.", "module.") if p != ".")
    sd = weights_for(target, weights, where, prefixes=prefixes,
                     allow_extra=entry.pooling == "layer3-avg" or entry.library == "transformers")
    target.load_state_dict(sd, strict=False, assign=True)
    leftover = [n for n, t in list(target.named_parameters()) + list(target.named_buffers()) if t.is_meta]
    if leftover:  # non-persistent buffers (position ids ...): build for real and load again
        real = build_image_encoder(entry, repo_config, meta=False, where=where)
        rtarget = real.trunk if hasattr(real, "trunk") else real.model
        result = rtarget.load_state_dict(sd, strict=False)
        if [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]:
            raise ModelConfigError(f"{where}: tensors missing from the weights: {result.missing_keys[:3]}")
        module = real
    return module.eval()



def load_transformers_weights(module, entry: ModelEntry, weights: Path, where: str):
    """transformers' own ``from_pretrained`` on the weights' folder (it knows its checkpoint key
    renames), after the checks it lacks: the folder's config (sizes already bounded) must not ask for
    more parameters than the weights hold, and no tensor of the architecture may stay missing."""
    from stamp.models.foundation import HFImageEncoder

    folder = weights.parent
    if not (folder / "config.json").is_file():
        raise PretrainedError(f"{weights}: a transformers model needs its config.json beside the weights; pass "
                              "the folder downloaded from " + entry.page)
    from stamp.safety import check_dtypes, check_finite

    shapes, dtypes, _ = _header(weights)
    # names differ from the module's (transformers renames on load): a weight or bias is floating point
    check_dtypes({k: "float32" for k in dtypes if k.endswith((".weight", ".bias"))}, dtypes,
                 f"{where} ({weights.name})")
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
    check_finite(model.state_dict().items(), f"{where} ({weights.name})")
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


def load_image_entry(entry: ModelEntry, *, weights: str | os.PathLike | None = None, revision: str | None = None,
                     token: str | None = None, source: str | None = None) -> Encoder:
    """A timm / transformers catalogue entry as an :class:`Encoder` (CPU, eval mode)."""
    from stamp.models.foundation import ImagePreprocess

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
                      weights_sha256=weights_sha256(wfile), extra={"library": entry.library, "pooling": entry.pooling})
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
                      weights_sha256=weights_sha256(folder / "model.safetensors"))
    has_tok = (folder / "tokenizer_config.json").is_file()
    if isinstance(cfg.get("vision"), dict) and isinstance(cfg.get("gene"), dict):
        from stamp.models.aligned_model import StampModel

        net = StampModel.from_pretrained(str(folder))
        tokenizer = load_tokenizer(folder, means) if kind != "image" and has_tok else None
        return Encoder(net, kind="aligned", embed_dim=net.config.embed_dim, provenance=prov,
                       transform=net.image_transform, tokenizer=tokenizer,
                       image_fn=lambda px: net.encode_image(px.to(net.device)),
                       gene_fn=lambda ids: net.encode_gene(ids.to(net.device)),
                       input_size=net.config.vision.img_size).eval()
    if kind == "image":
        raise PretrainedError(f"{source}: a gene encoder has no image side; pick an image or aligned model")
    from stamp.models.gene_encoder import StampGeneEncoder

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
               "mean": list(pc.get("mean", IMAGENET_MEAN)), "std": list(pc.get("std", IMAGENET_STD))}
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
            if weights is not None:  # hand-downloaded release: converted once, keyed by its sha256
                folder = converted_from_file(entry, Path(weights).expanduser())
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


def _hub_kwargs(overrides: dict) -> dict:
    return {k: overrides.pop(k) for k in ("revision", "token", "cache_dir") if k in overrides}


def create_pretrained_model(name_or_path: Any, **overrides: Any):
    """A catalogue name, Hub repo id or folder of this project's layout -> the right class with weights;
    a gene preset (``base``, ``tiny``) or config file -> a fresh :class:`StampGeneEncoder`
    (``stamp.create_model``; not to be confused with :func:`stamp.models.gene_encoder.create_gene_encoder`)."""
    from stamp.models.gene_encoder import StampGeneEncoder, create_gene_encoder

    text = str(name_or_path)
    if is_pretrained(text):
        entry = get_pretrained(text)
        if entry.library != "stamp":
            return load(text).module
        if entry.component == "full":
            from stamp.models.aligned_model import StampModel

            return StampModel.from_pretrained(str(resolve_pretrained(text, **_hub_kwargs(overrides))))
        return StampGeneEncoder.from_pretrained(str(resolve_pretrained(text, component="gene",
                                                                       **_hub_kwargs(overrides))))
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
            from stamp.models.aligned_model import StampModel

            return StampModel.from_pretrained(str(folder))
        return StampGeneEncoder.from_pretrained(str(folder))
    return create_gene_encoder(name_or_path, **overrides)


create_model = create_pretrained_model  # ``stamp.create_model`` (public name kept)


# ============================================================================ the STAMP vision tower
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
TRUNK_PREFIXES = ("module.", "trunk.", "visual_backbone.base_model.")  # wrappers a trunk's weights may carry


def vision_config(spec: Any):
    """``--vision``: a catalogue image entry (a timm ViT: ``uni``, ``uni2-h`` ...; its entry is the one
    description of it, :func:`stamp.zoo.catalogue.vision_config_data`), a shipped preset (``tiny``), a
    JSON file of :class:`~stamp.models.vision.VisionConfig` fields, a dict or a VisionConfig."""
    from stamp.models.vision import load_vision_config
    from stamp.zoo.catalogue import vision_config_data

    if isinstance(spec, str) and is_pretrained(spec):
        return load_vision_config(vision_config_data(spec))
    return load_vision_config(spec)


def load_trunk_weights(encoder, source: str | os.PathLike, *, token: str | None = None) -> str:
    """Load pretrained weights into a :class:`~stamp.models.vision.VisionEncoder`'s trunk; returns ``source``.

    ``source``: a catalogue name (its Hub repo and files, as ``stamp.load`` reads them), ``hf-hub:ORG/NAME``
    or a local file. Checked like every weights file of the zoo (:func:`weights_for`); one
    :class:`VisionWeightsError` line otherwise."""
    from stamp.errors import VisionWeightsError

    text = str(source)
    try:
        if is_pretrained(text):
            entry = get_pretrained(text)
            path = first_file(entry.hub_id, list(entry.files), token=token, terms_url=entry.page)
        elif text.startswith("hf-hub:"):
            path = first_file(text[len("hf-hub:"):], ["model.safetensors", "pytorch_model.bin"], token=token)
        else:
            path = Path(text).expanduser()
            if not path.is_file():
                raise VisionWeightsError(f"{path}: no such weights file; pass a .safetensors (or .bin/.pth) file")
        state = weights_for(encoder.trunk, path, text, prefixes=TRUNK_PREFIXES)
    except (ModelConfigError, PretrainedError) as exc:
        raise VisionWeightsError(str(exc)) from None
    encoder.trunk.load_state_dict(state, strict=True)
    return text


def create_vision_encoder(spec: str = "tiny", *, weights: str | None = None, pretrained: bool = True):
    """``--vision`` value -> :class:`~stamp.models.vision.VisionEncoder` (:func:`vision_config`); a weights
    file means UNI's architecture with those weights. ``pretrained`` loads the config's default weights
    (a catalogue entry's own), ``weights`` replaces them."""
    from stamp.models.vision import VisionEncoder, skip_trunk_init

    if Path(str(spec)).suffix in WEIGHT_SUFFIXES:
        config, weights = vision_config("uni"), weights or str(spec)
    else:
        config = vision_config(spec)
    source = weights or (config.weights if pretrained else None)
    if source:
        with skip_trunk_init():  # every trunk tensor is read from the weights next
            encoder = VisionEncoder(config)
        load_trunk_weights(encoder, source)
        return encoder
    return VisionEncoder(config)


__all__ = ["load", "create_pretrained_model", "create_model", "build_image_encoder", "load_image_entry",
           "load_image_weights", "timm_arguments", "weights_for", "vision_config", "create_vision_encoder",
           "load_trunk_weights"]
