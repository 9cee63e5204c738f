"""Checks on untrusted model sources, run BEFORE anything is allocated.

A model folder or Hub repo is data from someone else: its ``config.json`` can ask for 10^7
layers or a width of 10^9, its ``model.safetensors`` can be a pickle, its ``pytorch_model.bin``
can carry code. Every loader of the zoo (model classes' ``from_pretrained``, the factory's
timm / transformers paths, ``stamp convert``) goes through these functions:

* :func:`check_config_sizes` - every size-like key of a config (nested too) within sane bounds
  (at least 1: a width or head count of 0 would divide by zero);
* :func:`safetensors_layout` / :func:`safetensors_shapes` - the tensor names, shapes and dtypes from
  a safetensors header, without reading a tensor (a pickle / zip / garbage file named
  ``.safetensors`` is one clear line);
* :func:`check_shapes` - a model built on the ``meta`` device against that header; every missing
  tensor counted;
* :func:`check_dtypes` / :func:`fit_state` / :func:`check_finite` - integer (quantized) weights for a
  floating-point model are refused, other floating dtypes are cast to the model's, and NaN or
  infinite weights are refused (they would write NaN embeddings silently);
* :func:`load_torch_weights` - ``torch.load(weights_only=True)`` whose refusal of code says so;
* :func:`check_timm_kwargs` - only known, JSON-plain keyword arguments reach ``timm.create_model``;
* :func:`load_plain_pickle` - a data pickle (Geneformer's gene dictionaries) read with a restricted
  unpickler: dicts, lists, strings and numbers only; a pickle that carries code is refused unrun.

This module imports nothing of ``stamp`` but its errors: model classes sit above it.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

from stamp.errors import ModelConfigError

# Largest value each size-like config key may take. Real models are far below: the largest
# pathology encoders have 40 layers and width 1,536; the released gene encoder 12 layers,
# width 512, 20,310 genes, context 1,500. The bounds only stop absurd files from allocating.
SIZE_BOUNDS: dict[str, int] = {
    "num_layers": 512, "depth": 512, "num_hidden_layers": 512, "layers": 512,
    "hidden_size": 32768, "embed_dim": 32768, "width": 32768, "intermediate_size": 262144,
    "projection_dim": 32768, "num_features": 32768,
    "num_heads": 1024, "num_attention_heads": 1024,
    "context_length": 1_000_000, "max_position_embeddings": 1_000_000, "max_length": 1_000_000,
    "n_genes": 5_000_000, "vocab_size": 5_000_000, "n_reserved": 100_000,
    "img_size": 8192, "image_size": 8192, "patch_size": 1024, "reg_tokens": 1024,
    "num_register_tokens": 1024, "region_grid": 64, "csp_window": 1024, "csp_stride": 1024,
}
ZERO_ALLOWED = frozenset({"reg_tokens", "num_register_tokens", "n_reserved"})  # counts that may be 0; sizes may not
# the size names of the gene zoo's own config files (scGPT args.json, Nicheformer hyper-parameters)
SIZE_BOUNDS.update({"embsize": 32768, "nheads": 1024, "d_hid": 262144, "nlayers": 512, "n_layers_cls": 512,
                    "dim_model": 32768, "dim_feedforward": 262144, "n_tokens": 5_000_000})
FLOAT_BOUNDS: dict[str, float] = {"mlp_ratio": 64.0}
MAX_PARAMETERS = 20_000_000_000  # 20 B: ten times the largest released pathology encoder

# Keyword arguments a catalogue entry, a repo's timm config.json or a --vision JSON may pass to
# timm.create_model: architecture sizes and switches only. Anything that reads files, downloads,
# or takes code (checkpoint_path, pretrained, pretrained_cfg_overlay, ...) is refused.
TIMM_KWARGS = frozenset({
    "img_size", "patch_size", "in_chans", "num_classes", "global_pool", "embed_dim", "depth", "num_heads",
    "mlp_ratio", "qkv_bias", "qk_norm", "init_values", "class_token", "no_embed_class", "reg_tokens",
    "pre_norm", "fc_norm", "dynamic_img_size", "dynamic_img_pad", "drop_rate", "pos_drop_rate",
    "patch_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate", "weight_init", "mlp_layer",
    "act_layer", "norm_layer", "output_stride", "pos_embed", "use_fc_norm", "final_norm",
})
# Layers a JSON config may name (by these exact strings); nothing else is imported from a name.
LAYER_NAMES = {
    "timm.layers.SwiGLUPacked": ("timm.layers", "SwiGLUPacked"),
    "timm.layers.SwiGLU": ("timm.layers", "SwiGLU"),
    "timm.layers.Mlp": ("timm.layers", "Mlp"),
    "torch.nn.SiLU": ("torch.nn", "SiLU"),
    "torch.nn.GELU": ("torch.nn", "GELU"),
    "torch.nn.LayerNorm": ("torch.nn", "LayerNorm"),
    "silu": None, "gelu": None, "swish": None, "gelu_tanh": None,  # timm resolves these strings itself
}


def check_config_sizes(data: Any, where: str, *, _path: str = "") -> None:
    """Raise :class:`ModelConfigError` (one line naming ``where`` and the key) when a size-like
    key of ``data`` (nested dicts and lists too) is not a positive number within its bound."""
    if isinstance(data, Mapping):
        for key, value in data.items():
            name = f"{_path}{key}"
            if key in SIZE_BOUNDS and value is not None:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
                    raise ModelConfigError(f"{where}: {name} = {value!r} is not a whole number; fix the config")
                low = 0 if key in ZERO_ALLOWED else 1
                if not low <= value <= SIZE_BOUNDS[key]:
                    raise ModelConfigError(f"{where}: {name} = {value:g} is outside {low}..{SIZE_BOUNDS[key]:,}; "
                                           "the config is corrupt or not meant for this model")
            elif key in FLOAT_BOUNDS and value is not None:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= FLOAT_BOUNDS[key]:
                    raise ModelConfigError(f"{where}: {name} = {value!r} is outside (0, {FLOAT_BOUNDS[key]:g}]; "
                                           "fix the config")
            elif isinstance(value, (Mapping, list)):
                check_config_sizes(value, where, _path=name + ".")
    elif isinstance(data, list):
        for i, item in enumerate(data[:64]):
            check_config_sizes(item, where, _path=f"{_path}{i}.")


def read_json_config(path: str | os.PathLike) -> dict:
    """A ``config.json`` as a dict, its sizes checked; one line when it is not a JSON object."""
    path = Path(path)
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ModelConfigError(f"{path}: not a text file; a model's config.json must be JSON") from None
    except OSError as exc:
        raise ModelConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelConfigError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg}); the model folder is "
                               "damaged: download or save it again") from None
    if not isinstance(data, dict):
        raise ModelConfigError(f"{path}: a JSON {type(data).__name__}, not an object; not a model config")
    check_config_sizes(data, str(path))
    return data


def _sniff(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"PK"):
        return "a PyTorch zip checkpoint (torch.save), not safetensors"
    if head[:1] == b"\x80":
        return "a Python pickle, not safetensors"
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the weights (fetch the LFS object)"
    return "not a safetensors file"


def safetensors_layout(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor name -> (shape, dtype code such as ``F32``, ``BF16``, ``I8``) from a safetensors header
    (no tensor is read)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelConfigError(f"{path}: no such weights file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: (tuple(s.get_shape()), str(s.get_dtype())) for name in f.keys()
                    for s in (f.get_slice(name),)}
    except Exception:  # safetensors raises its own SafetensorError (and OSError, ValueError)
        raise ModelConfigError(f"{path}: {_sniff(path)}; re-download it or save the weights with safetensors") from None


def safetensors_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors file's header (no tensor is read)."""
    return {name: shape for name, (shape, _) in safetensors_layout(path).items()}


def _is_float(dtype: Any) -> bool:
    """A torch dtype or a safetensors dtype code (``F16``, ``BF16``, ``F8_E4M3``) of floating point."""
    return str(dtype).removeprefix("torch.").lower().startswith(("f", "bf"))


def check_dtypes(expected: Mapping[str, Any], stored: Mapping[str, Any], where: str) -> None:
    """Refuse weights stored as integers (quantized: int8, uint8, ...) where the model holds floating
    point: copied in, they would be wrong numbers; assigned, they fail in the first layer.
    ``expected``: model tensor name -> dtype; ``stored``: file tensor name -> dtype (or dtype code)."""
    bad = [k for k, d in stored.items() if k in expected and _is_float(expected[k]) and not _is_float(d)]
    if bad:
        kinds = sorted({str(stored[k]).removeprefix("torch.") for k in bad})
        raise ModelConfigError(f"{where}: {len(bad)} weight tensor(s) are stored as {'/'.join(kinds)} (first: "
                               f"{bad[0]}), not floating point; quantized weights are not supported: use the "
                               "fp32 / fp16 / bf16 weights of this model")


def check_finite(tensors: Iterable[tuple[str, Any]], where: str) -> None:
    """Refuse NaN or infinite weights (they would write NaN embeddings silently): one line naming the first."""
    import torch

    for name, t in tensors:
        if t.is_floating_point() and t.device.type != "meta" and t.numel() and not bool(torch.isfinite(t).all()):
            n = int((~torch.isfinite(t)).sum())
            raise ModelConfigError(f"{where}: tensor {name} holds {n:,} NaN or infinite value(s); the weights are "
                                   "damaged (or were saved from a diverged run): download or export them again")


def fit_state(state: Mapping[str, Any], target: Mapping[str, Any], where: str, *,
              finite: bool = True) -> dict[str, Any]:
    """``state`` ready to be assigned into a model whose tensors are ``target`` (its ``state_dict()``, on
    any device, ``meta`` too): integer weights for float tensors refused, other floating dtypes cast to
    the model's (fp16 / bf16 files load into an fp32 model), NaN / infinite weights refused (``finite=False``:
    the caller checks the tensors it keeps, :func:`check_finite`, e.g. when unused towers are dropped)."""
    check_dtypes({k: v.dtype for k, v in target.items()}, {k: v.dtype for k, v in state.items()}, where)
    out = {k: (v.to(target[k].dtype) if k in target and v.is_floating_point() and v.dtype != target[k].dtype else v)
           for k, v in state.items()}
    if finite:
        check_finite(out.items(), where)
    return out


def check_shapes(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]], where: str,
                 *, ignore_unexpected: bool = False) -> None:
    """Every tensor of a model (built on ``meta``) must be in the file with its shape: else one line."""
    missing = [k for k in expected if k not in found]
    if missing:
        raise ModelConfigError(f"{where}: {len(missing)} tensor(s) of the architecture are not in the weights "
                               f"(first: {missing[0]}); the config and the weights do not belong together")
    for key, shape in expected.items():
        if tuple(found[key]) != tuple(shape):
            raise ModelConfigError(f"{where}: tensor {key} has shape {tuple(found[key])} in the weights but the "
                                   f"config asks for {tuple(shape)}; the config.json does not match the weights")
    extra = [k for k in found if k not in expected]
    if extra and not ignore_unexpected:
        raise ModelConfigError(f"{where}: {len(extra)} tensor(s) in the weights have no place in the architecture "
                               f"(first: {extra[0]}); the config and the weights do not belong together")


def check_parameter_count(n: int, where: str) -> None:
    if n > MAX_PARAMETERS:
        raise ModelConfigError(f"{where}: the config describes {n:,} parameters (more than {MAX_PARAMETERS:,}); "
                               "refusing to build it")


def meta_shapes(module: Any) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def weights_only_load(path: str | os.PathLike) -> Any:
    """``torch.load(weights_only=True)``, memory-mapped when the file is in the zip format."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc) and "zip" not in str(exc):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format


def load_torch_weights(path: str | os.PathLike) -> Any:
    """``torch.load(weights_only=True)``; a file that needs code to unpickle is named as such."""
    import pickle

    path = Path(path)
    try:
        return weights_only_load(path)
    except pickle.UnpicklingError as exc:
        code = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", str(exc))
        if code is not None:
            raise ModelConfigError(
                f"{path}: holds Python code ({code.group(1)}), not only tensors; it was NOT loaded (loading it "
                "would run that code). Use a safetensors file, or re-save only the weights from a trusted copy"
            ) from None
        raise ModelConfigError(f"{path}: not a PyTorch checkpoint the weights-only reader accepts "
                               f"({str(exc).splitlines()[0][:160]}); re-download it") from None
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise ModelConfigError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {first}); "
                               "is it truncated? download it again") from None


def resolve_layer(value: Any, key: str, where: str) -> Any:
    """A layer named in JSON (``"timm.layers.SwiGLUPacked"``) -> the class; only :data:`LAYER_NAMES`."""
    if not isinstance(value, str):
        return value
    if value not in LAYER_NAMES:
        raise ModelConfigError(f"{where}: {key} = {value!r} is not a layer stamp knows; use one of "
                               f"{', '.join(sorted(LAYER_NAMES))}")
    spec = LAYER_NAMES[value]
    if spec is None:
        return value
    import importlib

    return getattr(importlib.import_module(spec[0]), spec[1])


def check_timm_kwargs(kwargs: Mapping[str, Any], where: str, *, resolve: bool = True) -> dict[str, Any]:
    """Only :data:`TIMM_KWARGS` with JSON-plain values; layer names resolved (``resolve=False``: only
    checked, nothing imported: the catalogue checks its entries so when it is read). One line otherwise."""
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key not in TIMM_KWARGS:
            hint = (" (weights are given with --weights / the entry's files, never through timm)"
                    if key in ("pretrained", "checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay") else "")
            raise ModelConfigError(f"{where}: model_kwargs key {key!r} is not allowed{hint}; allowed: "
                                   f"{', '.join(sorted(TIMM_KWARGS))}")
        if not isinstance(value, (str, int, float, bool, list, type(None))):
            raise ModelConfigError(f"{where}: model_kwargs {key} = {value!r} must be a JSON value")
        if key in ("mlp_layer", "act_layer", "norm_layer"):
            if isinstance(value, str) and value not in LAYER_NAMES:
                resolve_layer(value, key, where)  # raises the one line naming the known layers
            value = resolve_layer(value, key, where) if resolve else value
        out[key] = value
    check_config_sizes(out, where)
    return out


# ----------------------------------------------------------------------------- data pickles
# Geneformer ships its gene dictionaries as pickles of {str: int | float}; the released files hold
# numpy scalars (``numpy.core.multiarray.scalar`` of a ``numpy.dtype``: numbers, and strings when
# written from numpy arrays), which are rebuilt here from their bytes by these two functions, never
# by numpy's own unpickling hooks.
PICKLE_MAX_BYTES = 256 * 1024 * 1024
_NUMERIC_DTYPES = frozenset({"b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8"})


def _pickled_dtype(code: Any, align: Any = False, copy: Any = True):
    import numpy as np

    if not isinstance(code, str) or not (code in _NUMERIC_DTYPES or re.fullmatch(r"[US][0-9]{1,6}", code)):
        raise _Refused(f"numpy dtype {code!r} (only numbers and strings are read)")
    return np.dtype(code)


def _pickled_scalar(dtype: Any, data: Any = None):
    import numpy as np

    if not isinstance(dtype, np.dtype) or dtype.kind not in "biufUS" or not isinstance(data, bytes) \
            or len(data) != dtype.itemsize:
        raise _Refused("a numpy scalar that is not a plain number or string")
    value = np.frombuffer(data, dtype=dtype)[0].item()
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


_PICKLE_GLOBALS = {("numpy.core.multiarray", "scalar"): _pickled_scalar,
                   ("numpy._core.multiarray", "scalar"): _pickled_scalar,
                   ("numpy", "dtype"): _pickled_dtype}


class _Refused(Exception):
    """What the restricted unpickler met that is not plain data."""


def load_plain_pickle(path: str | os.PathLike) -> Any:
    """A pickle of plain data only (dict, list, tuple, str, bytes, int, float, bool, None and numpy
    number / string scalars, which become Python numbers / strings). Any other global - a class, a function, code - is
    refused in one :class:`ModelConfigError` line and never called."""
    import pickle

    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ModelConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if size > PICKLE_MAX_BYTES:
        raise ModelConfigError(f"{path}: {size:,} bytes, more than a gene dictionary ({PICKLE_MAX_BYTES:,}); "
                               "not read")

    class PlainUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            fn = _PICKLE_GLOBALS.get((module, name))
            if fn is None:
                raise _Refused(f"{module}.{name}")
            return fn

    try:
        with open(path, "rb") as f:
            return PlainUnpickler(f).load()
    except _Refused as exc:
        raise ModelConfigError(f"{path}: the pickle holds {exc}, not only plain data; it was NOT loaded (loading "
                               "it could run code). Use the file from the model's own repository") from None
    except Exception as exc:  # truncated, not a pickle, a BUILD on the wrong object ...
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise ModelConfigError(f"{path}: not a readable data pickle ({type(exc).__name__}: {first}); "
                               "download it again") from None


__all__ = ["SIZE_BOUNDS", "TIMM_KWARGS", "MAX_PARAMETERS", "check_config_sizes", "read_json_config",
           "safetensors_layout", "safetensors_shapes", "check_dtypes", "check_finite", "fit_state", "check_shapes",
           "check_parameter_count", "meta_shapes", "load_torch_weights", "check_timm_kwargs", "resolve_layer",
           "load_plain_pickle"]
