"""STimage-1K4M (Hugging Face dataset ``jiawennnn/STimage-1K4M``): per-slide Visium files.

Per slide ``<slide>`` (e.g. ``GSE144239_GSM4565823``): ``Visium/gene_exp/<slide>_count.csv``
and ``Visium/coord/<slide>_coord.csv`` (+ ``Visium/image/<slide>.png`` with images) land in
``CACHE/stimage/<slide>/`` keeping the repo layout (``read_slice`` finds the coord table next
to the counts). Same protocol as HEST (one resolved commit, hf_hub_download, Hub hashes
verified; ``SPAVIS_STIMAGE_REVISION``); see ``spavis.sources.hub``. STimage publishes no per-slide metadata file, so
organ/condition come from the manifest row (``unknown`` when fetched by bare id).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

from spavis.sources.hub import plan_hub_slices
from spavis.sources.parallel import SliceTask, run_slices

REPO_ID = "jiawennnn/STimage-1K4M"
LICENSE = "MIT (STimage-1K4M)"
CITATION = ("Chen J. et al. STimage-1K4M: A histopathology image-gene expression dataset for spatial "
            "transcriptomics. NeurIPS 2024 Datasets and Benchmarks.")
TECH_DIR = "Visium"


def slide_files(slide: str, with_images: bool = False) -> list[str]:
    names = [f"{TECH_DIR}/gene_exp/{slide}_count.csv", f"{TECH_DIR}/coord/{slide}_coord.csv"]
    return names + ([f"{TECH_DIR}/image/{slide}.png"] if with_images else [])


def sidecar_fields(slide: str, row: Any | None) -> dict[str, Any]:
    data_path = f"{TECH_DIR}/gene_exp/{slide}_count.csv"
    if row is not None:
        return {"accession": list(row.accession) or [slide], "organ": row.organ, "species": row.species,
                "condition": row.condition, "technology": row.technology, "license": row.license,
                "citation": row.citation, "data_path": data_path}
    accession = [a for a in re.split(r"[_]", slide) if re.fullmatch(r"GS[EM]\d+", a)] or [slide]
    return {"accession": accession, "organ": "unknown", "species": "Homo sapiens", "condition": "unknown",
            "technology": "Visium", "license": LICENSE, "citation": CITATION, "data_path": data_path}


def plan_slices(ids: Sequence[str], rows: Sequence[Any], *, cache: Path,
                with_images: bool = False) -> list[SliceTask]:
    """STimage-1K4M Visium slides by slide name and/or manifest rows; one task per slide."""
    return plan_hub_slices(ids, rows, repo_id=REPO_ID, source="stimage", cache=cache,
                           revision_env="SPAVIS_STIMAGE_REVISION",
                           files_of=lambda sid: slide_files(sid, with_images),
                           fields=lambda sid, row, folder: sidecar_fields(sid, row))


def fetch_slices(ids: Sequence[str], rows: Sequence[Any], *, cache: Path, workers: int = 4,
                 with_images: bool = False) -> list[Path]:
    """Fetch STimage-1K4M slides into ``CACHE/stimage/<slide>/``."""
    return run_slices(plan_slices(ids, rows, cache=cache, with_images=with_images), workers)


__all__ = ["REPO_ID", "fetch_slices", "plan_slices", "slide_files"]
