"""Shards -> token batches for training and embedding: streaming, shuffled, DDP-aware, resumable.

``TokenBatchLoader`` reads a corpus (local shard directory or Hub dataset id, through
``spavis.format``) one slide at a time and yields one typed :class:`Batch` from loader to
objective (training) and to ``stamp embed``:

* ``mode="spots"`` (stage 1, independent spots; also embedding): ``input_ids`` (B, L) int64,
  ``spot_ids``, ``slide_ids``, ``spot_index``; ``groups`` is None.
* ``mode="spatial"`` (stage 2, Algorithm 2): batches of ``groups_per_batch`` groups (24 x 9
  = 216 spots): ``groups`` (G, 9) int64 row indices into ``input_ids`` (seed first). The
  objective reads ``groups``; it never infers groups from row order.

``input_ids`` are model inputs: the first ``context_length`` tokens, padded with PAD=1
(stamp-v1 tokenizers pad with 0; that is remapped here). This is the one place where token
rows are cut to the model context.

No loop without progress: an epoch that yields no batch (fewer spots than one batch, no
spatial group within ``d_max_um``) raises :class:`~stamp.errors.DataError` with the numbers
and the fix, instead of re-reading the data forever.

Order and determinism: each epoch shuffles the shard files with ``(seed, epoch)``; rank r
of ``world_size`` reads files ``r, r + world_size, ...`` of that order (so ranks never read
the same shard; ``world_size`` must not exceed the number of shards). Units (spots or
groups) pass through a shuffle buffer of about ``shuffle_buffer`` spots. Tokenization
happens only for batches that are yielded, so ``load_state_dict`` resumes by replaying the
cheap plan (file order, permutations, groups) without re-tokenizing skipped batches.
``epochs=None`` cycles forever (training by steps; ranks never run dry); ``epochs=1`` with
``shuffle=False, drop_last=False`` gives every spot once in corpus order (embedding).
Memory is bounded by the shuffle buffer: slides are released once all their units are out.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Sequence

import numpy as np
import scipy.sparse as sp

from stamp.data.batching import spatial_groups
from stamp.constants import D_MAX_UM, GROUP_SIZE, GROUPS_PER_BATCH
from stamp.errors import DataError
from stamp.tokenizer import NATIVE_MAX_LENGTH, GeneTokenizer, table_to_csr, to_model_input_ids

logger = logging.getLogger(__name__)

MODES = ("spots", "spatial")
_SPOT_COLUMNS = ["spot_id", "slide_id", "spot_index", "gene_index", "counts"]
_SPATIAL_COLUMNS = _SPOT_COLUMNS + ["neighbors", "neighbor_distances",
                                    "pxl_row", "pxl_col", "array_row", "array_col"]


@dataclass
class Batch:
    """One batch of token rows, the single type passed from the loader to the objective / embedder.

    ``input_ids``: (B, L) int64 model inputs (cut to the context, PAD-padded);
    ``spot_ids`` / ``slide_ids``: B strings; ``spot_index``: (B,) int64 row of each spot in its
    slide's Zarr store; ``groups``: (G, group_size) int64 rows of ``input_ids``, seed first
    (spatial batches) or None.
    """

    input_ids: Any
    spot_ids: list[str]
    slide_ids: list[str] = field(default_factory=list)
    spot_index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    groups: Any = None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def __getitem__(self, key: str) -> Any:  # dict-style access of older callers: batch["input_ids"]
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def to(self, device: Any) -> "Batch":
        """The same batch with its tensors on ``device``."""
        groups = self.groups.to(device) if self.groups is not None else None
        return replace(self, input_ids=self.input_ids.to(device), groups=groups)


def no_progress_error(what: str, *, rank: int, spots: int, slides: int, batch_units: int,
                      groups: int | None = None, group_size: int = GROUP_SIZE,
                      d_max_um: float | None = None) -> DataError:
    """The error an epoch-repeating loader raises when one epoch yields no batch (it never would)."""
    where = f"{what} (rank {rank})" if rank else what
    if groups is None:
        return DataError(
            f"{where}: one epoch holds {spots} spots in {slides} slide(s), fewer than one batch of "
            f"{batch_units} spots, so no batch can ever be formed; lower --batch-size to at most {max(spots, 1)} "
            "or train on a larger corpus"
        )
    return DataError(
        f"{where}: found {groups} spatial groups of {group_size} spots within D_max={d_max_um:g} µm among "
        f"{spots} spots in {slides} slide(s), but a batch needs {batch_units} groups "
        f"({batch_units * group_size} spots), so no batch can ever be formed; "
        + (f"lower --batch-size to {max(groups, 1) * group_size} or less (a multiple of {group_size})"
           if groups else "raise --max-distance-um, or rebuild the shards with `spavis build-shards "
                          "--k-neighbors 16`")
        + " or train on a larger corpus"
    )


def rank_files(files: Sequence[str], rank: int, world_size: int, *, seed: int = 0, epoch: int = 0,
               shuffle: bool = True) -> list[str]:
    """The shard files rank ``rank`` reads in ``epoch``: a seeded permutation, then every world_size-th."""
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world_size {world_size}")
    if world_size > len(files):
        raise DataError(
            f"{world_size} ranks but only {len(files)} expression shard(s): each rank needs its own file; "
            "rebuild with a smaller `spavis build-shards --max-spots-per-shard` or use fewer ranks"
        )
    files = sorted(map(str, files))
    if shuffle:
        files = [files[i] for i in np.random.default_rng([int(seed), int(epoch), 7]).permutation(len(files))]
    return files[rank::world_size]


def _slide_scales(corpus) -> dict[str, float]:
    """slide_id -> µm per full-resolution pixel recorded in slides.parquet
    (:func:`spavis.format.coordinates.slide_scales`); empty without slides.parquet or the column."""
    from spavis.format.coordinates import slide_scales

    try:
        slides = corpus.slides
    except FileNotFoundError:  # expression shards without slides.parquet (hand-made test corpora)
        return {}
    return slide_scales(slides)


@dataclass
class _Slide:
    csr: sp.csr_matrix
    spot_ids: np.ndarray
    slide_ids: np.ndarray
    spot_index: np.ndarray


class TokenBatchLoader:
    """Iterable of token batches over a corpus (see module docstring)."""

    def __init__(
        self,
        data: Any,
        tokenizer: GeneTokenizer,
        *,
        mode: str = "spots",
        batch_size: int = GROUPS_PER_BATCH * GROUP_SIZE,
        groups_per_batch: int = GROUPS_PER_BATCH,
        group_size: int = GROUP_SIZE,
        d_max_um: float = D_MAX_UM,
        context_length: int = NATIVE_MAX_LENGTH,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        shuffle_buffer: int = 8192,
        epochs: int | None = None,
        drop_last: bool = True,
    ) -> None:
        if mode not in MODES:
            raise DataError(f"unknown loader mode {mode!r}; use one of {', '.join(MODES)}")
        if not hasattr(data, "iter_slides"):
            from spavis.format import open_corpus

            data = open_corpus(data)
        self.corpus = data
        self.tokenizer = tokenizer
        from spavis.format.vocabulary import require_same_vocabulary

        require_same_vocabulary(  # by identity: two vocabularies of one size give garbage silently
            tokenizer.gene_ids, data.genes["ensembl_id"].astype(str).tolist(), a_name="the tokenizer",
            b_name=repr(data), error=DataError,
            fix="use the tokenizer built from this corpus (GeneTokenizer.from_corpus) or matching shards")
        self.mode = mode
        self.units_per_batch = groups_per_batch if mode == "spatial" else batch_size
        self.group_size, self.d_max_um = group_size, d_max_um
        self.context_length = context_length
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle, self.epochs, self.drop_last = shuffle, epochs, drop_last
        unit = group_size if mode == "spatial" else 1
        self.buffer_units = max(self.units_per_batch, shuffle_buffer // unit) if shuffle else self.units_per_batch
        self._epoch, self._batch = 0, 0
        self._stats = {"spots": 0, "slides": 0, "groups": 0}
        self.files = list(data.expression_files)
        self._um_per_px = _slide_scales(data) if mode == "spatial" else {}
        rank_files(self.files, rank, world_size)  # fail early on too few shards

    # -- resume
    def state_dict(self) -> dict[str, int]:
        """Position of the next batch: resume with ``load_state_dict`` on a loader built alike."""
        return {"epoch": self._epoch, "batch": self._batch, "seed": self.seed,
                "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if (state.get("seed", self.seed), state.get("world_size", self.world_size)) != (self.seed, self.world_size):
            logger.warning("resuming with a different seed or world size: the data order will differ")
        self._epoch, self._batch = int(state["epoch"]), int(state["batch"])

    # -- iteration
    def __iter__(self) -> Iterator[Batch]:
        while self.epochs is None or self._epoch < self.epochs:
            skip = self._batch
            planned = 0
            self._stats = {"spots": 0, "slides": 0, "groups": 0}
            for i, plan in enumerate(self._plan(self._epoch)):
                planned += 1
                if i < skip:
                    continue
                batch = self._materialize(plan)
                self._batch = i + 1
                yield batch
            if planned == 0 and (self.epochs is None or self.epochs > 1 or self.drop_last):
                st = self._stats
                raise no_progress_error(
                    str(getattr(self.corpus, "repo_id", None) or getattr(self.corpus, "root", None) or "the corpus"),
                    rank=self.rank, spots=st["spots"], slides=st["slides"], batch_units=self.units_per_batch,
                    groups=st["groups"] if self.mode == "spatial" else None, group_size=self.group_size,
                    d_max_um=self.d_max_um)
            self._epoch, self._batch = self._epoch + 1, 0

    def _units(self, epoch: int) -> Iterator[tuple[_Slide, np.ndarray]]:
        """(slide, rows) units in file/slide order; rows is (1,) for spots, (group_size,) for groups."""
        files = rank_files(self.files, self.rank, self.world_size, seed=self.seed, epoch=epoch, shuffle=self.shuffle)
        columns = _SPATIAL_COLUMNS if self.mode == "spatial" else _SPOT_COLUMNS
        n_genes = self.tokenizer.n_genes
        for table in self.corpus.iter_slides(files=files, columns=columns):
            slide = _Slide(table_to_csr(table, n_genes), table.column("spot_id").to_numpy(zero_copy_only=False),
                           table.column("slide_id").to_numpy(zero_copy_only=False),
                           table.column("spot_index").to_numpy(zero_copy_only=False).astype(np.int64))
            if self.mode == "spatial":
                sid = str(slide.slide_ids[0]) if table.num_rows else ""
                rows = spatial_groups(table, group_size=self.group_size, d_max_um=self.d_max_um,
                                      seed=self.seed, epoch=epoch, um_per_px=self._um_per_px.get(sid))
            else:
                rows = np.arange(table.num_rows, dtype=np.int64)[:, None]
            self._stats["spots"] += table.num_rows
            self._stats["slides"] += 1
            self._stats["groups"] += len(rows) if self.mode == "spatial" else 0
            for r in rows:
                yield slide, r

    def _plan(self, epoch: int) -> Iterator[list[tuple[_Slide, np.ndarray]]]:
        """Batches as lists of units (no tokenization): buffered shuffle, fixed by (seed, epoch, rank)."""
        rng = np.random.default_rng([int(self.seed), int(epoch), int(self.rank), 11])
        buffer: list[tuple[_Slide, np.ndarray]] = []
        k = self.units_per_batch

        def drain(final: bool) -> Iterator[list]:
            nonlocal buffer
            if self.shuffle:
                buffer = [buffer[i] for i in rng.permutation(len(buffer))]
            n_full = len(buffer) // k
            for b in range(n_full):
                yield buffer[b * k:(b + 1) * k]
            buffer = buffer[n_full * k:]
            if final and buffer and not self.drop_last:
                yield buffer
                buffer = []

        for unit in self._units(epoch):
            buffer.append(unit)
            if len(buffer) >= self.buffer_units:
                yield from drain(final=False)
        yield from drain(final=True)

    def _materialize(self, units: list[tuple[_Slide, np.ndarray]]) -> Batch:
        import torch

        rows = np.concatenate([r for _, r in units])
        slide_of = np.repeat(np.arange(len(units)), [len(r) for _, r in units])
        by_slide: dict[int, list[int]] = {}
        slides: dict[int, _Slide] = {}
        for u, (slide, _) in enumerate(units):
            by_slide.setdefault(id(slide), []).append(u)
            slides[id(slide)] = slide
        positions, parts = [], []
        spot_ids, slide_ids = np.empty(rows.size, dtype=object), np.empty(rows.size, dtype=object)
        spot_index = np.empty(rows.size, dtype=np.int64)
        for key, us in by_slide.items():
            pos = np.flatnonzero(np.isin(slide_of, us))
            positions.append(pos)
            slide = slides[key]
            parts.append(slide.csr[rows[pos]])
            spot_ids[pos] = slide.spot_ids[rows[pos]]
            slide_ids[pos] = slide.slide_ids[rows[pos]]
            spot_index[pos] = slide.spot_index[rows[pos]]
        ids = self.tokenizer.encode_csr(sp.vstack(parts, format="csr"))
        out = np.empty_like(ids)
        out[np.concatenate(positions)] = ids
        input_ids = torch.from_numpy(to_model_input_ids(out, self.tokenizer.pad_value, self.context_length)
                                     .astype(np.int64))
        groups = None
        if self.mode == "spatial":  # units are whole groups, laid out seed first; the objective reads these
            groups = torch.arange(rows.size, dtype=torch.int64).reshape(len(units), self.group_size)
        return Batch(input_ids=input_ids, spot_ids=spot_ids.tolist(), slide_ids=slide_ids.tolist(),
                     spot_index=spot_index, groups=groups)
