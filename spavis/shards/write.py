"""Merge prepared slices into the final corpus directory, atomically and deterministically.

Slides are taken in slide_id order whatever order they were prepared in. Shard boundaries
are planned from the slides' spot counts alone (greedy, in slide_id order), so each
expression file is an independent job: ``write_shard`` encodes and hashes one whole file
and ``build_shards`` runs these jobs in its worker processes as soon as a file's slides are
prepared. Per-gene float64 sums are merged in slide_id order in the main process, so
every output byte is the same whatever the shard size, worker count or input order.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spavis import __version__
from spavis.format import schema as S
from spavis.report import card_section, write_card_figures
from spavis.shards.annotations import check_coverage, expression_schema
from spavis.shards.card import render_card
from spavis.shards.images import PAIRED_FILE, PairedShards
from spavis.format.integrity import store_digest
from spavis.format.io import sha256_file
from spavis.shards.prepare import (
    DONE_FILE,
    ROWS_FILE,
    SLIDE_FILE,
    STATS_FILE,
    ZARR_DIR,
    iter_rows,
    read_zarr_csr,
    tree_size,
)
from spavis.errors import SpavisError
from spavis.format.io import publish_dir
from spavis.shards.config import DEFAULT_MAX_SPOTS_PER_SHARD, resolve_vocab


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
        no_tissue = [s["slide_id"] for s in slides if not s.get("n_spots_in_tissue")]
        if len(no_tissue) == len(slides):  # --min-genes cannot help: say what is wrong
            raise SpavisError(
                f"no spot of any slide is marked in tissue ({', '.join(no_tissue[:5])}"
                f"{', ...' if len(no_tissue) > 5 else ''}), so the corpus would be empty: the in_tissue "
                "column of the positions files is all 0 or lists none of the matrix barcodes; check that "
                "each positions file belongs to its slice."
            )
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
    workers: int = 1,
) -> Path:
    """Write the corpus for ``prepared_dirs`` to ``out`` (built in a hidden ``.out.tmp-*``, then renamed).

    ``workers`` processes write the expression files (the Snakefile's write job passes its
    threads); the bytes are the same for any number.
    """
    from spavis.shards.workers import make_pool

    vocab = resolve_vocab(vocab)
    out = Path(out)
    items = _load_prepared(prepared_dirs, vocab)
    _check_not_empty([s for _, s in items])
    writer = CorpusWriter(out, vocab=vocab, params=params, max_spots_per_shard=max_spots_per_shard)
    pool = make_pool(workers)
    try:
        jobs = []
        for d, slide in items:
            jobs += writer.add(d)
            if progress:
                progress(slide["slide_id"])
        jobs += writer.finish()
        for fut in [pool.submit(write_shard, job) for job in jobs]:
            writer.shard_done(fut.result())
        pool.close()
        return writer.commit()
    except BaseException:
        pool.stop()
        writer.abort()
        raise


def write_corpus_in_order(
    prepared_dirs: Iterable[str | os.PathLike],
    out: str | os.PathLike,
    *,
    vocab: Any,
    params: dict[str, Any] | None = None,
    max_spots_per_shard: int = DEFAULT_MAX_SPOTS_PER_SHARD,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """``write_corpus`` for prepared slices that arrive one by one, already in slide_id order."""
    vocab = resolve_vocab(vocab)
    writer = CorpusWriter(Path(out), vocab=vocab, params=params, max_spots_per_shard=max_spots_per_shard)
    try:
        for raw in prepared_dirs:
            for job in writer.add(raw):
                writer.shard_done(write_shard(job))
            if progress:
                progress(writer.slides[-1]["slide_id"])
        for job in writer.finish():
            writer.shard_done(write_shard(job))
        return writer.commit()
    except BaseException:
        writer.abort()
        raise


def _shard_name(i: int, width: int) -> str:
    return f"{S.EXPRESSION_DIR}/part-{i:0{width}d}.parquet"


@dataclass(frozen=True)
class ShardJob:
    """One expression file to write: its number and the prepared slides it holds, in order."""

    tmp: str
    part: int
    slides: tuple[str, ...]
    obs_columns: tuple[str, ...] = ()


def plan_shards(spot_counts: Sequence[int], max_spots: int) -> list[list[int]]:
    """Greedy shard plan over slides in slide_id order: lists of slide positions per file.

    A slide never spans two files; a slide that would push the current file past
    ``max_spots`` starts the next one (a larger slide gets a file of its own); slides
    without spots are in no file. Depends only on the counts, so workers cannot change it.
    """
    planner = _Planner(max_spots)
    shards = [s for i, n in enumerate(spot_counts) if (s := planner.add(i, n))]
    return shards + ([last] if (last := planner.finish()) else [])


class _Planner:
    def __init__(self, max_spots: int):
        self.max_spots = max_spots
        self.current: list[int] = []
        self.rows = 0

    def add(self, i: int, n: int) -> list[int] | None:
        """Place slide ``i`` with ``n`` spots; returns the file it closed, if any."""
        if n <= 0:
            return None
        closed = None
        if self.current and self.rows + n > self.max_spots:
            closed, self.current, self.rows = self.current, [], 0
        self.current.append(i)
        self.rows += n
        return closed

    def finish(self) -> list[int] | None:
        closed, self.current, self.rows = self.current, [], 0
        return closed or None


def _count_arrays(offsets: np.ndarray, indices: np.ndarray, data: np.ndarray) -> tuple[pa.Array, pa.Array]:
    off = pa.array(offsets, pa.int32())
    return (pa.ListArray.from_arrays(off, pa.array(indices, pa.int32())),
            pa.ListArray.from_arrays(off, pa.array(data, pa.float32())))


def expression_write_options(schema: pa.Schema) -> dict[str, Any]:
    """Parquet settings of expression files: the format's, with ``EXPRESSION_COLUMN_ENCODING``,
    ``EXPRESSION_COMPRESSION_LEVEL`` and dictionary encoding on string columns only.

    Dictionary pages on every column made a 7,759-spot shard 17 % larger and ~10 % slower to
    encode; spot ids, slide ids, barcodes and annotation labels repeat or share prefixes, so
    they keep it (docs/shards.md has both measurements).
    """
    strings = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    return dict(S.PARQUET_WRITE_OPTIONS, use_dictionary=strings, column_encoding=dict(S.EXPRESSION_COLUMN_ENCODING),
                compression_level=S.EXPRESSION_COMPRESSION_LEVEL)


def write_shard(job: ShardJob) -> dict[str, Any]:
    """Write one expression file (and its paired-image file) from prepared slides; runs in a worker.

    Per slide, the per-spot columns stream from ``spots.arrow`` in ROW_GROUP_SIZE batches and
    the counts come from the slide's Zarr ``X`` (written once, by ``prepare_slice``); each batch
    becomes one row group. Returns the manifest entries with sha256 and size (hashed here,
    in parallel, rather than by the main process).
    """
    tmp = Path(job.tmp)
    rel = _shard_name(job.part, 5)
    schema = expression_schema(job.obs_columns)
    paired = PairedShards(tmp)
    offsets: list[tuple[str, int]] = []
    rows = 0
    writer = pq.ParquetWriter(tmp / rel, schema, **expression_write_options(schema))
    try:
        for raw in job.slides:
            d = Path(raw)
            data, indices, indptr = read_zarr_csr(d / ZARR_DIR / "X")
            offsets.append((str(raw), rows))
            start = 0
            for batch in iter_rows(d / ROWS_FILE):
                stop = start + batch.num_rows
                a, b = int(indptr[start]), int(indptr[stop])
                genes, counts = _count_arrays(indptr[start: stop + 1] - a, indices[a:b], data[a:b])
                columns = [genes if f.name == "gene_index" else counts if f.name == "counts"
                           else batch.column(f.name) for f in schema]
                writer.write_table(pa.Table.from_arrays(columns, schema=schema), row_group_size=S.ROW_GROUP_SIZE)
                start = stop
            if start != len(indptr) - 1:
                raise SpavisError(f"{d}: {ROWS_FILE} has {start} rows but the Zarr X has {len(indptr) - 1}; "
                                  "delete this prepared slice and build again.")
            rows += start
            paired.add(d, job.part)
    finally:
        writer.close()
        paired.close()
    entries = [{"path": rel, "kind": "expression", "rows": rows}] + paired.outputs(5)
    for entry in entries:
        p = tmp / entry["path"]
        entry["sha256"] = sha256_file(p)
        entry["size"] = p.stat().st_size
    return {"part": job.part, "entries": entries, "offsets": offsets}


_STAGING = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<host>[0-9a-f]{6})-(?P<pid>[0-9]+)-[0-9a-f]{8}$")


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


def staging_dir(out: Path) -> Path:
    """The hidden folder a corpus for ``out`` is written in before it is renamed into place.

    ``.<out name>.tmp-<host>-<pid>-<random>``: hidden, so a killed build (SIGKILL cannot be
    caught) leaves nothing visible beside ``--out``; the host and process id let any later build
    prove the writer is dead (``stale_staging_dirs``) before removing it.
    """
    return out.parent / f".{out.name}.tmp-{_host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def stale_staging_dirs(parent: Path) -> list[Path]:
    """Staging folders in ``parent`` whose writer is provably dead: written on this host by a process
    that no longer exists (a folder of another host, or of a live process, is never listed)."""
    host, found = _host_tag(), []
    try:
        entries = sorted(parent.iterdir())
    except OSError:
        return []
    for p in entries:
        m = _STAGING.match(p.name)
        if (m and m["host"] == host and int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"]))
                and p.is_dir() and not p.is_symlink()):
            found.append(p)
    return found


class CorpusWriter:
    """One corpus being written into a hidden ``.OUT.tmp-*`` folder (``staging_dir``): slides arrive in
    slide_id order, shards go out as jobs.

    ``add`` takes a prepared slice (hard-links its Zarr store) and returns the shard jobs
    that became complete (a shard is complete once the next slide with spots does not
    fit); ``finish`` returns the last one. The caller runs each job (``write_shard``, here
    or in a worker) and hands the result to ``shard_done``; ``commit`` writes genes,
    slides, card and manifest and renames the folder into place; ``abort`` removes it.
    """

    def __init__(self, out: Path, *, vocab: Any, params: dict[str, Any] | None, max_spots_per_shard: int,
                 move_stores: bool = False):
        self.out = Path(out)
        # True when the prepared slices are thrown away after the build (build_shards' default work
        # dir): their Zarr stores are then renamed into the corpus at commit (one rename per slide)
        # instead of hard-linked file by file now and unlinked again with the work dir.
        self.move_stores = bool(move_stores)
        self._moves: list[tuple[Path, Path]] = []  # (prepared store, its place in the corpus)
        self._moved: list[tuple[Path, Path]] = []
        self.vocab = resolve_vocab(vocab)
        self.params = dict(params or {})
        self.max_spots = int(max_spots_per_shard)
        _check_out(self.out, self.max_spots)
        self.obs_columns = tuple(self.params.get("obs_columns") or ())
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = staging_dir(self.out)
        self.tmp.mkdir()
        (self.tmp / S.EXPRESSION_DIR).mkdir(parents=True)
        (self.tmp / S.ZARR_DIR).mkdir()
        self.items: list[tuple[Path, dict]] = []
        self._planner = _Planner(self.max_spots)
        self._parts = 0
        self._results: dict[int, dict] = {}
        self._zarr_outputs: list[dict[str, Any]] = []
        self._plan: list[list[int]] = []  # slide positions per expression file
        self._finished = False
        self._summary: dict[str, Any] | None = None  # from prepare_commit

    @property
    def n_parts(self) -> int:
        """Expression files planned so far (all of them after ``finish``)."""
        return self._parts

    @property
    def slides(self) -> list[dict]:
        return [s for _, s in self.items]

    def _job(self, positions: list[int]) -> ShardJob:
        job = ShardJob(str(self.tmp), self._parts, tuple(str(self.items[i][0]) for i in positions), self.obs_columns)
        self._plan.append(positions)
        self._parts += 1
        return job

    def add(self, prepared: str | os.PathLike) -> list[ShardJob]:
        d, slide = _load_one(prepared, self.vocab)
        if self.items and slide["slide_id"] <= self.items[-1][1]["slide_id"]:
            _check_unique([self.items[-1], (d, slide)])
            raise SpavisError(f"{d}: prepared slices must come in slide_id order (after {self.items[-1][0]}).")
        self.items.append((d, slide))
        sid, n = slide["slide_id"], slide["n_spots_kept"]
        dest = self.tmp / S.ZARR_DIR / f"{sid}.zarr"
        if self.move_stores:
            self._moves.append((d / ZARR_DIR, dest))  # the shard jobs still read it where it is
        else:
            _link_or_copy_tree(d / ZARR_DIR, dest)
        digest = slide.pop("_zarr_digest", None) or {}
        if not digest:
            digest["sha256"], digest["n_files"] = store_digest(d / ZARR_DIR)
            digest["size"] = tree_size(d / ZARR_DIR)
        self._zarr_outputs.append({"path": f"{S.ZARR_DIR}/{sid}.zarr", "kind": "zarr", "rows": n, **digest})
        closed = self._planner.add(len(self.items) - 1, n)
        return [self._job(closed)] if closed else []

    def finish(self) -> list[ShardJob]:
        last = self._planner.finish()
        self._finished = True
        return [self._job(last)] if last else []

    def shard_done(self, result: dict[str, Any]) -> None:
        self._results[result["part"]] = result

    def prepare_commit(self) -> None:
        """Write genes, slides, figure and card: everything that does not wait for the shard files.

        Needs only the prepared slides and the plan (after ``finish``), so ``build_shards``
        runs it while workers still encode the last files; ``commit`` runs it if nobody did.
        """
        if self._summary is not None:
            return
        if not self._finished:
            raise SpavisError("CorpusWriter.prepare_commit: call finish() first (the shard plan is incomplete).")
        _check_not_empty(self.slides)
        genes = merge_gene_stats((pq.read_table(d / STATS_FILE) for d, _ in self.items),  # slide_id order
                                 self.vocab.ensembl_ids, self.vocab.symbols)
        # PairedShards writes a paired part for every file holding a slide with pairs
        has_paired = any((Path(d) / PAIRED_FILE).is_file() for d, s in self.items if s["n_spots_kept"] > 0)
        self._summary = write_summary_files(self.tmp, self.slides, genes, self._locations(), self._parts,
                                            self.vocab, self.params, has_paired=has_paired)

    def _locations(self) -> dict[str, tuple[str, int]]:
        """slide_id -> (expression file, first row), from the plan and the slides' spot counts."""
        width = _part_width(self._parts)
        where: dict[str, tuple[str, int]] = {}
        for part, positions in enumerate(self._plan):
            rows = 0
            for i in positions:
                _, slide = self.items[i]
                where[slide["slide_id"]] = (_shard_name(part, width), rows)
                rows += int(slide["n_spots_kept"])
        return where

    def commit(self) -> Path:
        self.prepare_commit()
        missing = [i for i in range(self._parts) if i not in self._results]
        if missing:
            raise SpavisError(f"{self.tmp}: expression files {missing[:5]} were not written.")
        results = [self._results[i] for i in range(self._parts)]
        _check_rows(results, self.items, self._plan)
        _write_manifest(self.tmp, results, self._zarr_outputs, self._summary, self.slides, self.vocab, self.params)
        self._move_stores()
        _publish(self.tmp, self.out)
        return self.out

    def _move_stores(self) -> None:
        """Rename the prepared stores into the corpus (all shard files are written: nobody reads them now).

        A prepared slice without its store no longer counts as prepared (``prepare.is_prepared``),
        so a build killed after this point prepares those slices again on resume.
        """
        while self._moves:
            src, dest = self._moves.pop(0)
            try:
                os.rename(src, dest)
            except OSError:  # another file system: link (or copy) as without move_stores
                _link_or_copy_tree(src, dest)
                continue
            self._moved.append((src, dest))

    def abort(self) -> None:
        for src, dest in reversed(self._moved):  # give the work dir its stores back (a rerun resumes)
            try:
                os.rename(dest, src)
            except OSError:
                pass
        self._moved.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _publish(tmp: Path, out: Path) -> None:
    publish_dir(tmp, out)  # an old corpus is renamed aside, the new one renamed in, the old removed


def _part_width(n_parts: int) -> int:
    return max(5, len(str(n_parts)))  # 5 digits unless there are 100,000+ files


def _check_rows(results, items, plan) -> None:
    """Each file holds its slides' kept spots at the planned offsets (the slides table already says so)."""
    for res, positions in zip(results, plan):
        rows, expected = 0, []
        for i in positions:
            expected.append((str(items[i][0]), rows))
            rows += int(items[i][1]["n_spots_kept"])
        if [tuple(o) for o in res["offsets"]] != expected or res["entries"][0]["rows"] != rows:
            raise SpavisError(f"expression file {res['part']}: its rows do not match the prepared slides' spot "
                              "counts; delete the work directory and build again.")


def write_summary_files(tmp: Path, slides: list[dict], genes: pa.Table, locations, n_parts: int, vocab, params, *,
                        has_paired: bool, build_key_: str | None = None, card_extra: str = "") -> dict[str, Any]:
    """genes.parquet, slides.parquet, the card figure and README.md; returns their manifest entries + stats.

    Shared by ``build_shards`` and ``spavis subset``: ``genes`` comes from ``merge_gene_stats``,
    ``locations`` (slide_id -> expression file, first row) from the shard plan; ``build_key_``
    defaults to the key of a build of ``slides``; ``card_extra`` is markdown added to the card.
    """
    check_coverage(slides, params.get("obs_columns") or ())
    pq.write_table(genes, tmp / S.GENES_FILE, row_group_size=len(vocab) or 1, **S.PARQUET_WRITE_OPTIONS)
    tail = [{"path": S.GENES_FILE, "kind": "genes", "rows": genes.num_rows}]

    slides_table = _slides_table(slides, locations)
    pq.write_table(slides_table, tmp / S.SLIDES_FILE, **S.PARQUET_WRITE_OPTIONS)
    tail.append({"path": S.SLIDES_FILE, "kind": "slides", "rows": slides_table.num_rows})

    tail += write_card_figures(tmp)  # spavis.report: the card's composition figure (kind "figure")
    stats = _summary(slides, genes, n_parts)
    key = build_key_ or build_key(vocab, params, manifest_inputs(slides))
    (tmp / S.CARD_FILE).write_text(render_card(vocab=vocab, params=params, stats=stats, slides=slides,
                                               build_key=key, paired=has_paired) + card_extra + card_section(tail),
                                   encoding="utf-8")
    tail.append({"path": S.CARD_FILE, "kind": "card", "rows": None})
    for entry in tail:
        p = tmp / entry["path"]
        entry["sha256"] = sha256_file(p)
        entry["size"] = p.stat().st_size
    return {"tail": tail, "stats": stats}


def _write_manifest(tmp: Path, results, zarr_outputs, summary, slides, vocab, params, **manifest_kwargs) -> None:
    """manifest.json over every output file (expression files renamed when 100,000+ of them)."""
    width = _part_width(len(results))
    outputs: list[dict[str, Any]] = []
    for res in results:
        for entry in res["entries"]:
            rel = entry["path"].replace(f"part-{res['part']:05d}", f"part-{res['part']:0{width}d}")
            if rel != entry["path"]:
                os.replace(tmp / entry["path"], tmp / rel)
            outputs.append(dict(entry, path=rel))
    outputs = sorted(outputs + summary["tail"] + zarr_outputs, key=lambda e: e["path"])
    manifest = build_manifest(vocab, params, slides, outputs, summary["stats"], **manifest_kwargs)
    (tmp / S.MANIFEST_FILE).write_text(S.json_dumps(manifest), encoding="utf-8")


def build_key(vocab, params: dict[str, Any], inputs: list[dict[str, Any]], *, spavis_version: str = __version__) -> str:
    """Digest of everything that decides the output bytes (a re-run with the same key is a no-op).

    ``spavis_version``: the version whose build produced the rows (``spavis subset`` passes its parent's).
    """
    payload = {
        "spavis_version": spavis_version,
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


def manifest_inputs(slides) -> list[dict[str, Any]]:
    """The manifest's ``inputs``: each slide's files, their sha256 and the metadata that reaches the output."""
    inputs = []
    for s in slides:
        meta = {k: s.get(k) for k in ("source", "accession", "organ", "species", "condition", "technology",
                                      "license", "citation")}
        inputs.append(input_entry(s["slide_id"], s["source"], s["input_sha256"], s["input_files"], meta))
    return inputs


def build_manifest(vocab, params, slides, outputs, stats, *, inputs: list[dict[str, Any]] | None = None,
                   spavis_version: str = __version__, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """manifest.json; ``spavis subset`` passes its parent's ``inputs`` entries, version and a ``subset`` record."""
    inputs = manifest_inputs(slides) if inputs is None else inputs
    return {
        "format": S.FORMAT_NAME,
        "format_version": S.FORMAT_VERSION,
        "spavis_version": spavis_version,
        "vocabulary": {"name": vocab.name, "checksum": vocab.checksum, "fingerprint": vocab.fingerprint,
                       "n_genes": len(vocab)},
        "parameters": params,
        "build_key": build_key(vocab, params, inputs, spavis_version=spavis_version),
        "summary": stats,
        "inputs": inputs,
        "slides": [
            {"slide_id": s["slide_id"], "mapping_report": s.get("mapping_report"), "qc": s.get("qc")}
            | ({"annotations": s["annotations"]} if "annotations" in s else {})
            for s in slides
        ],
        "outputs": outputs,
    } | (extra or {})


def merge_gene_stats(per_slide: Iterable[pa.Table], ensembl_ids, symbols) -> pa.Table:
    """genes.parquet from per-slide float64 sums (``prepare.STATS_SCHEMA`` tables), added in the given order.

    The one reduction of build and subset: both give the slides in slide_id order, so the float64
    additions happen in the same order and a subset's genes.parquet is bit-identical to a build
    of its slides. A slide lists the genes it detects; adding 0.0 for the others changes nothing.
    """
    n = len(ensembl_ids)
    nnz = np.zeros(n, np.int64)
    sum_raw = np.zeros(n, np.float64)
    sum_cp10k = np.zeros(n, np.float64)
    n_slides = np.zeros(n, np.int32)
    for t in per_slide:
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
            "ensembl_id": pa.array([str(x) for x in ensembl_ids], pa.string()),
            "symbol": pa.array([str(x) if x is not None else None for x in symbols], pa.string()),
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
