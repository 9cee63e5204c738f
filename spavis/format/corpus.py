"""The public read API of the spavis shard format (what STAMP and users rely on).

A corpus is a directory written by ``spavis build-shards`` (or the same files on the
Hugging Face Hub)::

    from spavis.format import open_corpus, rows_to_csr
    corpus = open_corpus("shards/")                 # or "org/name" on the Hub
    corpus.genes                                    # vocabulary + exact nonzero means
    for table in corpus.iter_slides(columns=["gene_index", "counts", "neighbors"]):
        X = rows_to_csr(table, len(corpus.genes))   # spots x genes, raw counts
    ds = corpus.load(streaming=True)                # datasets.IterableDataset of spots

Hub corpora are fetched with ``huggingface_hub.snapshot_download`` restricted to the files
asked for (metadata first, expression shards only when needed, Zarr stores never unless
``zarr_path`` is called).
"""
from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.sparse as sp

from spavis.format import schema as S
from spavis.errors import CorpusError, SpavisError

__all__ = [
    "Corpus", "CorpusError", "SpavisError", "open_corpus", "rows_to_csr", "iter_file_slides", "EXPRESSION_COLUMNS",
    "decode_image",
]  # SpavisError: base of every error spavis raises, re-exported for readers of the corpus


EXPRESSION_COLUMNS = tuple(S.EXPRESSION_SCHEMA.names)
_META_PATTERNS = [S.CARD_FILE, S.MANIFEST_FILE, S.GENES_FILE, S.SLIDES_FILE]
_META_KINDS = ("genes", "slides")  # checked on open; other kinds when first used


class Corpus:
    """A shard directory (local, or a local snapshot of a Hub dataset)."""

    def __init__(self, root: str | os.PathLike, *, repo_id: str | None = None, revision: str | None = None):
        self.root = Path(root)
        self.repo_id = repo_id
        self.revision = revision
        if not (self.root / S.GENES_FILE).is_file():
            where = repo_id or str(self.root)
            raise CorpusError(
                f"{where}: no {S.GENES_FILE} here, so it is not a spavis corpus; "
                "point open_corpus at the --out directory of `spavis build-shards`."
            )
        version = self.manifest.get("format_version")
        if isinstance(version, int) and version > S.FORMAT_VERSION:
            raise CorpusError(
                f"{repo_id or self.root}: shard format v{version} is newer than this spavis reads "
                f"(v{S.FORMAT_VERSION}); upgrade spavis (pip install -U spavis-stamp)."
            )
        # cheap integrity check of what is local now; expression shards when first used
        self.check(kinds=_META_KINDS)

    def __repr__(self) -> str:
        where = f"{self.repo_id}@{self.revision or 'main'}" if self.repo_id else str(self.root)
        return f"Corpus({where!r})"

    # ------------------------------------------------------------------ metadata
    @cached_property
    def manifest(self) -> dict[str, Any]:
        """manifest.json (empty dict when absent)."""
        path = self.root / S.MANIFEST_FILE
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text())
        except ValueError as exc:
            raise CorpusError(f"{path}: not valid JSON ({exc}); rebuild the corpus or download it again.") from None

    def check(self, kinds: Iterable[str] | None = None) -> None:
        """Raise CorpusError when files manifest.json lists are missing, resized or joined by strays.

        Cheap (sizes, no hashing; ``spavis validate`` does the full check). ``kinds`` limits
        it to some output kinds (``"expression"``, ``"genes"``, ``"slides"``, ``"zarr"``, ...);
        Zarr stores are only checked for presence (users add embeddings to them). A corpus
        without manifest.json is not checked.
        """
        from spavis.format import integrity

        if not self.manifest.get("outputs"):
            return
        wanted = set(S.OUTPUT_KINDS if kinds is None else kinds) - {"card"}
        # a stray shard would silently join training data; other strays are spavis validate's business
        strays = S.EXPRESSION_DIR if "expression" in wanted else None
        problems = integrity.check(self.manifest, integrity.LocalCopy(self.root), hashes=False, kinds=wanted,
                                   strays=strays)
        if problems:
            head = integrity.summary(problems)
            where = self.repo_id or str(self.root)
            raise CorpusError(
                f"{where}: the corpus does not match its manifest.json: {head}. Rebuild it with "
                "`spavis build-shards` (or download it again; remove files you added); "
                "`spavis validate` lists every problem."
            )

    @cached_property
    def genes(self):
        """genes.parquet as a pandas DataFrame in vocabulary order (row i = gene_index i)."""
        return _read_table(self.root / S.GENES_FILE).to_pandas()

    @cached_property
    def slides(self):
        """slides.parquet as a pandas DataFrame (one row per slide, sorted by slide_id)."""
        return _read_table(self.root / S.SLIDES_FILE).to_pandas()

    @property
    def n_genes(self) -> int:
        return int(_parquet_file(self.root / S.GENES_FILE).metadata.num_rows)

    @property
    def n_spots(self) -> int:
        rows = [o.get("rows") for o in self.manifest.get("outputs") or [] if o.get("kind") == "expression"]
        if self.repo_id is not None and rows and None not in rows:
            return int(sum(rows))  # a Hub corpus is not downloaded just to count its spots
        return int(sum(_parquet_file(f).metadata.num_rows for f in self.expression_files))

    @property
    def annotation_columns(self) -> tuple[str, ...]:
        """Annotation columns (``build-shards --obs-columns``) appended after the fixed expression schema."""
        return tuple((self.manifest.get("parameters") or {}).get("obs_columns") or ())

    @property
    def vocabulary(self) -> dict[str, Any]:
        """Name, checksum and size of the vocabulary the corpus is indexed by."""
        return dict(self.manifest.get("vocabulary") or {"n_genes": self.n_genes})

    # ------------------------------------------------------------------ data
    @cached_property
    def expression_files(self) -> list[str]:
        """Local paths of the expression shards, in order.

        Hub corpora: the paths inside the local snapshot, each downloaded when ``iter_slides``
        first reads it (so a reader that touches one slide downloads one shard).
        """
        listed = [o["path"] for o in self.manifest.get("outputs") or [] if o.get("kind") == "expression"]
        if self.repo_id is not None and not listed:  # no manifest to list them: fetch them all
            _hub().snapshot(self.repo_id, revision=self.revision, patterns=[f"{S.EXPRESSION_DIR}/*.parquet"])
        if self.repo_id is None or not listed:
            self.check(kinds=("expression",))
        if listed:
            files = sorted(str(self.root / rel) for rel in listed)
        else:
            files = sorted(str(p) for p in (self.root / S.EXPRESSION_DIR).glob("*.parquet"))
        if not files:
            raise CorpusError(f"{self.root}: no {S.EXPRESSION_DIR}/*.parquet; the corpus is incomplete.")
        return files

    def zarr_path(self, slide_id: str) -> Path:
        """Local path of ``zarr/<slide_id>.zarr`` (downloaded on demand for Hub corpora)."""
        rel = f"{S.ZARR_DIR}/{slide_id}.zarr"
        if self.repo_id is not None and not (self.root / rel).exists():
            _hub().snapshot(self.repo_id, revision=self.revision, patterns=[f"{rel}/*", f"{rel}/**"])
        path = self.root / rel
        if not path.exists():
            raise CorpusError(f"{self.root}: no Zarr store for slide {slide_id!r}; check corpus.slides.slide_id.")
        return path

    def read_slide_zarr(self, slide_id: str):
        """The slide as AnnData (X raw counts in vocabulary columns, spatial graph in obsp)."""
        import anndata as ad

        return ad.read_zarr(self.zarr_path(slide_id))

    def load(self, streaming: bool = False, **kwargs: Any):
        """The spots as ``datasets.Dataset`` (or ``IterableDataset`` when streaming).

        Hub corpora stream straight from the Hub; otherwise the local shards are used.
        """
        import datasets

        if self.repo_id is not None:
            return datasets.load_dataset(self.repo_id, revision=self.revision, split="train", streaming=streaming,
                                         **kwargs)
        # datasets keys its cache by the files' paths and mtimes; the build key (a digest of
        # everything that decides the bytes) also keys it, so a corpus rebuilt in place within
        # the file system's mtime resolution never loads the rows cached for the old one.
        key = self.manifest.get("build_key")
        if key and "description" not in kwargs:
            kwargs["description"] = f"spavis corpus build {key}"
        return datasets.load_dataset(
            "parquet", data_files={"train": self.expression_files}, split="train", streaming=streaming, **kwargs
        )

    def iter_slides(
        self,
        files: Sequence[str | os.PathLike] | None = None,
        columns: Sequence[str] | None = None,
        slide_ids: Iterable[str] | None = None,
    ) -> Iterator[pa.Table]:
        """Yield one ``pyarrow.Table`` per slide (rows in spot_index order), one slide in memory at a time.

        ``files`` restricts to some expression shards (e.g. one per data-loader worker);
        ``columns`` selects columns (``slide_id`` is always included); ``slide_ids`` filters.
        """
        wanted = set(slide_ids) if slide_ids is not None else None
        cols = None
        if columns is not None:
            known = EXPRESSION_COLUMNS + self.annotation_columns
            unknown = [c for c in columns if c not in known]
            if unknown:
                raise CorpusError(f"unknown expression column(s) {unknown}; choose from {list(known)}.")
            cols = list(dict.fromkeys(["slide_id", *columns]))
        if files is None and self.repo_id is not None and wanted is not None and "expression_file" in self.slides:
            holding = self.slides.loc[self.slides["slide_id"].isin(wanted), "expression_file"].dropna()
            files = sorted({str(self.root / rel) for rel in holding})  # only the shards holding these slides
        for f in files if files is not None else self.expression_files:
            yield from _iter_file_slides(self._local(Path(f)), cols, wanted)

    # ------------------------------------------------------------------ paired images
    @property
    def has_images(self) -> bool:
        """True when the corpus holds H&E patches (``build-shards --with-images``)."""
        outputs = self.manifest.get("outputs")
        if outputs:
            return any(o.get("kind") == "paired" for o in outputs)
        return any((self.root / S.PAIRED_DIR).glob("*.parquet"))

    @cached_property
    def paired_files(self) -> list[str]:
        """Local paths of ``data/paired/part-*.parquet`` (part N pairs with expression part N)."""
        listed = [o["path"] for o in self.manifest.get("outputs") or [] if o.get("kind") == "paired"]
        if self.repo_id is not None and not listed and not self.manifest.get("outputs"):
            _hub().snapshot(self.repo_id, revision=self.revision, patterns=[f"{S.PAIRED_DIR}/*.parquet"])
        if self.repo_id is None:
            self.check(kinds=("paired",))  # present with their recorded sizes (Hub files: downloaded on use)
        if listed:
            files = sorted(str(self.root / rel) for rel in listed)
        else:
            files = sorted(str(p) for p in (self.root / S.PAIRED_DIR).glob("*.parquet"))
        if not files:
            where = self.repo_id or str(self.root)
            raise CorpusError(f"{where}: no image patches ({S.PAIRED_DIR}/*.parquet); build the corpus with "
                              "`spavis build-shards --with-images` from slices that have an H&E image.")
        return files

    def iter_paired(
        self,
        columns: Sequence[str] | None = None,
        files: Sequence[str | os.PathLike] | None = None,
        slide_ids: Iterable[str] | None = None,
    ) -> Iterator[pa.Table]:
        """Yield one ``pyarrow.Table`` of patches per imaged slide, rows in expression order.

        Columns: ``spot_id``, ``slide_id``, ``patch``/``region`` (``{"bytes": PNG, "path": None}``,
        decode with :func:`decode_image`), ``region_cell`` (0-8), ``um_per_px``, ``upsampled``, ``padded``.
        """
        cols = None
        if columns is not None:
            unknown = [c for c in columns if c not in S.PAIRED_SCHEMA.names]
            if unknown:
                raise CorpusError(f"unknown paired column(s) {unknown}; choose from {S.PAIRED_SCHEMA.names}.")
            cols = list(dict.fromkeys(["slide_id", *columns]))
        wanted = set(slide_ids) if slide_ids is not None else None
        for f in files if files is not None else self.paired_files:
            yield from _iter_file_slides(self._local(Path(f)), cols, wanted)

    def images_zarr(self, slide_id: str):
        """The slide's ``images/`` Zarr group (``patch``/``region`` uint8 (n, 224, 224, 3), ``region_cell``,
        ``upsampled``, ``padded``), read-only and lazy."""
        import zarr

        path = self.zarr_path(slide_id) / S.IMAGES_GROUP
        if not path.exists():
            raise CorpusError(f"{self.root}: slide {slide_id!r} has no images/ group; it had no H&E image "
                              "or the corpus was built without --with-images.")
        return zarr.open_group(str(path), mode="r", zarr_format=2)

    def _local(self, path: Path) -> Path:
        """``path`` itself; for a Hub corpus, downloaded first (that one file) when not there yet."""
        if self.repo_id is None or path.exists():
            return path
        try:
            rel = path.relative_to(self.root).as_posix()
        except ValueError:
            return path
        _hub().download_file(self.repo_id, rel, revision=self.revision)  # lands in this same snapshot folder (commit)
        from spavis.format import integrity

        problems = integrity.check(self.manifest, integrity.LocalCopy(self.root), hashes=False, only=[rel],
                                   strays=None)
        if problems:
            raise CorpusError(f"{self.repo_id}@{self.revision}: {problems[0]}; the published corpus is damaged "
                              f"(`spavis validate {self.repo_id} --revision {self.revision}`).")
        return path


def decode_image(value: Any) -> np.ndarray:
    """An image cell of the paired table (PNG bytes, ``{"bytes": ...}``, a PIL image or an array)
    as a uint8 (H, W, 3) RGB array, decoded by :mod:`spavis.format.imagefile` (the one decoding
    path: 16-bit pictures rescaled, never clipped)."""
    from PIL import Image

    from spavis.format.imagefile import ImageFileError, pil_to_rgb, read_image_file

    if isinstance(value, Mapping):
        value = value.get("bytes")
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return read_image_file(bytes(value), name="an image cell")[0]
        except ImageFileError as exc:
            raise CorpusError(f"an image cell is not a readable PNG ({exc.reason}); run `spavis validate --full`.") from None
    if isinstance(value, Image.Image):
        return pil_to_rgb(value)
    if value is None:
        raise CorpusError("an image cell holds no image bytes; rebuild the corpus with --with-images.")
    arr = np.asarray(value)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise CorpusError(f"cannot decode an image from {type(value).__name__} {getattr(arr, 'shape', '')}.")
    return arr


def iter_file_slides(
    path: str | os.PathLike,
    columns: Sequence[str] | None = None,
    slide_ids: Iterable[str] | None = None,
) -> Iterator[pa.Table]:
    """Yield one ``pyarrow.Table`` per slide run of ONE expression shard, in file order.

    The building block of :meth:`Corpus.iter_slides`, public for checkers (``spavis
    validate``) and per-file workers. ``columns`` None = all (``slide_id`` is always
    read); ``slide_ids`` filters (row groups are skipped by their statistics). A slide
    that appears twice in a file yields two tables (validate reports that).
    """
    cols = None if columns is None else list(dict.fromkeys(["slide_id", *columns]))
    yield from _iter_file_slides(Path(path), cols, None if slide_ids is None else set(slide_ids))


_OS_PROBLEMS = (PermissionError, FileNotFoundError, IsADirectoryError)


def _corrupt(path: Path, exc: BaseException) -> CorpusError:
    return CorpusError(
        f"{path}: not a readable Parquet file ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
        "the file is corrupt or truncated: rebuild the corpus or download it again "
        "(`spavis validate` checks every file)."
    )


def _parquet_file(path: str | os.PathLike) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except _OS_PROBLEMS:
        raise
    except (pa.ArrowException, OSError) as exc:
        raise _corrupt(Path(path), exc) from None


def _read_table(path: Path, columns: list[str] | None = None) -> pa.Table:
    try:
        return pq.read_table(path, columns=columns)
    except _OS_PROBLEMS:
        raise
    except (pa.ArrowException, OSError) as exc:
        raise _corrupt(path, exc) from None


def _iter_file_slides(path: Path, columns: list[str] | None, wanted: set[str] | None) -> Iterator[pa.Table]:
    try:
        yield from _iter_file_slides_unchecked(path, columns, wanted)
    except _OS_PROBLEMS:
        raise
    except (pa.ArrowException, OSError) as exc:
        raise _corrupt(path, exc) from None


def _iter_file_slides_unchecked(path: Path, columns: list[str] | None, wanted: set[str] | None) -> Iterator[pa.Table]:
    pf = pq.ParquetFile(path)
    buffer: list[pa.Table] = []
    current: str | None = None
    for rg in range(pf.num_row_groups):
        if wanted is not None and not _row_group_may_hold(pf, rg, wanted):
            continue
        table = pf.read_row_group(rg, columns=columns)
        sid = table.column("slide_id")
        # split the row group into runs of equal slide_id (row groups normally hold one slide)
        values = sid.to_numpy(zero_copy_only=False)
        cuts = np.flatnonzero(values[1:] != values[:-1]) + 1
        starts = np.concatenate([[0], cuts])
        ends = np.concatenate([cuts, [len(values)]])
        for a, b in zip(starts, ends):
            run_id = str(values[a])
            part = table.slice(a, b - a)
            if current is not None and run_id != current:
                if wanted is None or current in wanted:
                    yield pa.concat_tables(buffer)
                buffer = []
            current = run_id
            buffer.append(part)
    if buffer and (wanted is None or current in wanted):
        yield pa.concat_tables(buffer)


def _row_group_may_hold(pf: pq.ParquetFile, rg: int, wanted: set[str]) -> bool:
    col = pf.schema_arrow.get_field_index("slide_id")
    stats = pf.metadata.row_group(rg).column(col).statistics
    if stats is None or not stats.has_min_max:
        return True
    return any(stats.min <= w <= stats.max for w in wanted)


def rows_to_csr(
    rows: pa.Table | pa.RecordBatch | Mapping[str, Any],
    n_genes: int,
    *,
    values: str = "counts",
) -> sp.csr_matrix:
    """Spots x genes CSR (float32) from ``gene_index`` + ``counts`` lists.

    Accepts a pyarrow Table/RecordBatch or a ``datasets`` batch (dict of lists).
    """
    if isinstance(rows, Mapping):
        idx_col = pa.array(rows["gene_index"], pa.list_(pa.int32()))
        val_col = pa.array(rows[values], pa.list_(pa.float32()))
    else:
        idx_col = rows.column("gene_index")
        val_col = rows.column(values)
    if isinstance(idx_col, pa.ChunkedArray):
        idx_col = idx_col.combine_chunks()
        val_col = val_col.combine_chunks()
    lengths = pc.list_value_length(idx_col).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    vlengths = pc.list_value_length(val_col).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    if not np.array_equal(lengths, vlengths):
        raise CorpusError(f"gene_index and {values} lists differ in length; the shard is corrupt (run spavis validate).")
    indptr = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    indices = pc.list_flatten(idx_col).to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    data = pc.list_flatten(val_col).to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    if indices.size and (indices.min() < 0 or indices.max() >= n_genes):
        raise CorpusError(f"gene_index out of range for a {n_genes}-gene vocabulary; pass len(corpus.genes).")
    return sp.csr_matrix((data, indices, indptr), shape=(len(lengths), int(n_genes)))


def _hub():
    """:mod:`spavis.format.hub` (imported on first Hub use: reading local corpora never needs it)."""
    from spavis.format import hub

    return hub


def open_corpus(path_or_repo_id: str | os.PathLike, revision: str | None = None) -> Corpus:
    """Open a local shard directory or a Hub dataset id (``org/name``, optional ``revision``).

    ``org/name@rev`` names a revision (branch, tag such as ``build-<build_key>``, or commit) in one
    string, for tools that take a single ``--data`` argument.
    """
    path = Path(path_or_repo_id).expanduser()
    if path.exists():
        return Corpus(path)
    hub = _hub()
    text = str(path_or_repo_id)
    if "@" in text and hub.is_repo_id(text.split("@", 1)[0]):
        text, at = text.split("@", 1)
        if revision is not None and revision != at:
            raise CorpusError(f"{path_or_repo_id}: names revision {at!r} but revision={revision!r} was also given.")
        revision = at or None
    hub.check_repo_id(text, not_an_id=f"{text}: no such directory and not a Hub dataset id (org/name).")
    root = hub.snapshot(text, revision=revision, patterns=_META_PATTERNS)  # one line: gated, missing repo, ...
    # the snapshot folder is named after the commit: pin it so later downloads match
    return Corpus(root, repo_id=text, revision=root.name)
