"""Convert the authors' released STAMP checkpoint into this project's layout, strictly and safely.

The released file (``pytorch_model.bin``, or a Lightning ``{'state_dict': ...}``) is one state
dict of their ``Stamp`` module (see docs/zoo.md for the full layout): ``spot_backbone.*`` (gene
encoder), ``visual_backbone.base_model.*`` (timm ViT-L/16), ``visual_backbone.p_visual`` /
``ref_pos_embed``, four projections and ``logit_scale`` - 514 tensors.

Why this module exists instead of ``load_state_dict(strict=False)`` (what their script does):

* **Safe**: ``torch.load(weights_only=True)`` - a file that needs arbitrary pickled objects is
  refused with a clear message, never unpickled. ``.safetensors`` inputs are read directly.
* **Strict**: every tensor of the target model comes from exactly one released tensor of the
  expected shape, and every released tensor is either mapped or on the list of deliberately
  unused ones (MLM/CGR heads, the ``encoder_layer`` template copy, the image side for a
  gene-only target). Anything else is an error naming the tensor.
* **Bounded memory**: the input is memory-mapped (``mmap=True``) and the output safetensors
  file is written tensor by tensor, so no second full copy of the model is ever held.
* **Atomic**: the output folder is assembled in a temp sibling and renamed; ``conversion.json``
  (the mapping report, source sha256) is written last.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from spavis.format.io import make_temp_dir, sha256_file
from stamp.errors import ConvertError, StampError  # noqa: F401
from stamp.cards import converted_model_card  # noqa: F401  (re-exported: the card lives with the others)
from stamp.zoo.catalogue import PretrainedEntry, get_pretrained, vocabulary
from stamp.locations import CONVERTED_MARKER
from stamp.tokenizer.io import MEANS_KEY, MEANS_REQUIRED_KEY

SOURCE_FORMATS = ("stamp-released",)
GENE_PREFIX = "spot_backbone."
# (prefix of released keys, why inference does not need them)
UNUSED = (
    ("spot_backbone.encoder_layer.", "template layer nn.TransformerEncoder deep-copies into encoder.layers; never called"),
    ("spot_backbone.classifier_head.", "masked-gene (IGR/MLM) head: pretraining only"),
    ("spot_backbone.spatial_classifier_head.", "neighbourhood (CGR) head: pretraining only"),
)
GENE_ONLY_UNUSED = "image encoder / alignment projection: not part of the gene encoder (use the full model)"


# ----------------------------------------------------------------------------- reading
def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) for k in obj)


def load_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The released state dict (memory-mapped where possible) and notes on the unwrapping done.

    Accepts ``.safetensors`` and ``torch.save`` files (plain state dict, Lightning
    ``{'state_dict': ...}``, ``module.`` prefixes from DataParallel/DDP).
    """
    path = Path(path)
    notes: list[str] = []
    if not path.is_file():
        raise ConvertError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except Exception as exc:
            raise ConvertError(f"{path}: not a readable safetensors file ({exc})") from None
    else:
        try:
            obj = _torch_load(path)
        except pickle.UnpicklingError as exc:
            detail = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", str(exc))
            if detail is None:
                raise ConvertError(f"{path}: not a PyTorch checkpoint (or a corrupt one): the unpickler cannot read "
                                   "it; download it again") from None
            raise ConvertError(
                f"{path}: refusing to unpickle it: it holds Python code ({detail.group(1)}), not only tensors and "
                "plain containers; it was NOT loaded (loading it would run that code). If you trust the file, re-save "
                "only its weights "
                "(torch.save(torch.load(f, weights_only=False)['state_dict'], 'weights.bin')) and convert that"
            ) from None
        except Exception as exc:
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise ConvertError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {first}); is it "
                               "truncated or corrupt? download it again") from None
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
            notes.append("Lightning checkpoint: read its 'state_dict'")
        if not _is_tensor_dict(obj):
            raise ConvertError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
        sd = obj
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConvertError(f"{path}: entries that are not tensors: {bad[:5]}; is it a state dict?")
    if any(k.startswith("module.") for k in sd):
        sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
        notes.append("stripped the 'module.' prefix (DataParallel/DDP)")
    if not any(k.startswith(GENE_PREFIX) for k in sd) and "embeddings.weight" in sd and any(
            k.startswith("encoder.layers.") for k in sd):
        sd = {GENE_PREFIX + k: v for k, v in sd.items()}
        notes.append("gene-encoder-only checkpoint: keys read as spot_backbone.*")
    return sd, notes


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)`` (memory-mapped for zip files): :func:`stamp.safety.weights_only_load`."""
    from stamp.safety import weights_only_load

    return weights_only_load(path)


# ----------------------------------------------------------------------------- mapping
@dataclass
class MappingReport:
    """What the conversion did, tensor by tensor (printed by ``stamp convert``, saved as conversion.json)."""

    source: str
    target: str
    mapped: list[dict] = field(default_factory=list)  # {target, source, shape, note}
    unused: list[dict] = field(default_factory=list)  # {source, shape, reason}
    notes: list[str] = field(default_factory=list)
    n_source: int = 0
    seconds: float = 0.0
    source_sha256: str | None = None

    def summary(self) -> str:
        by_reason: dict[str, int] = {}
        for u in self.unused:
            by_reason[u["reason"]] = by_reason.get(u["reason"], 0) + 1
        lines = [f"{self.source} -> {self.target}: {self.n_source} released tensors, {len(self.mapped)} mapped, "
                 f"{len(self.unused)} deliberately unused ({self.seconds:.1f} s)"]
        lines += [f"  note: {n}" for n in self.notes]
        groups: dict[str, int] = {}
        for m in self.mapped:
            src, tgt = m["source"].split("."), m["target"].split(".")
            s_n, t_n = (2 if len(src) > 2 else 1), (2 if len(tgt) > 2 else 1)
            key = (f"{'.'.join(src[:s_n])}{'.*' if len(src) > s_n else ''} -> "
                   f"{'.'.join(tgt[:t_n])}{'.*' if len(tgt) > t_n else ''}")
            groups[key] = groups.get(key, 0) + 1
        lines += [f"  mapped  {n:4d}  {g}" for g, n in groups.items()]
        lines += [f"  special       {m['source']} -> {m['target']}: {m['note']}" for m in self.mapped if m.get("note")]
        lines += [f"  unused  {n:4d}  {r}" for r, n in by_reason.items()]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return asdict(self)


# A rule maps a target key to (released key, transform or None, note, required released shape or None).


def gene_rules(target_prefix: str, vocab_size: int, hidden: int) -> Callable[[str], Any]:
    """Target gene-encoder key (under ``target_prefix``) -> released ``spot_backbone.*`` key."""

    def rule(key: str):
        if not key.startswith(target_prefix):
            return None
        k = key[len(target_prefix):]
        if k == "embeddings.weight":  # released: nn.Embedding(n_tokens + 5); ids never reach the last 5 rows
            return (GENE_PREFIX + k, lambda t: t[:vocab_size],
                    f"rows {vocab_size}..{vocab_size + 4} dropped (unreachable: token ids < {vocab_size})",
                    (vocab_size + 5, hidden))
        if k == "positional_embedding.weight":
            return GENE_PREFIX + k, None, "", None
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", k)
        if m:
            return f"{GENE_PREFIX}encoder.layers.{m.group(1)}.{m.group(2)}", None, "", None
        return None

    return rule


def vision_rules(target_prefix: str = "vision_encoder.") -> Callable[[str], Any]:
    """VisionEncoder key -> released ``visual_backbone.*`` key (timm trunk verbatim)."""

    def rule(key: str):
        if not key.startswith(target_prefix):
            return None
        k = key[len(target_prefix):]
        if k.startswith("trunk."):
            return "visual_backbone.base_model." + k[len("trunk."):], None, "", None
        if k == "pretext":
            return "visual_backbone.p_visual", lambda t: t.reshape(-1), "(1, 1, D) -> (D,)", None
        if k.startswith("region_proj."):
            return "visual_backbone.ref_pos_embed." + k[len("region_proj."):], None, "", None
        return None

    return rule


def head_rules(names: Iterable[str]) -> Callable[[str], Any]:
    """Projections and logit scale keep their released names."""
    names = tuple(names)

    def rule(key: str):
        if key == "logit_scale" or key.split(".")[0] in names:
            return key, None, "", None
        return None

    return rule


def map_state_dict(
    source: dict[str, torch.Tensor],
    target_shapes: dict[str, tuple[int, ...]],
    rules: Iterable[Callable[[str], tuple[str, Any, str] | None]],
    *,
    unused: Iterable[tuple[str, str]] = UNUSED,
    rest_unused: str | None = None,
    source_name: str = "released checkpoint",
    target_name: str = "model",
) -> tuple[dict[str, Callable[[], torch.Tensor]], MappingReport]:
    """Strict mapping: lazy producers for every target tensor + the report; errors name each bad tensor.

    ``rest_unused``: a reason applied to any released tensor no rule consumed (used for the
    gene-only target, where the whole image side is deliberately dropped).
    """
    rules = list(rules)
    report = MappingReport(source=source_name, target=target_name, n_source=len(source))
    producers: dict[str, Callable[[], torch.Tensor]] = {}
    consumed: set[str] = set()
    missing, misshaped, unmapped = [], [], []
    for key, shape in target_shapes.items():
        hit = next((r for r in (rule(key) for rule in rules) if r is not None), None)
        if hit is None:
            unmapped.append(key)
            continue
        src_key, fn, note, src_shape = hit
        if src_key not in source:
            missing.append(f"{src_key} (for {key})")
            continue
        t = source[src_key]
        out_shape = tuple(fn(t.to("meta")).shape) if fn is not None else tuple(t.shape)
        if out_shape != tuple(shape) or (src_shape is not None and tuple(t.shape) != tuple(src_shape)):
            need = tuple(src_shape) if src_shape is not None else tuple(shape)
            misshaped.append(f"{src_key} has shape {tuple(t.shape)}, expected {need} (for {key})")
            continue
        consumed.add(src_key)
        producers[key] = (lambda t=t, fn=fn: fn(t) if fn is not None else t)
        report.mapped.append({"target": key, "source": src_key, "shape": list(shape), "note": note})
    unexpected = []
    for key in source:
        if key in consumed:
            continue
        reason = next((why for prefix, why in unused if key.startswith(prefix)), None)
        if reason is None and rest_unused is not None and not key.startswith(GENE_PREFIX):
            reason = rest_unused
        if reason is None:
            unexpected.append(key)
        else:
            report.unused.append({"source": key, "shape": list(source[key].shape), "reason": reason})
    problems = []
    if missing:
        problems.append(f"missing in the {source_name}: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
    if misshaped:
        problems.append("wrong shape: " + "; ".join(misshaped[:8]) + (" ..." if len(misshaped) > 8 else ""))
    if unexpected:
        problems.append(f"not part of the released STAMP layout: {', '.join(unexpected[:8])}"
                        + (" ..." if len(unexpected) > 8 else ""))
    if unmapped:
        problems.append(f"no mapping rule for target tensors {', '.join(unmapped[:8])} (a stamp bug)")
    if problems:
        raise ConvertError(f"{source_name} does not convert to {target_name}: " + " | ".join(problems))
    return producers, report


# ----------------------------------------------------------------------------- writing
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def write_safetensors(path: str | os.PathLike, producers: dict[str, Callable[[], torch.Tensor]],
                      metadata: dict[str, str] | None = None) -> int:
    """Write a .safetensors file one tensor at a time (bounded memory); returns bytes written.

    The format: 8-byte little-endian header length, a JSON header (dtype, shape, data_offsets
    per tensor, ``__metadata__``), padded with spaces to 8 bytes, then the raw data in order.
    """
    entries, offset = {}, 0
    for name in sorted(producers):
        t = producers[name]()
        if t.dtype not in _ST_DTYPES:
            raise ConvertError(f"tensor {name}: dtype {t.dtype} cannot be stored in safetensors")
        nbytes = t.numel() * t.element_size()
        entries[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    header.update(entries)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in sorted(producers):
            t = producers[name]().contiguous()
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
    return 8 + len(raw) + offset


def _sha256(path: Path) -> str:
    return sha256_file(path)


def _write_config(model: torch.nn.Module, folder: Path) -> None:
    """config.json exactly as PyTorchModelHubMixin.save_pretrained writes it (sorted, indent 2)."""
    config = model._hub_mixin_config
    if is_dataclass(config):
        config = asdict(config)
    (folder / "config.json").write_text(json.dumps(config, sort_keys=True, indent=2))


# ----------------------------------------------------------------------------- targets
def _meta_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def gene_target(entry: PretrainedEntry):
    """(meta-device StampGeneEncoder, mapping rules) for a gene-only entry."""
    from stamp.models.gene_encoder import StampConfig, StampGeneEncoder

    cfg = StampConfig.from_dict(entry.gene_config)
    with torch.device("meta"):
        model = StampGeneEncoder(cfg)
    return model, [gene_rules("", cfg.vocab_size, cfg.hidden_size)]


def full_target(entry: PretrainedEntry):
    """(meta-device StampModel, mapping rules) for a full-model entry."""
    from stamp.models.gene_encoder import StampConfig
    from stamp.models.aligned_model import PROJECTIONS, StampModel, StampModelConfig
    from stamp.models.vision import load_vision_config

    if not entry.vision_config:
        raise ConvertError(f"registry entry {entry.name!r} is a full model but has no vision_config")
    cfg = StampModelConfig(gene=StampConfig.from_dict(entry.gene_config),
                           vision=load_vision_config(dict(entry.vision_config)), embed_dim=entry.embed_dim)
    with torch.device("meta"):
        model = StampModel(cfg)
    g = cfg.gene
    return model, [gene_rules("gene_encoder.", g.vocab_size, g.hidden_size), vision_rules("vision_encoder."),
                   head_rules(PROJECTIONS)]


def convert_released(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    name: "str | PretrainedEntry" = "stamp-v1",
    means: str | os.PathLike | None = None,
    overwrite: bool = False,
    source_id: str | None = None,
    load_name: str | None = None,
) -> MappingReport:
    """Convert a released checkpoint file into ``out`` (config.json, model.safetensors, tokenizer files,
    README.md, conversion.json) for registry entry ``name``; returns the mapping report.

    ``load_name``: what the model card's snippet loads (default: the registry name; ``stamp
    convert`` passes the output folder)."""
    t0 = time.perf_counter()
    entry = name if isinstance(name, PretrainedEntry) else get_pretrained(name)
    name = entry.name
    src, out = Path(src), Path(out)
    if out.exists() and not overwrite:
        raise ConvertError(f"{out} already exists; choose another folder or pass --overwrite")
    sd, notes = load_state_dict(src)
    if entry.component == "gene":
        model, rules = gene_target(entry)
        rest = GENE_ONLY_UNUSED
    else:
        model, rules = full_target(entry)
        rest = None
    producers, report = map_state_dict(sd, _meta_shapes(model), rules, rest_unused=rest,
                                       source_name=source_id or src.name, target_name=f"{type(model).__name__} ({name})")
    report.notes = notes + report.notes
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out)  # umask mode (mkdtemp's 0700 would make the model private)
    try:
        write_safetensors(tmp / "model.safetensors", producers,
                          {"format": "pt", "converted_from": source_id or src.name, "stamp_registry_name": name})
        _write_config(model, tmp)
        write_tokenizer_files(tmp, entry, means)
        report.source_sha256 = _sha256(src)
        report.seconds = time.perf_counter() - t0
        (tmp / "README.md").write_text(converted_model_card(entry, report, has_means=means is not None,
                                                             load_name=load_name))
        (tmp / CONVERTED_MARKER).write_text(json.dumps(report.to_dict(), indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / CONVERTED_MARKER).is_file():  # lost a race to another process: theirs is complete
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report

def write_tokenizer_files(folder: str | os.PathLike, entry: PretrainedEntry,
                          means: str | os.PathLike | None = None) -> None:
    """Tokenizer files of a converted entry: vocab.json + tokenizer_config.json (+ the means when given).

    The released means cannot be redistributed, so without ``means`` the folder records
    ``means_required`` (and ``means_key``: which file ``stamp models set-means`` registers for it)
    and ``stamp.zoo.factory.load_tokenizer`` finds the registered file or asks the user for it.
    """
    from stamp.tokenizer import CONFIG_FILE, MEANS_FILE, GeneTokenizer, load_means_file

    folder = Path(folder)
    spec = entry.tokenizer
    gene_ids, symbols = vocabulary(spec["vocabulary"])
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
        cfg[MEANS_KEY] = entry.full_entry or entry.name
        (folder / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")


__all__ = ["ConvertError", "MappingReport", "load_state_dict", "map_state_dict", "gene_rules", "vision_rules",
           "head_rules", "write_safetensors", "converted_model_card", "write_tokenizer_files",
           "convert_released", "UNUSED", "SOURCE_FORMATS"]
