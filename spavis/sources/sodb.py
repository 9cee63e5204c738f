"""SODB (Spatial Omics DataBase): one h5ad per experiment, via the REST API pysodb uses.

Protocol (read from pysodb/SODB.py; base ``SPAVIS_SODB_URL``, default
``https://gene.ai.tencent.com/SpatialOmics/api/pysodb``):

* ``GET <base>/info`` -> ``{"code": 0, "data": [[biotech_category, dataset, experiment], ...]}``
* ``GET <base>/download/<dataset>/<experiment>`` -> the experiment's ``.h5ad``

Ids: ``dataset`` (all its experiments) or ``dataset/experiment``. SODB publishes no
species or checksums through this API, so species/organ/condition come from manifest
rows (else "unknown"); build-shards' gene harmonization still rejects non-human slices.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import quote

from spavis.errors import FetchError
from spavis.sources import download, sidecar
from spavis.sources.parallel import SliceTask, run_slices

DEFAULT_BASE = "https://gene.ai.tencent.com/SpatialOmics/api/pysodb"
LICENSE = "SODB public data, see the original publication of each dataset"
CITATION = "Yuan Z. et al. SODB facilitates comprehensive exploration of spatial omics data. Nat Methods 20, 387-399 (2023)"


def base_url() -> str:
    return os.environ.get("SPAVIS_SODB_URL", DEFAULT_BASE).rstrip("/")


def list_experiments() -> list[tuple[str, str, str]]:
    """(biotech_category, dataset, experiment) for every experiment SODB serves."""
    url = base_url() + "/info"
    body = download.get_bytes(url, label="SODB")
    try:
        answer = json.loads(body)
        rows = answer["data"] if answer.get("code") == 0 else None
    except (ValueError, AttributeError, KeyError, TypeError):
        raise FetchError(f"SODB: {url} did not answer the pysodb JSON ({body[:60]!r}); check SPAVIS_SODB_URL.") from None
    if not rows:
        raise FetchError(f"SODB: {url} returned no experiments (code {answer.get('code')}).")
    return [tuple(map(str, row[:3])) for row in rows]  # type: ignore[misc]


def slide_id(dataset: str, experiment: str) -> str:
    """Experiment names are unique within SODB; keep them readable but path-safe."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", experiment).lstrip("._-") or re.sub(r"\W", "_", dataset)


def plan_slices(ids: Sequence[str], rows: Sequence[Any], *, cache: Path,
                with_images: bool = False) -> list[SliceTask]:
    """Resolve dataset[/experiment] ids and manifest rows against /info; one task per experiment."""
    wanted: list[tuple[str, str, Any]] = []
    if ids:
        by_dataset: dict[str, list[str]] = {}
        for _, ds, ex in list_experiments():
            by_dataset.setdefault(ds, []).append(ex)
        for i in ids:
            ds, _, ex = i.strip().partition("/")
            if ds not in by_dataset:
                raise FetchError(f"SODB: no dataset {ds!r} at {base_url()}/info; list them with pysodb or the SODB website.")
            if ex and ex not in by_dataset[ds]:
                raise FetchError(f"SODB: dataset {ds!r} has no experiment {ex!r}.")
            wanted += [(ds, e, None) for e in ([ex] if ex else by_dataset[ds])]
    for row in rows:
        extra = getattr(row, "extra", None) or {}
        ds = extra.get("dataset") or (row.accession[0] if row.accession else None)
        ex = extra.get("experiment") or row.slide_id
        if not ds:
            raise FetchError(f"manifest row {row.slide_id}: SODB rows need the dataset name (accession or extra.dataset).")
        wanted.append((ds, ex, row))
    return [SliceTask(row.slide_id if row is not None else slide_id(ds, ex),
                      lambda ds=ds, ex=ex, row=row: _fetch_one(ds, ex, row, Path(cache)))
            for ds, ex, row in wanted]


def fetch_slices(ids: Sequence[str], rows: Sequence[Any], *, cache: Path, workers: int = 4,
                 with_images: bool = False) -> list[Path]:
    return run_slices(plan_slices(ids, rows, cache=cache, with_images=with_images), workers)


def _fetch_one(ds: str, ex: str, row: Any, cache: Path) -> Path:
    sid = row.slide_id if row is not None else slide_id(ds, ex)
    return sidecar.fetch_file_slice(
        cache, "sodb", sid, url=f"{base_url()}/download/{quote(ds, safe='')}/{quote(ex, safe='')}",
        name=f"{sid}.h5ad", row=row, accession=[ds, ex], label=f"SODB {ds}/{ex}",
        defaults=dict(organ=None, species=None, condition="unknown", technology=None, license=LICENSE,
                      citation=CITATION))
