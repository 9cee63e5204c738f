"""Spot annotations (``build-shards --obs-columns layer,region [--annotations FILE]``).

Evaluation needs labels next to the expression (cortical layer, region, pathologist
annotation). They come, per slide, from the first of these that has the column:

1. ``--annotations FILE``: a CSV keyed by ``barcode`` (or ``spot_id`` = ``<slide_id>:<barcode>``),
   optionally with a ``slide_id`` column, one column per annotation;
2. the source's own ``obs`` (HEST / any ``.h5ad``: read from the file, the readers keep only
   coordinates);
3. Space Ranger ``analysis/clustering/<name>/clusters.csv`` (column ``<name>``, e.g.
   ``gene_expression_graphclust`` or ``graphclust``);
4. ``generated.json`` of a slice written by ``spavis.simulate`` (column ``domain``: the
   simulated ground truth, labelled generated like the slice).

Values are stored as strings; a spot without a value is null, never a made-up class.
The columns are appended after the fixed expression schema and added to the Zarr ``obs``.
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from spavis.format.io import not_regular, sha256_file
from spavis.errors import SpavisError
from spavis.format.schema import EXPRESSION_SCHEMA

ANNOTATION_TYPE = pa.string()
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_RESERVED = set(EXPRESSION_SCHEMA.names) | {"in_tissue", "total_counts", "n_genes"}


class AnnotationError(SpavisError):
    """An --obs-columns name or an --annotations file is unusable."""


def parse_obs_columns(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"layer,region"`` (or a list) -> ('layer', 'region'); names checked, order kept, duplicates dropped."""
    if not value:
        return ()
    parts = value.split(",") if isinstance(value, str) else [p for v in value for p in str(v).split(",")]
    names = tuple(dict.fromkeys(p.strip() for p in parts if p.strip()))
    for name in names:
        if not _NAME.match(name):
            raise AnnotationError(f"--obs-columns: {name!r} is not a usable column name (letters, digits, _ . -)")
        if name in _RESERVED:
            raise AnnotationError(
                f"--obs-columns: {name!r} is a fixed column of the shard format; annotations need other names"
            )
    return names


def expression_schema(obs_columns: Sequence[str] = ()) -> pa.Schema:
    """The fixed expression schema plus one nullable string column per annotation."""
    schema = EXPRESSION_SCHEMA
    for name in obs_columns:
        schema = schema.append(pa.field(name, ANNOTATION_TYPE))
    return schema


def annotations_param(path: str | Path | None) -> dict | None:
    """What a build records about ``--annotations FILE`` (name + sha256: a changed file rebuilds)."""
    if path is None:
        return None
    p = Path(path)
    what = not_regular(p)
    if what == "missing":
        raise AnnotationError(f"--annotations {p}: no such file; give a CSV with a barcode (or spot_id) column")
    if what is not None:  # a FIFO or device would block or never end
        raise AnnotationError(f"--annotations {p}: is {what}, not a regular file; give a CSV file with a barcode "
                              "(or spot_id) column")
    return {"name": p.name, "sha256": sha256_file(p)}


@lru_cache(maxsize=4)
def _read_annotation_csv(path: str, sha256: str) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=True, sep=None, engine="python")
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise AnnotationError(f"--annotations {path}: cannot read it as CSV ({exc}); fix the file") from exc
    cols = {c.lower(): c for c in df.columns}
    if "spot_id" in cols and "barcode" not in cols:
        split = df[cols["spot_id"]].str.rsplit(":", n=1, expand=True)
        if split.shape[1] != 2:
            raise AnnotationError(f"--annotations {path}: spot_id values must read <slide_id>:<barcode>")
        df["slide_id"], df["barcode"] = split[0], split[1]
    elif "barcode" in cols:
        df = df.rename(columns={cols["barcode"]: "barcode", **({cols["slide_id"]: "slide_id"} if "slide_id" in cols else {})})
    else:
        raise AnnotationError(
            f"--annotations {path}: needs a 'barcode' (or 'spot_id') column; found {list(df.columns)}"
        )
    return df


def _file_rows(path: str | Path, sha256: str, slide_id: str) -> pd.DataFrame:
    df = _read_annotation_csv(str(path), sha256)
    if "slide_id" in df.columns:
        df = df[df["slide_id"] == slide_id]
    dup = df["barcode"].duplicated()
    if dup.any():
        raise AnnotationError(
            f"--annotations {path}: barcode {df['barcode'][dup].iloc[0]!r} appears twice for slide {slide_id!r}; "
            "add a slide_id column or keep one row per spot"
        )
    return df.set_index("barcode")


def _h5ad_obs(data_path: Path) -> pd.DataFrame | None:
    files = [data_path] if data_path.is_file() else sorted(data_path.rglob("*.h5ad"))
    files = [f for f in files if f.name.endswith(".h5ad")]
    if not files:
        return None
    import h5py
    from anndata.io import read_elem

    with h5py.File(files[0], "r") as f:
        obs = read_elem(f["obs"])
    obs.index = obs.index.astype(str)
    return obs


def _spaceranger_clusters(data_path: Path) -> pd.DataFrame | None:
    if not data_path.is_dir():
        return None
    frames = []
    for csv in sorted(data_path.glob("**/analysis/clustering/*/clusters.csv")):
        df = pd.read_csv(csv, dtype=str)
        if {"Barcode", "Cluster"} <= set(df.columns):
            frames.append(df.set_index("Barcode")["Cluster"].rename(csv.parent.name))
    return pd.concat(frames, axis=1) if frames else None


def _generated_domains(root: Path) -> pd.DataFrame | None:
    if not root.is_dir():
        return None
    # the slice folder itself, or the one slice folder inside it (a folder holding one generated slice)
    found = [root / "generated.json"] if (root / "generated.json").is_file() else sorted(
        p for p in root.glob("*/generated.json") if p.is_file())
    if len(found) != 1:
        return None
    marker = found[0]
    gen = json.loads(marker.read_text())
    if not gen.get("generated") or not isinstance(gen.get("domains"), dict):
        return None
    return pd.DataFrame({"domain": pd.Series(gen["domains"], dtype=object)})


def _as_strings(values: pd.Series, barcodes: np.ndarray) -> list[str | None]:
    aligned = values.reindex(pd.Index(barcodes))
    out: list[str | None] = []
    for v in aligned.to_numpy(dtype=object):
        if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA or (isinstance(v, str) and v == ""):
            out.append(None)
        elif isinstance(v, (float, np.floating)) and float(v).is_integer():
            out.append(str(int(v)))  # cluster ids stored as floats: "3", not "3.0"
        else:
            out.append(str(v))
    return out


def slice_annotations(
    slide_id: str,
    root: Path,
    data_path: Path,
    barcodes: Iterable[str],
    obs_columns: Sequence[str],
    annotations: Mapping | None = None,
) -> dict[str, list[str | None]]:
    """Per requested column, one value (str or None) per barcode of the kept spots."""
    if not obs_columns:
        return {}
    barcodes = np.asarray([str(b) for b in barcodes], dtype=object)
    sources: list[pd.DataFrame] = []
    if annotations:
        sources.append(_file_rows(annotations["path"], annotations["sha256"], slide_id))
    for loader in (lambda: _h5ad_obs(Path(data_path)), lambda: _spaceranger_clusters(Path(data_path)),
                   lambda: _generated_domains(Path(root))):
        try:
            frame = loader()
        except (OSError, KeyError, ValueError) as exc:
            raise AnnotationError(f"{slide_id}: cannot read its annotations ({exc}); check {data_path}") from exc
        if frame is not None:
            sources.append(frame)
    out: dict[str, list[str | None]] = {}
    for name in obs_columns:
        frame = next((f for f in sources if name in f.columns), None)
        out[name] = _as_strings(frame[name], barcodes) if frame is not None else [None] * len(barcodes)
    return out


def append_columns(table: pa.Table, values: Mapping[str, list[str | None]]) -> pa.Table:
    """``table`` with the annotation columns appended (nullable strings)."""
    for name, col in values.items():
        table = table.append_column(pa.field(name, ANNOTATION_TYPE), pa.array(col, ANNOTATION_TYPE))
    return table


def obs_frame_columns(values: Mapping[str, list[str | None]]) -> dict[str, pd.Categorical]:
    """Zarr ``obs`` columns: categoricals with sorted categories, missing values as NaN."""
    return {name: pd.Categorical(col, categories=sorted({v for v in col if v is not None}))
            for name, col in values.items()}


def labelled_counts(values: Mapping[str, list[str | None]]) -> dict[str, int]:
    """Spots with a value, per column (recorded per slide; a column no slide has is an error)."""
    return {name: int(sum(v is not None for v in col)) for name, col in values.items()}


def check_coverage(slides: Sequence[Mapping], obs_columns: Sequence[str]) -> None:
    """Raise when a requested column has no value on any slide (a typo, not a missing label)."""
    for name in obs_columns:
        if not any((s.get("annotations") or {}).get(name) for s in slides):
            raise AnnotationError(
                f"--obs-columns {name}: no slide has this column (looked in --annotations, the .h5ad obs, "
                "Space Ranger analysis/clustering and generated.json); check the name"
            )
