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
from typing import Any, Mapping

import numpy as np

from stamp.constants import IMAGENET_MEAN, IMAGENET_STD
from stamp.errors import ModelConfigError, PretrainedError
from stamp.hub_access import check_repo_id, download_file, first_file, is_repo_id, snapshot
from stamp.zoo.catalogue import GENE_LIBRARIES, ModelEntry, get_pretrained, is_pretrained
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
    if entry.library in FOREIGN_LIBRARIES:
        module = build_foreign_image_encoder(entry, repo_config, meta=meta, where=where)
        check_parameter_count(sum(p.numel() for p in module.parameters()), where)
        return module
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
                    token: str | None, config_name: str | None = "config.json") -> tuple[Path, dict | None, str | None, str]:
    """(weights file, repo config dict or None, Hub revision, where) for an image entry (``config_name``: the
    library's config file beside the weights, None for none)."""
    from stamp.safety import read_json_config

    if weights is not None:
        path = Path(weights).expanduser()
        if path.is_dir():
            files = [path / f for f in entry.files if (path / f).is_file()]
            if not files:
                raise PretrainedError(f"{path}: holds none of {', '.join(entry.files)}; pass the weights file itself "
                                      "or the folder downloaded from " + entry.page)
            cfg = read_json_config(path / config_name) if config_name and (path / config_name).is_file() else None
            return files[0], cfg, None, str(path)
        if not path.is_file():
            raise PretrainedError(f"{path}: no such weights file; download it from {entry.page} (after accepting "
                                  "its terms) and pass its path")
        return path, None, None, str(path)
    wfile = first_file(entry.hub_id, list(entry.files), revision=revision, token=token, terms_url=entry.page)
    cfg = None
    if config_name is None:
        return wfile, None, wfile.parent.name, entry.hub_id
    cfg_path = wfile.parent / config_name
    if not cfg_path.is_file():
        try:
            cfg_path = download_file(entry.hub_id, config_name, revision=wfile.parent.name, token=token,
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
                      weights_sha256=weights_sha256(wfile),
                      extra={"library": entry.library, "pooling": entry.pooling, "marks": entry.marks})
    dim = entry.embed_dim
    if entry.extra.get("generic") and hasattr(module, "trunk"):  # no catalogue entry: the trunk says its width
        dim = int(getattr(module.trunk, "num_features", dim))
    enc = Encoder(module, kind="image", embed_dim=dim, provenance=prov, transform=transform,
                  image_fn=lambda px: module(px.to(next(module.parameters()).device)),
                  input_size=int(pre.get("crop", 224)))
    enc.architecture = image_architecture(entry, cfg)  # what a fine-tuned copy needs to be rebuilt
    return enc


# ============================================================================ open_clip and CONCH entries
# open_clip models (clip, quiltnet, omiclip) are built by open_clip from a checked model_cfg; CONCH's image
# tower by stamp.models.conch from the authors' config. Both read whole-model weight files (image tower +
# text towers): every tensor must fit the architecture; the parts an entry does not use are checked, then
# dropped.
FOREIGN_LIBRARIES = ("open_clip", "conch")


def _unwrap_state(state: dict, where: str) -> dict:
    """A checkpoint's tensors: ``module.`` prefixes (DDP) removed when every key carries one."""
    if state and all(isinstance(k, str) and k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    bad = [k for k, v in state.items() if not hasattr(v, "shape")]
    if bad:
        raise ModelConfigError(f"{where}: {bad[0]!r} is not a tensor; not a state dict of weights")
    return state


def _foreign_state(path: Path, where: str) -> dict:
    from stamp.safety import safetensors_shapes

    if path.suffix == ".safetensors":
        safetensors_shapes(path)  # a pickle / zip named .safetensors: one line saying what it is
    return _unwrap_state(_read_state(path), f"{where} ({path.name})")


def open_clip_model_config(entry: ModelEntry, repo_config: dict | None, where: str) -> tuple[dict, dict | None]:
    """(checked model_cfg, preprocess_cfg or None): the repo's ``open_clip_config.json`` when there is one,
    else the entry's own ``architecture.model_cfg``."""
    from stamp.models.openclip import CONFIG_FILE, check_model_config

    if repo_config is not None:
        cfg = repo_config.get("model_cfg", repo_config)
        return check_model_config(cfg, f"{where} ({CONFIG_FILE})"), repo_config.get("preprocess_cfg")
    return check_model_config(entry.architecture["model_cfg"], where), None


def _open_clip_towers(entry: ModelEntry, model):
    """The module the zoo keeps of a whole open_clip model: the image tower (image entries) or image + text
    towers (aligned entries)."""
    from stamp.models.openclip import OpenClipAlignedModel, OpenClipImageEncoder

    return OpenClipAlignedModel(model) if entry.kind == "aligned" else OpenClipImageEncoder(model.visual)


def build_foreign_image_encoder(entry: ModelEntry, repo_config: dict | None = None, *, meta: bool = True,
                                where: str | None = None):
    """An open_clip / CONCH entry's module (on ``meta`` unless told): what ``build_image_encoder`` gives for them."""
    where = where or entry.name
    if entry.library == "conch":
        from stamp.models.conch import ConchImageEncoder, ConchVisionConfig

        import torch

        config = ConchVisionConfig.from_model_config(entry.architecture["config"], where)
        if meta:
            with torch.device("meta"):
                return ConchImageEncoder(config, entry.pooling or "contrast")
        return ConchImageEncoder(config, entry.pooling or "contrast")
    from stamp.models.openclip import build_model

    model_cfg, _ = open_clip_model_config(entry, repo_config, where)
    return _open_clip_towers(entry, build_model(model_cfg, where, meta=meta))


def _load_open_clip(entry: ModelEntry, wfile: Path, repo_config: dict | None, where: str):
    """(module, model_cfg, preprocess_cfg): the whole model built on meta, the file checked against it tensor
    by tensor (none missing, none left over, shapes equal), loaded, then the unused towers dropped."""

    from stamp.models.openclip import build_model, materialize_masks
    from stamp.safety import check_finite, check_parameter_count, check_shapes, fit_state, meta_shapes

    model_cfg, preprocess_cfg = open_clip_model_config(entry, repo_config, where)
    model = build_model(model_cfg, where, meta=True)
    check_parameter_count(sum(p.numel() for p in model.parameters()), where)
    state = _foreign_state(wfile, where)
    expected = meta_shapes(model)
    if "logit_scale" in state and "logit_scale" in expected and state["logit_scale"].numel() == 1:
        state["logit_scale"] = state["logit_scale"].reshape(expected["logit_scale"])
    check_shapes(expected, {k: tuple(v.shape) for k, v in state.items()}, f"{where} ({wfile.name})")
    state = fit_state(state, model.state_dict(), f"{where} ({wfile.name})", finite=False)  # int8 refused, fp16 cast
    model.load_state_dict(state, strict=True, assign=True)
    module = _open_clip_towers(entry, model)
    check_finite(module.state_dict().items(), f"{where} ({wfile.name})")  # NaN in the towers kept (not dropped ones)
    materialize_masks(module)
    if any(t.is_meta for t in list(module.parameters()) + list(module.buffers())):  # buffers it cannot rebuild
        model = build_model(model_cfg, where, meta=False)
        model.load_state_dict(state, strict=True)
        module = _open_clip_towers(entry, model)
    return module.eval(), model_cfg, preprocess_cfg


def _load_conch(entry: ModelEntry, wfile: Path, where: str):
    """CONCH's image tower: the file's ``visual.`` tensors loaded strictly; every other tensor must sit under
    one of the entry's ``unused`` prefixes (the text towers), else it is an error naming it."""
    from stamp.safety import check_parameter_count, check_shapes, fit_state, meta_shapes

    module = build_foreign_image_encoder(entry, where=where)
    check_parameter_count(sum(p.numel() for p in module.parameters()), where)
    prefix = entry.architecture.get("prefix", "visual.")
    unused = tuple(entry.architecture.get("unused", ()))
    state = _foreign_state(wfile, where)
    ours = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    stray = [k for k in state if not k.startswith(prefix) and not k.startswith(unused)]
    if stray:
        raise ModelConfigError(f"{where} ({wfile.name}): tensor {stray[0]!r} is neither part of the {prefix[:-1]} "
                               f"tower nor of the known unused parts ({', '.join(unused)}); not a CONCH checkpoint")
    check_shapes(meta_shapes(module), {k: tuple(v.shape) for k, v in ours.items()}, f"{where} ({wfile.name})")
    ours = fit_state(ours, module.state_dict(), f"{where} ({wfile.name})")
    module.load_state_dict(ours, strict=True, assign=True)
    return module.eval()


def gene_input_of(entry: ModelEntry, model_cfg: dict):
    """The gene side of a foreign aligned entry (``gene_input`` of the catalogue)."""
    from stamp.models.openclip import GeneSentenceInput

    rule = dict(entry.gene_input or {})
    if rule.pop("rule", None) != "gene-sentence":
        raise ModelConfigError(f"{entry.name}: gene_input {entry.gene_input!r}: only the 'gene-sentence' rule exists")
    context = int(model_cfg["text_cfg"].get("context_length", 77))
    return GeneSentenceInput(context, top_k=int(rule.get("top_k", 50)), skip_chars=rule.get("skip_chars", (".", "-")),
                             exclude=rule.get("exclude", ()))


def load_foreign_entry(entry: ModelEntry, *, weights: str | os.PathLike | None = None, revision: str | None = None,
                       token: str | None = None, source: str | None = None) -> Encoder:
    """An open_clip or CONCH catalogue entry as an :class:`Encoder` (CPU, eval mode); ``weights``: a file or a
    folder in the library's Hub layout (open_clip: ``open_clip_config.json`` + weights)."""
    from stamp.models.foundation import ImagePreprocess
    from stamp.models.openclip import CONFIG_FILE, preprocessing

    config_name = CONFIG_FILE if entry.library == "open_clip" else None
    wfile, cfg, rev, where = _weights_source(entry, weights, revision, token, config_name=config_name)
    gene_input, model_cfg = None, None
    if entry.library == "conch":
        module = _load_conch(entry, wfile, where)
        pre = dict(entry.preprocessing or {})
        dim = module.embed_dim
    else:
        module, model_cfg, preprocess_cfg = _load_open_clip(entry, wfile, cfg, where)
        pre = preprocessing(model_cfg, preprocess_cfg, entry.preprocessing, where)
        dim = int(model_cfg["embed_dim"])
        if entry.kind == "aligned":
            gene_input = gene_input_of(entry, model_cfg)
    if dim != entry.embed_dim and not entry.extra.get("generic"):  # the loaded architecture decides the width
        logger.warning("%s: the loaded model gives %d-d features, the catalogue entry %r says %d", where, dim,
                       entry.name, entry.embed_dim)
    transform = ImagePreprocess(**pre)
    prov = Provenance(name=entry.name, source=source or entry.name, hub_id=entry.hub_id, revision=rev,
                      license=entry.license_name or entry.license, commercial=entry.commercial,
                      weights_sha256=weights_sha256(wfile),
                      extra={"library": entry.library, "pooling": entry.pooling, "marks": entry.marks,
                             **({"gene_input": gene_input.describe()} if gene_input is not None else {})})
    if entry.kind == "aligned":
        return Encoder(module, kind="aligned", embed_dim=dim, provenance=prov, transform=transform,
                       counts=gene_input, image_fn=lambda px: module.image_features(px),
                       gene_fn=lambda batch: module.embed_genes(batch), input_size=int(pre["crop"]))
    enc = Encoder(module, kind="image", embed_dim=dim, provenance=prov, transform=transform,
                  image_fn=lambda px: module(px.to(next(module.parameters()).device)), input_size=int(pre["crop"]))
    enc.architecture = image_architecture(entry, cfg, preprocessing=pre)
    return enc


# ============================================================================ fine-tuned image encoders (issue 28)
FINETUNED_TYPE = "stamp-finetuned"


def entry_data(entry: ModelEntry) -> dict:
    """A catalogue entry as the plain data it was read from (``ModelEntry.from_dict`` reads it back)."""
    import dataclasses

    data = {k: v for k, v in dataclasses.asdict(entry).items() if k not in ("name", "origin", "extra")}
    data.update(entry.extra)
    return json_safe(data)


def json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def image_architecture(entry: ModelEntry, repo_config: dict | None, preprocessing: dict | None = None) -> dict:
    """How to rebuild an image entry's module without its weights: the entry as data, the repo's config and the
    preprocessing actually used (recorded in a fine-tuned run's config.json)."""
    return {"name": entry.name, "entry": entry_data(entry), "repo_config": json_safe(repo_config),
            "preprocessing": json_safe(preprocessing or dict(entry.preprocessing or {}))}


def build_from_architecture(arch: dict, where: str, *, meta: bool = True):
    """The image module an :func:`image_architecture` record describes (sizes checked again: it is read back
    from a file); weights are loaded by the caller."""
    from stamp.safety import check_config_sizes

    if not isinstance(arch, dict) or not isinstance(arch.get("entry"), dict):
        raise ModelConfigError(f"{where}: config.json has no image_encoder.entry; not a fine-tuned stamp model")
    entry = ModelEntry.from_dict(str(arch.get("name") or "image-encoder"), arch["entry"], where)
    repo_config = arch.get("repo_config")
    if repo_config is not None:
        check_config_sizes(repo_config, where)
    return build_image_encoder(entry, repo_config, meta=meta, where=where), entry


def load_finetuned_folder(folder: Path, *, source: str) -> Encoder:
    """A ``stamp finetune`` run (RUN/model): the image encoder rebuilt from its recorded architecture and every
    tensor read strictly from model.safetensors; the gene side is the run's expression input."""
    import torch

    from stamp.models.finetune import ExpressionInput, FinetuneConfig, STFinetuneModel
    from stamp.models.foundation import ImagePreprocess
    from stamp.safety import check_shapes, fit_state, meta_shapes, read_json_config, safetensors_shapes

    cfg = read_json_config(folder / "config.json")
    where = str(folder / "config.json")
    config = FinetuneConfig.from_dict(cfg, where)
    weights = folder / "model.safetensors"
    shapes = safetensors_shapes(weights)

    def build(meta: bool):
        image, _ = build_from_architecture(config.image_encoder, where, meta=meta)
        if meta:
            with torch.device("meta"):
                return STFinetuneModel(image, config)
        return STFinetuneModel(image, config)

    model = build(True)
    check_shapes(meta_shapes(model), shapes, f"{folder} (model.safetensors)")
    from safetensors.torch import load_file

    state = fit_state(load_file(str(weights)), model.state_dict(), f"{folder} (model.safetensors)")
    model.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):  # non-persistent buffers
        model = build(False)
        model.load_state_dict(state, strict=True)
    model.eval()
    inputs = ExpressionInput.from_pretrained(folder)
    pre = dict(config.image_encoder.get("preprocessing") or {})
    prov = Provenance(name=source, source=source, license=str(cfg.get("license", "other")),
                      commercial=cfg.get("commercial"), weights_sha256=weights_sha256(weights),
                      extra={"library": "stamp", "base": config.image_encoder.get("name"), "marks": cfg.get("marks", "")})
    return Encoder(model, kind="aligned", embed_dim=config.embed_dim, provenance=prov, transform=ImagePreprocess(**pre),
                   counts=inputs, image_fn=lambda px: model.encode_image(px.to(model.device)),
                   gene_fn=lambda batch: model.encode_genes(batch), input_size=int(pre.get("crop", 224))).eval()


def _generic_open_clip_entry(folder: Path, source: str) -> ModelEntry | None:
    """A folder / repo in open_clip's Hub layout without a catalogue entry: a plain image entry for it."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    from stamp.models.openclip import CONFIG_FILE, WEIGHT_FILES
    from stamp.safety import read_json_config

    if not (folder / CONFIG_FILE).is_file():
        return None
    cfg = read_json_config(folder / CONFIG_FILE)
    model_cfg = cfg.get("model_cfg", cfg)
    data = dict(kind="image", library="open_clip", hub_id=source if is_repo_id(source) else "local/folder",
                license="unknown", commercial=None, gated=False, citation="", architecture={"model_cfg": model_cfg},
                pooling="encode_image", files=list(WEIGHT_FILES) + ["open_clip_pytorch_model.safetensors"],
                preprocessing={"resize": 224, "crop": 224, "interpolation": "bicubic", "mean": list(OPENAI_DATASET_MEAN),
                               "std": list(OPENAI_DATASET_STD)},  # open_clip's defaults; the repo's preprocess_cfg wins
                embed_dim=int(model_cfg.get("embed_dim") or 1) if isinstance(model_cfg, dict) else 1, generic=True)
    return ModelEntry.from_dict(source, data, str(folder / CONFIG_FILE))


def load_concatenation(text: str, path: Path, *, weights: Any = None, **kwargs: Any) -> Encoder | None:
    """``A+B`` (no file and no catalogue entry of that name): the parts loaded one by one and concatenated
    (:mod:`stamp.zoo.concat`); None for a single model. ``weights``: for some parts (``PART=PATH`` or a
    mapping, :func:`stamp.zoo.concat.part_weights`)."""
    from stamp.zoo.concat import SEPARATOR, ConcatEncoder, part_weights, split_spec

    if is_pretrained(text) or path.exists() or SEPARATOR not in text:
        return None
    parts = split_spec(text)
    if parts is None:
        raise PretrainedError(f"{text}: an empty part in the concatenation; write A+B (each part a model name, "
                              "folder or Hub repo id)")
    if len(set(parts)) != len(parts):
        raise PretrainedError(f"{text}: a model appears twice in the concatenation; give each once")
    files = part_weights(text, parts, weights)
    return ConcatEncoder([load(p, weights=files.get(p), **kwargs) for p in parts], text, kind=kwargs.get("kind"))


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
         kind: str | None = None, weights: str | os.PathLike | Mapping[str, Any] | None = None,
         revision: str | None = None, token: str | None = None) -> Encoder:
    """Load any encoder of the zoo in eval mode.

    ``name_or_path``: a catalogue name (``stamp models``), run / model folder or Hub repo id, or
    ``A+B``: several of them concatenated per spot (:mod:`stamp.zoo.concat`).
    ``means``: the released gene-means file for models that ship none (remembered ones are found
    without it); ``kind``: ``"image"`` / ``"gene"`` to take one side of an aligned model;
    ``weights``: a weights file or folder downloaded by hand (gated or offline use); for ``A+B``,
    ``"PART=PATH"`` or a mapping part -> path.
    """
    import torch

    if kind not in (None, "image", "gene", "aligned"):
        raise ModelConfigError(f"kind {kind!r} must be image, gene or aligned")
    if isinstance(name_or_path, Encoder):  # already loaded (e.g. with --weights): every command accepts one
        return name_or_path.to(device).eval() if device else name_or_path.eval()
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = str(name_or_path)
    path = Path(text).expanduser()
    concat = load_concatenation(text, path, device=device, means=means, kind=kind, weights=weights,
                                revision=revision, token=token)
    if concat is not None:
        return concat
    if is_pretrained(text) and not path.is_dir():
        entry = get_pretrained(text)
        if kind == "gene" and entry.kind == "image":
            raise PretrainedError(f"{text} is an image encoder; pick a gene or aligned model")
        if kind == "image" and entry.kind == "gene":
            raise PretrainedError(f"{text} is a gene encoder; pick an image or aligned model")
        if entry.library in ("timm", "transformers"):
            enc = load_image_entry(entry, weights=weights, revision=revision, token=token, source=text)
        elif entry.library in GENE_LIBRARIES:  # scGPT, Nicheformer, Geneformer: their authors' own files
            from stamp.zoo.gene_zoo import load_gene_entry

            enc = load_gene_entry(entry, weights=weights, revision=revision, token=token, means=means, source=text)
        elif entry.library in FOREIGN_LIBRARIES:  # CONCH, open_clip models (CLIP, QuiltNet, OmiCLIP)
            enc = load_foreign_entry(entry, weights=weights, revision=revision, token=token, source=text)
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
    open_clip_entry = _generic_open_clip_entry(folder, text)
    if open_clip_entry is not None:  # open_clip's Hub layout (open_clip_config.json + weights)
        return load_foreign_entry(open_clip_entry, weights=folder, source=text).to(dev).eval()
    if not (folder / "config.json").is_file():
        from stamp.models.openclip import CONFIG_FILE, WEIGHT_FILES

        if any((folder / f).is_file() for f in WEIGHT_FILES):
            raise PretrainedError(f"{folder}: open_clip weights without {CONFIG_FILE}; put the repo's {CONFIG_FILE} "
                                  "(model_cfg + preprocess_cfg) beside them, or pass a catalogue name with --weights "
                                  f"{folder} (clip, quiltnet)")
        raise PretrainedError(f"{folder}: no config.json; pass a run folder, its model/ folder, a catalogue name "
                              "(`stamp models`) or a Hub repo of one")
    from stamp.safety import read_json_config

    cfg = read_json_config(folder / "config.json")
    if cfg.get("model_type") == FINETUNED_TYPE:  # a `stamp finetune` run
        return load_finetuned_folder(folder, source=text).to(dev).eval()
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
