"""Shards -> token batches for training and embedding: streaming, shuffled, DDP-aware, resumable.

``TokenBatchLoader`` reads a corpus (local shard directory or Hub dataset id, through
``spavis.format``) one slide at a time and yields dicts of torch tensors:

* ``mode="spots"`` (stage 1, independent spots; also embedding): ``input_ids`` (B, L) int64
  and ``spot_ids`` (list of B str).
* ``mode="spatial"`` (stage 2, Algorithm 2): batches of ``groups_per_batch`` groups (24 x 9
  = 216 spots): ``input_ids`` (G*9, L) with group g in rows 9g..9g+8 (seed first),
  ``groups`` (G, 9) int64 row indices into ``input_ids``, and ``spot_ids``.

``input_ids`` are model inputs: the first ``context_length`` tokens, padded with PAD=1
(stamp-v1 tokenizers pad with 0; that is remapped here).

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
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import scipy.sparse as sp

from stamp.batching import D_MAX_UM, GROUP_SIZE, GROUPS_PER_BATCH, spatial_groups
from stamp.errors import DataError
from stamp.tokenizer import NATIVE_MAX_LENGTH, GeneTokenizer, table_to_csr, to_model_input_ids

logger = logging.getLogger(__name__)

MODES = ("spots", "spatial")
_SPOT_COLUMNS = ["spot_id", "gene_index", "counts"]
_SPATIAL_COLUMNS = _SPOT_COLUMNS + ["spot_index", "neighbors", "neighbor_distances",
                                    "pxl_row", "pxl_col", "array_row", "array_col"]


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


@dataclass
class _Slide:
    csr: sp.csr_matrix
    spot_ids: np.ndarray


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
        if len(data.genes) != tokenizer.n_genes:
            raise DataError(
                f"{data!r} has a {len(data.genes)}-gene vocabulary but the tokenizer has {tokenizer.n_genes}; "
                "use the tokenizer built from this corpus (GeneTokenizer.from_corpus) or matching shards"
            )
        self.mode = mode
        self.units_per_batch = groups_per_batch if mode == "spatial" else batch_size
        self.group_size, self.d_max_um = group_size, d_max_um
        self.context_length = context_length
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle, self.epochs, self.drop_last = shuffle, epochs, drop_last
        unit = group_size if mode == "spatial" else 1
        self.buffer_units = max(self.units_per_batch, shuffle_buffer // unit) if shuffle else self.units_per_batch
        self._epoch, self._batch = 0, 0
        self.files = list(data.expression_files)
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
    def __iter__(self) -> Iterator[dict[str, Any]]:
        while self.epochs is None or self._epoch < self.epochs:
            skip = self._batch
            for i, plan in enumerate(self._plan(self._epoch)):
                if i < skip:
                    continue
                batch = self._materialize(plan)
                self._batch = i + 1
                yield batch
            self._epoch, self._batch = self._epoch + 1, 0

    def _units(self, epoch: int) -> Iterator[tuple[_Slide, np.ndarray]]:
        """(slide, rows) units in file/slide order; rows is (1,) for spots, (group_size,) for groups."""
        files = rank_files(self.files, self.rank, self.world_size, seed=self.seed, epoch=epoch, shuffle=self.shuffle)
        columns = _SPATIAL_COLUMNS if self.mode == "spatial" else _SPOT_COLUMNS
        n_genes = self.tokenizer.n_genes
        for table in self.corpus.iter_slides(files=files, columns=columns):
            slide = _Slide(table_to_csr(table, n_genes), table.column("spot_id").to_numpy(zero_copy_only=False))
            if self.mode == "spatial":
                rows = spatial_groups(table, group_size=self.group_size, d_max_um=self.d_max_um,
                                      seed=self.seed, epoch=epoch)
            else:
                rows = np.arange(table.num_rows, dtype=np.int64)[:, None]
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

    def _materialize(self, units: list[tuple[_Slide, np.ndarray]]) -> dict[str, Any]:
        import torch

        rows = np.concatenate([r for _, r in units])
        slide_of = np.repeat(np.arange(len(units)), [len(r) for _, r in units])
        by_slide: dict[int, list[int]] = {}
        slides: dict[int, _Slide] = {}
        for u, (slide, _) in enumerate(units):
            by_slide.setdefault(id(slide), []).append(u)
            slides[id(slide)] = slide
        positions, parts, spot_ids = [], [], np.empty(rows.size, dtype=object)
        for key, us in by_slide.items():
            pos = np.flatnonzero(np.isin(slide_of, us))
            positions.append(pos)
            parts.append(slides[key].csr[rows[pos]])
            spot_ids[pos] = slides[key].spot_ids[rows[pos]]
        ids = self.tokenizer.encode_csr(sp.vstack(parts, format="csr"))
        out = np.empty_like(ids)
        out[np.concatenate(positions)] = ids
        batch: dict[str, Any] = {
            "input_ids": torch.from_numpy(
                to_model_input_ids(out, self.tokenizer.pad_value, self.context_length).astype(np.int64)),
            "spot_ids": spot_ids.tolist(),
        }
        if self.mode == "spatial":
            batch["groups"] = torch.arange(rows.size, dtype=torch.int64).reshape(len(units), self.group_size)
        return batch
