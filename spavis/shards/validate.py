"""`spavis validate DIR`: re-check a corpus against its manifest, its schema and itself.

Checks, in order: manifest present; every listed output exists with the recorded sha256
and row count and nothing unlisted is there; Parquet schemas; each slide's rows are
contiguous, complete and well formed; and (deep) each slide's Zarr store holds the same
matrix and graph as its Parquet rows and genes.parquet equals sums recomputed from rows.

Added to a store after the build (``obsm/X_*``, e.g. ``stamp embed --zarr``) and so outside the
manifest digest: every store's consolidated metadata must list AnnData elements only (never
``images/``), every ``obsm/X_*`` array must have all its chunk files (zarr reads a missing one
as zeros, silently), and (deep) no row of an embedding stamp wrote may be all zeros.

``full``: every patch and region PNG of ``data/paired`` is decoded and its size checked (and,
with ``deep``, compared with the Zarr ``images/`` arrays), not a sample.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from spavis.format import schema as S
from spavis.format.corpus import iter_file_slides, rows_to_csr
from spavis.format.integrity import LocalCopy, check
from spavis.errors import SpavisError, ValidationError

_MAX_ERRORS = 50


@dataclass
class ValidationReport:
    """Outcome of ``validate``: ``ok`` when ``errors`` is empty."""

    path: Path
    errors: list[str] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    def error(self, msg: str) -> None:
        if len(self.errors) < _MAX_ERRORS:
            self.errors.append(msg)

    def raise_for_errors(self) -> None:
        """Raise ValidationError listing the problems (no-op when ok)."""
        if self.errors:
            head = "\n  ".join(self.errors[:10])
            more = f"\n  … and {len(self.errors) - 10} more" if len(self.errors) > 10 else ""
            raise ValidationError(
                f"{self.path}: {len(self.errors)} problem(s):\n  {head}{more}\n"
                "Rebuild with `spavis build-shards` (or download the corpus again)."
            )


def _schema_matches(actual, expected) -> bool:
    a = actual.remove_metadata()
    e = expected.remove_metadata()
    return a.names == e.names and all(x.type == y.type for x, y in zip(a, e))


def validate(out: str | os.PathLike, *, deep: bool = True, full: bool = False) -> ValidationReport:
    """Check a corpus directory; ``deep`` also compares Parquet with Zarr and recomputes gene sums;
    ``full`` decodes every paired image (see the module docstring)."""
    from spavis.shards.annotations import expression_schema
    root = Path(out)
    rep = ValidationReport(root)
    mpath = root / S.MANIFEST_FILE
    try:
        manifest = json.loads(mpath.read_text())
    except FileNotFoundError:
        rep.error(f"{mpath}: missing; this is not a complete spavis corpus")
        return rep
    except ValueError as exc:
        rep.error(f"{mpath}: not valid JSON ({exc})")
        return rep
    if manifest.get("format") != S.FORMAT_NAME:
        rep.error(f"{mpath}: format is {manifest.get('format')!r}, expected {S.FORMAT_NAME!r}")
        return rep
    if manifest.get("format_version") != S.FORMAT_VERSION:
        rep.error(f"{mpath}: shard format v{manifest.get('format_version')}, this spavis checks "
                  f"v{S.FORMAT_VERSION}; rebuild the corpus with this spavis (`spavis build-shards`)")
        return rep

    # 1. checksums (spavis.format.integrity: the one check against manifest.json), row counts, unexpected files
    listed = {entry["path"]: entry for entry in manifest.get("outputs", [])}
    problems = check(manifest, LocalCopy(root))
    for problem in problems:
        rep.error(f"{root / problem.path}: {problem.what}")
    bad = {problem.path for problem in problems}
    for rel, entry in listed.items():
        p, rows = root / rel, entry.get("rows")
        if rows is not None and p.suffix == ".parquet" and rel not in bad:
            try:
                n = pq.ParquetFile(p).metadata.num_rows
            except Exception as exc:  # corrupt file
                rep.error(f"{p}: unreadable Parquet ({exc})")
                continue
            if n != rows:
                rep.error(f"{p}: {n} rows, manifest.json says {rows}")
    rep.checked["outputs"] = len(listed)
    if rep.errors:
        return rep

    # 2. schemas
    expr_files = sorted(k for k in listed if k.startswith(S.EXPRESSION_DIR + "/"))
    for rel, expected in [(S.GENES_FILE, S.GENES_SCHEMA), (S.SLIDES_FILE, S.SLIDES_SCHEMA)] + [
        (f, expression_schema((manifest.get("parameters") or {}).get("obs_columns") or ())) for f in expr_files
    ]:
        if rel not in listed:
            rep.error(f"{root / rel}: missing from manifest.json")
            continue
        if not _schema_matches(pq.read_schema(root / rel), expected):
            rep.error(f"{root / rel}: schema differs from the spavis shard format v{S.FORMAT_VERSION}")
    n_vocab = (manifest.get("vocabulary") or {}).get("n_genes")
    genes = pq.read_table(root / S.GENES_FILE)
    if n_vocab is not None and genes.num_rows != n_vocab:
        rep.error(f"{root / S.GENES_FILE}: {genes.num_rows} genes, manifest.json vocabulary has {n_vocab}")
    if rep.errors:
        return rep

    # 3. what was added to the stores after the build (embeddings), then rows per slide, (deep) Zarr and gene sums
    _check_added(root, listed, rep, deep)
    if rep.errors:
        return rep
    _check_rows(root, expr_files, genes, rep, deep)
    # 4. paired images (build-shards --with-images): spot order, labels, flags, (deep) Zarr
    if not rep.errors:
        from spavis.shards.images import check_paired

        check_paired(root, listed, rep, deep)
    if full and not rep.errors:
        _check_paired_full(root, listed, rep, deep)
    return rep


def _zarr_stores(root: Path, listed: dict) -> list[Path]:
    return [root / k for k, e in sorted(listed.items()) if e.get("kind") == "zarr" and (root / k).is_dir()]


def _check_added(root: Path, listed: dict, rep: ValidationReport, deep: bool) -> None:
    """Consolidated metadata and ``obsm/X_*`` arrays, which the manifest digest leaves out."""
    from spavis.format.zarrstore import array_paths, hidden_entries, missing_chunks

    stores = _zarr_stores(root, listed)
    for store in stores:
        hidden = hidden_entries(store)
        if hidden:
            rep.error(f"{store / S.ZARR_CONSOLIDATED}: lists {', '.join(h + '/' for h in hidden)}, which anndata "
                      "cannot read (an older `stamp embed --zarr` wrote it): rerun `stamp embed --zarr` on this "
                      "corpus, or call spavis.format.zarrstore.consolidate_anndata(store), to repair it")
        obsm = store / "obsm"
        if not obsm.is_dir():
            continue
        for name in sorted(os.listdir(obsm)):
            if not name.startswith(S.OBSM_EMBEDDING_PREFIX) or not (obsm / name).is_dir():
                continue
            for arr in array_paths(obsm / name):
                missing, total = missing_chunks(arr)
                if missing:
                    rep.error(f"{arr}: {missing} of {total} chunk files missing (they read as zeros): its writer "
                              "was interrupted or raced another; rerun the command that wrote it "
                              "(`stamp embed --zarr`)")
                elif deep:
                    _check_embedding_rows(arr, rep)
    rep.checked["stores"] = len(stores)


def _check_embedding_rows(arr_path: Path, rep: ValidationReport) -> None:
    """An embedding stamp wrote (attribute ``stamp_model``) has no all-zero row."""
    import zarr

    try:
        arr = zarr.open_array(str(arr_path), mode="r")
        if "stamp_model" not in arr.attrs or arr.ndim != 2:
            return
        step = max(1, (1 << 24) // max(1, 4 * arr.shape[1]))  # ~16 MB at a time
        zero = 0
        for a in range(0, arr.shape[0], step):
            block = np.asarray(arr[a:a + step])
            zero += int((~np.any(block != 0, axis=1)).sum())
    except Exception as exc:  # noqa: BLE001 — any failure is a finding
        rep.error(f"{arr_path}: unreadable array ({type(exc).__name__}: {exc})")
        return
    if zero:
        rep.error(f"{arr_path}: {zero} of {arr.shape[0]} embedding rows are all zeros (written by "
                  f"{arr.attrs.get('stamp_model')!r}); rerun `stamp embed --zarr` on this corpus")


def _check_paired_full(root: Path, listed: dict, rep: ValidationReport, deep: bool) -> None:
    """Decode every patch and region of data/paired; check 224 x 224 RGB; (deep) equal to the Zarr arrays."""
    from concurrent.futures import ThreadPoolExecutor

    from spavis.format.corpus import decode_image

    files = sorted(k for k in listed if k.startswith(S.PAIRED_DIR + "/"))
    want = (S.PATCH_PX, S.PATCH_PX, 3)
    n_checked = 0

    def one(value):
        try:
            return decode_image(value)
        except SpavisError as exc:
            return exc

    stores: dict[str, object] = {}
    row_in_slide: dict[tuple[str, str], int] = {}
    cache: dict[str, tuple] = {}
    with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
        for rel in files:
            path = root / rel
            offset = 0
            for rb in pq.ParquetFile(path).iter_batches(batch_size=256, columns=["spot_id", "slide_id", "patch",
                                                                                   "region"]):
                spots = rb.column(0).to_pylist()
                slides = rb.column(1).to_pylist()
                for name in ("patch", "region"):
                    decoded = list(pool.map(one, rb.column(rb.schema.get_field_index(name)).to_pylist()))
                    for i, img in enumerate(decoded):
                        where = f"{path} row {offset + i} (spot_id {spots[i]}) {name}"
                        if isinstance(img, Exception):
                            rep.error(f"{where}: {img}")
                        elif img.shape != want:
                            rep.error(f"{where}: {img.shape[1]} x {img.shape[0]} picture, expected {want[1]} x {want[0]}")
                        elif deep:
                            sid = slides[i]
                            k = row_in_slide.get((sid, name), 0)
                            row_in_slide[(sid, name)] = k + 1
                            group = stores.get(sid)
                            if group is None:
                                group = stores[sid] = _images_group(root, sid, rep)
                            if group is not False:
                                zimg = _zarr_row(cache, group, sid, name, k)
                                if zimg is None or not np.array_equal(img, zimg):
                                    rep.error(f"{where}: differs from zarr/{sid}.zarr/{S.IMAGES_GROUP}/{name}[{k}]")
                        if len(rep.errors) >= _MAX_ERRORS:
                            return
                n_checked += len(spots)
                offset += len(spots)
    rep.checked["images"] = n_checked


def _zarr_row(cache: dict, group, sid: str, name: str, k: int):
    """Row ``k`` of ``images/<name>``, decompressing each chunk once (rows come in order)."""
    arr = group[name]
    if k >= arr.shape[0]:
        return None
    size = arr.chunks[0]
    c = k // size
    hit = cache.get(name)
    if hit is None or hit[0] != (sid, c):
        hit = cache[name] = ((sid, c), np.asarray(arr[c * size:(c + 1) * size]))
    return hit[1][k - c * size]


def _images_group(root: Path, sid: str, rep: ValidationReport):
    import zarr

    path = root / S.ZARR_DIR / f"{sid}.zarr" / S.IMAGES_GROUP
    try:
        return zarr.open_group(str(path), mode="r", zarr_format=2)
    except Exception as exc:  # noqa: BLE001
        rep.error(f"{path}: unreadable images group ({type(exc).__name__}: {exc})")
        return False


def _check_rows(root: Path, expr_files: list[str], genes, rep: ValidationReport, deep: bool) -> None:
    from spavis.shards.prepare import gene_sums

    slides = pq.read_table(root / S.SLIDES_FILE).to_pylist()
    expected = {s["slide_id"]: s for s in slides}
    n_genes = genes.num_rows
    seen: set[str] = set()
    nnz = np.zeros(n_genes, np.int64)
    sum_raw = np.zeros(n_genes, np.float64)
    sum_cp10k = np.zeros(n_genes, np.float64)
    for rel in expr_files:
        try:  # a corrupt shard is one error (CorpusError), not a traceback
            for table in iter_file_slides(root / rel):
                sid = table.column("slide_id")[0].as_py()
                where = f"{root / rel} slide {sid!r}"
                if sid in seen:
                    rep.error(f"{where}: rows are not contiguous (slide appears twice)")
                    continue
                seen.add(sid)
                meta = expected.get(sid)
                if meta is None:
                    rep.error(f"{where}: slide missing from slides.parquet")
                    continue
                n = table.num_rows
                if n != meta["n_spots_kept"] or meta["expression_file"] != rel:
                    rep.error(f"{where}: {n} rows in this file, slides.parquet says {meta['n_spots_kept']} "
                              f"in {meta['expression_file']}")
                if not np.array_equal(table.column("spot_index").to_numpy(), np.arange(n)):
                    rep.error(f"{where}: spot_index is not 0..{n - 1} in order")
                barcodes = table.column("barcode").to_pylist()
                if table.column("spot_id").to_pylist() != [f"{sid}:{b}" for b in barcodes]:
                    rep.error(f"{where}: spot_id is not '<slide_id>:<barcode>'")
                try:
                    X = rows_to_csr(table, n_genes)
                except Exception as exc:
                    rep.error(f"{where}: {exc}")
                    continue
                if np.any((np.diff(X.indices.astype(np.int64)) <= 0) & ~_row_starts(X)):
                    rep.error(f"{where}: gene_index lists are not strictly ascending")
                if not np.array_equal(np.diff(X.indptr), table.column("n_genes").to_numpy()):
                    rep.error(f"{where}: n_genes does not match the gene_index lists")
                totals = np.asarray(X.sum(axis=1, dtype=np.float64)).reshape(-1)
                if not np.allclose(totals.astype(np.float32), table.column("total_counts").to_numpy(), rtol=1e-6):
                    rep.error(f"{where}: total_counts does not match the counts lists")
                nbrs = table.column("neighbors")
                flat = np.asarray(nbrs.combine_chunks().flatten().to_numpy(), dtype=np.int64)
                if flat.size and (flat.min() < 0 or flat.max() >= n):
                    rep.error(f"{where}: neighbors point outside the slide")
                if deep:
                    a, b, c = gene_sums(X, totals)
                    nnz += a
                    sum_raw += b
                    sum_cp10k += c
                    _check_zarr(root, sid, table, X, rep)
        except SpavisError as exc:
            rep.error(str(exc))
    rep.checked["slides"] = len(seen)
    for sid, meta in expected.items():
        if meta["n_spots_kept"] > 0 and sid not in seen:
            rep.error(f"{root}: slide {sid!r} is in slides.parquet but has no expression rows")
    if deep and not rep.errors:
        if not np.array_equal(nnz, genes.column("nnz").to_numpy()):
            rep.error(f"{root / S.GENES_FILE}: nnz differs from the expression rows")
        for name, ours in (("nonzero_sum_raw", sum_raw), ("nonzero_sum_cp10k", sum_cp10k)):
            if not np.allclose(ours, genes.column(name).to_numpy(), rtol=1e-9, atol=1e-9):
                rep.error(f"{root / S.GENES_FILE}: {name} differs from sums recomputed from the expression rows")
        rep.checked["genes"] = n_genes


def _row_starts(X) -> np.ndarray:
    """Mask over diff(indices) positions that cross a row boundary (not an ordering violation)."""
    m = np.zeros(max(X.indices.size - 1, 0), dtype=bool)
    starts = X.indptr[1:-1]
    starts = starts[(starts > 0) & (starts < X.indices.size)]
    m[starts - 1] = True
    return m


def _check_zarr(root: Path, sid: str, table, X, rep: ValidationReport) -> None:
    import anndata as ad

    path = root / S.ZARR_DIR / f"{sid}.zarr"
    where = f"{path}"
    try:
        adata = ad.read_zarr(path)
    except Exception as exc:
        rep.error(f"{where}: unreadable AnnData Zarr ({exc})")
        return
    if adata.n_obs != X.shape[0] or adata.n_vars != X.shape[1]:
        rep.error(f"{where}: shape {adata.shape} but Parquet has {X.shape}")
        return
    if list(adata.obs_names) != table.column("spot_id").to_pylist():
        rep.error(f"{where}: obs_names differ from Parquet spot_id")
    Z = adata.X.tocsr() if hasattr(adata.X, "tocsr") else None
    if Z is None or (Z != X).nnz:
        rep.error(f"{where}: X differs from the Parquet counts")
    D = adata.obsp.get(S.OBSP_DISTANCES)
    if D is None:
        rep.error(f"{where}: obsp['{S.OBSP_DISTANCES}'] missing")
        return
    nbrs = table.column("neighbors").combine_chunks()
    dist = table.column("neighbor_distances").combine_chunks()
    import scipy.sparse as sp

    lengths = np.diff(nbrs.offsets.to_numpy()) if len(nbrs) else np.zeros(0, np.int64)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    P = sp.csr_matrix(
        (np.asarray(dist.flatten().to_numpy(), np.float32), (rows, np.asarray(nbrs.flatten().to_numpy(), np.int64))),
        shape=D.shape,
    )
    if (sp.csr_matrix(D, dtype=np.float32) != P).nnz:
        rep.error(f"{where}: obsp['{S.OBSP_DISTANCES}'] differs from Parquet neighbors/neighbor_distances")
