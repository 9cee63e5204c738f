"""Merge prepared slices into the final corpus directory, atomically and deterministically.

Slides are taken in slide_id order whatever order they were prepared in; each slide's
rows are streamed batch by batch into the shard writers (memory does not grow with the
number of slides); per-gene float64 sums are merged in the same fixed order, so
genes.parquet is identical whatever the shard size, worker count or input order.

The writer consumes slides one at a time (``write_corpus_in_order``), so ``build_shards``
feeds it each slide as soon as it and every slide before it are prepared: the Parquet
encoding of early slides overlaps the preparation of later ones in the worker processes.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spavis import __version__
from spavis.format import schema as S
from spavis.shards.annotations import check_coverage, expression_schema
from spavis.shards.card import render_card
from spavis.shards.prepare import (  # noqa: F401  (file_sha256/tree_sha256 are re-exported)
    DONE_FILE,
    ROWS_FILE,
    SLIDE_FILE,
    STATS_FILE,
    ZARR_DIR,
    file_sha256,
    iter_rows,
    resolve_vocab,
    tree_sha256,
    tree_size,
)
from spavis.errors import SpavisError

DEFAULT_MAX_SPOTS_PER_SHARD = 50_000


def _link_or_copy_tree(src: Path, dest: Path) -> None:
    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copyfile(s, d)

    shutil.copytree(src, dest, copy_function=link)


def _load_one(raw: str | os.PathLike, vocab) -> tuple[Path, dict]:
    d = Path(raw)
    try:
        done = json.loads((d / DONE_FILE).read_text())
        slide = json.loads((d / SLIDE_FILE).read_text())
    except (OSError, ValueError):
        raise SpavisError(f"{d}: not a completely prepared slice; run prepare_slice/build-shards again.") from None
    if done["key"]["vocab_checksum"] != vocab.checksum:
        raise SpavisError(
            f"{d}: prepared with another vocabulary (checksum {done['key']['vocab_checksum'][:12]}); "
            "delete the work directory or prepare it again with the same --vocab."
        )
    slide["_zarr_digest"] = done.get("zarr")  # hashed by prepare_slice (absent in older work dirs)
    return d, slide


def _load_prepared(prepared_dirs: Iterable[str | os.PathLike], vocab) -> list[tuple[Path, dict]]:
    items = [_load_one(raw, vocab) for raw in prepared_dirs]
    items.sort(key=lambda t: t[1]["slide_id"])
    _check_unique(items)
    return items


def _check_unique(items: list[tuple[Path, dict]]) -> None:
    """Raise when a slide_id is prepared twice (``items`` sorted by slide_id)."""
    for (d0, s0), (d1, s1) in zip(items, items[1:]):
        if s0["slide_id"] == s1["slide_id"]:
            raise SpavisError(f"slide_id {s1['slide_id']!r} is prepared twice ({d0} and {d1}); keep one.")


def _check_out(out: Path, max_spots_per_shard: int) -> None:
    if max_spots_per_shard < 1:
        raise SpavisError("--max-spots-per-shard must be at least 1.")
    if out.exists() and not out.is_dir():
        raise SpavisError(f"{out}: exists and is not a directory; choose another --out.")
    if out.is_dir() and any(out.iterdir()) and not (out / S.MANIFEST_FILE).is_file():
        raise SpavisError(f"{out}: exists and is not a spavis shard directory; choose an empty or new --out.")


def _check_not_empty(slides: list[dict]) -> None:
    if not slides:
        raise SpavisError("no prepared slices to write; give build-shards at least one slice.")
    if sum(s["n_spots_kept"] for s in slides) == 0:
        raise SpavisError(
            "no spot of any slide passed QC, so the corpus would be empty; lower --min-genes "
            "(the number of detected vocabulary genes a spot needs) or check the inputs."
        )


def write_corpus(
    prepared_dirs: Iterable[str | os.PathLike],
    out: str | os.PathLike,
    *,
    vocab: Any,
    params: dict[str, Any] | None = None,
    max_spots_per_shard: int = DEFAULT_MAX_SPOTS_PER_SHARD,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write the corpus for ``prepared_dirs`` to ``out`` (built in ``out.tmp-*``, then renamed)."""
    vocab = resolve_vocab(vocab)
    out = Path(out)
    items = _load_prepared(prepared_dirs, vocab)
    _check_not_empty([s for _, s in items])
    _check_out(out, max_spots_per_shard)
    return _write_atomically(iter(items), out, vocab, params, max_spots_per_shard, progress)


def write_corpus_in_order(
    prepared_dirs: Iterable[str | os.PathLike],
    out: str | os.PathLike,
    *,
    vocab: Any,
    params: dict[str, Any] | None = None,
    max_spots_per_shard: int = DEFAULT_MAX_SPOTS_PER_SHARD,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """``write_corpus`` for prepared slices that arrive one by one, already in slide_id order.

    ``prepared_dirs`` may be a generator that blocks until the next slide is prepared;
    each slide is written as soon as it arrives (same bytes as ``write_corpus``).
    """
    vocab = resolve_vocab(vocab)
    out = Path(out)
    _check_out(out, max_spots_per_shard)

    def items():
        last = None
        for raw in prepared_dirs:
            d, slide = _load_one(raw, vocab)
            if last is not None and slide["slide_id"] <= last[1]["slide_id"]:
                _check_unique([last, (d, slide)])
                raise SpavisError(f"{d}: prepared slices must come in slide_id order (after {last[0]}).")
            last = (d, slide)
            yield d, slide

    return _write_atomically(items(), out, vocab, params, max_spots_per_shard, progress)


def _write_atomically(items, out: Path, vocab, params, max_spots, progress) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_into(tmp, items, vocab, dict(params or {}), max_spots, progress)
        if out.exists():
            old = out.parent / f"{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _shard_name(i: int, width: int) -> str:
    return f"{S.EXPRESSION_DIR}/part-{i:0{width}d}.parquet"


def _write_into(tmp, items, vocab, params, max_spots, progress) -> None:
    """Stream ``items`` ((prepared dir, slide record) in slide_id order) into ``tmp``.

    Shards are packed greedily as slides arrive: a slide with spots starts a new file when
    it would push the current one past ``max_spots`` (a slide never spans two files, a
    larger slide gets a file of its own, slides without spots are in no file). A file is named with the 5-digit minimum width and renamed at the end in the
    rare case (100,000+ files) that the final count needs a wider number.
    """
    say = progress or (lambda _msg: None)
    expr_dir = tmp / S.EXPRESSION_DIR
    expr_dir.mkdir(parents=True)
    (tmp / S.ZARR_DIR).mkdir()

    done: list[tuple[Path, dict]] = []
    location: dict[str, tuple[int, int]] = {}  # slide_id -> (shard number, row offset)
    shard_rows: list[int] = []
    zarr_outputs: list[dict[str, Any]] = []
    writer = None
    expr_schema = expression_schema(params.get("obs_columns") or ())  # + --obs-columns annotations
    try:
        for d, slide in items:
            sid, n = slide["slide_id"], slide["n_spots_kept"]
            done.append((d, slide))
            if n > 0:
                if writer is None or shard_rows[-1] + n > max_spots:
                    if writer is not None:
                        writer.close()
                    shard_rows.append(0)
                    writer = pq.ParquetWriter(tmp / _shard_name(len(shard_rows) - 1, 5), expr_schema,
                                              **S.PARQUET_WRITE_OPTIONS)
                location[sid] = (len(shard_rows) - 1, shard_rows[-1])
                for batch in iter_rows(d / ROWS_FILE):
                    writer.write_table(pa.Table.from_batches([batch], schema=expr_schema),
                                       row_group_size=S.ROW_GROUP_SIZE)
                    shard_rows[-1] += batch.num_rows
            dest = tmp / S.ZARR_DIR / f"{sid}.zarr"
            _link_or_copy_tree(d / ZARR_DIR, dest)
            digest = slide.pop("_zarr_digest", None) or {}
            if not digest:
                digest["sha256"], digest["n_files"] = tree_sha256(dest)
                digest["size"] = tree_size(dest)
            zarr_outputs.append({"path": f"{S.ZARR_DIR}/{sid}.zarr", "kind": "zarr", "rows": n, **digest})
            say(sid)
    finally:
        if writer is not None:
            writer.close()
    slides = [s for _, s in done]
    _check_not_empty(slides)
    check_coverage(slides, params.get("obs_columns") or ())

    width = max(5, len(str(len(shard_rows))))
    outputs: list[dict[str, Any]] = []
    for i, rows in enumerate(shard_rows):
        rel = _shard_name(i, width)
        if width != 5:
            os.replace(tmp / _shard_name(i, 5), tmp / rel)
        outputs.append({"path": rel, "kind": "expression", "rows": rows})
    shard_file = {sid: (_shard_name(i, width), offset) for sid, (i, offset) in location.items()}

    genes = _merge_gene_stats(done, vocab)
    pq.write_table(genes, tmp / S.GENES_FILE, row_group_size=len(vocab) or 1, **S.PARQUET_WRITE_OPTIONS)
    outputs.append({"path": S.GENES_FILE, "kind": "genes", "rows": genes.num_rows})

    slides_table = _slides_table(slides, shard_file)
    pq.write_table(slides_table, tmp / S.SLIDES_FILE, **S.PARQUET_WRITE_OPTIONS)
    outputs.append({"path": S.SLIDES_FILE, "kind": "slides", "rows": slides_table.num_rows})

    stats = _summary(slides, genes, len(shard_rows))
    (tmp / S.CARD_FILE).write_text(render_card(vocab=vocab, params=params, stats=stats, slides=slides), encoding="utf-8")
    outputs.append({"path": S.CARD_FILE, "kind": "card", "rows": None})

    for entry in outputs:
        p = tmp / entry["path"]
        entry["sha256"] = file_sha256(p)
        entry["size"] = p.stat().st_size
    outputs = sorted(outputs + zarr_outputs, key=lambda e: e["path"])
    manifest = build_manifest(vocab, params, slides, outputs, stats)
    (tmp / S.MANIFEST_FILE).write_text(S.json_dumps(manifest), encoding="utf-8")


def build_key(vocab, params: dict[str, Any], inputs: list[dict[str, Any]]) -> str:
    """Digest of everything that decides the output bytes (a re-run with the same key is a no-op)."""
    payload = {
        "spavis_version": __version__,
        "format_version": S.FORMAT_VERSION,
        "vocab_checksum": vocab.checksum,
        "parameters": params,
        "inputs": [{"slide_id": i["slide_id"], "sha256": i["sha256"], "metadata_sha256": i.get("metadata_sha256")}
                   for i in sorted(inputs, key=lambda i: i["slide_id"])],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def input_entry(slide_id: str, source: str, input_sha256: str, files: list[dict], metadata: dict) -> dict:
    meta = json.dumps(metadata, sort_keys=True, default=str).encode()
    return {"slide_id": slide_id, "source": source, "sha256": input_sha256,
            "metadata_sha256": hashlib.sha256(meta).hexdigest(), "files": files}


def build_manifest(vocab, params, slides, outputs, stats) -> dict[str, Any]:
    inputs = []
    for s in slides:
        meta = {k: s.get(k) for k in ("source", "accession", "organ", "species", "condition", "technology",
                                      "license", "citation")}
        inputs.append(input_entry(s["slide_id"], s["source"], s["input_sha256"], s["input_files"], meta))
    return {
        "format": S.FORMAT_NAME,
        "format_version": S.FORMAT_VERSION,
        "spavis_version": __version__,
        "vocabulary": {"name": vocab.name, "checksum": vocab.checksum, "n_genes": len(vocab)},
        "parameters": params,
        "build_key": build_key(vocab, params, inputs),
        "summary": stats,
        "inputs": inputs,
        "slides": [
            {"slide_id": s["slide_id"], "mapping_report": s.get("mapping_report"), "qc": s.get("qc")}
            | ({"annotations": s["annotations"]} if "annotations" in s else {})
            for s in slides
        ],
        "outputs": outputs,
    }


def _merge_gene_stats(items, vocab) -> pa.Table:
    n = len(vocab)
    nnz = np.zeros(n, np.int64)
    sum_raw = np.zeros(n, np.float64)
    sum_cp10k = np.zeros(n, np.float64)
    n_slides = np.zeros(n, np.int32)
    for d, _slide in items:  # slide_id order: the float64 additions happen in a fixed order
        t = pq.read_table(d / STATS_FILE)
        gi = t["gene_index"].to_numpy()
        nnz[gi] += t["nnz"].to_numpy()
        sum_raw[gi] += t["sum_raw"].to_numpy()
        sum_cp10k[gi] += t["sum_cp10k"].to_numpy()
        n_slides[gi] += 1
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_raw = np.where(nnz > 0, sum_raw / np.maximum(nnz, 1), np.nan)
        mean_cp10k = np.where(nnz > 0, sum_cp10k / np.maximum(nnz, 1), np.nan)
    missing = nnz == 0
    return pa.Table.from_pydict(
        {
            "gene_index": np.arange(n, dtype=np.int32),
            "ensembl_id": pa.array([str(x) for x in vocab.ensembl_ids], pa.string()),
            "symbol": pa.array([str(x) if x is not None else None for x in vocab.symbols], pa.string()),
            "nnz": nnz,
            "nonzero_sum_raw": sum_raw,
            "nonzero_mean_raw": pa.array(mean_raw, pa.float64(), mask=missing),
            "nonzero_sum_cp10k": sum_cp10k,
            "nonzero_mean_cp10k": pa.array(mean_cp10k, pa.float64(), mask=missing),
            "n_slides_detected": n_slides,
        },
        schema=S.GENES_SCHEMA,
    )


def _slides_table(slides, location) -> pa.Table:
    cols: dict[str, list] = {f.name: [] for f in S.SLIDES_SCHEMA}
    for s in slides:
        file, offset = location.get(s["slide_id"], (None, None))
        row = dict(s, expression_file=file, row_offset=offset)
        for name in cols:
            cols[name].append(row.get(name))
    return pa.Table.from_pydict(cols, schema=S.SLIDES_SCHEMA)


def _summary(slides, genes: pa.Table, n_shards: int) -> dict[str, Any]:
    nnz = genes["nnz"].to_numpy()
    return {
        "n_slides": len(slides),
        "n_slides_with_spots": sum(1 for s in slides if s["n_spots_kept"] > 0),
        "n_spots": int(sum(s["n_spots_kept"] for s in slides)),
        "n_spots_input": int(sum(s["n_spots_input"] for s in slides)),
        "n_expression_files": n_shards,
        "n_genes_vocabulary": int(genes.num_rows),
        "n_genes_detected": int((nnz > 0).sum()),
        "n_nonzero": int(nnz.sum()),
        "sources": _counts(s["source"] for s in slides),
        "organs": _counts(s.get("organ") or "unknown" for s in slides),
        "conditions": _counts(s["condition"] for s in slides),
    }


def _counts(values: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return dict(sorted(out.items()))
