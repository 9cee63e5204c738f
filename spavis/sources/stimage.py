"""STimage-1K4M (Hugging Face dataset ``jiawennnn/STimage-1K4M``): per-slide Visium files.

Per slide ``<slide>`` (e.g. ``GSE144239_GSM4565823``): ``Visium/gene_exp/<slide>_count.csv``
and ``Visium/coord/<slide>_coord.csv`` (+ ``Visium/image/<slide>.png`` with images) land in
``CACHE/stimage/<slide>/`` keeping the repo layout (``read_slice`` finds the coord table next
to the counts). Same protocol as HEST (one resolved commit, hf_hub_download, Hub hashes
verified); see ``spavis.sources.hest``. STimage publishes no per-slide metadata file, so
organ/condition come from the manifest row (``unknown`` when fetched by bare id).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Sequence

from spavis.sources.hest import _pool_map, fetch_hub_slice, remote_files, resolve_revision

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


def fetch_slices(ids: Sequence[str], rows: Sequence[Any], *, cache: Path, workers: int = 4,
                 with_images: bool = False) -> list[Path]:
    """Fetch STimage-1K4M Visium slides by slide name and/or manifest rows."""
    targets: dict[str, Any] = {}
    for i in ids:
        targets.setdefault(i.strip(), None)
    for row in rows:
        targets[row.slide_id] = row
    if not targets:
        return []
    revision = resolve_revision(REPO_ID, os.environ.get("SPAVIS_STIMAGE_REVISION", "main"))
    wanted = [name for sid in targets for name in slide_files(sid, with_images)]
    remote = remote_files(REPO_ID, wanted, revision, what=f"{REPO_ID} ({len(targets)} slides)")

    def one(sid: str) -> Path:
        row = targets[sid]
        return fetch_hub_slice(repo_id=REPO_ID, source="stimage", slide_id=sid,
                               files=slide_files(sid, with_images), remote=remote, revision=revision,
                               cache=Path(cache), fields=lambda folder: sidecar_fields(sid, row),
                               checksums=dict(row.checksums) if row is not None else {})

    return _pool_map(one, list(targets), workers)


__all__ = ["REPO_ID", "fetch_slices", "slide_files"]
