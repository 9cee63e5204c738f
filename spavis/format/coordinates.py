"""Spot coordinates in micrometres from what the corpus records (one definition for every reader).

spavis measures each slide's scale once, at build time, and records it in ``slides.parquet``
(``um_per_px``: micrometres per full-resolution pixel, ``um_per_px_method`` says how). Readers
turn ``pxl_row``/``pxl_col`` into µm with that number and never re-derive it (from neighbour
distances, spot spacing or the lattice). A slide without pixel coordinates, or a corpus that
records no scale (format v1), is placed on the Visium lattice from its recorded
``array_row``/``array_col`` (spots 100 µm apart: ``array_col`` steps 50 µm, ``array_row``
50·√3 µm, the positions spavis's neighbour graph uses); without either, nothing locates the spots.

Dependencies: numpy only (pandas/pyarrow objects are read through their usual methods).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from spavis.format.schema import SPOT_SPACING_UM

__all__ = ["lattice_to_um", "pixels_to_um", "spot_coordinates_um", "slide_scales", "usable_scale"]


def lattice_to_um(array_row: Any, array_col: Any) -> np.ndarray:
    """(x, y) micrometres of Visium lattice positions (hex grid, 100 µm centre spacing)."""
    x = np.asarray(array_col, dtype=np.float64) * (SPOT_SPACING_UM / 2.0)
    y = np.asarray(array_row, dtype=np.float64) * (SPOT_SPACING_UM / 2.0 * np.sqrt(3.0))
    return np.column_stack([x, y])


def usable_scale(um_per_px: Any) -> float | None:
    """``um_per_px`` as a float when it is a finite positive number (a recorded scale), else None."""
    try:
        value = float(um_per_px)
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) and value > 0 else None


def pixels_to_um(pxl_row: Any, pxl_col: Any, um_per_px: float) -> np.ndarray:
    """(x, y) = (pxl_col, pxl_row) full-resolution pixels times the slide's recorded ``um_per_px``."""
    return np.column_stack([np.asarray(pxl_col, dtype=np.float64), np.asarray(pxl_row, dtype=np.float64)]) * float(
        um_per_px)


def _finite(values: Any) -> np.ndarray | None:
    if values is None:
        return None
    arr = np.asarray(values, dtype=np.float64)  # nulls (None / NaN) -> nan
    return arr if arr.size and np.isfinite(arr).all() else None


def spot_coordinates_um(*, um_per_px: Any = None, pxl_row: Any = None, pxl_col: Any = None,
                        array_row: Any = None, array_col: Any = None) -> np.ndarray | None:
    """Spot centres (x, y) in µm, float64 (n, 2), or None when nothing recorded locates them.

    Pixels times the recorded ``um_per_px`` when both are there; else the Visium lattice from
    ``array_row``/``array_col`` (non-negative, finite); else None. Nothing is estimated.
    """
    scale = usable_scale(um_per_px)
    pr, pc = _finite(pxl_row), _finite(pxl_col)
    if scale is not None and pr is not None and pc is not None:
        return pixels_to_um(pr, pc, scale)
    ar, ac = _finite(array_row), _finite(array_col)
    if ar is not None and ac is not None and (ar >= 0).all() and (ac >= 0).all():
        return lattice_to_um(ar, ac)
    return None


def slide_scales(slides: Any) -> dict[str, float]:
    """slide_id -> recorded µm per full-resolution pixel, from ``slides.parquet`` (a DataFrame);
    slides without one are left out, and a corpus without the column (format v1) gives {}."""
    if slides is None or "um_per_px" not in slides or "slide_id" not in slides:
        return {}
    known = slides[slides["um_per_px"].notna()]
    return dict(zip(known["slide_id"].astype(str), known["um_per_px"].astype(float)))
