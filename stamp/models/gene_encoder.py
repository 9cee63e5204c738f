"""STAMP gene encoder: a post-LN Transformer over rank-ordered gene tokens.

The architecture follows the paper's Table 3 (``base`` config) and the authors' released
code: learned token + position embeddings, post-norm encoder blocks (ReLU, LayerNorm eps
1e-12, dropout 0) and two linear heads over the whole token vocabulary: ``mlm_head`` for
IGR (the spot's own masked genes) and ``cgr_head`` for CGR (the seed's masked genes from
its neighbours). Attention is ``torch.nn.functional.scaled_dot_product_attention`` with a
boolean key-padding mask, so GPUs pick flash / memory-efficient kernels with no extra
package. Block parameter names mirror ``nn.TransformerEncoderLayer`` (``self_attn.in_proj_weight``,
``linear1``, ``norm1`` ...) so the authors' checkpoints map onto this module by name.

Deliberately no ``from __future__ import annotations`` here: ``PyTorchModelHubMixin`` reads
the ``config`` annotation at class creation to (de)serialize :class:`StampConfig`.
"""
import json
from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from stamp.constants import CLS_ID, MASK_ID, N_RESERVED, PAD_ID
from stamp.errors import ModelConfigError

RELEASED_POOLING = "released"  # the released STAMP pooling (was "stamp-v1"; that value is still read)
POOLINGS = ("mean", RELEASED_POOLING)
LEGACY_POOLINGS = {"stamp-v1": RELEASED_POOLING}


@dataclass
class StampConfig:
    """Hyper-parameters of :class:`StampGeneEncoder` (serialized as the repo's ``config.json``).

    ``pooling``: ``"mean"`` (default) averages the last layer over non-pad positions;
    ``"released"`` (``"stamp-v1"`` in configs written before the rename) reproduces the released
    STAMP code, which averages positions 3..end of
    the last layer *including* padding (kept for comparisons with the authors' numbers).
    """

    n_genes: int = 20310
    n_reserved: int = N_RESERVED
    hidden_size: int = 512
    intermediate_size: int = 1024
    num_layers: int = 12
    num_heads: int = 16
    dropout: float = 0.0
    layer_norm_eps: float = 1e-12
    context_length: int = 1500
    activation: str = "relu"
    pooling: str = "mean"
    mask_token_id: int = MASK_ID
    pad_token_id: int = PAD_ID
    cls_token_id: int = CLS_ID
    heads: bool = True  # False: inference-only encoder without the IGR/CGR heads (converted releases)

    def __post_init__(self) -> None:
        self.pooling = LEGACY_POOLINGS.get(self.pooling, self.pooling)  # old run folders stay loadable

    @property
    def vocab_size(self) -> int:
        return self.n_genes + self.n_reserved

    def validate(self) -> "StampConfig":
        if self.hidden_size % self.num_heads:
            raise ModelConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; "
                "fix the model config"
            )
        if self.activation not in ("relu", "gelu"):
            raise ModelConfigError(f"activation {self.activation!r} must be 'relu' or 'gelu'")
        if self.pooling not in POOLINGS:
            raise ModelConfigError(f"pooling {self.pooling!r} must be one of {POOLINGS}")
        if min(self.n_genes, self.context_length, self.num_layers) < 1:
            raise ModelConfigError("n_genes, context_length and num_layers must be positive")
        return self

    @classmethod
    def from_dict(cls, data: dict) -> "StampConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"vocab_size"})
        if unknown:
            raise ModelConfigError(f"unknown model config keys {unknown}; known keys: {sorted(known)}")
        return cls(**{k: v for k, v in data.items() if k in known}).validate()

    def to_dict(self) -> dict:
        return asdict(self)


def preset_names() -> list[str]:
    """Names of the configs shipped in ``stamp/configs/`` (``base``, ``tiny`` ...)."""
    root = resources.files("stamp") / "configs"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".json") and not p.name.startswith("vision-"))


def load_config(name_or_path: Union[str, Path]) -> StampConfig:
    """A shipped preset by name (``base``, ``tiny``) or a JSON file of :class:`StampConfig` fields."""
    text = None
    path = Path(name_or_path)
    if str(name_or_path) in preset_names():
        text = (resources.files("stamp") / "configs" / f"{name_or_path}.json").read_text()
        path = Path(f"stamp/configs/{name_or_path}.json")
    elif path.is_dir() and (path / "config.json").is_file():
        path = path / "config.json"
    if text is None:
        if not path.is_file():
            raise ModelConfigError(
                f"model config {str(name_or_path)!r} is neither a preset {preset_names()} nor a JSON file"
            )
        text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelConfigError(f"{path}: not valid JSON ({exc}); fix the file") from exc
    data = data.get("config", data)  # a saved model folder nests it under "config"
    return StampConfig.from_dict(data)


def quiet_stdout():
    """huggingface_hub's mixin prints "Loading weights from local directory" to stdout on every local
    load, which would corrupt a CLI's machine-readable output (``--json``, piped embeddings)."""
    import contextlib
    import io

    return contextlib.redirect_stdout(io.StringIO())


class EncoderBlock(nn.Module):
    """Post-LN Transformer block (as ``nn.TransformerEncoderLayer(norm_first=False)``) on SDPA."""

    def __init__(self, cfg: StampConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.dropout = cfg.dropout
        self.self_attn = nn.Module()
        self.self_attn.in_proj_weight = nn.Parameter(torch.empty(3 * d, d))
        self.self_attn.in_proj_bias = nn.Parameter(torch.zeros(3 * d))
        self.self_attn.out_proj = nn.Linear(d, d)
        self.linear1 = nn.Linear(d, cfg.intermediate_size)
        self.linear2 = nn.Linear(cfg.intermediate_size, d)
        self.norm1 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.norm2 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.act = F.relu if cfg.activation == "relu" else F.gelu
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        b, n, d = x.shape
        qkv = F.linear(x, self.self_attn.in_proj_weight, self.self_attn.in_proj_bias)
        q, k, v = qkv.view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        a = self.self_attn.out_proj(a.transpose(1, 2).reshape(b, n, d))
        x = self.norm1(x + self.drop(a))
        return self.norm2(x + self.drop(self.linear2(self.drop(self.act(self.linear1(x))))))


class StampGeneEncoder(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="stamp",
    tags=["spatial-transcriptomics", "visium", "stamp", "gene-encoder"],
    repo_url="https://arxiv.org/abs/2602.13944",
    license="bsd-3-clause",
):
    """Gene encoder: token ids (B, L) -> hidden states (B, L, D); :meth:`embed` -> (B, D).

    Token ids: 0 MASK, 1 PAD, 2 CLS, 3..29 reserved, gene ``i`` of the vocabulary -> ``i + 30``.
    Sequences longer than ``context_length`` are truncated (the tokenizer ranks genes, so
    the kept prefix is the most over-expressed genes). ``save_pretrained`` writes
    ``config.json`` + ``model.safetensors``; ``from_pretrained`` reads a folder or Hub repo.
    """

    def __init__(self, config: StampConfig = None) -> None:  # type: ignore[assignment]
        super().__init__()
        if config is None:
            config = StampConfig()
        if isinstance(config, dict):
            config = StampConfig.from_dict(config)
        self.config = config.validate()
        c = self.config
        self.embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.positional_embedding = nn.Embedding(c.context_length, c.hidden_size)
        self.layers = nn.ModuleList(EncoderBlock(c) for _ in range(c.num_layers))
        self.dropout = nn.Dropout(c.dropout)
        self.mlm_head = nn.Linear(c.hidden_size, c.vocab_size) if c.heads else None
        self.cgr_head = nn.Linear(c.hidden_size, c.vocab_size) if c.heads else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-normal linear weights and zero biases, as the authors' code."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_normal_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, EncoderBlock):
                nn.init.xavier_uniform_(module.self_attn.in_proj_weight)
                nn.init.zeros_(module.self_attn.in_proj_bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight)
                if module.padding_idx is not None:
                    with torch.no_grad():
                        module.weight[module.padding_idx].zero_()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs) -> "StampGeneEncoder":
        """A local model folder (``RUN`` or ``RUN/model``) or a Hub repo id (this class knows no
        names: ``stamp.create_model("stamp-v1-gene")`` for a catalogue name). The folder's config
        sizes and weight shapes are checked before anything is allocated."""
        folder = pretrained_folder(pretrained_model_name_or_path, **kwargs)
        check_pretrained_folder(folder, lambda cfg: cls(StampConfig.from_dict(cfg)))
        return checked_weights(super().from_pretrained(folder, *args, **kwargs), folder)

    def _save_pretrained(self, save_directory: Path) -> None:
        save_weights(self, save_directory)

    @classmethod
    def _from_pretrained(cls, *args, **kwargs) -> "StampGeneEncoder":
        with quiet_stdout():
            return super()._from_pretrained(*args, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.embeddings.weight.device

    def _prepare(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids = torch.as_tensor(input_ids)
        if input_ids.dim() != 2:
            raise ModelConfigError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        input_ids = input_ids[:, : self.config.context_length].to(self.device, torch.long)
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size):
            raise ModelConfigError(
                f"token ids must lie in [0, {self.config.vocab_size}); got "
                f"[{int(input_ids.min())}, {int(input_ids.max())}]: was the tokenizer built on another vocabulary?"
            )
        return input_ids, input_ids != self.config.pad_token_id

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Last-layer hidden states (B, L, D); padded positions are excluded as attention keys."""
        input_ids, valid = self._prepare(input_ids)
        n = input_ids.shape[1]
        pos = torch.arange(n, device=input_ids.device)
        x = self.dropout(self.embeddings(input_ids) + self.positional_embedding(pos))
        attn_mask = None
        if not bool(valid.all()):
            # An all-PAD row (spot with no vocabulary gene) would give an all-masked softmax
            # (NaN): let such rows attend to their first position; pooling ignores them anyway.
            keys = valid.clone()
            keys[:, 0] |= ~valid.any(dim=1)
            attn_mask = keys[:, None, None, :]
        for layer in self.layers:
            x = layer(x, attn_mask)
        return x

    def pool(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Spot embedding from last-layer states; all-PAD spots get a zero vector."""
        input_ids = torch.as_tensor(input_ids)[:, : hidden.shape[1]].to(hidden.device)
        if self.config.pooling == RELEASED_POOLING:
            return hidden[:, 3:].float().mean(dim=1)
        valid = (input_ids != self.config.pad_token_id).unsqueeze(-1).to(hidden.dtype)
        total = (hidden * valid).float().sum(dim=1)
        return total / valid.float().sum(dim=1).clamp(min=1.0)

    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """One float32 embedding per spot (B, D), in eval mode semantics (no masking)."""
        return self.pool(self.forward(input_ids), input_ids)


def pretrained_folder(name_or_path: Union[str, Path], **hub_kwargs) -> str:
    """The local folder behind a model class's ``from_pretrained`` argument: ``RUN`` -> ``RUN/model``,
    a model folder, or a snapshot of a Hub repo id. A zoo name is refused in one line pointing to
    the zoo, which is the one place that knows names."""
    from stamp.hub_access import is_repo_id, snapshot
    from stamp.locations import model_folder_of

    text = str(name_or_path)
    if Path(text).expanduser().is_dir():
        return str(model_folder_of(text))
    if is_repo_id(text):
        keep = {k: hub_kwargs.get(k) for k in ("revision", "token", "cache_dir")}
        return str(snapshot(text, **keep))
    from stamp.errors import PretrainedError

    raise PretrainedError(f"{text!r} is neither a local model folder nor a Hub repo id (ORG/NAME); for a zoo "
                           f"name use stamp.create_model({text!r}) (the model) or stamp.load({text!r}) (an Encoder)")


def check_pretrained_folder(folder: Union[str, Path], build) -> None:
    """Refuse a model folder whose ``config.json`` is not JSON, asks for absurd sizes, or does not match
    the tensor shapes and dtypes in ``model.safetensors`` (integer weights for a float model) - all
    before anything is allocated (``build(config)`` runs on the ``meta`` device)."""
    from stamp.safety import check_dtypes, check_parameter_count, check_shapes, read_json_config, safetensors_layout

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        return  # the mixin names the missing file
    cfg = read_json_config(folder / "config.json")
    cfg = cfg["config"] if isinstance(cfg.get("config"), dict) else cfg
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise ModelConfigError(f"{folder}: no model.safetensors beside config.json; the model folder is incomplete "
                               "(save it again, or re-download it)")
    layout = safetensors_layout(weights)
    try:
        with torch.device("meta"):
            model = build(cfg)
    except (TypeError, ValueError, ModelConfigError) as exc:  # e.g. unknown keys: a folder of another model
        raise ModelConfigError(f"{folder / 'config.json'}: not a config of this model ({exc})") from None
    check_parameter_count(sum(p.numel() for p in model.parameters()), str(folder / "config.json"))
    state = model.state_dict()
    check_shapes({k: tuple(v.shape) for k, v in state.items()}, {k: s for k, (s, _) in layout.items()}, str(folder))
    check_dtypes({k: v.dtype for k, v in state.items()}, {k: d for k, (_, d) in layout.items()}, str(folder))


def save_weights(model: nn.Module, save_directory: Union[str, Path]) -> None:
    """``model.safetensors`` of a model class's ``save_pretrained``, written atomically with the umask's mode
    (safetensors' own writer leaves 0600 files a group cannot read)."""
    from safetensors.torch import save_model

    from spavis.format.io import atomic_path

    with atomic_path(Path(save_directory) / "model.safetensors") as tmp:
        save_model(model, str(tmp))


def checked_weights(model: nn.Module, folder: Union[str, Path]) -> nn.Module:
    """``model`` just loaded from ``folder``, refused when a weight is NaN or infinite (a damaged file or
    a diverged run would otherwise write NaN embeddings silently)."""
    from stamp.safety import check_finite

    check_finite(model.state_dict().items(), f"{folder}/model.safetensors")
    return model


def create_gene_encoder(name_or_path: Union[str, Path, StampConfig], **overrides) -> StampGeneEncoder:
    """A gene encoder from a preset name, a config JSON file, a StampConfig, or a saved model.

    Presets and config files give a randomly initialised encoder (seed with
    ``torch.manual_seed`` first); a folder holding ``model.safetensors`` (e.g. ``RUN/model``)
    is loaded with its weights. ``overrides`` replace config fields (e.g. ``n_genes`` taken
    from a corpus's ``genes.parquet``).
    """
    if isinstance(name_or_path, StampConfig):
        cfg = name_or_path
    else:
        path = Path(name_or_path)
        # a shipped preset wins over a same-named folder in the working directory
        if str(name_or_path) not in preset_names() and path.is_dir() and (path / "model.safetensors").is_file():
            model = StampGeneEncoder.from_pretrained(str(path))
            for key, value in overrides.items():
                if getattr(model.config, key) != value:
                    raise ModelConfigError(
                        f"{path}: saved model has {key}={getattr(model.config, key)}, data needs {value}; "
                        "use a model trained on the same vocabulary"
                    )
            return model
        cfg = load_config(name_or_path)
    cfg = StampConfig.from_dict({**cfg.to_dict(), **overrides})
    return StampGeneEncoder(cfg)


# The earlier name, kept for its callers (training, tests); ``stamp.create_model`` is the zoo's
# factory (:func:`stamp.zoo.factory.create_pretrained_model`), a different function.
create_model = create_gene_encoder


__all__ = [
    "StampConfig",
    "StampGeneEncoder",
    "create_model",
    "create_gene_encoder",
    "check_pretrained_folder",
    "load_config",
    "preset_names",
    "ModelConfigError",
    "MASK_ID",
    "PAD_ID",
    "CLS_ID",
    "N_RESERVED",
]
