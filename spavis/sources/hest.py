"""HEST-1k (Hugging Face dataset ``MahmoodLab/hest``): per-sample files, never the whole repo.

Protocol in ``spavis.sources.hub`` (one resolved commit recorded as ``revision``,
hf_hub_download, Hub sizes/hashes verified; ``HF_ENDPOINT``; ``SPAVIS_HEST_REVISION`` pins
a branch/tag/commit). The dataset is gated: 401/403 say to accept its terms and log in.

Per sample ``<id>``: ``st/<id>.h5ad`` + ``metadata/<id>.json`` (+ ``wsis/<id>.tif`` with
images) land in ``CACHE/hest/<id>/`` with the repo layout that ``read_slice`` understands.
The metadata file comes first so a non-human sample is refused before its h5ad downloads.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from spavis.errors import FetchError
from spavis.sources.hub import plan_hub_slices
from spavis.sources.parallel import SliceTask, run_slices

REPO_ID = "MahmoodLab/hest"
LICENSE = "CC BY-NC-SA 4.0 (HEST-1k)"
CITATION = ("Jaume G. et al. HEST-1k: A Dataset for Spatial Transcriptomics and Histology Image Analysis. "
            "NeurIPS 2024 Datasets and Benchmarks.")
_CONDITIONS = {"cancer": "cancer", "tumor": "cancer", "diseased": "diseased", "healthy": "healthy",
               "treated": "treated"}


def _str(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and value != value):
        return None
    text = str(value).strip()
    return text or None


def sidecar_fields(sample_id: str, metadata: dict[str, Any], row: Any | None) -> dict[str, Any]:
    """slice.json fields from the manifest row (preferred) or HEST's metadata/<id>.json."""
    species = _str(metadata.get("species")) or (row.species if row is not None else None) or "unknown"
    if species != "Homo sapiens":
        raise FetchError(f"{sample_id}: HEST lists species {species!r}; spavis builds human corpora only. "
                         "Pick a Homo sapiens sample (see manifests/hest-v1.csv).")
    if row is not None:
        return {"accession": list(row.accession) or [sample_id], "organ": row.organ, "species": species,
                "condition": row.condition, "technology": row.technology, "license": row.license,
                "citation": row.citation, "data_path": f"st/{sample_id}.h5ad"}
    title, link = _str(metadata.get("dataset_title")), _str(metadata.get("study_link"))
    return {
        "accession": [sample_id], "organ": (_str(metadata.get("organ")) or "unknown").lower(), "species": species,
        "condition": _CONDITIONS.get((_str(metadata.get("disease_state")) or "").lower(), "unknown"),
        "technology": _str(metadata.get("st_technology")) or "Visium",
        "license": _str(metadata.get("license")) or LICENSE,
        "citation": "; ".join(x for x in (title, link) if x) + f" (via {CITATION})",
        "data_path": f"st/{sample_id}.h5ad",
    }


def sample_files(sample_id: str, with_images: bool = False) -> list[str]:
    """Repo paths of one sample, metadata first (species is checked on it)."""
    names = [f"metadata/{sample_id}.json", f"st/{sample_id}.h5ad"]
    return names + ([f"wsis/{sample_id}.tif"] if with_images else [])


def _fields(sample_id: str, row: Any | None, folder: Path) -> dict[str, Any]:
    try:
        metadata = json.loads((folder / f"metadata/{sample_id}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FetchError(f"{sample_id}: metadata/{sample_id}.json is unreadable ({exc}); delete "
                         f"{folder} and fetch again.") from None
    return sidecar_fields(sample_id, metadata if isinstance(metadata, dict) else {}, row)


def plan_slices(ids: Sequence[str], rows: Sequence[Any], *, cache: Path,
                with_images: bool = False) -> list[SliceTask]:
    """HEST samples by id (e.g. ``TENX152``) and/or manifest rows; one task per sample."""
    return plan_hub_slices(ids, rows, repo_id=REPO_ID, source="hest", cache=cache,
                           revision_env="SPAVIS_HEST_REVISION",
                           files_of=lambda sid: sample_files(sid, with_images), fields=_fields, precheck=True)


def fetch_slices(ids: Sequence[str], rows: Sequence[Any], *, cache: Path, workers: int = 4,
                 with_images: bool = False) -> list[Path]:
    """Fetch HEST samples into ``CACHE/hest/<id>/``."""
    return run_slices(plan_slices(ids, rows, cache=cache, with_images=with_images), workers)


__all__ = ["REPO_ID", "fetch_slices", "plan_slices", "sample_files", "sidecar_fields"]
