"""Pickle-free training checkpoints: tensors in safetensors, everything else in JSON.

Layout of ``RUN/checkpoints/step-N/`` (written to a temp folder, then renamed, so a
half-written checkpoint is never visible)::

    model.safetensors          encoder weights (same keys as RUN/model/model.safetensors)
    optimizer.safetensors      AdamW moments + step counts, keys "<param index>.<name>"
    optimizer.json             AdamW param_groups (lr, betas, weight_decay, ...)
    trainer_state.json         step, schedule, metrics, world size (written last)
    rank-<r>.json              that rank's data position (epoch, batches done, spots seen)
    rng-rank-<r>.safetensors   that rank's torch / masking / CUDA RNG states as uint8 tensors

Nothing is ever read with ``torch.load``.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from spavis.format.io import atomic_path, atomic_write_text, publish_dir

STATE_FILE = "trainer_state.json"
_STEP_RE = re.compile(r"^step-(\d+)$")


def checkpoint_root(run: Path) -> Path:
    return Path(run) / "checkpoints"


def list_checkpoints(run: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those holding trainer_state.json), oldest first."""
    root = checkpoint_root(run)
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = _STEP_RE.match(p.name)
            if m and (p / STATE_FILE).is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run: Path) -> Path | None:
    ckpts = list_checkpoints(run)
    return ckpts[-1][1] if ckpts else None


def staging_dir(run: Path, step: int) -> Path:
    """The temp folder every rank writes its part of checkpoint ``step`` into."""
    return checkpoint_root(run) / f".tmp-step-{step}"


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = optimizer.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{idx}.{name}"] = t.detach().cpu().contiguous()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def load_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    tensors = load_file(str(folder / "optimizer.safetensors"))
    groups = json.loads((folder / "optimizer.json").read_text())
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_tensors(mask_generator: torch.Generator) -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state(), "mask": mask_generator.get_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def restore_rng(folder: Path, rank: int, mask_generator: torch.Generator) -> None:
    states = load_file(str(folder / f"rng-rank-{rank}.safetensors"))
    torch.set_rng_state(states["torch"])
    mask_generator.set_state(states["mask"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def write_rank_part(stage: Path, rank: int, position: dict, mask_generator: torch.Generator) -> None:
    stage.mkdir(parents=True, exist_ok=True)
    with atomic_path(stage / f"rng-rank-{rank}.safetensors") as tmp:
        save_file(rng_tensors(mask_generator), str(tmp))
    _write_json(stage / f"rank-{rank}.json", position)


def write_main_part(
    stage: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict
) -> None:
    stage.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(stage / "model.safetensors") as tmp:
        save_file(weights, str(tmp))
    tensors, groups = optimizer_tensors(optimizer)
    with atomic_path(stage / "optimizer.safetensors") as tmp:
        save_file(tensors, str(tmp))
    _write_json(stage / "optimizer.json", groups)


def finalize(run: Path, step: int, state: dict, keep: int | None = None) -> Path:
    """Write trainer_state.json last, then atomically rename the staging folder."""
    stage = staging_dir(run, step)
    _write_json(stage / STATE_FILE, state)
    final = checkpoint_root(run) / f"step-{step}"
    publish_dir(stage, final)  # an existing step-N is swapped out, never half-deleted
    if keep:
        for _, old in list_checkpoints(run)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(folder: Path) -> dict:
    return json.loads((folder / STATE_FILE).read_text())


def read_position(folder: Path, rank: int) -> dict:
    return json.loads((folder / f"rank-{rank}.json").read_text())


def load_model_weights(model: torch.nn.Module, folder: Path) -> None:
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
