"""Paired shards -> (tokens, patch, region, cell) batches for the alignment stage.

A corpus built with ``spavis build-shards --with-images`` holds ``data/paired/part-N.parquet``
beside ``data/expression/part-N.parquet`` (same part number, same spot order). Each batch
is a :class:`PairedBatch`: ``input_ids`` (B, L) model token ids, ``patch`` and ``region``
uint8 RGB (B, 224, 224, 3) (pixels are normalised on the device, 4x less to copy),
``region_cell`` (B,) int64 and ``spot_ids``.

Order and resumption: each epoch shuffles the paired files with ``(seed, epoch)``; rank r of
``world_size`` reads files r, r + world_size, ... (``stamp.data.tokens.rank_files``); rows of a file
are permuted with ``(seed, epoch, file)`` and consecutive rows form batches (a batch may
span two files). The plan needs only row counts, so ``load_state_dict`` skips consumed
batches without reading or decoding them. At most two files are held in memory (PNG
bytes; decoded per batch by a thread pool -- PIL's decoder releases the GIL).
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from stamp.errors import DataError
from stamp.data.prefetch import prefetch  # noqa: F401  (re-exported: read batches ahead)

logger = logging.getLogger(__name__)

_IMAGE_COLUMNS = ["spot_id", "patch", "region", "region_cell"]
_EXPR_COLUMNS = ["spot_id", "gene_index", "counts"]


@dataclass
class PairedBatch:
    input_ids: torch.Tensor
    patch: torch.Tensor
    region: torch.Tensor
    region_cell: torch.Tensor
    spot_ids: list
    position: Optional[dict] = None  # the loader's state once this batch is consumed (exact resume)

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def __len__(self) -> int:
        return len(self.spot_ids)


def decode_png(value: Any, where: str = "a paired row") -> np.ndarray:
    """PNG bytes (or an HF Image struct ``{"bytes": ...}``) -> uint8 (224, 224, 3) RGB.

    A corrupt picture or one of another size is one :class:`DataError` line starting with
    ``where`` (the loaders pass ``<shard> row N (spot_id ...)``)."""
    from spavis.format import schema as S
    from spavis.format.imagefile import ImageFileError, read_image_file

    data = value.get("bytes") if isinstance(value, dict) else value
    if data is None:
        raise DataError(f"{where}: holds no image bytes; rebuild the shards with --with-images")
    try:
        arr = read_image_file(bytes(data), name=where)[0]  # writable (torch.from_numpy wants it)
    except ImageFileError as exc:
        raise DataError(f"{where}: not a readable PNG ({exc.reason}); the shard is corrupt: rebuild the corpus "
                        "(`spavis build-shards --with-images`); `spavis validate --full` lists every bad row") from None
    if arr.shape != (S.PATCH_PX, S.PATCH_PX, 3):
        raise DataError(f"{where}: a {arr.shape[1]} x {arr.shape[0]} picture, the paired format holds "
                        f"{S.PATCH_PX} x {S.PATCH_PX}; the shard was not written by `spavis build-shards "
                        "--with-images`: rebuild it (`spavis validate --full` lists every bad row)")
    return arr


def decode_rows(pool: Optional[ThreadPoolExecutor], cells: list[tuple[Any, str]]) -> list[np.ndarray]:
    """Decode ``(value, where)`` cells (on ``pool`` when given); the first bad one raises its one line
    (``where`` names the shard, row and spot: ``<shard> row N (spot_id S) patch``)."""
    def one(cell):
        try:
            return decode_png(*cell)
        except DataError as exc:
            return exc

    out = list(pool.map(one, cells) if pool is not None else map(one, cells))
    for item in out:
        if isinstance(item, DataError):
            raise item
    return out


def paired_pairs(corpus) -> list[tuple[str, str]]:
    """(paired file, expression file) per part, through the corpus read API."""
    from spavis.format import schema as S

    if hasattr(corpus, "has_images") and not corpus.has_images:
        raise DataError(
            f"{corpus.root}: the corpus holds no paired images; rebuild it with "
            "`spavis build-shards --with-images` from slices that have an H&E image"
        )
    files = list(getattr(corpus, "paired_files", None) or
                 sorted(str(p) for p in (Path(corpus.root) / S.PAIRED_DIR).glob("*.parquet")))
    if not files:
        raise DataError(f"{corpus.root}: no {S.PAIRED_DIR}/*.parquet; rebuild with `spavis build-shards --with-images`")
    expr = {Path(f).name: f for f in corpus.expression_files}
    out = []
    for f in sorted(files):
        if Path(f).name not in expr:
            raise DataError(f"{f}: no expression shard of the same name; the corpus is incomplete (spavis validate)")
        out.append((str(f), expr[Path(f).name]))
    return out


class PairedBatchLoader:
    """Endless (``epochs=None``) or finite iterable of :class:`PairedBatch` (see module docstring)."""

    def __init__(
        self,
        corpus,
        tokenizer,
        *,
        batch_size: int = 256,
        context_length: int = 1500,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        epochs: Optional[int] = None,
        shuffle: bool = True,
        drop_last: bool = True,
        threads: int = 4,
    ) -> None:
        from stamp.data.tokens import rank_files

        if batch_size < 1:
            raise DataError(f"batch size must be at least 1, got {batch_size}")
        self.corpus = corpus
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.context_length = int(context_length)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.epochs, self.shuffle, self.drop_last = epochs, shuffle, drop_last
        self.threads = max(1, int(threads))
        self.pairs = paired_pairs(corpus)
        self._partner = dict(self.pairs)
        self._index = {p: i for i, (p, _) in enumerate(self.pairs)}
        self._rows = {p: int(pq.ParquetFile(p).metadata.num_rows) for p, _ in self.pairs}
        rank_files([p for p, _ in self.pairs], rank, world_size)  # raises when ranks outnumber files
        self.epoch, self.batches_done = 0, 0

    # ------------------------------------------------------------------ plan
    def _plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(file number, row) of every unit this rank reads in ``epoch``, in order."""
        from stamp.data.tokens import rank_files

        files = rank_files([p for p, _ in self.pairs], self.rank, self.world_size, seed=self.seed, epoch=epoch,
                           shuffle=self.shuffle)
        fidx, rows = [], []
        for k, f in enumerate(files):
            n = self._rows[f]
            order = (np.random.default_rng([self.seed, epoch, self._index[f], 11]).permutation(n)
                     if self.shuffle else np.arange(n))
            fidx.append(np.full(n, k, dtype=np.int64))
            rows.append(order.astype(np.int64))
        if not fidx:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), files
        return np.concatenate(fidx), np.concatenate(rows), files

    def n_batches(self, epoch: int = 0) -> int:
        n = int(self._plan(epoch)[0].size)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def n_spots(self) -> int:
        return int(sum(self._rows.values()))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])

    # ------------------------------------------------------------------ reading
    def _load(self, path: str) -> tuple[pa.Table, pa.Table]:
        images = pq.read_table(path, columns=_IMAGE_COLUMNS)
        expr = pq.read_table(self._partner[path], columns=_EXPR_COLUMNS)
        if images.num_rows != expr.num_rows or not images.column("spot_id").equals(expr.column("spot_id")):
            raise DataError(
                f"{path}: its spot_id column differs from {self._partner[path]}; paired and expression parts "
                "must list the same spots in the same order (rebuild with --with-images, run spavis validate)"
            )
        return images, expr

    def _batch(self, parts: list[tuple[tuple[pa.Table, pa.Table], np.ndarray, str]],
               pool: ThreadPoolExecutor) -> PairedBatch:
        from stamp.tokenizer import to_model_input_ids

        exprs, cells_in = [], {"patch": [], "region": []}
        for (images, expr), rows, path in parts:
            idx = pa.array(rows)
            exprs.append(expr.take(idx))
            spots = images.column("spot_id").take(idx).to_pylist()
            for name in ("patch", "region"):
                values = images.column(name).take(idx).to_pylist()
                cells_in[name] += [(v, f"{path} row {int(r)} (spot_id {sp}) {name}") for v, r, sp in zip(values, rows, spots)]
        expr = pa.concat_tables(exprs)
        ids = to_model_input_ids(self.tokenizer.encode_table(expr), self.tokenizer.pad_value, self.context_length)
        cells = np.concatenate([images.column("region_cell").take(pa.array(rows)).to_numpy(zero_copy_only=False)
                                for (images, _), rows, _ in parts])
        if cells.size and (cells.min() < 0 or cells.max() > 8):
            raise DataError(f"{self.corpus.root}: a paired shard holds region_cell outside 0..8; it is corrupt "
                            "(run `spavis validate`, rebuild with --with-images)")
        decoded = decode_rows(pool, cells_in["patch"] + cells_in["region"])
        n = len(decoded) // 2
        return PairedBatch(
            input_ids=torch.from_numpy(ids.astype(np.int64)),
            patch=torch.from_numpy(np.stack(decoded[:n])),
            region=torch.from_numpy(np.stack(decoded[n:])),
            region_cell=torch.from_numpy(cells.astype(np.int64)),
            spot_ids=[str(s) for s in expr.column("spot_id").to_pylist()],
        )

    def __iter__(self) -> Iterator[PairedBatch]:
        pool = ThreadPoolExecutor(self.threads)
        try:
            while self.epochs is None or self.epoch < self.epochs:
                fidx, rows, files = self._plan(self.epoch)
                n = fidx.size
                n_batches = n // self.batch_size if self.drop_last else -(-n // self.batch_size)
                if n_batches == 0 and self.epochs is None:
                    from stamp.data.tokens import no_progress_error

                    raise no_progress_error(f"{self.corpus.root} (paired)", rank=self.rank, spots=n,
                                            slides=len(files), batch_units=self.batch_size)
                cache: dict[int, tuple[pa.Table, pa.Table]] = {}
                while self.batches_done < n_batches:
                    a = self.batches_done * self.batch_size
                    sl = slice(a, min(n, a + self.batch_size))
                    parts = []
                    for k in np.unique(fidx[sl]):
                        if k not in cache:
                            for old in [j for j in cache if j < k]:
                                del cache[old]
                            cache[k] = self._load(files[k])
                        parts.append((cache[k], rows[sl][fidx[sl] == k], files[k]))
                    batch = self._batch(parts, pool)
                    self.batches_done += 1
                    batch.position = self.state_dict()
                    yield batch
                self.epoch += 1
                self.batches_done = 0
        finally:
            pool.shutdown(wait=False, cancel_futures=True)


__all__ = ["PairedBatch", "PairedBatchLoader", "decode_png", "decode_rows", "paired_pairs", "prefetch"]
