"""GENERATED Visium slices (``spavis.simulate``, not real data) and a corpus of them, for the benchmarks.

Slice ``i`` uses seed ``1000 + i`` in every script, so the scripts measure the same slices.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


def generated_slices(folder: Path, n: int, *, tissue_fraction: float | None = None) -> list[Path]:
    """``folder/generated_000`` ... (Space Ranger layout); slices already there are kept."""
    from spavis.simulate import write_simulated_slice

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        d = folder / f"generated_{i:03d}"
        if not d.exists():
            write_simulated_slice(d, seed=1000 + i, tissue_fraction=tissue_fraction)
        out.append(d)
    return out


def generated_corpus(work: Path, n: int, **build_kwargs: Any) -> Path:
    """A corpus of ``n`` generated slices in ``work/corpus`` (``build_shards`` keywords passed on)."""
    from spavis.shards import build_shards

    return build_shards(generated_slices(work / "inputs", n), work / "corpus", **build_kwargs)
