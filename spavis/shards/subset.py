"""`spavis subset CORPUS --where SQL --out SUB`: a complete corpus of some slides of a built one, without raw slices.

Users of the published corpus rarely have the raw slices, and they carve sub-corpora all the time
(one organ, one source, cancer vs healthy, slides with images). A subset is what a build of the
chosen slides with the parent's parameters would write, made from the parent's own files:

- the slides are chosen by a SQL WHERE clause over ``slides.parquet`` (polars' SQL context over a
  lazy scan, predicate pushed down; the columns of slides.parquet plus ``n_spots`` = n_spots_kept
  and ``has_image`` = the slide has paired H&E patches), and/or ``--slides ID,...``;
- expression (and paired) files are re-planned over the chosen slides (``write.plan_shards``,
  the parent's ``max_spots_per_shard``) and written with the build's writer settings, one slide's
  rows at a time, read from the parent file that holds it (``slides.expression_file``: slides never
  span files, so files without a chosen slide are never opened, nor downloaded from the Hub, and
  row groups of other slides are skipped by their statistics);
- genes.parquet: each slide's float64 sums are recomputed from its rows by the function the build
  uses (``prepare.gene_stats_table``, on the same matrix) and added in slide_id order by the build's
  own reduction (``write.merge_gene_stats``), so every statistic is bit-identical to a fresh build;
- slides.parquet, Zarr stores (linked or copied; embeddings added later are left out), card
  (licence: the most restrictive among the chosen slides) and manifest.json, whose build key is that
  of a build of the chosen slides (so ``build-shards`` of the same raw slices finds it up to date)
  and whose ``subset`` record names the parent, its build key and the filter.

tests/test_subset.py checks the result against a fresh build of the same slides, file by file.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spavis import __version__
from spavis.errors import CorpusError, SubsetError
from spavis.format import schema as S
from spavis.format.corpus import iter_file_slides, rows_to_csr
from spavis.format.io import publish_dir, sha256_file

__all__ = ["subset", "select_slides", "SubsetResult", "SubsetFilter", "FILTER_COLUMNS"]

# Columns --where may use besides those of slides.parquet (derived in ``slides_frame``).
FILTER_COLUMNS = {"n_spots": "n_spots_kept", "has_image": "image_file IS NOT NULL"}
EXAMPLE_WHERE = "organ = 'brain' AND n_spots >= 1000"
# what the fork server imports for subset workers: the shard writers, not the readers and gene tables
SUBSET_PRELOAD = ["spavis.shards.subset", "spavis.shards.prepare", "spavis.shards.write", "spavis.shards.images"]


@dataclass(frozen=True)
class SubsetFilter:
    """Which slides: a SQL WHERE clause over slides.parquet and/or a list of slide ids (both: AND)."""

    where: str | None = None
    slides: tuple[str, ...] | None = None

    @classmethod
    def of(cls, where: str | None, slides: Sequence[str] | str | None) -> "SubsetFilter":
        where = where.strip() if isinstance(where, str) and where.strip() else None
        if isinstance(slides, str):
            slides = [s for s in (x.strip() for x in slides.split(",")) if s]
        ids = tuple(dict.fromkeys(str(s) for s in slides)) if slides else None
        if where is None and not ids:
            raise SubsetError(f"say which slides to keep: --where \"{EXAMPLE_WHERE}\" and/or --slides ID,ID,...")
        return cls(where, ids)

    def describe(self) -> str:
        parts = ([f"where {self.where}"] if self.where else []) + (
            [f"slides {','.join(self.slides)}"] if self.slides else [])
        return " and ".join(parts)

    def record(self) -> dict[str, Any]:
        return {"where": self.where, "slides": list(self.slides) if self.slides else None}


@dataclass(frozen=True)
class SubsetResult:
    """What ``subset`` made: the corpus folder, its slides and spots, and whether it was already there."""

    out: Path
    slide_ids: tuple[str, ...]
    n_spots: int
    n_files: int
    parent: str
    parent_build_key: str
    up_to_date: bool


# ----------------------------------------------------------------------------------- selection


def slides_frame(path: str | os.PathLike):
    """slides.parquet as a polars LazyFrame with the derived filter columns (nothing read yet)."""
    import polars as pl

    lf = pl.scan_parquet(str(path))
    return lf.with_columns(n_spots=pl.col("n_spots_kept"), has_image=pl.col("image_file").is_not_null())


def select_slides(slides_path: str | os.PathLike, flt: SubsetFilter, *, corpus_name: str = "the corpus") -> list[str]:
    """Slide ids (sorted) that ``flt`` keeps; each mistake is one ``SubsetError`` line."""
    import polars as pl

    lf = slides_frame(slides_path)
    columns = lf.collect_schema().names()
    all_ids = set(pq.read_table(slides_path, columns=["slide_id"]).column("slide_id").to_pylist())
    chosen = set(all_ids)
    if flt.where is not None:
        ctx = pl.SQLContext(slides=lf, eager=False)
        try:
            found = ctx.execute(f"SELECT slide_id FROM slides WHERE {flt.where}").collect()
        except pl.exceptions.ColumnNotFoundError as exc:
            m = re.search(r'column "([^"]+)"', str(exc)) or re.search(r"column '?([\w.]+)'?", str(exc))
            name = m.group(1) if m else "?"
            raise SubsetError(f"--where {flt.where!r}: no column {name!r} in slides.parquet; columns: "
                              f"{', '.join(columns)}") from None
        except (pl.exceptions.PolarsError, ValueError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise SubsetError(f"--where {flt.where!r}: not a valid SQL WHERE clause over slides.parquet "
                              f"(polars: {first}); e.g. --where \"{EXAMPLE_WHERE}\"") from None
        chosen = {str(s) for s in found.get_column(found.columns[0]).to_list()} & all_ids
        if not chosen:
            raise SubsetError(f"--where {flt.where!r} selects none of the {len(all_ids)} slides of {corpus_name}"
                              f"{_no_image_hint(flt.where, lf)}; check the values with `spavis info`.")
    if flt.slides:
        unknown = [s for s in flt.slides if s not in all_ids]
        if unknown:
            some = ", ".join(sorted(all_ids)[:3])
            raise SubsetError(f"--slides: {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''} not in "
                              f"{corpus_name} (it has {len(all_ids)} slides, e.g. {some}).")
        chosen &= set(flt.slides)
        if not chosen:
            raise SubsetError(f"--where {flt.where!r} keeps none of the slides given with --slides.")
    return sorted(chosen)


def _no_image_hint(where: str, lf) -> str:
    import polars as pl

    if "has_image" not in where:
        return ""
    if lf.select(pl.col("has_image").any()).collect().item():
        return ""
    return " (no slide of this corpus has image patches: it was built without --with-images)"


# ----------------------------------------------------------------------------------- the parent


@dataclass(frozen=True)
class CorpusVocabulary:
    """The vocabulary as a corpus records it (manifest + genes.parquet): what writers need of a Vocabulary."""

    name: str
    checksum: str
    fingerprint: str
    ensembl_ids: np.ndarray
    symbols: np.ndarray

    def __len__(self) -> int:
        return len(self.ensembl_ids)


def _parent_vocabulary(root: Path, manifest: dict) -> CorpusVocabulary:
    from spavis.format.vocabulary import vocabulary_fingerprint

    genes = pq.read_table(root / S.GENES_FILE, columns=["ensembl_id", "symbol"])
    ids = np.asarray(genes.column("ensembl_id").to_pylist(), dtype=object)
    symbols = np.asarray(genes.column("symbol").to_pylist(), dtype=object)
    voc = manifest.get("vocabulary") or {}
    return CorpusVocabulary(str(voc.get("name")), str(voc.get("checksum")),
                            str(voc.get("fingerprint") or vocabulary_fingerprint(ids)), ids, symbols)


def _require_build_record(name: str, manifest: dict) -> None:
    version = manifest.get("format_version")
    if manifest.get("format") != S.FORMAT_NAME or not manifest.get("build_key") or not manifest.get("inputs"):
        raise SubsetError(f"{name}: manifest.json has no build record (inputs, build_key), so a subset could not "
                          "say what it is a subset of; rebuild the corpus with `spavis build-shards`.")
    if version != S.FORMAT_VERSION:
        raise SubsetError(f"{name}: shard format v{version}, this spavis carves subsets of v{S.FORMAT_VERSION} "
                          "corpora; rebuild it with this spavis (`spavis build-shards`).")


def _slide_records(root: Path, manifest: dict, chosen: list[str]) -> list[dict]:
    """The build's slide records of the chosen slides: slides.parquet rows + the manifest's per-slide parts."""
    table = pq.read_table(root / S.SLIDES_FILE, filters=[("slide_id", "in", chosen)])
    rows = {r["slide_id"]: r for r in table.to_pylist()}
    inputs = {i.get("slide_id"): i for i in manifest.get("inputs") or []}
    extra = {s.get("slide_id"): s for s in manifest.get("slides") or []}
    records = []
    for sid in chosen:
        if sid not in inputs or sid not in extra or sid not in rows:
            raise SubsetError(f"slide {sid!r} is in slides.parquet but not in the manifest's inputs/slides; the "
                              "corpus is damaged: `spavis validate` it, or rebuild it.")
        row = dict(rows[sid])
        row.update(input_files=inputs[sid].get("files") or [], mapping_report=extra[sid].get("mapping_report"),
                   qc=extra[sid].get("qc"))
        if "annotations" in extra[sid]:
            row["annotations"] = extra[sid]["annotations"]
        records.append(row)
    return records


# ----------------------------------------------------------------------------------- shard jobs


@dataclass(frozen=True)
class SubsetShardJob:
    """One expression file of the subset: (slide_id, spots, parent expression file, parent paired file) each."""

    tmp: str
    part: int
    slides: tuple[tuple[str, int, str, str | None], ...]
    obs_columns: tuple[str, ...]
    n_genes: int


def _one_slide(path: str, slide_id: str) -> pa.Table:
    tables = list(iter_file_slides(path, slide_ids=[slide_id]))
    if len(tables) != 1:
        raise SubsetError(f"{path}: slide {slide_id!r} appears {len(tables)} times (slides.parquet names this file); "
                          "the parent corpus is damaged: `spavis validate` it, or download it again.")
    return tables[0]


def _write_slices(writer: pq.ParquetWriter, table: pa.Table, schema: pa.Schema, size: int) -> None:
    """The build's row groups: each slide from a new group, ``size`` rows each, one chunk per column."""
    table = table.select(schema.names).cast(schema)
    for a in range(0, table.num_rows, size):
        part = table.slice(a, size).combine_chunks()
        writer.write_table(pa.Table.from_arrays(part.columns, schema=schema), row_group_size=size)


def write_subset_shard(job: SubsetShardJob) -> dict[str, Any]:
    """Write one expression file (and paired file) of a subset; returns manifest entries and per-slide sums."""
    from spavis.shards.annotations import expression_schema
    from spavis.shards.images import paired_write_options
    from spavis.shards.prepare import gene_stats_table
    from spavis.shards.write import _shard_name, expression_write_options

    tmp = Path(job.tmp)
    rel = _shard_name(job.part, 5)
    paired_rel = f"{S.PAIRED_DIR}/part-{job.part:05d}.parquet"
    schema = expression_schema(job.obs_columns)
    offsets, stats = [], []
    rows = paired_rows = 0
    paired: pq.ParquetWriter | None = None
    writer = pq.ParquetWriter(tmp / rel, schema, **expression_write_options(schema))
    try:
        for sid, n_spots, src, paired_src in job.slides:
            table = _one_slide(src, sid)
            if table.num_rows != n_spots:
                raise SubsetError(f"{src}: slide {sid!r} has {table.num_rows} rows, slides.parquet says {n_spots}; "
                                  "the parent corpus is damaged: `spavis validate` it.")
            X = rows_to_csr(table, job.n_genes)
            stats.append((sid, gene_stats_table(X, np.asarray(X.sum(axis=1, dtype=np.float64)).reshape(-1))))
            del X
            _write_slices(writer, table, schema, S.ROW_GROUP_SIZE)
            offsets.append((sid, rows))
            rows += table.num_rows
            del table
            if paired_src is None:
                continue
            for pairs in iter_file_slides(paired_src, slide_ids=[sid]):
                if paired is None:
                    (tmp / S.PAIRED_DIR).mkdir(parents=True, exist_ok=True)
                    paired = pq.ParquetWriter(tmp / paired_rel, S.PAIRED_SCHEMA, **paired_write_options())
                _write_slices(paired, pairs, S.PAIRED_SCHEMA, S.PAIRED_ROW_GROUP_SIZE)
                paired_rows += pairs.num_rows
    finally:
        writer.close()
        if paired is not None:
            paired.close()
    entries = [{"path": rel, "kind": "expression", "rows": rows}]
    if paired is not None:
        entries.append({"path": paired_rel, "kind": "paired", "rows": paired_rows})
    for entry in entries:
        p = tmp / entry["path"]
        entry["sha256"] = sha256_file(p)
        entry["size"] = p.stat().st_size
    return {"part": job.part, "entries": entries, "offsets": offsets, "stats": stats}


# ----------------------------------------------------------------------------------- Zarr stores


def _copy_store(src: Path, dest: Path) -> None:
    """A slide's store as the build wrote it: its build files, hard-linked when possible, else copied.

    Hub snapshots hold symlinks into the blob cache: the blob itself is linked or copied. Arrays
    added later (``obsm/X_*``) stay behind; the consolidated metadata is then written anew.
    """
    from spavis.format.zarrstore import consolidate_anndata

    dropped = False
    for dirpath, _dirs, files in os.walk(src):
        for name in files:
            path = Path(dirpath, name)
            rel = path.relative_to(src).as_posix()
            if not S.zarr_build_file(rel) and rel != S.ZARR_CONSOLIDATED:
                dropped = True
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            real = path.resolve()
            try:
                os.link(real, target)
            except OSError:
                shutil.copyfile(real, target)
    if dropped:
        (dest / S.ZARR_CONSOLIDATED).unlink(missing_ok=True)
        consolidate_anndata(dest)


def _copy_stores(root: Path, tmp: Path, slide_ids: Sequence[str], listed: dict) -> list[dict[str, Any]]:
    """Every chosen slide's store into the staging folder; their manifest entries (the parent's digests)."""
    entries = []
    for sid in slide_ids:
        rel = f"{S.ZARR_DIR}/{sid}.zarr"
        _copy_store(root / rel, tmp / rel)
        entries.append({k: listed[rel][k] for k in ("path", "kind", "rows", "sha256", "n_files", "size")
                        if k in listed[rel]})
    return entries


# ----------------------------------------------------------------------------------- subset


def _parent_name(corpus: Any, repo_id: str | None) -> str:
    return repo_id if repo_id else Path(os.fspath(corpus)).expanduser().resolve().name


def _subset_record(flt: SubsetFilter, name: str, repo_id: str | None, revision: str | None, manifest: dict,
                   n_parent: int) -> dict[str, Any]:
    return {
        "parent": {"name": name, "repo_id": repo_id, "revision": revision, "build_key": manifest["build_key"],
                   "n_slides": n_parent},
        **flt.record(),
    }


def _same_subset(out: Path, key: str, record: dict) -> bool:
    """``out`` already holds this subset (same build key, parent and filter, card naming the build)."""
    from spavis.shards.builder import _card_names_build

    try:
        manifest = json.loads((out / S.MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return False
    held = manifest.get("subset") or {}
    same = {k: held.get(k) for k in record} == record  # parent and filter (not the spavis that carved it)
    return manifest.get("build_key") == key and same and _card_names_build(out, key)


def _check_out(out: Path, parent_root: Path, overwrite: bool, record: dict) -> None:
    from spavis.shards.builder import _check_out_dir, _foreign_files

    root = parent_root.resolve()
    if out == root or root in out.parents or out in root.parents:
        raise SubsetError(f"--out {out}: is the parent corpus or inside/around it; choose a folder outside {root}.")
    _check_out_dir(out)  # not a folder, or a folder of other files: one line
    if not (out / S.MANIFEST_FILE).is_file():
        return
    try:
        manifest = json.loads((out / S.MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        manifest = {}
    held = manifest.get("subset")
    same_command = bool(held) and _filter_part(held) == _filter_part(record) and (
        (held.get("parent") or {}).get("name") == record["parent"]["name"])
    if not overwrite and not same_command:  # the same subset of a rebuilt parent is simply brought up to date
        what = (f"the subset {json.dumps({k: held.get(k) for k in ('where', 'slides')})} of "
                f"{(held.get('parent') or {}).get('name')}" if held else "a corpus built by build-shards")
        raise SubsetError(f"--out {out}: holds another corpus ({what}); pass --overwrite to replace it, or choose "
                          "another --out.")
    foreign = _foreign_files(out, manifest)
    if foreign:
        raise SubsetError(f"--out {out}: holds files no build wrote ({', '.join(foreign[:3])}); move them out of the "
                          "corpus folder first (a subset never deletes them).")


def _filter_part(record: dict) -> dict:
    return {k: record.get(k) for k in ("where", "slides")}


def _plan_locations(slide_ids: Sequence[str], counts: Sequence[int], plan: list[list[int]]) -> dict[str, tuple[str, int]]:
    from spavis.shards.write import _part_width, _shard_name

    width = _part_width(len(plan))
    where: dict[str, tuple[str, int]] = {}
    for part, positions in enumerate(plan):
        rows = 0
        for i in positions:
            where[slide_ids[i]] = (_shard_name(part, width), rows)
            rows += int(counts[i])
    return where


def _fetch(parent, records: list[dict], needed_paired: set[str]) -> None:
    """Hub parent: download exactly the files the chosen slides live in (one snapshot call, parallel)."""
    if parent.repo_id is None:
        parent.check(kinds=("expression", "paired", "zarr"))  # present, recorded sizes (cheap)
        return
    from spavis.format.hub import snapshot

    files = sorted({r["expression_file"] for r in records if r.get("expression_file")} | needed_paired)
    stores = [f"{S.ZARR_DIR}/{r['slide_id']}.zarr" for r in records]
    snapshot(parent.repo_id, revision=parent.revision,
             patterns=files + [p for s in stores for p in (f"{s}/*", f"{s}/**")])
    sizes = {o.get("path"): o.get("size") for o in parent.manifest.get("outputs") or []}
    for rel in files:
        size = (parent.root / rel).stat().st_size
        if sizes.get(rel) is not None and size != sizes[rel]:
            raise CorpusError(f"{parent.repo_id}@{parent.revision}: {rel} has {size} bytes, manifest.json says "
                              f"{sizes[rel]}; the published corpus is damaged.")


def subset(
    corpus: str | os.PathLike,
    out: str | os.PathLike,
    *,
    where: str | None = None,
    slides: Sequence[str] | str | None = None,
    revision: str | None = None,
    workers: int = 1,
    overwrite: bool = False,
) -> SubsetResult:
    """Write the sub-corpus of ``corpus`` (folder or Hub id) holding the slides ``where``/``slides`` select.

    ``where``: a SQL WHERE clause over slides.parquet (``FILTER_COLUMNS`` added); ``slides``: slide
    ids (a list or "a,b,c"); both given: slides that satisfy both. ``workers`` processes write the
    expression files (the bytes never depend on it). A re-run with the same parent and filter is a
    no-op; an ``out`` holding anything else is refused unless ``overwrite`` (files no build wrote:
    always refused). See the module docstring for what the subset holds.
    """
    from spavis.format.corpus import open_corpus
    from spavis.shards.builder import _lock, _warm_up_card_imports
    from spavis.shards.config import DEFAULT_MAX_SPOTS_PER_SHARD
    from spavis.shards.workers import make_pool, refuse_spawned_reimport
    from spavis.shards.write import (
        _check_not_empty,
        _write_manifest,
        build_key,
        merge_gene_stats,
        plan_shards,
        staging_dir,
        write_summary_files,
    )

    refuse_spawned_reimport()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise SubsetError(f"--workers must be an integer of at least 1 (got {workers!r}).")
    flt = SubsetFilter.of(where, slides)
    parent = open_corpus(corpus, revision)
    name = _parent_name(corpus, parent.repo_id)
    manifest = parent.manifest
    _require_build_record(name, manifest)
    chosen = select_slides(parent.root / S.SLIDES_FILE, flt, corpus_name=name)
    records = _slide_records(parent.root, manifest, chosen)
    vocab = _parent_vocabulary(parent.root, manifest)
    params = dict(manifest.get("parameters") or {})
    version = str(manifest.get("spavis_version"))
    inputs = {i["slide_id"]: i for i in manifest["inputs"]}
    sub_inputs = [inputs[sid] for sid in chosen]
    key = build_key(vocab, params, sub_inputs, spavis_version=version)
    n_parent = int(manifest.get("summary", {}).get("n_slides") or len(inputs))
    record = _subset_record(flt, name, parent.repo_id, parent.revision, manifest, n_parent)
    out = Path(out).expanduser().resolve()
    counts = [int(r["n_spots_kept"]) for r in records]

    def result(up_to_date: bool, n_files: int) -> SubsetResult:
        return SubsetResult(out, tuple(chosen), sum(counts), n_files, name, manifest["build_key"], up_to_date)

    if _same_subset(out, key, record):
        return result(True, _n_files(out))
    _check_out(out, parent.root, overwrite, record)
    with _lock(out.parent / f".{out.name}.spavis-lock", f"another build-shards or subset is writing {out}"):
        if _same_subset(out, key, record):
            return result(True, _n_files(out))
        _check_out(out, parent.root, overwrite, record)
        _check_not_empty(records)
        plan = plan_shards(counts, int(params.get("max_spots_per_shard") or DEFAULT_MAX_SPOTS_PER_SHARD))
        listed = {o.get("path"): o for o in manifest.get("outputs") or []}
        paired_of = {}
        for r in records:
            rel = r.get("expression_file")
            paired_rel = rel.replace(S.EXPRESSION_DIR + "/", S.PAIRED_DIR + "/", 1) if rel else None
            paired_of[r["slide_id"]] = paired_rel if paired_rel in listed and r.get("image_file") else None
        _fetch(parent, records, {p for p in paired_of.values() if p})
        for r in records:
            if f"{S.ZARR_DIR}/{r['slide_id']}.zarr" not in listed:
                raise SubsetError(f"{name}: manifest.json lists no Zarr store for slide {r['slide_id']!r}; the corpus "
                                  "is damaged: `spavis validate` it.")

        tmp = staging_dir(out)
        obs_columns = tuple(params.get("obs_columns") or ())
        jobs = [SubsetShardJob(str(tmp), part, tuple(
            (chosen[i], counts[i], str(parent.root / records[i]["expression_file"]),
             str(parent.root / paired_of[chosen[i]]) if paired_of[chosen[i]] else None) for i in positions),
            obs_columns, len(vocab)) for part, positions in enumerate(plan)]
        pool = None
        try:
            (tmp / S.EXPRESSION_DIR).mkdir(parents=True)
            (tmp / S.ZARR_DIR).mkdir()
            pool = make_pool(min(workers, max(1, len(jobs))), preload=SUBSET_PRELOAD)
            _warm_up_card_imports()  # datasets + matplotlib for the card, on a thread while the files are written
            futures = [pool.submit(write_subset_shard, job) for job in jobs]
            zarr_outputs = _copy_stores(parent.root, tmp, chosen, listed)  # while the workers write the files
            results = [f.result() for f in futures]
            pool.close()
            stats = dict(s for res in results for s in res["stats"])
            genes = merge_gene_stats((stats.get(sid, _empty_stats()) for sid in chosen),  # slide_id order
                                     vocab.ensembl_ids, vocab.symbols)
            for res in results:
                res.pop("stats")
            locations = _plan_locations(chosen, counts, plan)
            has_paired = any(e["kind"] == "paired" for res in results for e in res["entries"])
            summary = write_summary_files(tmp, records, genes, locations, len(plan), vocab, params,
                                          has_paired=has_paired, build_key_=key,
                                          card_extra=_card_section(record, len(chosen)))
            sub = dict(record, n_slides=len(chosen), spavis_version=__version__)
            _write_manifest(tmp, results, zarr_outputs, summary, records, vocab, params, inputs=sub_inputs,
                            spavis_version=version, extra={"subset": sub})
            publish_dir(tmp, out)
        except BaseException:
            if pool is not None:
                pool.stop()
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return result(False, len(plan))


def _empty_stats() -> pa.Table:
    from spavis.shards.prepare import STATS_SCHEMA

    return STATS_SCHEMA.empty_table()


def _n_files(out: Path) -> int:
    return len(list((out / S.EXPRESSION_DIR).glob("*.parquet")))


def _card_section(record: dict, n_slides: int) -> str:
    parent = record["parent"]
    where = f"`{record['where']}`" if record.get("where") else "(none)"
    ids = ", ".join(f"`{s}`" for s in record["slides"]) if record.get("slides") else "(all that match)"
    source = f"`{parent['repo_id']}` at `{parent['revision']}`" if parent.get("repo_id") else f"`{parent['name']}`"
    return (
        "\n## Subset\n\n"
        f"{n_slides} of the {parent['n_slides']} slides of {source} (build `{parent['build_key']}`), carved by "
        f"`spavis subset` without the raw slices: SQL filter over slides.parquet {where}; slides {ids}. Files, "
        "gene statistics and build key are those of a build of these slides with the parent's parameters.\n"
    )
